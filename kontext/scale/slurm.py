"""Preemption and requeue under SLURM (slurm/train.sbatch: `--signal=USR1@90 --requeue`).

SLURM signals every task of the job some time before its time limit. The handler only sets a
flag: saving inside a signal handler can hang or leave a corrupt checkpoint. At the next
optimizer-step boundary the ranks agree that one of them was signalled, save one checkpoint
together (atomically, see `kontext.formats.checkpoint`) and stop; once the loggers are flushed, rank 0
runs `scontrol requeue` and the run ends without its end-of-run work (`kontext.run`). The
requeued job runs the same command: the run directory is
the same (it depends only on the overrides), `resume=auto` continues from that checkpoint, and
the wandb run id kept in the run directory continues the same wandb run.

Lightning's own SLURM requeue (which saves inside the handler) is switched off: see
`cluster_plugins`.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import torch
from lightning.pytorch.callbacks import Callback

_requested: int | None = None


def _flag(signum, frame) -> None:
    global _requested
    _requested = signum


def install(signals: tuple[str, ...] = ("SIGUSR1",)) -> None:
    """Install the flag-only handler. Call it early: before it, SIGUSR1 kills the process; data
    loader workers forked after it inherit it (SLURM signals every process of the job step)."""
    for name in signals:
        signal.signal(getattr(signal, name), _flag)


def requested() -> int | None:
    """The signal received since `install` (or None)."""
    return _requested


def clear() -> None:
    global _requested
    _requested = None


def in_slurm_job() -> bool:
    return "SLURM_JOB_ID" in os.environ


def job_id() -> str:
    """The id `scontrol requeue` takes: ARRAYJOB_TASK for an array element, else the job id."""
    if "SLURM_ARRAY_JOB_ID" in os.environ and "SLURM_ARRAY_TASK_ID" in os.environ:
        return f"{os.environ['SLURM_ARRAY_JOB_ID']}_{os.environ['SLURM_ARRAY_TASK_ID']}"
    return os.environ["SLURM_JOB_ID"]


def requeue() -> bool:
    """Put this job back in the queue (it then ends this allocation); True on success."""
    out = subprocess.run(["scontrol", "requeue", job_id()], capture_output=True, text=True)
    if out.returncode != 0:
        print(f"scontrol requeue {job_id()} failed: {out.stderr.strip()}", file=sys.stderr)
    return out.returncode == 0


def cluster_plugins() -> list:
    """Trainer plugins for the cluster environment: under `srun`, Lightning's SLURM environment
    with its save-in-the-handler requeue switched off (RequeueOnSignal does it at a step boundary)."""
    from lightning.fabric.plugins.environments import SLURMEnvironment

    return [SLURMEnvironment(auto_requeue=False)] if SLURMEnvironment.detect() else []


class RequeueOnSignal(Callback):
    """On a requested signal: save at the next step boundary and stop; `requeue_job` afterwards.

    `check_every_n_steps`: how often the ranks compare flags (one all-reduce of one number)."""

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGUSR1",), requeue: bool = True,
                 check_every_n_steps: int = 1):
        self.signals = tuple(signals)
        self.requeue = requeue
        self.every = max(1, int(check_every_n_steps))
        self.stopped_at: int | None = None  # the step saved at, once stopped for a requeue
        self.checkpoint: str | None = None
        self._last_step = -1

    def setup(self, trainer, pl_module, stage: str) -> None:
        install(self.signals)
        if self.saver(trainer) is None:
            raise ValueError("RequeueOnSignal needs the AtomicCheckpoint callback (kontext.formats.checkpoint)")

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # boundaries are the optimizer steps from here on

    @staticmethod
    def saver(trainer):
        from kontext.formats.checkpoint import AtomicCheckpoint

        return next((cb for cb in trainer.callbacks if isinstance(cb, AtomicCheckpoint)), None)

    def any_rank_signalled(self, trainer, pl_module) -> bool:
        flag = torch.tensor([0 if requested() is None else 1], device=pl_module.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        return bool(flag.item())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if step == self._last_step or step % self.every:  # not an optimizer-step boundary, or not checked
            return
        self._last_step = step
        if not self.any_rank_signalled(trainer, pl_module):
            return
        self.checkpoint = self.saver(trainer).save_now(trainer)
        self.stopped_at = step
        trainer.should_stop = True
        if trainer.is_global_zero:
            print(f"signal received: saved step {step} to {self.checkpoint}", file=sys.stderr, flush=True)
        clear()

    def requeue_job(self, trainer) -> bool:
        """After fit has stopped (loggers flushed): rank 0 puts the SLURM job back in the queue."""
        if not (trainer.is_global_zero and self.requeue and in_slurm_job()):
            return False
        if requeue():
            print(f"requeued SLURM job {job_id()}; it resumes from {self.checkpoint}", file=sys.stderr, flush=True)
            return True
        return False


def stopped_for_requeue(trainer) -> RequeueOnSignal | None:
    """The callback that stopped this fit for a requeue, if one did."""
    return next((cb for cb in trainer.callbacks if isinstance(cb, RequeueOnSignal) and cb.stopped_at is not None),
                None)
