"""One reader of what training and export leave on disk: any trained artifact -> its transformer.

`read_artifact` tells its source apart by what is there:
- a run directory (`config.yaml`, `checkpoints/`): the checkpoint `resume=auto` would take (the
  intact one with the highest step, :func:`kontext.formats.checkpoint.newest_checkpoint`), or, for a run
  without checkpoints, its `export/` folder;
- a training checkpoint of the flow stage: a `.ckpt` file, or a folder of FSDP shards (Lightning's
  distributed checkpoint, consolidated here in one process), with the `config.yaml` of its run;
- an export folder (:mod:`kontext.export`): `config.json` and `transformer.safetensors`;
- a reference-format transformer `.safetensors` file (its params recorded in it, or given).

It returns an :class:`Artifact`: the `FluxParams`, the weights to sample with (a checkpoint's
EMA), a checkpoint's raw weights when asked for, and the run's config or the export's
`config.json` for the rest (autoencoder, text encoder, sampler: :mod:`kontext.formats.loading`). The
pipeline (`sample.py`), a run's starting weights (`stage.init_from`, a LoRA base), the
distillation teacher and student source, the export and this module's command read through it
(`load_model` for a whole transformer, `source_rows`/`weight_rows` for a model sharded on `meta`);
the command writes the transformer as a reference-format file:

    python -m kontext.artifact RUN_DIR|CHECKPOINT transformer.safetensors [--raw] [--dtype bf16]

A sharded checkpoint is exported without gathering it: `sharded_artifact` reads all but its
weights, and :mod:`kontext.formats.stream_export` writes the file tensor by tensor.

A run's config builds only the project's own classes and holds no interpolation
(:mod:`kontext.formats.run_config`), and a checkpoint is read weights-only
(:mod:`kontext.formats.checkpoint`): reading someone else's run never runs their code. Every
problem with the source is a one-line :class:`KontextError`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from kontext.errors import KontextError, first_line
from kontext.formats.run_config import build_from_run_config, read_run_config
from kontext.network.model import Flux, FluxParams

if TYPE_CHECKING:
    from omegaconf import DictConfig

    from kontext.formats.slices import Rows

log = logging.getLogger(__name__)

EMA_PREFIX = "ema.model."  # a flow-stage checkpoint's EMA transformer, under `state_dict.`
RAW_PREFIX = "model."
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # the command's --dtype
EXPORT_FORMAT = "kontext-export"


@dataclass
class Artifact:
    """A trained transformer as read from disk, with what its source records besides."""

    params: FluxParams
    ema: dict[str, Tensor]  # the weights to sample with: a checkpoint's EMA, a file's weights
    raw: dict[str, Tensor] | None  # a checkpoint's trained weights before averaging, if asked for
    path: Path  # the checkpoint (file or folder), export folder or file the weights came from
    run_config: DictConfig | None = None  # a checkpoint's run `config.yaml`, read safely
    export_config: dict | None = None  # an export folder's `config.json`
    config_path: Path | None = None  # the file run_config or export_config came from

    @staticmethod
    def state_prefix(raw: bool = False) -> str:
        """The key prefix of a flow-stage checkpoint's EMA (or, `raw`, trained) transformer."""
        return "state_dict." + (RAW_PREFIX if raw else EMA_PREFIX)

    def transformer(self, raw: bool = False, device: str | torch.device = "cpu",
                    dtype: torch.dtype | None = None) -> Flux:
        """The `Flux` with the EMA (or raw) weights, built strictly per `params`; for a LoRA run
        (`stage.lora` in its config) its base `stage.init_from` with those adapters merged in."""
        from kontext.network.model import flux_from_weights

        weights = self.raw if raw else self.ema
        if weights is None:
            raise KontextError(f"{self.path} holds no raw weights (only a training checkpoint does)")
        what = (f"{'raw' if raw else 'EMA'} weights in {self.path} (config {self.config_path})"
                if self.run_config is not None else f"Flux weights in {self.path}")
        lora = self.lora
        if lora is None:
            return flux_from_weights(self.params, weights, what, device=device, dtype=dtype)
        return self._merged_lora_run(weights, float(lora["alpha"]), what).to(device=device, dtype=dtype)

    @property
    def lora(self):
        """A LoRA run's `stage.lora` section (its weights are adapters on `stage.init_from`), else None."""
        if self.run_config is None:
            return None
        from omegaconf import OmegaConf

        return OmegaConf.select(self.run_config, "stage.lora", default=None)

    def _merged_lora_run(self, adapters: dict[str, Tensor], alpha: float, what: str) -> Flux:
        from omegaconf import OmegaConf

        from kontext.formats.lora_files import merge
        from kontext.network.lora import adapters_from_state

        base = OmegaConf.select(self.run_config, "stage.init_from", default=None)
        if not base or not Path(str(base)).expanduser().exists():
            raise KontextError(f"{self.path} is a LoRA run whose base stage.init_from={base} is not there")
        model = load_model(str(base), self.params, f"the base of LoRA run {self.path}")
        if kind := OmegaConf.select(self.run_config, "stage.lora.quantize_base", default=None):
            # the weights the adapters trained with, as the run's own export has them
            from kontext.network.lora import precision_dtype
            from kontext.network.quantized import rounded_as_trained

            rounded_as_trained(model, kind, precision_dtype(OmegaConf.select(self.run_config, "trainer.precision",
                                                                             default="32-true")))
        return merge(model, adapters_from_state(adapters, alpha), what=f"the adapters ({what})")


