"""The FLUX convolutional autoencoder: images in [-1, 1] <-> 16-channel latents, 8x smaller.

FLUX.1 works in the latent space of a KL-regularised convolutional autoencoder trained from
scratch (FLUX.1 Kontext report, §2). This module keeps the reference parameter layout and key
names of `ae.safetensors` (encoder/decoder, `down.i.block.j`, `mid.attn_1`, `up.i.upsample`,
...), so the official file loads strictly and without an adapter; the `embedded` preset is a
small instance of the same layout for the 64x64 Shapes-Edit default.

Latent convention (as the reference): `encode(x) = scale_factor * (mean - shift_factor)`,
`decode(z) = decoder(z / scale_factor + shift_factor)`. The reference's regulariser draws a
posterior sample by default; `encode` here returns the posterior mean (deterministic latents for
the context images and the feature cache) and `encode(x, sample=True)` draws the sample.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from kontext.formats.weights import (
    WeightsError,
    load_into,
    read_metadata,
    read_safetensors,
    save_safetensors,
    strip_prefix,
)

GROUPS = 32  # GroupNorm groups everywhere, as in the reference: channel counts must divide by 32


@dataclass
class AutoEncoderParams:
    resolution: int  # nominal training resolution (bookkeeping only; any multiple of 8 works)
    in_channels: int
    ch: int  # channels of the first level; level i has ch * ch_mult[i]
    out_ch: int
    ch_mult: list[int]  # one entry per level; len(ch_mult) - 1 downsamples
    num_res_blocks: int  # per encoder level (the decoder has one more)
    z_channels: int
    scale_factor: float
    shift_factor: float

    def __post_init__(self):
        self.ch_mult = [int(m) for m in self.ch_mult]  # accept Hydra's ListConfig
        if not self.ch_mult or min(self.ch_mult) < 1:
            raise ValueError(f"ch_mult must be a non-empty list of positive ints, got {self.ch_mult}")
        bad = [self.ch * m for m in self.ch_mult if (self.ch * m) % GROUPS]
        if bad:
            raise ValueError(f"GroupNorm({GROUPS}) needs channel counts divisible by {GROUPS}; got {bad} "
                             f"from ch={self.ch}, ch_mult={self.ch_mult}")
        if self.num_res_blocks < 1 or self.z_channels < 1 or self.scale_factor == 0:
            raise ValueError(f"invalid autoencoder params: {self}")

    @property
    def downsample(self) -> int:
        """Spatial reduction factor of the latent (8 for four levels)."""
        return 2 ** (len(self.ch_mult) - 1)


AE_PRESETS: dict[str, AutoEncoderParams] = {
    # The official FLUX.1 / Kontext autoencoder: 244 tensors, 83,819,683 parameters.
    "flux": AutoEncoderParams(resolution=256, in_channels=3, ch=128, out_ch=3, ch_mult=[1, 2, 4, 4],
                              num_res_blocks=2, z_channels=16, scale_factor=0.3611, shift_factor=0.1159),
    # The embedded default for 64x64 Shapes-Edit (kontext/assets/embedded_ae.safetensors);
    # scale/shift are the trained file's, measured on its latents.
    "embedded": AutoEncoderParams(resolution=64, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 1, 2, 2],
                                  num_res_blocks=1, z_channels=16, scale_factor=0.5851123501468534,
                                  shift_factor=0.008112352922065191),
}

EMBEDDED_PATH = Path(__file__).resolve().parents[1] / "assets" / "embedded_ae.safetensors"


def swish(x: Tensor) -> Tensor:
    return F.silu(x)  # x * sigmoid(x), in one pass


def Normalize(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(num_groups=GROUPS, num_channels=channels, eps=1e-6, affine=True)


class AttnBlock(nn.Module):
    """Single-head self-attention over all h*w positions, with 1x1-conv projections."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        q, k, v = (rearrange(f(h), "b c h w -> b 1 (h w) c") for f in (self.q, self.k, self.v))
        h = F.scaled_dot_product_attention(q, k, v)  # (B, 1, h*w, C)
        h = rearrange(h, "b 1 (h w) c -> b c h w", h=x.shape[2], w=x.shape[3])
        return x + self.proj_out(h)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        self.norm2 = Normalize(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(swish(self.norm1(x)))
        h = self.conv2(swish(self.norm2(h)))
        if hasattr(self, "nin_shortcut"):
            x = self.nin_shortcut(x)
        return x + h


class Downsample(nn.Module):
    """Stride-2 3x3 conv after padding one pixel on the right and bottom only."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))


class Upsample(nn.Module):
    """Nearest-neighbour x2, then a 3x3 conv."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: list[nn.Module], resample: nn.Module | None, name: str) -> nn.Module:
    """One resolution level, keyed as in the reference: `block.j`, (empty) `attn`, `downsample`/`upsample`."""
    level = nn.Module()
    level.block = nn.ModuleList(blocks)
    level.attn = nn.ModuleList()  # the reference layout has no per-level attention
    if resample is not None:
        setattr(level, name, resample)
    return level


def _mid(channels: int) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(channels, channels)
    mid.attn_1 = AttnBlock(channels)
    mid.block_2 = ResnetBlock(channels, channels)
    return mid


class Encoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.num_resolutions = len(p.ch_mult)
        self.conv_in = nn.Conv2d(p.in_channels, p.ch, kernel_size=3, stride=1, padding=1)
        self.down = nn.ModuleList()
        block_in = p.ch
        for i, mult in enumerate(p.ch_mult):
            blocks = []
            for _ in range(p.num_res_blocks):
                blocks.append(ResnetBlock(block_in, p.ch * mult))
                block_in = p.ch * mult
            last = i == self.num_resolutions - 1
            self.down.append(_level(blocks, None if last else Downsample(block_in), "downsample"))
        self.mid = _mid(block_in)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * p.z_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: Tensor) -> Tensor:  # (B, 3, H, W) -> (B, 2z, H/f, W/f)
        h = self.conv_in(x)
        for i, level in enumerate(self.down):
            for block in level.block:
                h = block(h)
            if i != self.num_resolutions - 1:
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(swish(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, p: AutoEncoderParams):
        super().__init__()
        self.num_resolutions = len(p.ch_mult)
        block_in = p.ch * p.ch_mult[-1]
        self.conv_in = nn.Conv2d(p.z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid(block_in)
        # Built from the lowest resolution up but stored by level, so `up.0` is full resolution.
        up = []
        for i in reversed(range(self.num_resolutions)):
            blocks = []
            for _ in range(p.num_res_blocks + 1):
                blocks.append(ResnetBlock(block_in, p.ch * p.ch_mult[i]))
                block_in = p.ch * p.ch_mult[i]
            up.insert(0, _level(blocks, Upsample(block_in) if i != 0 else None, "upsample"))
        self.up = nn.ModuleList(up)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, p.out_ch, kernel_size=3, stride=1, padding=1)

    def forward(self, z: Tensor) -> Tensor:  # (B, z, h, w) -> (B, 3, h*f, w*f)
        h = self.conv_in(z)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i in reversed(range(self.num_resolutions)):
            for block in self.up[i].block:
                h = block(h)
            if i != 0:
                h = self.up[i].upsample(h)
        return self.conv_out(swish(self.norm_out(h)))


@dataclass
class DiagonalGaussian:
    """The encoder's posterior N(mean, exp(logvar)) in the raw (unscaled) latent space."""

    mean: Tensor  # (B, z, h, w)
    logvar: Tensor  # (B, z, h, w), clamped for a finite KL

    @classmethod
    def from_moments(cls, moments: Tensor) -> DiagonalGaussian:
        mean, logvar = moments.chunk(2, dim=1)
        return cls(mean, logvar.clamp(-30.0, 20.0))

    def sample(self, generator: torch.Generator | None = None) -> Tensor:
        noise = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + torch.exp(0.5 * self.logvar) * noise

    def kl(self) -> Tensor:  # (B,) KL to N(0, I), summed over the latent
        return 0.5 * (self.mean**2 + self.logvar.exp() - 1.0 - self.logvar).sum(dim=(1, 2, 3))


class AutoEncoder(nn.Module):
    def __init__(self, params: AutoEncoderParams):
        super().__init__()
        self.params = params
        self.encoder = Encoder(params)
        self.decoder = Decoder(params)
        self.scale_factor = params.scale_factor
        self.shift_factor = params.shift_factor

    def _check(self, x: Tensor, channels: int, factor: int, what: str) -> None:
        if x.ndim != 4 or x.shape[1] != channels or x.shape[2] % factor or x.shape[3] % factor:
            raise ValueError(f"{what} must be (B, {channels}, H, W) with H, W divisible by {factor}; "
                             f"got {tuple(x.shape)}")

    def posterior(self, x: Tensor) -> DiagonalGaussian:
        """The raw posterior of images x (B, 3, H, W) in [-1, 1] (no scale/shift): for training."""
        self._check(x, self.params.in_channels, self.params.downsample, "images")
        return DiagonalGaussian.from_moments(self.encoder(x))

    def scale(self, raw: Tensor) -> Tensor:
        return self.scale_factor * (raw - self.shift_factor)

    def unscale(self, z: Tensor) -> Tensor:
        return z / self.scale_factor + self.shift_factor

    def encode(self, x: Tensor, sample: bool = False, generator: torch.Generator | None = None) -> Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> latents (B, z, H/f, W/f): the scaled, shifted
        posterior mean (or a posterior sample with `sample=True`)."""
        post = self.posterior(x)
        return self.scale(post.sample(generator) if sample else post.mean)

    def decode(self, z: Tensor) -> Tensor:
        """Latents (B, z, h, w) -> images (B, 3, h*f, w*f), nominally in [-1, 1] (not clamped)."""
        self._check(z, self.params.z_channels, 1, "latents")
        return self.decoder(self.unscale(z))

    def forward(self, x: Tensor) -> Tensor:
        return self.decode(self.encode(x))

    def current_params(self) -> AutoEncoderParams:
        """The params with the scale/shift this instance uses now."""
        return replace(self.params, scale_factor=float(self.scale_factor), shift_factor=float(self.shift_factor))


# --------------------------------------------------------------------------------------- files
ARCH_FIELDS = tuple(f.name for f in fields(AutoEncoderParams) if f.name not in ("scale_factor", "shift_factor"))


def params_from_metadata(meta: dict[str, str]) -> AutoEncoderParams | None:
    """The params stored in a file written by `save_autoencoder` (None for other files)."""
    if "params" not in meta:
        return None
    try:
        return AutoEncoderParams(**json.loads(meta["params"]))
    except (TypeError, ValueError) as err:
        raise WeightsError(f"autoencoder file has unreadable params metadata: {err}") from err


def load_autoencoder(path: str | os.PathLike = EMBEDDED_PATH, params: AutoEncoderParams | None = None,
                     device: str | torch.device = "cpu") -> AutoEncoder:
    """Load an autoencoder strictly from a reference-format safetensors file.

    Architecture: `params` if given, else the params stored in the file (our own files), else
    the `flux` preset (the official `ae.safetensors`, which stores none). If both the file and
    `params` state an architecture they must agree. scale/shift come from the file when it
    stores them (they were measured on its own latents), else from `params`.
    """
    meta = read_metadata(path) if Path(path).is_file() else {}
    stored = params_from_metadata(meta)
    if params is None:
        params = stored or AE_PRESETS["flux"]
    elif stored is not None:
        diff = [f"{k}: file {getattr(stored, k)} vs config {getattr(params, k)}"
                for k in ARCH_FIELDS if getattr(stored, k) != getattr(params, k)]
        if diff:
            raise WeightsError(f"autoencoder file {path} has another architecture than asked: {'; '.join(diff)}")
    if stored is not None:
        params = replace(params, scale_factor=stored.scale_factor, shift_factor=stored.shift_factor)
    sd = strip_prefix(read_safetensors(path, device=device), ("first_stage_model.", "vae.", "ae."))
    with torch.device("meta"):
        ae = AutoEncoder(params)
    load_into(ae, sd, what=f"autoencoder weights in {path}", assign=True)
    return ae.eval()


def save_autoencoder(ae: AutoEncoder, path: str | os.PathLike, metadata: dict | None = None) -> Path:
    """Write the reference-format tensors plus our params (with current scale/shift) as metadata."""
    meta = {"format": "kontext.latent.autoencoder", "params": asdict(ae.current_params()), **(metadata or {})}
    return save_safetensors(ae.state_dict(), path, meta)
