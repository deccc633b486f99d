"""What `train.py` does with a composed config: prepare, build, fit, finish.

The run is config-driven and stage-agnostic: `cfg.prepare` lists idempotent steps that must
hold before training (generate shards, cache features), `cfg.data` is a LightningDataModule,
`cfg.stage` the LightningModule, and a stage that defines `finish(run_dir, datamodule)`
gets it after fitting (benchmark, export, summary). Every config value is checked before
anything is built (:mod:`kontext.config_check`), a run that trained no step stops with an error
instead of finishing, and errors about the user's input are printed as one line (see
:mod:`kontext.errors`).
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import sys
import time
from pathlib import Path

import lightning as L
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback, LearningRateMonitor, TQDMProgressBar
from lightning.pytorch.strategies import ModelParallelStrategy
from omegaconf import DictConfig, OmegaConf

from kontext.config_check import check_config
from kontext.errors import KontextError
from kontext.formats.checkpoint import find_resume_checkpoint
from kontext.formats.safe_load import weights_only_loads
from kontext.network.attention import set_attention_backend
from kontext.scale import slurm
from kontext.stages.metrics import Throughput

log = logging.getLogger(__name__)
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
ASSETS = Path(__file__).resolve().parent / "assets"


def run_name(overrides: str) -> str:
    """A directory name for a set of overrides: readable, no slashes, at most ~80 characters."""
    if not overrides:
        return "default"
    name = overrides.replace("/", "_")
    if len(name) > 80:
        name = f"{name[:60]}-{hashlib.sha1(overrides.encode()).hexdigest()[:8]}"
    return name


def register_resolvers() -> None:
    """`${run_name:${hydra:job.override_dirname}}`: a stable run directory per distinct
    set of overrides, so rerunning the same command finds (and resumes) its own run."""
    if not OmegaConf.has_resolver("run_name"):
        OmegaConf.register_new_resolver("run_name", run_name)
    if not OmegaConf.has_resolver("kontext_asset"):
        OmegaConf.register_new_resolver("kontext_asset", lambda name: str(ASSETS / name))
    if not OmegaConf.has_resolver("wandb_run_id"):
        from kontext.stages.metrics import persistent_run_id

        OmegaConf.register_new_resolver("wandb_run_id", persistent_run_id)


def run(cfg: DictConfig) -> dict:
    """Prepare, build and fit the configured stage; returns the stage's final summary (if any)."""
    from hydra.errors import InstantiationException
    from omegaconf.errors import OmegaConfBaseException

    try:
        return _run(cfg)
    except (KontextError, FileNotFoundError, InstantiationException, OmegaConfBaseException) as err:
        # Hydra wraps what a constructor raised; report the user's problem, not the wrapper.
        while isinstance(err, InstantiationException) and err.__cause__ is not None:
            err = err.__cause__
        if not isinstance(err, KontextError | FileNotFoundError | InstantiationException | OmegaConfBaseException):
            raise err
        print(f"error: {one_line(err)}", file=sys.stderr)
        sys.exit(2)


def one_line(err: BaseException) -> str:
    lines = [line.strip() for line in str(err).strip().splitlines() if line.strip()]
    return "; ".join(lines[:2]) if lines else type(err).__name__


