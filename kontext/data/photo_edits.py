"""Photo-Edit: a small set of real-photo edits with exact answers, made on this machine from the
colour photographs that ship inside the scikit-image package (no download).

Each sample is a crop of a photo (non-square, about 512 px, sides multiples of 16), one fixed
instruction and the target that a procedural edit computes from the crop pixel for pixel:

    mirror the image left to right   columns reversed
    turn it upside down              rows reversed
    make it black and white          luma (299 R + 587 G + 114 B) / 1000, rounded, in all three channels
    make it brighter                 each channel times 3/2, rounded down, clipped at 255
    add a red border                 the outer sixteenth of the short side painted (255, 0, 0)
    zoom in on the centre            the centre half of each side, every pixel repeated 2 x 2

The set is written as a `metadata.csv` (columns reference, instruction, target, task; image paths
relative to its folder), the layout that `data/import_pairs.py csv=...` reads. Two photos are
held out of it (`heldout/<photo>.png`, at half the size: what `experiment=photo_lora` trains at),
with every edit's exact answer (`heldout/<photo>_<task>.png`), for watching the training edit
photos it has never seen and scoring it (validation cases' `expected`).
"""

from __future__ import annotations

import csv
import importlib.util
import os
import random
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from kontext.errors import KontextError

# The colour photographs in skimage/data (the rest there are grayscale or synthetic).
PHOTOS = ("astronaut.png", "coffee.png", "motorcycle_left.png", "motorcycle_right.png", "hubble_deep_field.jpg",
          "ihc.png", "retina.jpg", "chelsea.png", "rocket.jpg")
HELDOUT = ("chelsea.png", "rocket.jpg")
SIZES = ((512, 384), (384, 512), (448, 512), (512, 448), (512, 320))  # (width, height)
BORDER_PER_SIDE = 16  # the border is 1/16 of the short side: 24 px at 512 x 384, 12 px at the half size trained at
RED = (255, 0, 0)


def mirror(a: np.ndarray) -> np.ndarray:
    return a[:, ::-1].copy()


def upside_down(a: np.ndarray) -> np.ndarray:
    return a[::-1].copy()


