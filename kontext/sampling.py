"""The Euler sampler of the flow model, with Kontext context tokens (reference FLUX ``sampling.py``).

``denoise`` integrates the predicted velocity from t = 1 (noise) to t = 0 (data) over a list
of times: the shifted grid of :func:`kontext.flow.schedule`, or an explicit list given by the
caller (few-step distilled students). At every step the context tokens ride along after the
target tokens, with their own ids, and only the target slice of the prediction moves the
sample; context tokens never change. Two guidance mechanisms, usable together:

- ``guidance``: the scalar fed to the model's guidance embedding (guidance-distilled models);
- ``cfg_scale`` != 1: true classifier-free guidance against an unconditional prompt,
  ``v = v_uncond + cfg_scale (v_cond - v_uncond)``.

:func:`sample_latents` is the whole path from seed to target latent: noise, packing, schedule
(mu from the target token count only), denoise, unpacking. Training uses the same packing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kontext import packing
from kontext.flow import schedule

LATENT_CHANNELS = 16


def get_noise(
    batch: int,
    latent_h: int,
    latent_w: int,
    seed: int,
    device: torch.device | str,
    dtype: torch.dtype,
    channels: int = LATENT_CHANNELS,
) -> Tensor:
    """Starting noise (B, C, latent_h, latent_w), the same for a seed on every device and dtype.

    Drawn in float32 from a CPU generator, then cast and moved: fp32 and bf16 runs start from
    the same numbers (up to rounding), and GPU runs from the same numbers as CPU runs.
    """
    if latent_h % 2 or latent_w % 2:
        raise ValueError(f"latent size must be even to pack into 2x2 patches, got {latent_h}x{latent_w}")
    generator = torch.Generator("cpu").manual_seed(seed)
    noise = torch.randn(batch, channels, latent_h, latent_w, generator=generator, dtype=torch.float32)
    return noise.to(device=device, dtype=dtype)


def _text_pair(uncond) -> tuple[Tensor, Tensor]:
    """(txt, vec) of the unconditional prompt, from a pair or from an object with .txt/.vec."""
    if hasattr(uncond, "txt") and hasattr(uncond, "vec"):
        return uncond.txt, uncond.vec
    txt, vec = uncond
    return txt, vec


@torch.no_grad()
def denoise(
    model: nn.Module,
    img: Tensor,
    img_ids: Tensor,
    ctx: Tensor | None,
    ctx_ids: Tensor | None,
    txt: Tensor,
    txt_ids: Tensor,
    vec: Tensor,
    timesteps: Sequence[float] | Tensor,
    guidance: float | None = None,
    cfg_scale: float = 1.0,
    uncond=None,
    progress: bool = False,
) -> Tensor:
    """Integrate ``img`` (B, L_img, C) from ``timesteps[0]`` to ``timesteps[-1]`` with Euler steps.

    ctx, ctx_ids: (B, L_ctx, C), (B, L_ctx, 3), or None / L_ctx = 0 for text-to-image.
    txt, txt_ids, vec: (B, L_txt, D_txt), (B, L_txt, 3), (B, D_vec).
    timesteps: decreasing times, e.g. ``schedule(steps, L_img)`` or an explicit list; one model
        evaluation per consecutive pair (two with CFG).
    guidance: value of the guidance-embedding input; None for models without one.
    uncond: (txt, vec) of the negative or empty prompt (a pair, or anything with .txt/.vec),
        batch B or 1, required when cfg_scale != 1. When its txt has the shape of ``txt`` both
        branches share one forward of batch 2B; otherwise each branch runs on its own.
    Returns the sample at the last time, (B, L_img, C), in the dtype of ``img``.
    """
    timesteps = [float(t) for t in timesteps]
    if len(timesteps) < 2:
        raise ValueError(f"denoise needs at least two timesteps, got {timesteps}")
    use_cfg = cfg_scale != 1.0
    if use_cfg and uncond is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs the unconditional prompt features (uncond)")

    b, n_img = img.shape[:2]
    if ctx is not None and ctx.shape[1] > 0:
        tokens_ctx, ids = ctx.to(img), torch.cat([img_ids, ctx_ids], dim=1)  # ids: (B, L_img + L_ctx, 3)
    else:
        tokens_ctx, ids = None, img_ids

    branches = [(txt, txt_ids, vec)]
    if use_cfg:
        u_txt, u_vec = _text_pair(uncond)
        if u_txt.shape[0] == 1 and b > 1:  # one empty-prompt encoding serves the whole batch
            u_txt, u_vec = u_txt.expand(b, *u_txt.shape[1:]), u_vec.expand(b, *u_vec.shape[1:])
        u_txt_ids = packing.txt_ids(b, u_txt.shape[1]).to(txt_ids)
        branches.append((u_txt, u_txt_ids, u_vec))
    # Both CFG branches in one forward of 2B when the text shapes allow it (the usual case: text
    # padded to a fixed length); the network is batch-independent, so this only saves time.
    batched = use_cfg and branches[0][0].shape == branches[1][0].shape
    if batched:
        branches = [tuple(torch.cat(pair, dim=0) for pair in zip(*branches, strict=True))]

    # Trailing zero rows of the text (the embedded encoder's padding) shrink to a few weighted
    # ones; exact (packing.compact_text), and a model only sees the argument when it applies.
    compacted = []
    for b_txt, b_txt_ids, b_vec in branches:
        short, extra = packing.model_text(b_txt)
        compacted.append((short, b_txt_ids[:, : short.shape[1]], b_vec, extra))

    def velocity(tokens: Tensor, t: float) -> Tensor:
        preds = []
        for b_txt, b_txt_ids, b_vec, extra in compacted:
            reps = b_txt.shape[0] // b
            x = tokens.repeat(reps, 1, 1)
            x_ids = ids.repeat(reps, 1, 1)
            t_vec = torch.full((x.shape[0],), t, device=x.device, dtype=x.dtype)
            g_vec = None if guidance is None else torch.full_like(t_vec, guidance)
            pred = model(x, x_ids, b_txt, b_txt_ids, t_vec, b_vec, guidance=g_vec, **extra)
            preds.append(packing.target_slice(pred, n_img))  # (reps * B, L_img, C)
        pred = torch.cat(preds, dim=0)
        if not use_cfg:
            return pred
        cond, neg = pred.chunk(2, dim=0)
        return neg + cfg_scale * (cond - neg)

    pairs = list(zip(timesteps[:-1], timesteps[1:], strict=True))
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc="sampling", unit="step")
    for t_curr, t_prev in pairs:
        tokens = img if tokens_ctx is None else torch.cat([img, tokens_ctx], dim=1)
        img = img + (t_prev - t_curr) * velocity(tokens, t_curr)
    return img


def sample_latents(
    model: nn.Module,
    context_latents: Sequence[Tensor],
    txt: Tensor,
    vec: Tensor,
    height: int,
    width: int,
    steps: int = 30,
    seed: int = 0,
    guidance: float | None = None,
    cfg_scale: float = 1.0,
    uncond=None,
    timesteps: Sequence[float] | Tensor | None = None,
    shift: bool = True,
    dtype: torch.dtype | None = None,
    progress: bool = False,
) -> Tensor:
    """Sample target latents (B, 16, height, width) for the given contexts and text.

    context_latents: zero or more (B, 16, h_i, w_i) latents (empty for text-to-image).
    txt, vec: text features of the instruction, (B, L_txt, D_txt) and (B, D_vec); they set the
        batch size, the device and (unless ``dtype`` is given) the dtype.
    height, width: the target latent size (image size / 8), even.
    timesteps: explicit times overriding ``steps`` and the schedule (few-step students).
    """
    b = txt.shape[0]
    dtype = dtype or txt.dtype
    noise = get_noise(b, height, width, seed, txt.device, dtype)
    contexts = [c.to(device=txt.device, dtype=dtype) for c in context_latents]
    tokens = packing.prepare(noise, contexts)
    if timesteps is None:
        timesteps = schedule(steps, tokens.img.shape[1], shift=shift)  # target tokens only
    img = denoise(
        model,
        tokens.img,
        tokens.img_ids,
        tokens.ctx,
        tokens.ctx_ids,
        txt,
        packing.txt_ids(b, txt.shape[1], device=txt.device),
        vec,
        timesteps,
        guidance=guidance,
        cfg_scale=cfg_scale,
        uncond=uncond,
        progress=progress,
    )
    return tokens.unpack(img)  # (B, 16, height, width)
