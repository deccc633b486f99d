"""Aspect-ratio buckets and the Kontext preferred resolutions.

A bucket is a (width, height) with both sides multiples of 16 (one latent 2x2 patch of an
8x autoencoder) and an area of at most the configured `max_area`. Every image is scaled to its
bucket at its own aspect ratio and centre-cropped to it, so a batch of one bucket stacks.

`PREFERRED_KONTEXT_RESOLUTIONS` is the (width, height) list the reference FLUX.1 Kontext code
snaps context images to (about 1 MP each); `preferred_size` scales it to another area.
"""

from __future__ import annotations

import math

from PIL import Image, ImageOps

MULTIPLE = 16
# How references are sized (`data.reference_size`): the target's bucket and crop, their own
# aspect ratio under their own pixel budget, or the nearest preferred Kontext resolution.
REFERENCE_SIZES = ("strict", "loose", "preferred")

# (width, height), about 1024 * 1024 pixels each, ordered from tallest to widest.
PREFERRED_KONTEXT_RESOLUTIONS: tuple[tuple[int, int], ...] = (
    (672, 1568), (688, 1504), (720, 1456), (752, 1392), (800, 1328), (832, 1248), (880, 1184),
    (944, 1104), (1024, 1024), (1104, 944), (1184, 880), (1248, 832), (1328, 800), (1392, 752),
    (1456, 720), (1504, 688), (1568, 672),
)


def _floor(x: float, m: int = MULTIPLE) -> int:
    return max(m, int(x) // m * m)


def bucket_size(width: int, height: int, max_area: int, max_aspect: float = 4.0) -> tuple[int, int]:
    """The (W, H) bucket of an image: its aspect ratio (clamped to [1/max_aspect, max_aspect]),
    scaled to area <= max_area, sides floored to multiples of 16."""
    if width <= 0 or height <= 0:
        raise ValueError(f"bad image size {width}x{height}")
    aspect = min(max(width / height, 1 / max_aspect), max_aspect)
    h = math.sqrt(max_area / aspect)
    return _floor(h * aspect), _floor(h)


def preferred_size(width: int, height: int, area: int = 1024 * 1024) -> tuple[int, int]:
    """The preferred Kontext resolution nearest in aspect ratio, scaled to `area` and floored to
    multiples of 16; at the default area this is exactly an entry of the list."""
    aspect = width / height
    pw, ph = min(PREFERRED_KONTEXT_RESOLUTIONS, key=lambda r: abs(aspect - r[0] / r[1]))
    scale = math.sqrt(area / (1024 * 1024))
    return _floor(pw * scale), _floor(ph * scale)


def fit(img: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Scale to cover `size` (W, H) and centre-crop; untouched when already that size.
    No flips or random crops: instructions name positions ("left", "top right")."""
    if img.size == tuple(size):
        return img
    return ImageOps.fit(img, size, method=Image.LANCZOS, centering=(0.5, 0.5))
