"""Building blocks of the FLUX.1 transformer, with the reference math and parameter names.

Follows the reference FLUX.1 `modules/layers.py` (FLUX.1 Kontext paper §2): sinusoidal
timestep embedding, 3-axis RoPE (`EmbedND`), adaLN modulation, QK RMSNorm, the double-stream
block (separate image/text weights, joint attention with text first) and the fused
single-stream block (parallel attention and MLP after ViT-22B), and the adaLN output layer.
Attribute names equal the reference state-dict keys, so official checkpoints load strictly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from kontext.network.attention import apply_rope, attention, rope

__all__ = [
    "DoubleStreamBlock", "EmbedND", "LastLayer", "MLPEmbedder", "Modulation", "ModulationOut",
    "QKNorm", "RMSNorm", "SelfAttention", "SingleStreamBlock", "apply_rope", "rope",
    "timestep_embedding",
]

# Fused qkv projections are laid out [q | k | v], each heads-major.
SPLIT_QKV = "B L (K H D) -> K B H L D"


def _layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


def _gelu_mlp(dim: int, hidden: int) -> nn.Sequential:
    # State-dict indices 0 and 2, as in the reference.
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class EmbedND(nn.Module):
    """Rotations for ids (B, L, n_axes) -> (B, 1, L, sum(axes_dim)/2) complex, axis 0 first."""

    def __init__(self, dim: int, theta: int, axes_dim: list[int]):
        super().__init__()
        self.dim = dim
        self.theta = theta
        self.axes_dim = list(axes_dim)

    def forward(self, ids: Tensor) -> Tensor:
        emb = torch.cat([rope(ids[..., i], self.axes_dim[i], self.theta) for i in range(ids.shape[-1])], dim=-1)
        return emb.unsqueeze(1)


def timestep_embedding(t: Tensor, dim: int, max_period: int = 10000, time_factor: float = 1000.0) -> Tensor:
    """Sinusoidal embedding (B,) -> (B, dim) of `time_factor * t`, cosines first.

    Flow time t in [0, 1] (and the guidance scale) is scaled by 1000 first, as in the reference.
    """
    t = time_factor * t
    half = dim // 2
    freqs = torch.exp(
        -math.log(max_period) * torch.arange(0, half, dtype=torch.float32, device=t.device) / half
    )
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    if torch.is_floating_point(t):
        emb = emb.to(t)
    return emb


class MLPEmbedder(nn.Module):
    """in_dim -> hidden_dim -> hidden_dim with a SiLU between (time, guidance and vec inputs)."""

    def __init__(self, in_dim: int, hidden_dim: int):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_dim, bias=True)
        self.silu = nn.SiLU()
        self.out_layer = nn.Linear(hidden_dim, hidden_dim, bias=True)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(self.silu(self.in_layer(x)))


class RMSNorm(nn.Module):
    """RMS normalisation computed in float32; the learnt `scale` applies in the input dtype."""

    def __init__(self, dim: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        x_dtype = x.dtype
        x = x.float()
        rrms = torch.rsqrt(torch.mean(x**2, dim=-1, keepdim=True) + 1e-6)
        return (x * rrms).to(dtype=x_dtype) * self.scale


class QKNorm(nn.Module):
    """Per-head RMSNorm of queries and keys; the outputs take the dtype of the values."""

    def __init__(self, dim: int):
        super().__init__()
        self.query_norm = RMSNorm(dim)
        self.key_norm = RMSNorm(dim)

    def forward(self, q: Tensor, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        return self.query_norm(q).to(v), self.key_norm(k).to(v)


class SelfAttention(nn.Module):
    """The parameters of one attention stream: fused `qkv`, QK `norm`, output `proj`."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm = QKNorm(dim // num_heads)
        self.proj = nn.Linear(dim, dim)

    def qkv_heads(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(B, L, dim) -> normalised q, k and v, each (B, H, L, D)."""
        q, k, v = rearrange(self.qkv(x), SPLIT_QKV, K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        return q, k, v

    def forward(self, x: Tensor, pe: Tensor) -> Tensor:
        return self.proj(attention(*self.qkv_heads(x), pe=pe))


@dataclass
class ModulationOut:
    shift: Tensor  # (B, 1, dim)
    scale: Tensor  # (B, 1, dim)
    gate: Tensor   # (B, 1, dim)

    def modulate(self, x: Tensor) -> Tensor:
        """(1 + scale) * x + shift, the adaLN input of a sub-block (one fused pass)."""
        return torch.addcmul(self.shift, 1 + self.scale, x)

    def gated(self, residual: Tensor, x: Tensor) -> Tensor:
        """residual + gate * x, the gated residual of a sub-block (one fused pass)."""
        return torch.addcmul(residual, self.gate, x)


class Modulation(nn.Module):
    """adaLN parameters from vec: one (shift, scale, gate) set, or two for a double block."""

    def __init__(self, dim: int, double: bool):
        super().__init__()
        self.is_double = double
        self.multiplier = 6 if double else 3
        self.lin = nn.Linear(dim, self.multiplier * dim, bias=True)

    def forward(self, vec: Tensor) -> tuple[ModulationOut, ModulationOut | None]:
        out = self.lin(F.silu(vec))[:, None, :].chunk(self.multiplier, dim=-1)  # each (B, 1, dim)
        return ModulationOut(*out[:3]), ModulationOut(*out[3:]) if self.is_double else None


class DoubleStreamBlock(nn.Module):
    """Separate image and text weights; one attention over [txt | img] (MMDiT)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, qkv_bias: bool = False):
        super().__init__()
        mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.num_heads = num_heads
        self.hidden_size = hidden_size

        self.img_mod = Modulation(hidden_size, double=True)
        self.img_norm1 = _layer_norm(hidden_size)
        self.img_attn = SelfAttention(dim=hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.img_norm2 = _layer_norm(hidden_size)
        self.img_mlp = _gelu_mlp(hidden_size, mlp_hidden_dim)

        self.txt_mod = Modulation(hidden_size, double=True)
        self.txt_norm1 = _layer_norm(hidden_size)
        self.txt_attn = SelfAttention(dim=hidden_size, num_heads=num_heads, qkv_bias=qkv_bias)
        self.txt_norm2 = _layer_norm(hidden_size)
        self.txt_mlp = _gelu_mlp(hidden_size, mlp_hidden_dim)

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, pe: Tensor,
                key_bias: Tensor | None = None) -> tuple[Tensor, Tensor]:
        # img: (B, L_img, D), txt: (B, L_txt, D), vec: (B, D), pe: (B, 1, L_txt + L_img, D_head/2) complex,
        # key_bias: None or (B, L_txt + L_img), see `attention`
        img_mod1, img_mod2 = self.img_mod(vec)
        txt_mod1, txt_mod2 = self.txt_mod(vec)

        img_q, img_k, img_v = self.img_attn.qkv_heads(img_mod1.modulate(self.img_norm1(img)))
        txt_q, txt_k, txt_v = self.txt_attn.qkv_heads(txt_mod1.modulate(self.txt_norm1(txt)))

        # Text first: the order of the rotary ids and of the single-stream sequence.
        q = torch.cat((txt_q, img_q), dim=2)
        k = torch.cat((txt_k, img_k), dim=2)
        v = torch.cat((txt_v, img_v), dim=2)
        attn = attention(q, k, v, pe=pe, key_bias=key_bias)  # (B, L_txt + L_img, D)
        txt_attn, img_attn = attn.split((txt.shape[1], img.shape[1]), dim=1)

        img = img_mod1.gated(img, self.img_attn.proj(img_attn))
        img = img_mod2.gated(img, self.img_mlp(img_mod2.modulate(self.img_norm2(img))))

        txt = txt_mod1.gated(txt, self.txt_attn.proj(txt_attn))
        txt = txt_mod2.gated(txt, self.txt_mlp(txt_mod2.modulate(self.txt_norm2(txt))))
        return img, txt


