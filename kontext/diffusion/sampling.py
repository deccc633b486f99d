"""The Euler sampler of the flow model, with Kontext context tokens (reference FLUX ``sampling.py``).

``denoise`` integrates the predicted velocity from t = 1 (noise) to t = 0 (data) over a list
of times: the shifted grid of :func:`kontext.diffusion.flow.schedule`, or an explicit list given by the
caller (few-step distilled students). At every step the context tokens ride along after the
target tokens, with their own ids, and only the target prediction moves the sample
(`kontext.network.packing.predict`); context tokens never change. ``velocity`` is the field it
follows, also the distillation teachers' guided velocity. Two guidance mechanisms, usable
together:

- ``guidance``: the scalar fed to the model's guidance embedding (guidance-distilled models);
- ``cfg_scale`` != 1: true classifier-free guidance against an unconditional prompt,
  ``v = v_uncond + cfg_scale (v_cond - v_uncond)``.

`KontextPipeline` runs the whole path from seed to target latent: `get_noise`, the packing,
the schedule (mu from the target token count only), `denoise`, the unpacking. Training uses the
same packing.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kontext.diffusion.flow import cfg_velocity, euler_step
from kontext.network import packing

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


def velocity(
    model: nn.Module,
    tokens: packing.KontextTokens,
    img: Tensor,
    t: Tensor,
    txt: Tensor,
    vec: Tensor,
    guidance: Tensor | float | None = None,
    cfg_scale: Tensor | float = 1.0,
    uncond=None,
    compact: bool = True,
) -> Tensor:
    """The velocity (B, L_img, C) the sampler follows at the target tokens ``img`` and times t (B,).

    ``cfg_scale`` != 1 (a float, or one value per sample (B,)) is true classifier-free guidance
    against ``uncond``, the (txt, vec) of the negative or empty prompt (batch B or 1, the text
    as long as ``txt``): both branches run in one forward of batch 2B (the network is
    batch-independent) and combine by `flow.cfg_velocity`. The text is compacted (exact).
    """
    if not isinstance(cfg_scale, Tensor) and cfg_scale == 1.0:
        return packing.predict(model, tokens, img, t, txt, vec, guidance, compact)
    if uncond is None:
        raise ValueError(f"cfg_scale={cfg_scale} needs the unconditional prompt features (uncond)")
    b = img.shape[0]
    u_txt, u_vec = _text_pair(uncond)
    u_txt, u_vec = u_txt.expand(b, *u_txt.shape[1:]).to(txt), u_vec.expand(b, *u_vec.shape[1:]).to(vec)
    if u_txt.shape != txt.shape:
        raise ValueError(f"unconditional text {tuple(u_txt.shape)} must match the text {tuple(txt.shape)}")
    if isinstance(guidance, Tensor):
        guidance = guidance.repeat(2)
    both = packing.predict(model, tokens.repeat(2), img.repeat(2, 1, 1), t.repeat(2), torch.cat([txt, u_txt]),
                           torch.cat([vec, u_vec]), guidance, compact)
    cond, neg = both.chunk(2)
    return cfg_velocity(cond, neg, cfg_scale)


@torch.no_grad()
def denoise(
    model: nn.Module,
    tokens: packing.KontextTokens,
    img: Tensor,
    txt: Tensor,
    vec: Tensor,
    timesteps: Sequence[float] | Tensor,
    guidance: float | None = None,
    cfg_scale: float = 1.0,
    uncond=None,
    progress: bool = False,
) -> Tensor:
    """Integrate the target tokens ``img`` (B, L_img, C) from ``timesteps[0]`` to ``timesteps[-1]``.

    tokens: the packed target and context tokens with their ids (`packing.prepare`); the context
        tokens ride along unchanged at every step. txt, vec: (B, L_txt, D_txt), (B, D_vec).
    timesteps: decreasing times, e.g. ``schedule(steps, L_img)`` or an explicit list; one model
        evaluation per consecutive pair (of batch 2B with CFG, see `velocity`).
    guidance: value of the guidance-embedding input; None for models without one.
    Returns the sample at the last time, (B, L_img, C), in the dtype of ``img``.
    """
    timesteps = [float(t) for t in timesteps]
    if len(timesteps) < 2:
        raise ValueError(f"denoise needs at least two timesteps, got {timesteps}")
    pairs = list(zip(timesteps[:-1], timesteps[1:], strict=True))
    if progress:
        from tqdm.auto import tqdm

        pairs = tqdm(pairs, desc="sampling", unit="step")
    for t_curr, t_next in pairs:
        t = torch.full((img.shape[0],), t_curr, device=img.device, dtype=img.dtype)
        v = velocity(model, tokens, img, t, txt, vec, guidance, cfg_scale, uncond)
        img = euler_step(img, v, t_curr, t_next)
    return img

