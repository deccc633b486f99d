"""Training checkpoints that survive a crash mid-save, and the choice of the one to resume from.

A checkpoint is a file (one process, or FSDP gathering to rank 0) or a folder of distributed
checkpoint shards plus `meta.pt` (FSDP, `save_distributed_checkpoint`). Either is written under
a `.partial` name and renamed into place once every rank has finished, so a crash mid-save
leaves a `.partial` that nothing reads and every earlier checkpoint intact. `resume=auto` takes
the complete checkpoint with the highest step.

Reading a checkpoint never runs code from it (:mod:`kontext.formats.safe_load`). A file that is
damaged or holds anything else is skipped by `resume=auto` with one line naming it.
:mod:`kontext.formats.consolidate` reads its full tensors; :mod:`kontext.artifact` reads a run's
weights (for sampling, a teacher or an export) through `newest_checkpoint` and `consolidate`.
"""

from __future__ import annotations

import logging
import os
import shutil
import warnings
import zipfile
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback, ModelCheckpoint

from kontext.errors import KontextError
from kontext.formats.safe_load import MetadataUnpickler, load_file, why
from kontext.formats.weights import shape_mismatches

PARTIAL = ".partial"
REPLACED = ".old"  # a finished checkpoint moved aside while its successor is renamed into place
META = "meta.pt"   # Lightning's non-tensor state inside a sharded checkpoint folder

log = logging.getLogger(__name__)


class CheckpointError(KontextError):
    """A checkpoint that is damaged, or holds something other than tensors and plain state."""


class AtomicCheckpoint(ModelCheckpoint):
    """Lightning's `ModelCheckpoint` whose every write (periodic, `last`, on request) is atomic."""

    def _save_checkpoint(self, trainer, filepath: str) -> None:
        partial = filepath + PARTIAL
        strategy = trainer.strategy
        if trainer.is_global_zero:
            remove(partial)  # left by an earlier crash
        strategy.barrier("atomic_checkpoint_clean")
        trainer.save_checkpoint(partial, self.save_weights_only)
        strategy.barrier("atomic_checkpoint_written")
        if trainer.is_global_zero:
            publish(partial, filepath)
        strategy.barrier("atomic_checkpoint_published")
        self._last_global_step_saved = trainer.global_step
        self._last_checkpoint_saved = filepath
        if trainer.is_global_zero:
            from weakref import proxy

            for logger in trainer.loggers:
                logger.after_save_checkpoint(proxy(self))

    def save_now(self, trainer) -> str:
        """Save `last` at this step (a requested save, e.g. before a requeue); returns its path."""
        if self._last_global_step_saved != trainer.global_step or not self.last_model_path:
            candidates = self._monitor_candidates(trainer)
            filepath = self.format_checkpoint_name(candidates, self.CHECKPOINT_NAME_LAST)
            self.last_model_path = filepath
            self._save_checkpoint(trainer, filepath)
        return self.last_model_path


