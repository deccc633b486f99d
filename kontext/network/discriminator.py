"""The LADD discriminator: the frozen teacher as feature network, light heads on its blocks.

Latent adversarial diffusion distillation (Sauer et al. 2024, arXiv 2403.12015) replaces a
pixel-space feature network with the generative features of the teacher itself, read after
several transformer blocks on a re-noised latent. :func:`block_features` runs a `Flux`
forward with forward hooks (the network is not modified) and keeps, per chosen block, the
target image tokens only, reshaped to their 2-D token grid:

- double blocks return ``(img, txt)``: the image stream is ``img`` = [target | context];
- single blocks return ``x`` = [txt | target | context] (the last one only the target rows
  `packing.predict` asks for): the image part is the last rows;

and the target part of either is ``packing.target_slice``. Text and context tokens still
condition the teacher through attention, but no head sees them. The forward stops after the
deepest chosen block. Gradients flow through the teacher's activations (to the student whose
prediction was re-noised) while the teacher's own weights stay frozen.

:class:`Discriminator` holds one head per chosen block: 2-D convolutions over the token grid
(after ADD / StyleGAN-T projected heads, made 2-D as in LADD), FiLM-conditioned on the
re-noising level ``t_hat`` and the pooled text vector, one logit per sample and head.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.distributed.fsdp import FSDPModule

from kontext.network import packing
from kontext.network.layers import timestep_embedding
from kontext.network.model import TIME_EMBED_DIM, Flux

GRID = "b (h w) d -> b d h w"


class _StopForward(Exception):
    """Raised by the hook of the deepest chosen block: the rest of the forward is not needed."""


def resolve_blocks(model: Flux, blocks: Sequence[int] | None) -> list[int]:
    """Block indices over [double blocks | single blocks]; None = every block. Negative indices
    count from the last single block."""
    n = len(model.double_blocks) + len(model.single_blocks)
    chosen = list(range(n)) if blocks is None else [int(i) % n if -n <= int(i) < n else int(i) for i in blocks]
    bad = [i for i in chosen if not 0 <= i < n]
    if bad or not chosen or len(set(chosen)) != len(chosen):
        raise ValueError(f"feature blocks {list(blocks or [])} must be distinct indices in [0, {n}) "
                         f"({len(model.double_blocks)} double + {len(model.single_blocks)} single blocks)")
    return sorted(chosen)


def block_features(
    model: Flux,
    blocks: Sequence[int],
    tokens: packing.KontextTokens,  # the target's grid and the context tokens with their ids
    img: Tensor,       # (B, L_img, C): the (re-noised) target tokens
    t: Tensor,         # (B,)
    txt: Tensor,       # (B, L_txt, D_txt)
    vec: Tensor,       # (B, D_vec)
    guidance: Tensor | float | None = None,
    compact: bool = True,
) -> list[Tensor]:
    """Target-token features after each of ``blocks`` (sorted, see :func:`resolve_blocks`):
    a list of (B, D, h, w), in the order of ``blocks``. The forward is `packing.predict`'s."""
    n_img, grid = tokens.n_img, (tokens.height // packing.PATCH, tokens.width // packing.PATCH)
    n_image_rows = n_img + tokens.ctx.shape[1]  # target and context tokens
    all_blocks = [*model.double_blocks, *model.single_blocks]
    n_double, last = len(model.double_blocks), max(blocks)
    feats: dict[int, Tensor] = {}
    # A forward stopped half-way would leave an FSDP2 root's forward state set: a sharded
    # teacher runs to the end instead (the blocks after the last feature are wasted work).
    sharded = isinstance(model, FSDPModule)

    def hook_for(i: int):
        def hook(module, args, output):
            # Double blocks return (img, txt); single ones [txt | img], the last one fewer rows:
            # the image rows are the last ones, the target's first among them.
            image = output[0] if i < n_double else output[:, -min(output.shape[1], n_image_rows):]
            feats[i] = rearrange(packing.target_slice(image, n_img), GRID, h=grid[0], w=grid[1])
            if i == last and not sharded:
                raise _StopForward

        return hook

    handles = [all_blocks[i].register_forward_hook(hook_for(i)) for i in blocks]
    try:
        packing.predict(model, tokens, img, t, txt, vec, guidance, compact)
    except _StopForward:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return [feats[i] for i in blocks]


def _groups(channels: int) -> int:
    return next(g for g in (32, 16, 8, 4, 2, 1) if channels % g == 0)


class Head(nn.Module):
    """Token-grid features (B, D, h, w) + condition (B, C_cond) -> one logit per sample (B,)."""

    def __init__(self, dim: int, channels: int, cond_dim: int):
        super().__init__()
        self.conv_in = nn.Conv2d(dim, channels, 3, padding=1)
        self.norm_in = nn.GroupNorm(_groups(channels), channels)
        self.film = nn.Linear(cond_dim, 2 * channels)
        self.conv_mid = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm_mid = nn.GroupNorm(_groups(channels), channels)
        self.conv_out = nn.Conv2d(channels, 1, 1)
        nn.init.zeros_(self.film.weight)  # starts unconditioned: scale 1, shift 0
        nn.init.zeros_(self.film.bias)

    def forward(self, x: Tensor, cond: Tensor) -> Tensor:
        scale, shift = self.film(cond)[:, :, None, None].chunk(2, dim=1)  # each (B, C, 1, 1)
        x = self.norm_in(self.conv_in(x)) * (1 + scale) + shift
        x = F.leaky_relu(x, 0.2)
        x = x + self.conv_mid(F.leaky_relu(self.norm_mid(x), 0.2))
        return self.conv_out(x).mean(dim=(1, 2, 3))  # patch logits averaged over the grid


class Discriminator(nn.Module):
    """One :class:`Head` per feature block; the condition is [emb(t_hat) | pooled text vector]."""

    def __init__(self, dim: int, vec_dim: int, n_heads: int, channels: int = 64):
        super().__init__()
        self.cond = nn.Sequential(nn.Linear(TIME_EMBED_DIM + vec_dim, channels), nn.SiLU())
        self.heads = nn.ModuleList(Head(dim, channels, channels) for _ in range(n_heads))

    def forward(self, feats: Sequence[Tensor], t_hat: Tensor, y: Tensor) -> Tensor:
        """feats: one (B, D, h, w) per head; t_hat: (B,); y: (B, D_vec) -> logits (B, K)."""
        if len(feats) != len(self.heads):
            raise ValueError(f"{len(feats)} feature maps for {len(self.heads)} heads")
        temb = timestep_embedding(t_hat, TIME_EMBED_DIM).to(y)
        cond = self.cond(torch.cat([temb, y], dim=-1))
        return torch.stack([head(f.to(cond), cond) for head, f in zip(self.heads, feats, strict=True)], dim=-1)