def read_artifact(source: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
                  config: str | os.PathLike | None = None, params: FluxParams | str | None = None,
                  raw: bool = False, device: str | torch.device = "cpu", weights: bool = True) -> Artifact:
    """The transformer of `source` (see the module docstring).

    checkpoint: in a run directory, the checkpoint to read instead of the newest (a path, or a
      name under `checkpoints/`); config: the run config of a checkpoint that is not in its run's
      `checkpoints/`; params: the architecture of a reference file that records none; raw: also
      read a checkpoint's raw weights; device: where a safetensors file is read to (checkpoint
      tensors stay on the CPU, memory-mapped where the format allows); weights=False: a
      checkpoint's tensors on the meta device (shapes and dtypes from its metadata, none read)."""
    kind, path, config = locate(source, checkpoint, config)
    if kind == "file":
        from kontext.network.model import read_flux

        params, tensors = read_flux(path, params, device=device)
        return Artifact(params, tensors, None, path)
    if kind == "export":
        return _read_export(path, device)
    return _read_checkpoint(path, config, raw, weights)


def existing(source: str | os.PathLike, what: str) -> Path:
    """`source` as a path, or a one-line error naming it as `what` (e.g. "teacher") if it is not there."""
    path = Path(source).expanduser()
    if not path.exists():
        raise KontextError(f"{what} not found: {path} (give a run directory, a training checkpoint, an export "
                           "folder or a reference-format .safetensors)")
    return path


def load_model(source: str | os.PathLike, params: FluxParams | str | None = None, what: str = "trained model",
               device: str | torch.device = "cpu") -> Flux:
    """The transformer of `source` (`read_artifact`): a checkpoint's EMA weights, a LoRA run's
    merged into its base, a file's tensors in the file's dtype. `params` is needed only for a
    bare reference-format file that records none."""
    return read_artifact(existing(source, what), params=params, device=device).transformer(device=device)


def source_rows(source: str | os.PathLike | Flux, what: str = "model", read: bool = True,
                params: FluxParams | str | None = None) -> tuple[FluxParams, Rows | None]:
    """The architecture of `source` and a reader of its weights' rows, nothing read yet
    (`weight_rows`); a LoRA run's weights are merged whole (said in the log), unless `read=False`,
    which gives the architecture alone. A model in memory is its own rows."""
    from kontext.formats.slices import TensorRows

    if isinstance(source, Flux):
        return source.params, TensorRows(source.state_dict())
    path = existing(source, what)
    params, rows = weight_rows(path, params)
    if rows is None and read:
        log.info("%s %s is a LoRA run: its adapters are merged into its base whole", what, source)
        rows = TensorRows(load_model(path, what=what).state_dict())
    return params, rows