def black_and_white(a: np.ndarray) -> np.ndarray:
    """ITU-R 601 luma in integers, the same in every channel (an RGB image that looks gray)."""
    r, g, b = (a[..., i].astype(np.int32) for i in range(3))
    y = ((299 * r + 587 * g + 114 * b + 500) // 1000).astype(np.uint8)
    return np.repeat(y[..., None], 3, axis=2)


def brighter(a: np.ndarray) -> np.ndarray:
    return np.minimum(a.astype(np.int32) * 3 // 2, 255).astype(np.uint8)


def border_width(a: np.ndarray) -> int:
    """The border's width in pixels: the short side over BORDER_PER_SIDE, so that a pair and its copy at
    another size (training buckets, held-out photos) ask for the same border."""
    return max(1, min(a.shape[:2]) // BORDER_PER_SIDE)


def red_border(a: np.ndarray) -> np.ndarray:
    out, bw = a.copy(), border_width(a)
    out[:bw], out[-bw:], out[:, :bw], out[:, -bw:] = RED, RED, RED, RED
    return out


def zoom_centre(a: np.ndarray) -> np.ndarray:
    """The centre half of each side, scaled back up by repeating every pixel 2 x 2 (exact; the
    sides must be multiples of 4, as every size here is)."""
    h, w = a.shape[:2]
    centre = a[h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2]
    return centre.repeat(2, axis=0).repeat(2, axis=1)


# task name -> (instruction, edit)
EDITS: dict[str, tuple[str, Callable[[np.ndarray], np.ndarray]]] = {
    "mirror": ("mirror the image left to right", mirror),
    "flip": ("turn it upside down", upside_down),
    "grayscale": ("make it black and white", black_and_white),
    "brighten": ("make it brighter", brighter),
    "border": ("add a red border", red_border),
    "zoom": ("zoom in on the centre", zoom_centre),
}


def photo_dir() -> Path:
    """skimage/data of the installed scikit-image, found without importing it (an import takes seconds)."""
    spec = importlib.util.find_spec("skimage")
    if spec is None or not spec.submodule_search_locations:
        raise KontextError("the photo example reads the photographs inside scikit-image: pip install scikit-image")
    folder = Path(list(spec.submodule_search_locations)[0]) / "data"
    missing = [p for p in PHOTOS if not (folder / p).is_file()]
    if missing:
        raise KontextError(f"{folder} lacks {', '.join(missing)}; reinstall it: pip install --force-reinstall scikit-image")
    return folder


def load_photo(name: str, folder: Path | None = None) -> Image.Image:
    img = Image.open((folder or photo_dir()) / name)
    if img.mode != "RGB":
        raise KontextError(f"{name} is {img.mode}, not a colour photograph")
    return img


def crop(img: Image.Image, size: tuple[int, int], rng: random.Random) -> Image.Image:
    """A `size` crop of `img`, scaled (Lanczos) so that its shorter fit covers `size` at a scale
    drawn from [1, 1.5], at a drawn position: the same for the same rng state."""
    w, h = size
    scale = max(w / img.width, h / img.height) * rng.uniform(1.0, 1.5)
    sw, sh = max(w, round(img.width * scale)), max(h, round(img.height * scale))
    big = img.resize((sw, sh), Image.Resampling.LANCZOS)
    x, y = rng.randint(0, sw - w), rng.randint(0, sh - h)
    return big.crop((x, y, x + w, y + h))


def write_photo_edits(out: str | os.PathLike, n: int = 60, seed: int = 0) -> Path:
    """n pairs (photo, crop and edit drawn from `seed` and the pair's index) as PNGs under
    out/images and out/metadata.csv; the held-out photos' crops, half as large, as out/heldout/<name>.png,
    and their edits' exact answers as out/heldout/<name>_<task>.png.
    The edits go round in turn, so every one has n / 6 pairs. Returns the CSV's path."""
    folder = photo_dir()
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    (out / "heldout").mkdir(exist_ok=True)
    photos = {p: load_photo(p, folder) for p in PHOTOS}
    train = [p for p in PHOTOS if p not in HELDOUT]
    tasks = list(EDITS)
    rows = []
    for i in range(n):
        rng = random.Random(f"photo-edits-{seed}-{i}")
        name = train[rng.randrange(len(train))]
        ref = np.asarray(crop(photos[name], SIZES[rng.randrange(len(SIZES))], rng))
        task = tasks[i % len(tasks)]
        instruction, edit = EDITS[task]
        stem = f"{i:05d}_{Path(name).stem}"
        Image.fromarray(ref).save(out / "images" / f"{stem}_ref.png")
        Image.fromarray(edit(ref)).save(out / "images" / f"{stem}_{task}.png")
        rows.append((f"images/{stem}_ref.png", instruction, f"images/{stem}_{task}.png", task))
    for k, name in enumerate(HELDOUT):
        rng = random.Random(f"photo-edits-heldout-{seed}-{k}")
        w, h = SIZES[k % len(SIZES)]
        held = crop(photos[name], (w // 2, h // 2), rng)
        held.save(out / "heldout" / f"{Path(name).stem}.png")
        for task, (_, edit) in EDITS.items():  # the exact answers, for validation cases' `expected`
            Image.fromarray(edit(np.asarray(held))).save(out / "heldout" / f"{Path(name).stem}_{task}.png")
    path = out / "metadata.csv"
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(("reference", "instruction", "target", "task"))
        writer.writerows(rows)
    return path


def write_random_base(path: str | os.PathLike, preset: str = "tiny", seed: int = 0) -> Path:
    """A reference-format transformer of `preset` with every weight drawn at random (the zero-initialised
    output layers too, so that adapters get a gradient): the stand-in that `stage.init_from` starts a
    LoRA from on a machine without the official weights."""
    import torch

    from kontext.network.model import build_flux, save_flux

    model = build_flux(preset)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    return Path(save_flux(model, path))
