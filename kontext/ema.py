"""Exponential moving average of a network's weights, used for evaluation, samples and export.

The average lives in a frozen copy of the network (a submodule of the training stage, so it
is saved and restored with every checkpoint). The decay warms up as ``(1 + n) / (10 + n)``
so that early averages are not dominated by the random initialisation.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        super().__init__()
        self.decay = decay
        self.warmup = warmup
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        ema_params = dict(self.model.named_parameters())
        pairs = [(ema_params[name], param.detach().to(ema_params[name].dtype)) for name, param in model.named_parameters()]
        if not any(isinstance(t, DTensor) for pair in pairs for t in pair):
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - decay)  # one fused pass
        else:  # DTensor shards (FSDP2): one tensor at a time
            for ema, param in pairs:
                ema.lerp_(param, 1.0 - decay)
        for (_, ema_buf), (_, buf) in zip(self.model.named_buffers(), model.named_buffers(), strict=True):
            ema_buf.copy_(buf)
        self.num_updates += 1

    def train(self, mode: bool = True):
        # The averaged copy always stays in eval mode.
        super().train(mode)
        self.model.eval()
        return self