def weight_rows(source: str | os.PathLike, params: FluxParams | str | None = None,
                raw: bool = False) -> tuple[FluxParams, Rows | None]:
    """The architecture of `source` (as `read_artifact` reads it) and a reader of its weights'
    rows (:mod:`kontext.formats.slices`) that has read no tensor yet: a model sharded on `meta` takes
    only its rows from it. No reader (None) for a LoRA run, whose weights are a merge computed whole."""
    from kontext.formats.slices import FileRows, FolderRows, TensorRows
    from kontext.network.model import CHECKPOINT_PREFIXES, file_params

    kind, path, config = locate(source)
    if kind == "file":
        return file_params(path, params), FileRows(path, CHECKPOINT_PREFIXES)
    if kind == "export":
        return _export_params(path, read_export_config(path)), FileRows(path / "transformer.safetensors",
                                                                        CHECKPOINT_PREFIXES)
    # A checkpoint file's tensors are memory-mapped, not read (rows are read as touched); a
    # sharded folder's are read one tensor at a time.
    artifact = _read_checkpoint(path, config, raw, weights=path.is_file())
    if artifact.lora is not None:
        return artifact.params, None
    if path.is_dir():
        return artifact.params, FolderRows(path, Artifact.state_prefix(raw))
    return artifact.params, TensorRows(artifact.raw if raw else artifact.ema)


def locate(source: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
           config: str | os.PathLike | None = None) -> tuple[str, Path, Path | None]:
    """What `read_artifact(source, checkpoint=, config=)` reads: ("file", the .safetensors, None),
    ("export", the folder, None) or ("checkpoint", the checkpoint file or folder, its run config
    if known)."""
    path = existing(source, "trained model")
    if path.is_file() and path.suffix == ".safetensors":
        return "file", path, None
    if path.is_dir() and (path / "config.json").is_file():
        return "export", path, None
    if path.is_dir() and not _is_checkpoint_folder(path):  # a run directory
        run_dir, path = path, _run_checkpoint(path, checkpoint)
        if path is None:
            if (run_dir / "export" / "config.json").is_file():
                return "export", run_dir / "export", None
            raise KontextError(f"{run_dir} has no checkpoints/*.ckpt and no export/ folder")
        config = config or run_dir / "config.yaml"
    return "checkpoint", path, None if config is None else Path(config)


def sharded_artifact(source: str | os.PathLike, raw: bool = False) -> Artifact | None:
    """`read_artifact(source, raw=raw)` without its weights (meta tensors) when `source` is, or
    resolves to, a sharded checkpoint folder of a run that is not a LoRA run: an export streams
    its weights tensor by tensor (:mod:`kontext.formats.stream_export`). None for any other source, and
    for a missing one (the caller's own reader says what is wrong)."""
    if not Path(source).expanduser().exists():
        return None
    kind, path, config = locate(source)
    if kind != "checkpoint" or not path.is_dir():
        return None
    artifact = _read_checkpoint(path, config, raw, weights=False)
    return None if artifact.lora is not None else artifact


def _is_checkpoint_folder(path: Path) -> bool:
    from kontext.formats.checkpoint import META

    return path.suffix == ".ckpt" or (path / ".metadata").is_file() or (path / META).is_file()