def _run(cfg: DictConfig) -> dict:
    check_config(cfg)
    run_dir = Path(cfg.paths.output_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    slurm.install()  # first: a preemption signal from now on only sets a flag (kontext/scale/slurm.py)
    ckpt = find_resume_checkpoint(cfg.get("resume"), run_dir / "checkpoints")
    L.seed_everything(cfg.seed, workers=True)
    set_attention_backend(cfg.get("attention", "auto"))
    if cfg.get("threads"):
        torch.set_num_threads(int(cfg.threads))
    timings: dict[str, float] = {}

    for name, step in (cfg.get("prepare") or {}).items():
        start = time.perf_counter()
        instantiate(step)
        timings[f"prepare/{name}"] = time.perf_counter() - start

    datamodule = instantiate(cfg.data)
    loggers = [instantiate(lg) for lg in (cfg.get("logger") or {}).values()]
    callbacks = [instantiate(c) for c in (cfg.get("callbacks") or {}).values()]
    throughput = Throughput()
    callbacks += [throughput, DataStats()]
    if not loggers:  # the learning-rate monitor refuses to run without a logger; it has nothing to do
        callbacks = [c for c in callbacks if not isinstance(c, LearningRateMonitor)]
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False,
                                     plugins=slurm.cluster_plugins() or None)
    if cfg.get("parallel") is not None and "meta_build" in cfg.parallel and cfg.parallel.meta_build is None:
        # Build on meta (and fill each rank's rows) exactly when the trainer shards the model.
        cfg.parallel.meta_build = isinstance(trainer.strategy, ModelParallelStrategy) and trainer.world_size > 1
    module = instantiate(cfg.stage)
    if trainer.is_global_zero:
        OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)

    start = time.perf_counter()
    # Lightning >= 2.6 takes weights_only itself; weights_only_loads forces it for older ones too.
    weights_only = {"weights_only": True} if "weights_only" in inspect.signature(trainer.fit).parameters else {}
    with weights_only_loads():
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt, **weights_only)
    timings["train"] = time.perf_counter() - start
    module.throughput = throughput.summary()
    module.data_stats = data_stats(datamodule)
    if (stop := slurm.stopped_for_requeue(trainer)) is not None:
        if trainer.is_global_zero:
            print(f"stopped at step {stop.stopped_at} for a requeue; checkpoint {stop.checkpoint}")
        requeued = stop.requeue_job(trainer)
        return {"steps": stop.stopped_at, "requeued": requeued, "checkpoint": stop.checkpoint}
    if trainer.global_step == 0:
        skipped = module.data_stats or {}
        raise KontextError(f"trained 0 steps, so nothing is benchmarked or exported ({skipped.get('seen', '?')} "
                           f"samples read, {skipped.get('corrupt', '?')} skipped {skipped.get('reasons', {})}); "
                           "check data.shards and trainer.max_steps / max_epochs")

    summary: dict = {}
    if hasattr(module, "finish") and trainer.is_global_zero and not trainer.fast_dev_run:
        summary = module.finish(run_dir, datamodule=datamodule, timings=timings) or {}
    if trainer.is_global_zero:
        (run_dir / "timings.json").write_text(json.dumps(timings, indent=2))
    return summary


def data_stats(datamodule) -> dict | None:
    """Samples read and skipped (by reason) by this rank's training loader, if it counts them."""
    return datamodule.stats() if hasattr(datamodule, "stats") else None


class DataStats(Callback):
    """Logs the training data's read and skipped samples (by reason) when training ends."""

    def on_train_end(self, trainer, pl_module):
        stats = data_stats(trainer.datamodule)
        if not stats:
            return
        if stats["corrupt"]:
            log.warning("skipped %d unreadable samples or shards of %d samples read: %s",
                        stats["corrupt"], stats["seen"], stats["reasons"])
        metrics = {"data/seen": stats["seen"], "data/skipped": stats["corrupt"],
                   **{f"data/skipped/{reason}": n for reason, n in stats["reasons"].items()}}
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=trainer.global_step)


class Progress(TQDMProgressBar):
    """Progress bar with loss, samples/s and the ETA (tqdm's) of the whole run."""

    def __init__(self, refresh_rate: int = 10):
        super().__init__(refresh_rate=refresh_rate)
        self._t0: float | None = None
        self._samples = 0

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self._t0 is None:
            self._t0 = time.perf_counter()
        else:
            self._samples += getattr(pl_module, "last_batch_size", 0)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def get_metrics(self, trainer, pl_module):
        metrics = super().get_metrics(trainer, pl_module)
        metrics.pop("v_num", None)
        if self._t0 is not None and self._samples:
            metrics["samples/s"] = f"{self._samples / (time.perf_counter() - self._t0):.0f}"
        return metrics


def main_guard(hydra_main, config_name: str) -> None:
    """Compose the config once up front so that an unknown override or a bad value is one
    clear line (exit 2) instead of Hydra's multi-line report; then run the Hydra app."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    args = [a for a in sys.argv[1:] if not a.startswith("-")]
    if "-m" not in sys.argv and "--multirun" not in sys.argv and not any(
        a.startswith(("hydra.", "hydra/", "+hydra")) for a in args
    ):
        try:
            with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
                compose(config_name, overrides=args)
        except (HydraException, OmegaConfBaseException) as err:
            print(f"error: {one_line(err)} (overrides: {' '.join(args) or 'none'})", file=sys.stderr)
            sys.exit(2)
    os.environ.setdefault("HYDRA_FULL_ERROR", "0")
    hydra_main()