class RankStates(Callback):
    """What differs between ranks, which Lightning keeps from rank 0 alone: every rank's random
    generators (torch CPU and CUDA, numpy, python) and its data loader position. Gathered into
    the checkpoint when saving; on resume each rank takes its own back, so that data and
    randomness continue exactly where they stopped. A run resumed on another number of ranks
    keeps its fresh seeds and starts a new data epoch, and says so."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        from lightning.fabric.utilities.seed import _collect_rng_states

        rng = _collect_rng_states()
        if "numpy" in rng:  # as a tensor: checkpoints stay loadable with torch.load(weights_only=True)
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            rng["numpy"] = (kind, torch.from_numpy(keys.astype("int64")), pos, has_gauss, gauss)
        mine = {"rng": rng, "data": _fit_loop_state(checkpoint).get("combined_loader")}
        states = [mine]
        if _distributed():
            states = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(states, mine)
        checkpoint["per_rank"] = states

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        from lightning.fabric.utilities.seed import _set_rng_states

        states = checkpoint.get("per_rank", [])
        rank, world = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if _distributed() else (0, 1)
        if len(states) != world:
            warnings.warn(f"checkpoint holds the states of {len(states)} ranks, this run has {world}: "
                          "keeping this run's seeds", stacklevel=2)
            return
        rng = dict(states[rank]["rng"])
        if "numpy" in rng:
            kind, keys, pos, has_gauss, gauss = rng["numpy"]
            rng["numpy"] = (kind, keys.numpy().astype("uint32"), pos, has_gauss, gauss)
        _set_rng_states(rng)
        # The loops are restored from this same dict right after the callbacks: give them this rank's position.
        if states[rank]["data"] is not None and "loops" in checkpoint:
            _fit_loop_state(checkpoint)["combined_loader"] = states[rank]["data"]


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _fit_loop_state(checkpoint: dict) -> dict:
    return checkpoint.get("loops", {}).get("fit_loop", {}).get("state_dict", {})


def remove(path: str | os.PathLike) -> None:
    path = Path(path)
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    elif path.exists() or path.is_symlink():
        path.unlink()


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(partial: str | os.PathLike, final: str | os.PathLike) -> None:
    """Move a finished write into place. A file replaces a file in one rename; a folder (or a
    change of kind) moves the previous checkpoint aside first, so at every instant either it or
    its successor is complete under a name that `complete_checkpoints` accepts."""
    partial, final = Path(partial), Path(final)
    for f in [partial] if partial.is_file() else [p for p in partial.rglob("*") if p.is_file()]:
        _fsync(f)
    if partial.is_file() and (final.is_file() or not final.exists()):
        os.replace(partial, final)
    else:
        aside = final.with_name(final.name + REPLACED)
        remove(aside)
        if final.exists():
            os.rename(final, aside)
        os.rename(partial, final)
        remove(aside)
    _fsync(final.parent)


def is_complete(path: Path) -> bool:
    """A checkpoint that can be read: a zip file (torch.save's format) that is whole, or a
    sharded folder with its metadata."""
    if path.name.endswith(PARTIAL):
        return False
    if path.is_dir():
        return (path / META).is_file() and (path / ".metadata").is_file()
    return path.is_file() and zipfile.is_zipfile(path)


def check_complete(path: Path) -> None:
    """A `CheckpointError` that says why, unless `is_complete(path)`."""
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if not is_complete(path):
        what = "a sharded checkpoint folder without its metadata" if path.is_dir() else \
            "truncated or not a PyTorch checkpoint (no zip directory)"
        raise CheckpointError(f"checkpoint {path} is {what}")


def read_state(path: Path) -> dict:
    """A checkpoint's pickled state (its tensors mapped, not read; a sharded folder's `meta.pt`),
    which checks the whole record. A damaged or untrusted checkpoint is a `CheckpointError`."""
    path = Path(path)
    try:
        if path.is_dir():
            with open(path / ".metadata", "rb") as f:
                MetadataUnpickler(f).load()
            return load_file(path / META, mmap=True) if (path / META).is_file() else {}
        return load_file(path, mmap=True)
    except Exception as err:  # torch.load and pickle raise many types for a damaged file
        raise CheckpointError(f"checkpoint {path} is unusable: {why(err)}") from err


def checkpoint_step(path: Path) -> int:
    """The global step a checkpoint was saved at, once the checkpoint has been checked whole."""
    path = Path(path)
    check_complete(path)
    state = read_state(path)
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise CheckpointError(f"checkpoint {path} is not a Lightning checkpoint (no global_step)")
    return state["global_step"]


def complete_checkpoints(ckpt_dir: Path) -> list[Path]:
    """Intact checkpoints in `ckpt_dir`, oldest step first (ties: older file first); each damaged
    one is logged in one line and left out."""
    intact, damaged = _scan(Path(ckpt_dir))
    _log_skipped(damaged)
    return [path for path, _ in intact]


def newest_checkpoint(ckpt_dir: Path) -> tuple[Path | None, list[tuple[Path, CheckpointError]]]:
    """The checkpoint of a run: the intact one with the highest step in `ckpt_dir` (ties: the
    newer file), the one `resume=auto` resumes from and `kontext.artifact` reads; None when there
    is none. Also the damaged ones with their errors, each logged in one line when passed over
    for an intact one (with none intact, the caller reports them)."""
    intact, damaged = _scan(Path(ckpt_dir))
    if intact:
        _log_skipped(damaged)
    return (intact[-1][0] if intact else None), damaged


def _scan(ckpt_dir: Path) -> tuple[list[tuple[Path, int]], list[tuple[Path, CheckpointError]]]:
    if not ckpt_dir.is_dir():
        return [], []
    intact, damaged = [], []
    for p in ckpt_dir.iterdir():
        if not (p.name.endswith(".ckpt") or p.name.endswith(".ckpt" + REPLACED)):
            continue  # a `.partial` is a write that never finished: not a checkpoint
        try:
            intact.append((p, checkpoint_step(p)))
        except CheckpointError as err:
            damaged.append((p, err))
    return sorted(intact, key=lambda ps: (ps[1], ps[0].stat().st_mtime)), sorted(damaged, key=lambda pe: pe[0])


def _log_skipped(damaged: list[tuple[Path, CheckpointError]]) -> None:
    for _, err in damaged:
        log.warning("skipped: %s", err)


def check_resumable(module: torch.nn.Module, checkpoint: dict) -> None:
    """Raise a one-line CheckpointError when a training checkpoint's tensors do not fit `module`
    (the run's model config changed since it was saved), before Lightning's wall of size errors."""
    state = checkpoint.get("state_dict")
    if not isinstance(state, dict):
        return
    wrong = shape_mismatches(module.state_dict(), state)
    if wrong:
        key, theirs, ours = wrong[0]
        raise CheckpointError(
            f"the checkpoint to resume was trained with another model shape ({len(wrong)} tensors differ, "
            f"e.g. {key}: {list(theirs)} there, {list(ours)} in this config); resume=null or a new "
            "paths.output_dir starts afresh")


def find_resume_checkpoint(resume, ckpt_dir: Path) -> str | None:
    """`resume`: null/false = start fresh; `auto` = the checkpoint of the run (`newest_checkpoint`;
    none at all: start fresh; only damaged ones: an error, since starting over must be asked
    for); anything else is a path to an intact checkpoint."""
    if resume in (None, False, "none", "null"):
        return None
    if resume == "auto":
        newest, damaged = newest_checkpoint(Path(ckpt_dir))
        if newest is None and damaged:
            _log_skipped(damaged)
            raise CheckpointError(f"no intact checkpoint to resume from in {ckpt_dir} (damaged: "
                                  f"{', '.join(p.name for p, _ in damaged)}); resume=null starts afresh")
        return None if newest is None else str(newest)
    path = Path(str(resume))
    if not path.exists():
        raise CheckpointError(f"resume checkpoint not found: {path}")
    checkpoint_step(path)
    return str(path)
