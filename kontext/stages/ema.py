"""Exponential moving average of a network's weights, used for evaluation, samples and export.

The average lives in a frozen copy of the network (a submodule of the training stage, so it
is saved and restored with every checkpoint). The decay warms up as ``(1 + n) / (10 + n)``
so that early averages are not dominated by the random initialisation.

With `trainable_only` (LoRA: the base never changes) the copy holds the trained parameters
alone, under the same names, in a module tree of their own: the average of the adapters,
without a second copy of the frozen base.
"""

from __future__ import annotations

import copy

import torch
from torch import nn
from torch.distributed.tensor import DTensor


def mirror(named: dict[str, torch.Tensor]) -> nn.Module:
    """A module tree holding frozen copies of `named` tensors under the same dotted names."""
    root = nn.Module()
    for name, tensor in named.items():
        *path, leaf = name.split(".")
        module = root
        for part in path:
            if part not in module._modules:
                module.add_module(part, nn.Module())
            module = module._modules[part]
        module.register_parameter(leaf, nn.Parameter(tensor.detach().clone(), requires_grad=False))
    return root


class EMA(nn.Module):
    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True, trainable_only: bool = False):
        super().__init__()
        self.decay = decay
        self.warmup = warmup
        if trainable_only:
            self.model = mirror({n: p for n, p in model.named_parameters() if p.requires_grad})
        else:
            self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self.register_buffer("num_updates", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def copy_from(self, model: nn.Module) -> None:
        """Set the average to `model`'s weights (shard by shard when both are sharded alike)."""
        live = dict(model.named_parameters())
        for name, ema in self.model.named_parameters():
            src = live[name].detach()
            if isinstance(ema, DTensor):
                ema.to_local().copy_(src.to_local())
            else:
                ema.copy_(src)
        self._copy_buffers(model)

    def _copy_buffers(self, model: nn.Module) -> None:
        live = dict(model.named_buffers())
        for name, ema_buf in self.model.named_buffers():
            ema_buf.copy_(live[name])

    def current_decay(self) -> float:
        n = int(self.num_updates)
        return min(self.decay, (1 + n) / (10 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        decay = self.current_decay()
        live = dict(model.named_parameters())
        pairs = [(ema, live[name].detach().to(ema.dtype)) for name, ema in self.model.named_parameters()]
        if not any(isinstance(t, DTensor) for pair in pairs for t in pair):
            torch._foreach_lerp_([e for e, _ in pairs], [p for _, p in pairs], 1.0 - decay)  # one fused pass
        else:  # DTensor shards (FSDP2): one tensor at a time
            for ema, param in pairs:
                ema.lerp_(param, 1.0 - decay)
        self._copy_buffers(model)
        self.num_updates += 1

    def train(self, mode: bool = True):
        # The averaged copy always stays in eval mode.
        super().train(mode)
        self.model.eval()
        return self

    def shard_like(self, model: nn.Module) -> None:
        """Lay each averaged tensor out as its live parameter is (FSDP2's DTensor shards, same
        mesh and placements), so that every rank averages only its own shard. For a
        `trainable_only` average; a whole copy is sharded as a model (`parallel.shard`)."""
        from torch.distributed.tensor import distribute_tensor

        live = dict(model.named_parameters())
        for name, ema in list(self.model.named_parameters()):
            param = live[name]
            if isinstance(param, DTensor) and not isinstance(ema, DTensor):
                owner, _, leaf = name.rpartition(".")
                value = distribute_tensor(ema.detach().to(param.device), param.device_mesh, param.placements)
                self.model.get_submodule(owner).register_parameter(leaf, nn.Parameter(value, requires_grad=False))