class SingleStreamBlock(nn.Module):
    """One stream over [txt | img]: attention and MLP in parallel from a fused `linear1`,
    merged back by a fused `linear2` (ViT-22B style)."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.hidden_dim = hidden_size
        self.num_heads = num_heads
        self.mlp_hidden_dim = int(hidden_size * mlp_ratio)
        self.linear1 = nn.Linear(hidden_size, hidden_size * 3 + self.mlp_hidden_dim)
        self.linear2 = nn.Linear(hidden_size + self.mlp_hidden_dim, hidden_size)
        self.norm = QKNorm(hidden_size // num_heads)
        self.pre_norm = _layer_norm(hidden_size)
        self.mlp_act = nn.GELU(approximate="tanh")
        self.modulation = Modulation(hidden_size, double=False)

    def forward(self, x: Tensor, vec: Tensor, pe: Tensor, key_bias: Tensor | None = None,
                rows: slice | None = None) -> Tensor:
        # x: (B, L_txt + L_img, D), key_bias: None or (B, L_txt + L_img) -> (B, L_txt + L_img, D).
        # With `rows` only those tokens are updated and returned, (B, len(rows), D): every token
        # still gives keys and values, but queries, MLP and output run on the kept rows alone
        # (the last block, whose text and context outputs nobody reads).
        mod, _ = self.modulation(vec)
        x_mod = mod.modulate(self.pre_norm(x))
        if rows is not None and isinstance(self.linear1, nn.Linear):
            w, b = self.linear1.weight, self.linear1.bias
            qkv = F.linear(x_mod, w[: 3 * self.hidden_dim], b[: 3 * self.hidden_dim])
            mlp = F.linear(x_mod[:, rows], w[3 * self.hidden_dim :], b[3 * self.hidden_dim :])
            x = x[:, rows]
        else:
            qkv, mlp = torch.split(self.linear1(x_mod), [3 * self.hidden_dim, self.mlp_hidden_dim], dim=-1)
            if rows is not None:  # a wrapped linear1 (a LoRA adapter) is more than its weight: run it whole
                mlp, x = mlp[:, rows], x[:, rows]
        q, k, v = rearrange(qkv, SPLIT_QKV, K=3, H=self.num_heads)
        q, k = self.norm(q, k, v)
        attn = attention(q, k, v, pe=pe, key_bias=key_bias, rows=rows)  # (B, L or len(rows), D)
        return mod.gated(x, self.linear2(torch.cat((attn, self.mlp_act(mlp)), dim=2)))


class LastLayer(nn.Module):
    """adaLN (shift, scale) from vec, then the projection to patch channels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = _layer_norm(hidden_size)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        # x: (B, L, D) -> (B, L, patch*patch*out_channels)
        shift, scale = self.adaLN_modulation(vec).chunk(2, dim=1)
        x = (1 + scale[:, None, :]) * self.norm_final(x) + shift[:, None, :]
        return self.linear(x)
