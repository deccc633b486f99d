"""Loader throughput (samples/s) beside a plain single-process PIL decode loop over the same files.

    python benchmarks/loader_throughput.py [--out DIR] [--n64 4000] [--n512 600] [--workers 0 2]

Two shard sets, each sample a target and one reference: 64x64 PNG (Shapes-Edit) and 512x512
JPEG (synthetic photos: smooth colour fields with shapes and noise, quality 90). The loader runs
in exact mode (every sample once), batch 16, bucket area = image area (decode, no resize),
to float tensors in [-1, 1]. The baseline reads the same tars with `tarfile` and decodes every
image with PIL to an RGB array, in one process (and, as a second row, also converts it to the
float array the loader delivers). All measured in one run; prints a table and
writes JSON.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import tarfile
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from kontext.data.format import Sample, encode_image
from kontext.data.loader import KontextLoader, expand_shards
from kontext.data.stream import StreamConfig
from kontext.data.writers import ShardWriter, write_shapes_edit


def synthetic_photo(rng: np.random.Generator, size: int) -> Image.Image:
    small = rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)
    img = Image.fromarray(small).resize((size, size), Image.BICUBIC)
    draw = ImageDraw.Draw(img)
    for _ in range(6):
        x, y, r = (int(v) for v in rng.integers(0, size, 3) // (1, 1, 3))
        draw.ellipse([x - r, y - r, x + r, y + r], fill=tuple(int(c) for c in rng.integers(0, 255, 3)))
    noise = rng.normal(0, 6, (size, size, 3))
    arr = np.clip(np.asarray(img.filter(ImageFilter.GaussianBlur(1)), dtype=np.float32) + noise, 0, 255)
    return Image.fromarray(arr.astype(np.uint8))


def write_jpeg_shards(out: Path, n: int, size: int = 512) -> list[str]:
    rng = np.random.default_rng(0)
    with ShardWriter(str(out / "photo-%04d.tar"), maxcount=50, verify=False) as w:
        for i in range(n):
            target, ref = synthetic_photo(rng, size), synthetic_photo(rng, size)
            w.write(Sample(f"p{i:06d}", "make it brighter", encode_image(target, "jpg", 90),
                           [encode_image(ref, "jpg", 90)], {"task": "edit", "source": "synthetic"}))
    return w.shards


def pil_loop(shards: list[str], to_float: bool = False) -> tuple[int, float]:
    """Plain baseline: every image of every sample decoded to an RGB array, one process;
    with to_float also made a (3, H, W) float32 array in [-1, 1], as the loader delivers."""
    t0, n = time.perf_counter(), 0
    for path in shards:
        with tarfile.open(path) as tar:
            for member in tar:
                name = member.name.split(".", 1)[1]
                if name.startswith(("target.", "ref")):
                    data = tar.extractfile(member).read()
                    arr = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))
                    if to_float:
                        arr = arr.transpose(2, 0, 1).astype(np.float32) / 127.5 - 1
                    n += name.startswith("target.")
    return n, time.perf_counter() - t0


def loader_run(shards: list[str], size: int, workers: int) -> tuple[int, float]:
    cfg = StreamConfig(batch_size=16, mode="exact", max_area=size * size, shuffle_buffer=100)
    loader = KontextLoader(shards, cfg, num_workers=workers)
    t0, n = time.perf_counter(), 0
    for batch in loader:
        n += len(batch["key"])
    return n, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=None, help="folder for shards and results (default: a temp folder)")
    p.add_argument("--n64", type=int, default=4000)
    p.add_argument("--n512", type=int, default=600)
    p.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = p.parse_args()
    out = Path(args.out or tempfile.mkdtemp(prefix="kontext-bench-"))
    sets = {
        "64x64 PNG": (write_shapes_edit(out / "png64", args.n64, size=64, shard_size=250), 64),
        "512x512 JPEG": (write_jpeg_shards(out / "jpg512", args.n512), 512),
    }
    rows = []
    for name, (shards, size) in sets.items():
        shards = expand_shards(shards)
        pil_loop(shards[:1])  # warm the page cache
        n, dt = pil_loop(shards)
        rows.append({"data": name, "reader": "PIL loop (1 process)", "samples": n, "seconds": dt})
        n, dt = pil_loop(shards, to_float=True)
        rows.append({"data": name, "reader": "PIL loop + float (1 proc)", "samples": n, "seconds": dt})
        for w in args.workers:
            n, dt = loader_run(shards, size, w)
            rows.append({"data": name, "reader": f"KontextLoader, {w} workers", "samples": n, "seconds": dt})
    for r in rows:
        r["samples_per_s"] = r["samples"] / r["seconds"]
    env = {"cpus": os.cpu_count(), "load_avg_1min": os.getloadavg()[0], "python": platform.python_version(),
           "machine": platform.machine()}
    print(f"{'data':<14} {'reader':<28} {'samples':>8} {'s':>7} {'samples/s':>10}")
    for r in rows:
        print(f"{r['data']:<14} {r['reader']:<28} {r['samples']:>8} {r['seconds']:>7.2f} {r['samples_per_s']:>10.0f}")
    print(f"environment: {env}")
    (out / "loader_throughput.json").write_text(json.dumps({"rows": rows, "environment": env}, indent=1))
    print(f"results: {out / 'loader_throughput.json'}")


if __name__ == "__main__":
    main()
