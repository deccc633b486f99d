"""A frozen LoRA base stored weight-only quantised by torchao (`adapter.quantize_base`): int8 or
fp8 (e4m3) with one scale per output row, about a quarter of fp32 and half of bf16. The forward
dequantises on the fly; backward dequantises again instead of keeping a dequantised copy per
layer (`FrozenQuantizedLinear`). At the end of a run the weights go back to plain tensors
(`dequantize_base`) so that the adapters merge into what they trained with; `rounded_as_trained`
rounds a plain model the same way (for reading such a run)."""

from __future__ import annotations

import torch
from torch import nn

from kontext.errors import KontextError

QUANTIZED = ("int8", "fp8")  # `adapter.quantize_base`


def quantize_base(model: nn.Module, kind: str) -> int:
    """Store the frozen weights of every linear layer of the blocks (the adapters' base layers
    and the frozen rest, e.g. the modulation) weight-only quantised by torchao: int8 with one
    scale per output row, or fp8 (e4m3) likewise; about a quarter of fp32, half of bf16. The
    forward dequantises on the fly in the base's dtype, and backward dequantises again rather
    than keep a dequantised copy per layer (`FrozenQuantizedLinear`); the adapters, embedders and
    norms keep their dtype. Returns the number of layers quantised."""
    try:
        from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise KontextError(f"adapter.quantize_base={kind} needs torchao: pip install 'torchao>=0.18'") from err
    from kontext.scale import parallel

    if kind not in QUANTIZED:
        raise KontextError(f"adapter.quantize_base={kind!r}: expected one of {', '.join(QUANTIZED)} or null")
    # Version 2: the tensors with `qdata` and per-row `scale`; inductor's global settings untouched.
    config = (Int8WeightOnlyConfig(version=2, set_inductor_config=False) if kind == "int8"
              else Float8WeightOnlyConfig(version=2, set_inductor_config=False))
    frozen = {id(m): m for block in parallel.blocks(model) for name, m in block.named_modules()
              if isinstance(m, nn.Linear) and ".lora_" not in f".{name}" and not m.weight.requires_grad}
    quantize_(model, config, filter_fn=lambda m, _name: id(m) in frozen)
    for m in frozen.values():
        if not is_quantized(m.weight):
            raise KontextError(f"torchao {_torchao_version()} did not give a weight-only tensor with per-row scales; "
                               "adapter.quantize_base needs torchao>=0.18")
        m.__class__ = FrozenQuantizedLinear
    return len(frozen)


def _torchao_version() -> str:
    import torchao

    return getattr(torchao, "__version__", "?")


def is_quantized(weight) -> bool:
    """Whether `weight` is one of torchao's quantised weight tensors."""
    try:
        from torchao.utils import TorchAOBaseTensor
    except ImportError:
        return False
    return isinstance(weight, TorchAOBaseTensor) and hasattr(weight, "qdata")


class _FrozenQuantizedMatmul(torch.autograd.Function):
    """y = linear(x, W, b) with W frozen and quantised. Autograd would keep the forward's
    dequantised copy of W for the input's gradient (as large as a bf16 weight, per layer);
    this keeps only the quantised W and dequantises it again in backward."""

    @staticmethod
    def forward(ctx, x, weight, bias):
        ctx.save_for_backward(weight)
        ctx.x_dtype = x.dtype
        return torch.nn.functional.linear(x, weight, bias)

    @staticmethod
    def backward(ctx, grad):
        (weight,) = ctx.saved_tensors
        w = weight.dequantize().to(grad.dtype)
        return (grad @ w).to(ctx.x_dtype), None, None


class FrozenQuantizedLinear(nn.Linear):
    """A frozen linear layer whose weight is a torchao quantised tensor (`quantize_base`): the
    same parameters and names, a backward that keeps no dequantised weight."""

    def forward(self, x):
        if torch.is_autocast_enabled(x.device.type):  # the matmul's dtype, as autocast would pick it
            x = x.to(torch.get_autocast_dtype(x.device.type))
        with torch.autocast(x.device.type, enabled=False):
            return _FrozenQuantizedMatmul.apply(x, self.weight, self.bias)


def rounded_as_trained(model: nn.Module, kind: str, dtype: torch.dtype | None) -> nn.Module:
    """A plain model's weights as a `quantize_base=kind` run trained on them: cast to the run's
    compute dtype, the block linears quantised and dequantised, in place."""
    model.to(dtype or torch.float32).requires_grad_(False)
    quantize_base(model, kind)
    dequantize_base(model)
    return model


def dequantize_base(model: nn.Module) -> None:
    """Quantised base weights back to plain tensors of their dtype, in place (before a merge)."""
    for m in model.modules():
        if isinstance(m, nn.Linear) and is_quantized(m.weight):
            m.weight = nn.Parameter(m.weight.dequantize().to(m.weight.dtype), requires_grad=False)
            if isinstance(m, FrozenQuantizedLinear):
                m.__class__ = nn.Linear
