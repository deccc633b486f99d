"""Multi-head attention with 3-axis RoPE, and the choice of attention kernel.

Follows the reference FLUX.1 `math.py`: rotary embeddings rotate interleaved adjacent pairs
(x[2j], x[2j+1]) of every head in float32, then plain softmax attention with the default
1/sqrt(head_dim) scale, no mask and no dropout (FLUX.1 Kontext paper §2-3). The reference
stores each rotation as a 2x2 real matrix; here it is the equal unit complex number, applied
by one complex product (5x faster forward and backward on CPU, same values to float rounding).

Kernels: `sdpa` (`torch.nn.functional.scaled_dot_product_attention`, everywhere) and `flash`
(FlashAttention 3 through `flash_attn_interface` when importable, else FlashAttention 2
through `flash_attn`; CUDA fp16/bf16 with head_dim a multiple of 8 and at most 256).
`auto` takes flash where it applies and SDPA otherwise. The process-wide choice is set from
the config with `set_attention_backend`; `attention(..., backend=...)` overrides it per call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor

BACKENDS = ("auto", "sdpa", "flash")
MERGE_HEADS = "B H L D -> B L (H D)"

_backend = "auto"


# ----------------------------------------------------------------------------- RoPE


def rope(pos: Tensor, dim: int, theta: int) -> Tensor:
    """Rotations for one position axis as unit complex numbers: (B, L) -> (B, L, dim/2), complex64.

    omega_k = theta^(-2k/dim); frequency k turns pair k by the angle pos * omega_k, i.e. it is
    the reference's 2x2 block [[cos, -sin], [sin, cos]] written as cos + i sin.
    """
    if dim % 2:
        raise ValueError(f"a RoPE axis needs an even dim, got {dim}")
    pos = pos.float()
    scale = torch.arange(0, dim, 2, dtype=torch.float32, device=pos.device) / dim
    omega = 1.0 / (theta**scale)                                  # (dim/2,)
    angles = pos[..., None] * omega                               # (B, L, dim/2)
    return torch.polar(torch.ones_like(angles), angles)


def _rotate(x: Tensor, pe: Tensor) -> Tensor:
    # x: (B, H, L, D); pe: (B, 1, L, D/2) complex. Pair j of a head, (x[2j], x[2j+1]), is the
    # complex number x[2j] + i x[2j+1]; turning it is one complex product, whose backward is
    # one more (by the conjugate), with no reduction over a broadcast axis.
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))  # (B, H, L, D/2)
    return torch.view_as_real(pairs * pe).flatten(-2).type_as(x)


def apply_rope(q: Tensor, k: Tensor, pe: Tensor) -> tuple[Tensor, Tensor]:
    """Rotate queries and keys (B, H, L, D) by `pe` (B, 1, L, D/2) complex, in float32."""
    return _rotate(q, pe), _rotate(k, pe)


# ----------------------------------------------------------------------------- kernels


def _find_flash_kernel() -> tuple[str, Callable] | None:
    """(name, flash_attn_func) of the newest installed FlashAttention, or None."""
    try:
        from flash_attn_interface import flash_attn_func  # FlashAttention 3 (Hopper)

        return "fa3", flash_attn_func
    except ImportError:
        pass
    try:
        from flash_attn import flash_attn_func  # FlashAttention 2

        return "fa2", flash_attn_func
    except ImportError:
        return None


# Looked up once at import, so that compiled blocks never trace an import.
_FLASH = _find_flash_kernel()


def _flash_kernel() -> tuple[str, Callable] | None:
    return _FLASH


def flash_unsupported_reason(q: Tensor) -> str | None:
    """Why the flash kernel cannot run on `q` (B, H, L, D), or None if it can."""
    if _flash_kernel() is None:
        return "neither flash_attn_interface (FA3) nor flash_attn (FA2) is installed"
    if not q.is_cuda:
        return f"flash attention needs CUDA tensors, got device {q.device}"
    if q.dtype not in (torch.float16, torch.bfloat16):
        return f"flash attention needs fp16 or bf16, got {q.dtype}"
    head_dim = q.shape[-1]
    if head_dim % 8 or head_dim > 256:
        return f"flash attention needs head_dim a multiple of 8 and <= 256, got {head_dim}"
    return None


def set_attention_backend(name: str) -> None:
    """Choose the kernel for every later `attention` call: 'auto', 'sdpa' or 'flash'.

    'flash' fails here already when no FlashAttention package is installed.
    """
    global _backend
    if name not in BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of {BACKENDS}")
    if name == "flash" and _flash_kernel() is None:
        raise RuntimeError(
            "attention backend 'flash' was requested but neither flash_attn_interface (FA3) nor "
            "flash_attn (FA2) is installed; install the `gpu` extra or use 'auto' / 'sdpa'"
        )
    _backend = name


def get_attention_backend() -> str:
    return _backend


def resolve_backend(q: Tensor, backend: str | None = None) -> str:
    """The kernel ('sdpa' or 'flash') that `attention` uses for `q` under `backend`."""
    backend = backend or _backend
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {BACKENDS}")
    if backend == "sdpa":
        return "sdpa"
    reason = flash_unsupported_reason(q)
    if backend == "flash" and reason is not None:
        raise RuntimeError(f"attention backend 'flash' cannot run here: {reason}")
    return "flash" if reason is None else "sdpa"


def attention(q: Tensor, k: Tensor, v: Tensor, pe: Tensor, backend: str | None = None,
              key_bias: Tensor | None = None, rows: slice | None = None) -> Tensor:
    """RoPE, then softmax attention over all tokens: (B, H, L, D) x3 -> (B, L, H*D).

    `key_bias` (B, L), optional, is added to every query's logit for each key (the log of how
    many identical tokens a key stands for, see `packing.compact_text`); SDPA runs it.
    `rows`, optional, keeps only those queries: (B, len(rows), H*D), from every key."""
    q, k = apply_rope(q, k, pe)
    if rows is not None:
        q = q[:, :, rows]
    if key_bias is not None:
        return rearrange(_sdpa(q, k, v, key_bias[:, None, None, :]), MERGE_HEADS)
    if resolve_backend(q, backend) == "flash":
        _, kernel = _flash_kernel()
        # flash kernels take (B, L, H, D); some FA3 builds also return the log-sum-exp.
        out = kernel(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        out = out[0] if isinstance(out, tuple) else out
        return rearrange(out, "B L H D -> B L (H D)")
    return rearrange(_sdpa(q, k, v), MERGE_HEADS)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    if q.device.type == "cpu" and q.dtype != torch.float32:
        # On CPU, bf16 SDPA's backward is several times slower than fp32's at these sizes (and
        # CPU autocast would cast float inputs back to bf16), so it runs in float32.
        with torch.autocast("cpu", enabled=False):
            mask = None if mask is None else mask.float()
            return F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask).to(v.dtype)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=None if mask is None else mask.to(q.dtype))
