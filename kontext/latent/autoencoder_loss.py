"""Objective and metrics of autoencoder training, as plain functions plus the patch discriminator.

Reconstruction (L1 / L2), the KL term to N(0, I) (in :class:`kontext.latent.autoencoder.DiagonalGaussian`),
an optional patch discriminator with hinge losses (after pix2pix's PatchGAN, used by the
LDM-family autoencoders that FLUX's descends from), and, for images drawn from a fixed palette
(Shapes-Edit), a per-pixel palette classification loss: logits -||x - p_k||^2 / tau, so that
what is optimised is what the Shapes-Edit scorer measures (the nearest palette colour).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def reconstruction_loss(x_rec: Tensor, x: Tensor, kind: str = "l1", weight: Tensor | None = None) -> Tensor:
    """Mean L1 or L2 error; `weight` (B, 1, H, W) reweights pixels (normalised to mean 1)."""
    if kind not in ("l1", "l2"):
        raise ValueError(f"reconstruction loss must be 'l1' or 'l2', got {kind!r}")
    err = (x_rec - x).abs() if kind == "l1" else (x_rec - x) ** 2
    if weight is None:
        return err.mean()
    return (err * weight).mean() / weight.mean()


def palette_tensor(colors, like: Tensor) -> Tensor:
    """(K, 3) palette of sRGB 0..255 triples, in the [-1, 1] image range."""
    return torch.as_tensor(colors, dtype=like.dtype, device=like.device) / 127.5 - 1.0


def palette_logits(x: Tensor, palette: Tensor, tau: float) -> Tensor:
    """(B, 3, H, W), (K, 3) -> (B, K, H, W): -squared distance to each palette colour / tau."""
    d2 = ((x.unsqueeze(1) - palette[None, :, :, None, None]) ** 2).sum(dim=2)
    return -d2 / tau


def quantize(x: Tensor) -> Tensor:
    """[-1, 1] images to the 0..255 integer levels an image file would hold (as float)."""
    return ((x.clamp(-1, 1) + 1) * 127.5).round()


def class_map(x: Tensor, palette: Tensor) -> Tensor:
    """(B, 3, H, W) in [-1, 1] -> (B, H, W) index of the nearest palette colour, measured on the
    8-bit image (ties to the earlier entry), as the Shapes-Edit scorer does."""
    levels = quantize(x)
    pal = quantize(palette)
    d2 = ((levels.unsqueeze(1) - pal[None, :, :, None, None]) ** 2).sum(dim=2)
    return d2.argmin(dim=1)


def foreground_weight(classes: Tensor, fg_weight: float, edge_weight: float = 0.0) -> Tensor:
    """(B, H, W) class map -> (B, 1, H, W) pixel weights: 1, plus `fg_weight` off the image's most
    frequent class (the background), plus `edge_weight` where a 3x3 neighbour has another class."""
    b = classes.shape[0]
    background = classes.reshape(b, -1).mode(dim=1).values[:, None, None]
    w = 1.0 + fg_weight * (classes != background).float()
    if edge_weight:
        c = classes[:, None].float()
        hi = F.max_pool2d(c, 3, stride=1, padding=1)
        lo = -F.max_pool2d(-c, 3, stride=1, padding=1)
        w = w + edge_weight * (hi != lo).squeeze(1).float()
    return w[:, None]


def palette_loss(x_rec: Tensor, classes: Tensor, palette: Tensor, tau: float, weight: Tensor | None = None) -> Tensor:
    """Cross-entropy of the reconstruction's palette logits against the input's class map."""
    ce = F.cross_entropy(palette_logits(x_rec, palette, tau), classes, reduction="none")  # (B, H, W)
    if weight is None:
        return ce.mean()
    w = weight.squeeze(1)
    return (ce * w).mean() / w.mean()


def psnr(x_rec: Tensor, x: Tensor) -> Tensor:
    """(B,) PSNR in dB of [-1, 1] images (peak-to-peak 2), after clamping the reconstruction."""
    mse = ((x_rec.clamp(-1, 1) - x) ** 2).flatten(1).mean(dim=1)
    return 10 * torch.log10(4.0 / mse.clamp_min(1e-10))


class PatchDiscriminator(nn.Module):
    """PatchGAN: strided 4x4 convs with LeakyReLU; one real/fake logit per overlapping patch."""

    def __init__(self, in_channels: int = 3, channels: int = 64, layers: int = 3):
        super().__init__()
        mods: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, stride=2, padding=1), nn.LeakyReLU(0.2)]
        c = channels
        for i in range(1, layers + 1):
            c_next = channels * min(2**i, 8)
            stride = 2 if i < layers else 1
            mods += [nn.Conv2d(c, c_next, 4, stride=stride, padding=1, bias=False),
                     nn.BatchNorm2d(c_next), nn.LeakyReLU(0.2)]
            c = c_next
        mods.append(nn.Conv2d(c, 1, 4, stride=1, padding=1))
        self.main = nn.Sequential(*mods)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, 1, h, w) logits
        return self.main(x)


def patch_d_loss(logits_real: Tensor, logits_fake: Tensor) -> Tensor:
    """The patch discriminator's hinge loss, halved as in taming-transformers: its logits are
    averaged over patches (the LADD heads' hinge, `kontext.diffusion.distill.hinge_d_loss`,
    sums over heads and is not halved)."""
    return 0.5 * (F.relu(1.0 - logits_real).mean() + F.relu(1.0 + logits_fake).mean())


def patch_g_loss(logits_fake: Tensor) -> Tensor:
    return -logits_fake.mean()
