"""The Kontext shard format: one (references, instruction, target) sample per webdataset key.

A shard is a plain tar (webdataset convention: files sharing a key form one sample; the key
ends at the first dot). One sample `<key>` holds:

    <key>.target.{png,jpg,webp}   the target image (required in image shards)
    <key>.instruction.txt         the instruction, UTF-8 ("" allowed, e.g. an uncaptioned t2i)
    <key>.ref0.{png,jpg,webp}     zero or more references, numbered from 0 without gaps;
    <key>.ref1....                none at all = a text-to-image sample
    <key>.meta.json               {"task": str, "source": str, "size": [w, h], ...} (optional)
    <key>.<name>.npy              cached features (e.g. target_latent, ref0_latent, txt, vec),
    <key>.features.safetensors    as single .npy arrays or one safetensors blob of named tensors

Image bytes are stored as given (a PNG round-trips bit-exactly); the format is recognised
from the bytes, and the extension always matches it. An image over `max_pixels` (default
`MAX_PIXELS`) is refused from its header, before a pixel is decoded (a decompression-bomb guard).
"""

from __future__ import annotations

import hashlib
import io
import json
import re
import warnings
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

IMAGE_EXTS = ("png", "jpg", "webp")
INSTRUCTION = "instruction.txt"
META = "meta.json"
FEATURES = "features.safetensors"
KEY_RE = re.compile(r"[A-Za-z0-9_\-]+")
_REF_RE = re.compile(r"ref(\d+)\.(png|jpg|jpeg|webp)")
_TARGET_RE = re.compile(r"target\.(png|jpg|jpeg|webp)")
MAX_PIXELS = 64_000_000  # the default limit on width x height of any image read


class FormatError(ValueError):
    """A sample that does not follow the shard format; the message says why."""


class ImageTooLarge(FormatError):
    """An image whose header states more pixels than the limit."""


def check_pixels(size: tuple[int, int], max_pixels: int | None = MAX_PIXELS, name: str | None = None) -> None:
    """ImageTooLarge if a (width, height) exceeds `max_pixels` (None: no limit)."""
    w, h = size
    if max_pixels is not None and w * h > max_pixels:
        raise ImageTooLarge(f"image too large: {f'{name} is ' if name else ''}{w}x{h} pixels ({w * h / 1e6:.1f} MP), "
                            f"over the limit of {max_pixels / 1e6:.1f} MP (max_pixels={max_pixels})")


def open_image(fp, max_pixels: int | None = MAX_PIXELS, name: str | None = None) -> Image.Image:
    """`Image.open` (lazy: nothing decoded yet) whose size is checked from the header against
    `max_pixels`. Pillow's own bomb warning is silenced; its error (at about 179 MP) still
    applies, also with `max_pixels=None`, and reads as the same "image too large"."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(fp)
        except Image.DecompressionBombError as e:
            raise ImageTooLarge(f"image too large: {f'{name}: ' if name else ''}{e}") from e
    try:
        check_pixels(img.size, max_pixels, name)
    except ImageTooLarge:
        img.close()
        raise
    return img


@dataclass
class Sample:
    key: str
    instruction: str
    target: bytes | None = None  # encoded image; None only for a feature-only sample
    references: list[bytes] = field(default_factory=list)
    meta: dict[str, Any] = field(default_factory=dict)
    features: dict[str, Any] = field(default_factory=dict)  # name -> np.ndarray | torch.Tensor

    @property
    def task(self) -> str:
        return self.meta.get("task") or ("edit" if self.references else "t2i")


def image_format(data: bytes) -> str:
    """'png', 'jpg' or 'webp', from the file's magic bytes."""
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    raise FormatError("not a PNG, JPEG or WebP image")


def encode_image(img: Image.Image, fmt: str = "png", quality: int = 95) -> bytes:
    buf = io.BytesIO()
    if fmt == "png":
        img.save(buf, format="PNG")
    elif fmt == "jpg":
        img.convert("RGB").save(buf, format="JPEG", quality=quality)
    elif fmt == "webp":
        img.save(buf, format="WEBP", lossless=True)
    else:
        raise ValueError(f"image format {fmt!r} not in {IMAGE_EXTS}")
    return buf.getvalue()


def image_size(data: bytes, max_pixels: int | None = MAX_PIXELS) -> tuple[int, int]:
    """(width, height) from the header alone; FormatError if the bytes are not an image,
    ImageTooLarge if it has more than `max_pixels` pixels."""
    image_format(data)
    try:
        with open_image(io.BytesIO(data), max_pixels) as img:
            return img.size
    except ImageTooLarge:
        raise
    except Exception as e:
        raise FormatError(f"unreadable image header: {e}") from e


