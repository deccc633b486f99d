"""Kontext token packing: the one place where latents become transformer tokens and back.

Follows the reference FLUX.1 `sampling.py` (`prepare`, `unpack`, `prepare_kontext`) and the
FLUX.1 Kontext paper §3 ("Token sequence construction"). A latent (B, C, H, W) becomes
H/2*W/2 tokens of 2x2 patches (channel index c*4 + ph*2 + pw, row-major token order), each
with a (t, row, col) id. The target has t = 0; the i-th context image (i = 1, 2, ...) has
t = i, and its own spatial ids from 0, so contexts of any resolution overlap the target's
grid and are told apart by the virtual time axis only. The transformer sees
[txt | target | context_1 | ... | context_N] and the target slice of its output is kept.
Training and sampling both call `prepare`, `KontextTokens.joint` and `target_slice`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from einops import rearrange, repeat
from torch import Tensor

PATCH = 2
PACK = "b c (h ph) (w pw) -> b (h w) (c ph pw)"
UNPACK = "b (h w) (c ph pw) -> b c (h ph) (w pw)"


def pack(x: Tensor) -> Tensor:
    """(B, C, H, W) latent -> (B, H/2 * W/2, 4C) tokens."""
    if x.ndim != 4 or x.shape[-2] % PATCH or x.shape[-1] % PATCH:
        raise ValueError(f"pack needs a (B, C, H, W) latent with even H and W, got {tuple(x.shape)}")
    return rearrange(x, PACK, ph=PATCH, pw=PATCH)


def unpack(x: Tensor, h: int, w: int) -> Tensor:
    """(B, h/2 * w/2, 4C) tokens -> (B, C, h, w) latent of latent height h and width w."""
    return rearrange(x, UNPACK, h=h // PATCH, w=w // PATCH, ph=PATCH, pw=PATCH)


def make_ids(
    b: int, h: int, w: int, t: int = 0, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """(t, row, col) ids of the tokens of a (B, C, h, w) latent -> (B, h/2 * w/2, 3)."""
    ids = torch.zeros(h // PATCH, w // PATCH, 3, device=device, dtype=dtype)
    ids[..., 0] = t
    ids[..., 1] = torch.arange(h // PATCH, device=device, dtype=dtype)[:, None]
    ids[..., 2] = torch.arange(w // PATCH, device=device, dtype=dtype)[None, :]
    return repeat(ids, "h w c -> b (h w) c", b=b)


def txt_ids(
    b: int, length: int, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32
) -> Tensor:
    """Text token ids: all zeros, (B, L_txt, 3)."""
    return torch.zeros(b, length, 3, device=device, dtype=dtype)


def compact_text(txt: Tensor, multiple: int = 1) -> tuple[Tensor, Tensor | None]:
    """Drop most trailing all-zero rows of `txt` (B, L, D) without changing the model's output.

    Zero rows are identical tokens all the way through the network: the same input row
    (`txt_in`'s bias), the same id (text ids are all zero) and only token-wise operations
    besides attention, where every copy is one more equal key and value. K equal keys weigh
    exactly as one key whose logit is raised by log K. So sample i, with n_i prompt rows
    followed by L - n_i zero rows, can keep m - n_i of them, each standing for
    (L - n_i) / (m - n_i) rows; `Flux.forward(..., txt_multiplicity=...)` adds the log of that
    count to their attention logits. The embedded encoder zero-pads its prompts (Shapes-Edit
    edits are <= 10 of 32 rows); encoders whose padding is not zero (T5) are returned as given.

    m is the batch's longest prompt plus one zero row, rounded up to a multiple of `multiple`
    (a larger multiple gives fewer distinct shapes to a compiled model; eagerly every row
    costs). Returns (txt[:, :m], the (B, m) multiplicities), or (txt, None) when nothing would
    be dropped.
    """
    b, length = txt.shape[:2]
    rows = torch.arange(1, length + 1, device=txt.device)
    n = torch.where(txt.ne(0).any(dim=-1), rows, 0).amax(dim=1)  # (B,) rows up to the last non-zero one
    m = min(length, -(-(int(n.max()) + 1) // multiple) * multiple)
    if m >= length:
        return txt, None
    count = ((length - n) / (m - n)).to(txt.dtype)  # (B,) rows each kept zero row stands for
    mult = torch.where(rows[:m] > n[:, None], count[:, None], torch.ones((), dtype=txt.dtype, device=txt.device))
    return txt[:, :m], mult


def model_text(txt: Tensor, compact: bool = True) -> tuple[Tensor, dict[str, Tensor]]:
    """(text rows, extra keyword arguments) to call the model with: `compact_text`'s rows and,
    when it dropped any, `{"txt_multiplicity": ...}`; with `compact=False`, `txt` and `{}`.
    A model only sees the argument when it applies (so stand-in models need not accept it)."""
    if not compact:
        return txt, {}
    short, mult = compact_text(txt)
    return short, ({} if mult is None else {"txt_multiplicity": mult})


@dataclass
class KontextTokens:
    img: Tensor       # (B, L_img, 4C) target tokens
    img_ids: Tensor   # (B, L_img, 3), axis 0 = 0
    ctx: Tensor       # (B, L_ctx, 4C) all context tokens in order; L_ctx = 0 without contexts
    ctx_ids: Tensor   # (B, L_ctx, 3), axis 0 = i for the i-th context
    height: int       # latent size of the target, for `unpack`
    width: int

    @property
    def n_img(self) -> int:
        return self.img.shape[1]

    def joint(self, img: Tensor | None = None) -> tuple[Tensor, Tensor]:
        """The image-stream input [img | ctx] (B, L_img + L_ctx, 4C) and its ids.

        `img` replaces the target tokens (e.g. the noisy target z_t); its ids stay the target's.
        """
        img = self.img if img is None else img
        if img.shape[1] != self.n_img:
            raise ValueError(f"expected {self.n_img} target tokens, got {img.shape[1]}")
        if self.ctx.shape[1] == 0:
            return img, self.img_ids
        return torch.cat((img, self.ctx.to(img)), dim=1), torch.cat((self.img_ids, self.ctx_ids), dim=1)

    def unpack(self, img: Tensor) -> Tensor:
        """Target tokens (B, L_img, 4C) -> target latent (B, C, H, W)."""
        return unpack(img, self.height, self.width)

    def repeat(self, n: int) -> KontextTokens:
        """The batch n times over (sample i of copy j at j * B + i), e.g. for a CFG pair."""
        rep = lambda x: x.repeat(n, *([1] * (x.ndim - 1)))
        return KontextTokens(rep(self.img), rep(self.img_ids), rep(self.ctx), rep(self.ctx_ids), self.height, self.width)


def prepare(target: Tensor, contexts: Sequence[Tensor] = ()) -> KontextTokens:
    """Pack a target latent (B, C, H, W) and any number of context latents (B, C, h_i, w_i)."""
    b, c, height, width = target.shape
    img = pack(target)
    img_ids = make_ids(b, height, width, t=0, device=target.device)
    ctx, ctx_ids = [], []
    for i, context in enumerate(contexts, start=1):
        if context.shape[:2] != (b, c):
            raise ValueError(f"context {i} has shape {tuple(context.shape)}; needs batch {b} and {c} channels")
        ctx.append(pack(context))
        ctx_ids.append(make_ids(b, context.shape[-2], context.shape[-1], t=i, device=target.device))
    if not ctx:
        ctx = [img.new_zeros(b, 0, img.shape[-1])]
        ctx_ids = [img_ids.new_zeros(b, 0, 3)]
    return KontextTokens(
        img=img, img_ids=img_ids, ctx=torch.cat(ctx, dim=1), ctx_ids=torch.cat(ctx_ids, dim=1),
        height=height, width=width,
    )


def target_slice(pred: Tensor, n_img: int) -> Tensor:
    """The target part (B, n_img, C) of a prediction over [target | contexts] (B, L, C)."""
    return pred[:, :n_img]


def predict(model, tokens: KontextTokens, img: Tensor, t: Tensor, txt: Tensor, vec: Tensor,
            guidance: Tensor | float | None = None, compact: bool = True) -> Tensor:
    """The model's prediction for the target tokens only: the one call of the transformer on
    Kontext tokens, shared by training, sampling and distillation.

    img: (B, L_img, C) the current target tokens (e.g. z_t), joined with `tokens`' context
    tokens and ids; t: (B,) flow times; txt, vec: (B, L_txt, D_txt), (B, D_vec), the text
    compacted when `compact` (exact, see `compact_text`); guidance: the guidance-embedding
    input, a (B,) tensor or one value for the batch (None for models without one).
    Returns (B, L_img, C): the target slice of the prediction.
    """
    joint, ids = tokens.joint(img)
    txt, extra = model_text(txt, compact)
    b = joint.shape[0]
    if guidance is not None and not isinstance(guidance, Tensor):
        guidance = torch.full((b,), float(guidance), device=joint.device, dtype=joint.dtype)
    pred = model(joint, ids, txt, txt_ids(b, txt.shape[1], device=joint.device), t, vec, guidance=guidance,
                 n_out=tokens.n_img, **extra)
    return target_slice(pred, tokens.n_img)  # (B, L_img, C)