def _run_checkpoint(run_dir: Path, checkpoint: str | os.PathLike | None) -> Path | None:
    """The given checkpoint, else the one `resume=auto` takes; None when the run has none."""
    from kontext.formats.checkpoint import CheckpointError, newest_checkpoint

    if checkpoint is not None:
        path = Path(checkpoint).expanduser()
        return path if path.exists() else run_dir / "checkpoints" / path
    newest, damaged = newest_checkpoint(run_dir / "checkpoints")
    if newest is None and damaged:
        raise CheckpointError(f"{run_dir} has no intact checkpoint: {'; '.join(str(err) for _, err in damaged)}")
    return newest


def _read_checkpoint(path: Path, config: str | os.PathLike | None, raw: bool, weights: bool = True) -> Artifact:
    from kontext.formats.consolidate import consolidate

    if config is None:  # RUN/checkpoints/x.ckpt, or a checkpoint beside its config
        here = Path(os.path.abspath(path))
        candidates = [here.parent.parent / "config.yaml", here.parent / "config.yaml"]
        config = next((c for c in candidates if c.is_file()), candidates[0])
    config = Path(config)
    cfg = read_run_config(config)
    params = build_from_run_config(cfg.get("model"), "model", config)
    ema = consolidate(path, Artifact.state_prefix(), read=weights)
    if not ema:
        raise KontextError(f"{path} holds no EMA weights (keys {EMA_PREFIX}*); is it a flow-stage checkpoint?")
    trained = consolidate(path, Artifact.state_prefix(raw=True), read=weights) if raw else None
    return Artifact(params, ema, trained, path, run_config=cfg, config_path=config)


# ----------------------------------------------------------------------------- export folders
def read_export_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise KontextError(f"export folder {folder} has no config.json")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise KontextError(f"cannot read {path}: {first_line(err)}") from err
    fmt = cfg.get("format") if isinstance(cfg, dict) else None
    if fmt != EXPORT_FORMAT:
        raise KontextError(f"{path} is not a Kontext export (format {fmt!r})")
    return cfg


def _export_params(folder: Path, cfg: dict) -> FluxParams:
    try:
        return FluxParams(**cfg["model"])
    except (KeyError, TypeError, ValueError) as err:
        raise KontextError(f"{folder}/config.json has unusable model params: {first_line(err)}") from err


def _read_export(folder: Path, device: str | torch.device) -> Artifact:
    from kontext.network.model import read_flux

    cfg = read_export_config(folder)
    params = _export_params(folder, cfg)
    _, weights = read_flux(folder / "transformer.safetensors", params, device=device)
    return Artifact(params, weights, None, folder, export_config=cfg, config_path=folder / "config.json")


# ----------------------------------------------------------------------------- the command
def export_transformer(source: str | os.PathLike, out: str | os.PathLike, ema: bool = True,
                       dtype: torch.dtype | None = None) -> Path:
    """The transformer of `source` (a checkpoint's EMA, or with `ema=False` its raw weights) as a
    reference-format safetensors file, cast to `dtype` (default: as stored). A sharded checkpoint
    is written tensor by tensor, never gathered whole."""
    from kontext.network.model import flux_metadata, save_flux

    sharded = sharded_artifact(source, raw=not ema)
    if sharded is not None:
        from kontext.formats.stream_export import stream_transformer

        return stream_transformer(sharded, out, raw=not ema, dtype=dtype, metadata=flux_metadata(sharded.params))
    return Path(save_flux(read_artifact(source, raw=not ema).transformer(raw=not ema, dtype=dtype), out))


def main(argv: list[str] | None = None) -> None:
    import argparse

    parser = argparse.ArgumentParser(description="Write the transformer of a run, a training checkpoint (file or "
                                     "FSDP folder) or an export as a reference-format safetensors file.")
    parser.add_argument("source")
    parser.add_argument("out")
    parser.add_argument("--raw", action="store_true", help="a checkpoint's trained weights instead of their EMA")
    parser.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: as stored)")
    args = parser.parse_args(argv)
    print(export_transformer(args.source, args.out, ema=not args.raw, dtype=DTYPES.get(args.dtype)))


if __name__ == "__main__":
    from kontext.cli import run_main

    run_main(main)
