"""User images in and out of the pipeline: reading, colour conversion and the size policy.

Size policy (reference Kontext sampler, fact sheet §4, relaxed for small images): an image
up to ``max_area`` pixels (1024² by default) keeps its size, floored to multiples of 16 (the
autoencoder's 8x reduction times the 2x2 token patch); a larger one is resized to the entry
of the Kontext preferred-resolution list closest in aspect ratio (all about one megapixel;
scaled to ``max_area`` when that is set to another area).
Resizing uses LANCZOS and never crops, so the aspect ratio may change slightly.

Any readable image becomes 8-bit RGB: transparency is composited onto white, greyscale is
expanded, 16-bit and floating-point pixels are scaled to 8 bits. A missing, unreadable or
truncated file, or one over ``max_pixels`` pixels (refused from its header, before decoding),
is an :class:`ImageError` with a one-line message.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError
from torch import Tensor

from kontext.data.buckets import preferred_size
from kontext.data.format import MAX_PIXELS, ImageTooLarge, open_image
from kontext.errors import KontextError

MAX_AREA = 1024 * 1024
MULTIPLE = 16  # autoencoder reduction (8) x token patch (2)

ImageInput = str | os.PathLike | Image.Image


class ImageError(KontextError):
    """An input image that is missing, unreadable or unusable."""


def load_image(source: ImageInput, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """An 8-bit RGB image from a path or a PIL image (EXIF orientation applied for files)."""
    if isinstance(source, Image.Image):
        return to_rgb(source)
    path = Path(source).expanduser()
    if not path.is_file():
        raise ImageError(f"image not found: {path}" if not path.is_dir() else f"image {path} is a folder")
    try:
        with open_image(path, max_pixels, name=str(path)) as img:
            img.load()  # decode now, so a truncated file fails here and not later
            img = ImageOps.exif_transpose(img)
            return to_rgb(img)
    except ImageTooLarge as err:
        raise ImageError(str(err)) from err
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise ImageError(f"cannot read image {path}: not an image or the file is corrupt ({err})") from err


def to_rgb(img: Image.Image) -> Image.Image:
    """8-bit RGB: alpha composited onto white, greyscale expanded, 16-bit and float rescaled."""
    if img.mode == "RGB":
        return img
    if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I", "F"):
        # Pillow's own convert() clips these to 255 instead of rescaling them.
        px = np.asarray(img, dtype=np.float64)
        if img.mode == "F":
            scale = 255.0 if px.max(initial=0) <= 1.0 else 1.0
        else:
            scale = 1 / 257 if img.mode.startswith("I;16") or px.max(initial=0) > 255 else 1.0
        img = Image.fromarray(np.clip(px * scale + 0.5, 0, 255).astype(np.uint8))
    if img.mode == "P":
        img = img.convert("RGBA" if "transparency" in img.info else "RGB")
    if img.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = img.convert("RGBA")
        canvas = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(canvas, rgba).convert("RGB")
    return img.convert("RGB")


def snap_size(width: int, height: int, max_area: int = MAX_AREA) -> tuple[int, int]:
    """The (width, height) an image of this size is resized to (see the module docstring)."""
    if width < 1 or height < 1:
        raise ImageError(f"image size must be positive, got {width}x{height}")
    if width * height > max_area:
        return preferred_size(width, height, area=max_area)
    return max(MULTIPLE, width // MULTIPLE * MULTIPLE), max(MULTIPLE, height // MULTIPLE * MULTIPLE)


def check_output_size(width: int, height: int) -> tuple[int, int]:
    """An explicitly asked output size, floored to multiples of 16 (at least 16)."""
    if int(width) < 1 or int(height) < 1:
        raise ImageError(f"output size must be positive, got width={width} height={height}")
    return max(MULTIPLE, int(width) // MULTIPLE * MULTIPLE), max(MULTIPLE, int(height) // MULTIPLE * MULTIPLE)


def prepare_reference(source: ImageInput, max_area: int = MAX_AREA,
                      max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Load one reference and resize it to its snapped size."""
    img = load_image(source, max_pixels)
    size = snap_size(*img.size, max_area=max_area)
    return img if img.size == size else img.resize(size, Image.LANCZOS, reducing_gap=3.0)


def to_tensor(images: Sequence[Image.Image]) -> Tensor:
    """Same-size RGB images -> (B, 3, H, W) float32 in [-1, 1]."""
    arrays = np.stack([np.asarray(img.convert("RGB"), dtype=np.float32) for img in images])
    return torch.from_numpy(arrays).permute(0, 3, 1, 2) / 127.5 - 1.0


def to_pil(x: Tensor) -> list[Image.Image]:
    """(B, 3, H, W) in [-1, 1] (clamped) -> 8-bit RGB images."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a) for a in x.permute(0, 2, 3, 1).cpu().numpy()]
