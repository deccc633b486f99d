"""What a fit did, for the tests that run one through `kontext.run.run` (which returns nothing
for a `fast_dev_run`): the optimizer steps taken, the values logged and which weights moved.

Added to a composed config with `+callbacks.record._target_=fit_record.FitRecord`; the record
of the last fit that started is `FitRecord.last`.
"""

from __future__ import annotations

import torch
from lightning.pytorch.callbacks import Callback


class FitRecord(Callback):
    last: FitRecord | None = None

    def on_train_start(self, trainer, pl_module) -> None:
        FitRecord.last = self
        self.module = pl_module
        # After setup and on_fit_start: a distillation student is its starting point here.
        self._before = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}
        self.steps, self.metrics, self.moved = 0, {}, set()

    def on_train_end(self, trainer, pl_module) -> None:
        self.steps = trainer.global_step
        self.metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
        self.moved = {k for k, v in pl_module.state_dict().items() if not torch.equal(self._before[k], v)}