def decode_image(data: bytes, max_pixels: int | None = MAX_PIXELS) -> Image.Image:
    """Fully decoded RGB image; FormatError if any part of the file is broken, ImageTooLarge
    (before decoding) if it has more than `max_pixels` pixels."""
    try:
        img = open_image(io.BytesIO(data), max_pixels)
        img.load()
        return img if img.mode == "RGB" else img.convert("RGB")
    except ImageTooLarge:
        raise
    except Exception as e:
        raise FormatError(f"undecodable image: {e}") from e


def check_key(key: str) -> str:
    if not KEY_RE.fullmatch(key):
        raise FormatError(f"key {key!r} must match {KEY_RE.pattern} (no dots: they start the extension)")
    return key


def make_key(text: str) -> str:
    """A valid key from a path-like string: every other character becomes '_', and then a short
    hash of the text is added, so that `über` and `_ber` stay two keys."""
    key = re.sub(r"[^A-Za-z0-9_\-]", "_", text)
    if key == text and key:
        return key
    return f"{key}-{hashlib.sha256(text.encode('utf-8', 'surrogatepass')).hexdigest()[:8]}"


def _feature_bytes(value: Any) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.asarray(value), allow_pickle=False)
    return buf.getvalue()


def to_record(sample: Sample, *, verify: bool = True) -> dict[str, Any]:
    """The webdataset record (`__key__` plus name -> bytes) of a sample. With verify, every
    image is fully decoded first, so a broken file is refused before anything is written."""
    check_key(sample.key)
    if not isinstance(sample.instruction, str):
        raise FormatError("instruction must be a string")
    if sample.target is None and not sample.features:
        raise FormatError("a sample needs a target image or cached features")
    record: dict[str, Any] = {"__key__": sample.key, INSTRUCTION: sample.instruction.encode("utf-8")}
    meta = dict(sample.meta)
    meta.setdefault("task", sample.task)
    if sample.target is not None:
        record[f"target.{image_format(sample.target)}"] = bytes(sample.target)
        meta.setdefault("size", list(image_size(sample.target)))
    for i, ref in enumerate(sample.references):
        record[f"ref{i}.{image_format(ref)}"] = bytes(ref)
    if verify:
        for data in [sample.target, *sample.references]:
            if data is not None:
                decode_image(data)
    for name in sample.features:
        if name == "features" or not KEY_RE.fullmatch(name):
            raise FormatError(f"bad feature name {name!r}")
    if any(type(v).__module__.startswith("torch") for v in sample.features.values()):
        # torch tensors (bf16 included) go into one safetensors blob
        import torch
        from safetensors.torch import save

        record[FEATURES] = save({k: torch.as_tensor(v).contiguous() for k, v in sample.features.items()})
    else:
        for name, value in sample.features.items():
            record[f"{name}.npy"] = _feature_bytes(value)
    record[META] = json.dumps(meta, sort_keys=True).encode("utf-8")
    return record


def _load_features(record: dict[str, Any]) -> dict[str, Any]:
    features: dict[str, Any] = {}
    for name, value in record.items():
        if name.endswith(".npy"):
            features[name[: -len(".npy")]] = np.load(io.BytesIO(value), allow_pickle=False)
    if FEATURES in record:
        from safetensors.torch import load

        features.update(load(bytes(record[FEATURES])))
    return features


def from_record(record: dict[str, Any], *, features: bool = False) -> Sample:
    """Parse a raw webdataset record (bytes values) into a Sample without decoding images.
    Raises FormatError on a missing target, a gap in the reference numbers, bad JSON or text."""
    key = record.get("__key__", "?")
    targets = [k for k in record if _TARGET_RE.fullmatch(k)]
    if len(targets) > 1:
        raise FormatError(f"{key}: several target images {targets}")
    refs = sorted((int(m[1]), k) for k in record if (m := _REF_RE.fullmatch(k)))
    if [i for i, _ in refs] != list(range(len(refs))):
        raise FormatError(f"{key}: references must be numbered 0..n-1, got {[i for i, _ in refs]}")
    try:
        instruction = bytes(record[INSTRUCTION]).decode("utf-8") if INSTRUCTION in record else None
        meta = json.loads(bytes(record[META]).decode("utf-8")) if META in record else {}
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise FormatError(f"{key}: bad text or meta.json: {e}") from e
    if instruction is None:
        raise FormatError(f"{key}: no {INSTRUCTION}")
    if not isinstance(meta, dict):
        raise FormatError(f"{key}: meta.json is not an object")
    try:
        feats = _load_features(record) if features else {}
    except Exception as e:
        raise FormatError(f"{key}: unreadable cached features: {e}") from e
    target = bytes(record[targets[0]]) if targets else None
    if target is None and not (features and feats):
        raise FormatError(f"{key}: no target image")
    return Sample(key, instruction, target, [bytes(record[k]) for _, k in refs], meta, feats)
