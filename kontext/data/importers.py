"""Importers: a folder of image pairs, or a JSONL manifest, into Kontext shards.

Folder layout (the convention of common Kontext trainers): target images with a same-named
`.txt` instruction beside them, and one folder per reference holding files of the same relative
name (any image extension). No reference folder gives text-to-image samples.

    targets/cat_01.png  targets/cat_01.txt      refs_a/cat_01.jpg      refs_b/cat_01.png

Manifest: one JSON object per line, paths relative to the manifest's folder:

    {"reference": "a.jpg" | ["a.jpg", "b.png"] | null, "instruction": "...", "target": "t.png",
     "task": "...", "key": "..."}      (task and key optional)

Every pair is checked (files exist, decode, are at least `min_side` pixels, instruction present,
key unique) before it is written; a pair that fails is skipped as a whole and listed with the
reason in the report. PNG, JPEG and WebP bytes are copied unchanged; other formats (BMP, TIFF,
GIF, ...) are converted to PNG without loss.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from kontext.data.format import FormatError, Sample, decode_image, encode_image, image_format, make_key
from kontext.data.writers import ShardWriter

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


@dataclass
class ImportReport:
    written: int = 0
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (item, reason)
    shards: list[str] = field(default_factory=list)

    def summary(self) -> str:
        reasons = Counter(r.split(":")[0] for _, r in self.skipped)
        lines = [f"wrote {self.written} samples to {len(self.shards)} shards; skipped {len(self.skipped)}"]
        lines += [f"  {n:6d}  {reason}" for reason, n in reasons.most_common()]
        return "\n".join(lines)

    def to_json(self, path: str | os.PathLike) -> None:
        skipped = [{"item": item, "reason": reason} for item, reason in self.skipped]
        Path(path).write_text(json.dumps({"written": self.written, "shards": self.shards, "skipped": skipped},
                                         indent=1))


def read_image(path: Path, min_side: int = 16) -> bytes:
    """Shard-ready bytes of one image file (see the module docstring); FormatError on failure."""
    if not path.is_file():
        raise FormatError(f"missing file: {path}")
    data = path.read_bytes()
    try:
        image_format(data)
        img = decode_image(data)
    except FormatError:
        try:
            with Image.open(io.BytesIO(data)) as im:
                im.load()
                img = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        except Exception as e:
            raise FormatError(f"unreadable image: {path}: {e}") from e
        data = encode_image(img, "png")
    if min(img.size) < min_side:
        raise FormatError(f"image smaller than {min_side} px: {path} is {img.size[0]}x{img.size[1]}")
    return data


def _pair(key: str, target: Path, instruction: str | None, refs: list[Path], meta: dict,
          min_side: int, allow_empty: bool) -> Sample:
    if instruction is None:
        raise FormatError(f"no instruction for {target}")
    instruction = instruction.strip()
    if not instruction and not allow_empty:
        raise FormatError(f"empty instruction for {target}")
    target_bytes = read_image(target, min_side)
    ref_bytes = [read_image(r, min_side) for r in refs]
    meta = {"task": "edit" if refs else "t2i", **meta}
    return Sample(make_key(key), instruction, target_bytes, ref_bytes, meta)


class _Importer:
    def __init__(self, writer: ShardWriter):
        self.writer, self.report, self.keys = writer, ImportReport(), set()

    def add(self, item: str, build) -> None:
        try:
            sample = build()
            if sample.key in self.keys:
                raise FormatError(f"duplicate key {sample.key!r}")
            self.writer.write(sample)
        except (FormatError, OSError, ValueError) as e:
            self.report.skipped.append((item, str(e)))
            return
        self.keys.add(sample.key)
        self.report.written += 1

    def finish(self) -> ImportReport:
        self.report.shards = self.writer.close()
        return self.report


def _find_reference(folder: Path, rel: Path) -> Path:
    matches = [p for s in IMAGE_SUFFIXES for p in [folder / rel.with_suffix(s)] if p.is_file()]
    if not matches:
        raise FormatError(f"missing reference: no {rel.with_suffix('.*')} in {folder}")
    if len(matches) > 1:
        raise FormatError(f"ambiguous reference: {[str(m) for m in matches]}")
    return matches[0]


def folder_pairs(target_dir: Path) -> Iterator[tuple[Path, Path]]:
    """(target path, path relative to the folder) of every image under the folder, sorted."""
    for path in sorted(target_dir.rglob("*")):
        if path.suffix.lower() in IMAGE_SUFFIXES and path.is_file():
            yield path, path.relative_to(target_dir)


def import_folder(target_dir: str | os.PathLike, reference_dirs: list[str | os.PathLike], writer: ShardWriter,
                  *, task: str | None = None, source: str | None = None, min_side: int = 16,
                  allow_empty: bool = False) -> ImportReport:
    target_dir, ref_dirs = Path(target_dir), [Path(d) for d in reference_dirs]
    meta = {"source": source or target_dir.name, **({"task": task} if task else {})}
    imp = _Importer(writer)
    for path, rel in folder_pairs(target_dir):
        txt = path.with_suffix(".txt")

        def build(path=path, rel=rel, txt=txt):
            text = txt.read_text(encoding="utf-8") if txt.is_file() else None
            refs = [_find_reference(d, rel) for d in ref_dirs]
            key = str(rel.with_suffix("")).replace(os.sep, "__")
            return _pair(key, path, text, refs, meta, min_side, allow_empty)

        imp.add(str(path), build)
    return imp.finish()


def import_jsonl(manifest: str | os.PathLike, writer: ShardWriter, *, base_dir: str | os.PathLike | None = None,
                 task: str | None = None, source: str | None = None, min_side: int = 16,
                 allow_empty: bool = False) -> ImportReport:
    manifest = Path(manifest)
    base = Path(base_dir) if base_dir is not None else manifest.parent
    imp = _Importer(writer)
    for lineno, line in enumerate(manifest.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue

        def build(line=line, lineno=lineno):
            try:
                row = json.loads(line)
                target, refs = row["target"], row.get("reference")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise FormatError(f"bad manifest line: {e}") from e
            refs = [] if refs is None else [refs] if isinstance(refs, str) else list(refs)
            meta = {"source": source or manifest.stem}
            if row.get("task") or task:
                meta["task"] = row.get("task") or task
            key = row.get("key") or f"{Path(target).stem}-{lineno:08d}"
            return _pair(str(key), base / target, row.get("instruction"), [base / r for r in refs], meta,
                         min_side, allow_empty)

        imp.add(f"{manifest}:{lineno}", build)
    return imp.finish()
