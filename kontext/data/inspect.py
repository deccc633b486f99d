"""Looking at shards: sample counts per task, target-size and reference-count histograms,
unreadable samples, and a picture grid (references | target, instruction underneath)."""

from __future__ import annotations

import textwrap
from collections import Counter
from dataclasses import dataclass, field

import webdataset as wds
from PIL import Image, ImageDraw

from kontext.data.format import FormatError, Sample, decode_image, from_record, image_size
from kontext.data.loader import expand_shards


@dataclass
class ShardSummary:
    shards: int = 0
    samples: int = 0
    tasks: Counter = field(default_factory=Counter)
    sizes: Counter = field(default_factory=Counter)  # "WxH" of the target -> count
    references: Counter = field(default_factory=Counter)  # number of references -> count
    sources: Counter = field(default_factory=Counter)
    bad: list[tuple[str, str]] = field(default_factory=list)  # (key, reason)

    def table(self) -> str:
        def block(title: str, c: Counter) -> list[str]:
            return [title] + [f"  {n:8d}  {k}" for k, n in sorted(c.items(), key=lambda kv: (-kv[1], str(kv[0])))]

        lines = [f"{self.samples} samples in {self.shards} shards, {len(self.bad)} unreadable"]
        lines += block("tasks:", self.tasks) + block("target sizes:", self.sizes)
        lines += block("references per sample:", self.references) + block("sources:", self.sources)
        lines += [f"  unreadable {k}: {r}" for k, r in self.bad[:10]]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"shards": self.shards, "samples": self.samples, "tasks": dict(self.tasks),
                "sizes": dict(self.sizes), "references": {str(k): v for k, v in self.references.items()},
                "sources": dict(self.sources), "bad": [list(b) for b in self.bad]}


def summarize(shards: str | list[str], grid_samples: int = 0) -> tuple[ShardSummary, list[Sample]]:
    """Read every sample once (headers only); also keep the first `grid_samples` good ones."""
    urls = expand_shards(shards)
    summary, keep = ShardSummary(shards=len(urls)), []

    def on_error(exn: Exception) -> bool:
        summary.bad.append(("<shard>", str(exn)))
        return True

    for rec in wds.tariterators.tarfile_samples(({"url": u} for u in urls), handler=on_error):
        try:
            s = from_record(rec)
            w, h = image_size(s.target)
            for r in s.references:
                image_size(r)
        except FormatError as e:
            summary.bad.append((rec.get("__key__", "?"), str(e)))
            continue
        summary.samples += 1
        summary.tasks[s.task] += 1
        summary.sizes[f"{w}x{h}"] += 1
        summary.references[len(s.references)] += 1
        summary.sources[s.meta.get("source", "?")] += 1
        if len(keep) < grid_samples:
            keep.append(s)
    return summary, keep


def picture_grid(samples: list[Sample], cell: int = 128) -> Image.Image:
    """One row per sample: its references, then its target, then the wrapped instruction."""
    cols = max([len(s.references) for s in samples] + [0]) + 1
    text_w = max(2 * cell, 240)
    row_h = cell + 4
    grid = Image.new("RGB", (cols * (cell + 4) + text_w, max(1, len(samples)) * row_h), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, s in enumerate(samples):
        y = r * row_h
        images = [*s.references] + [None] * (cols - 1 - len(s.references)) + [s.target]
        for c, data in enumerate(images):
            if data is None:
                continue
            img = decode_image(data)
            img.thumbnail((cell, cell))
            grid.paste(img, (c * (cell + 4), y))
        label = f"[{s.task}] {s.instruction or '(no instruction)'}"
        draw.multiline_text((cols * (cell + 4) + 2, y + 2), "\n".join(textwrap.wrap(label, text_w // 6)[: cell // 12]), fill=(0, 0, 0))
    return grid
