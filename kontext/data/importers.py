"""Importers: a folder of image pairs, or a JSONL manifest, into Kontext shards.

Folder layout (the convention of common Kontext trainers): target images with a same-named
`.txt` instruction beside them, and one folder per reference holding files of the same relative
name (any image extension). No reference folder gives text-to-image samples.

    targets/cat_01.png  targets/cat_01.txt      refs_a/cat_01.jpg      refs_b/cat_01.png

Manifest: one JSON object per line, paths relative to the manifest's folder:

    {"reference": "a.jpg" | ["a.jpg", "b.png"] | null, "instruction": "...", "target": "t.png",
     "task": "...", "key": "..."}      (task and key optional)

Every pair is checked (fields of the right types, files exist, decode, are at least `min_side`
and at most `max_pixels` pixels, instruction present, key unique) before it is written; a pair
that fails is skipped as a whole and listed with the reason in the report, and the others are
written: whatever stops an import, the samples written so far are published. Text (manifest,
captions) is read as `encoding` (UTF-8 by default). A key that needs sanitising gets a short
hash of its original text, so two names never fall onto one key. PNG, JPEG and WebP bytes are
copied unchanged; other formats (BMP, TIFF, GIF, ...) are converted to PNG without loss.
"""

from __future__ import annotations

import io
import json
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

from kontext.cli import read_text
from kontext.data.format import (
    MAX_PIXELS,
    FormatError,
    ImageTooLarge,
    Sample,
    decode_image,
    encode_image,
    image_format,
    make_key,
    open_image,
)
from kontext.data.writers import ShardWriter
from kontext.errors import KontextError

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


def read_image(path: Path, min_side: int = 16, max_pixels: int | None = MAX_PIXELS) -> bytes:
    """Shard-ready bytes of one image file (see the module docstring); FormatError on failure."""
    if not path.is_file():
        raise FormatError(f"missing file: {path}")
    data = path.read_bytes()
    try:
        open_image(io.BytesIO(data), max_pixels, name=str(path)).close()  # too large: refused unread
    except ImageTooLarge:
        raise
    except Exception as e:
        raise FormatError(f"unreadable image: {path}: {e}") from e
    try:
        image_format(data)
        img = decode_image(data, max_pixels)
    except FormatError:
        try:
            with open_image(io.BytesIO(data), max_pixels) as im:
                im.load()
                img = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        except Exception as e:
            raise FormatError(f"unreadable image: {path}: {e}") from e
        data = encode_image(img, "png")
    if min(img.size) < min_side:
        raise FormatError(f"image smaller than {min_side} px: {path} is {img.size[0]}x{img.size[1]}")
    return data


def _pair(key: str, target: Path, instruction: str | None, refs: list[Path], meta: dict,
          min_side: int, allow_empty: bool, max_pixels: int | None) -> Sample:
    if instruction is None:
        raise FormatError(f"no instruction for {target}")
    instruction = instruction.strip()
    if not instruction and not allow_empty:
        raise FormatError(f"empty instruction for {target}")
    target_bytes = read_image(target, min_side, max_pixels)
    ref_bytes = [read_image(r, min_side, max_pixels) for r in refs]
    meta = {"task": "edit" if refs else "t2i", **meta}
    return Sample(make_key(key), instruction, target_bytes, ref_bytes, meta)


class _Importer:
    """Adds one item at a time; an item that fails in any way is a skip with its reason. Used as a
    context manager, so the shards are closed and published however the import ends."""

    def __init__(self, writer: ShardWriter):
        self.writer, self.report, self.keys = writer, ImportReport(), {}

    def add(self, item: str, build) -> None:
        try:
            sample = build()
            if sample.key in self.keys:
                raise FormatError(f"duplicate key {sample.key!r}: also {self.keys[sample.key]}")
            self.writer.write(sample)
        except Exception as e:  # one bad item never stops the others
            reason = str(e) if isinstance(e, (FormatError, OSError)) else f"{type(e).__name__}: {e}"
            self.report.skipped.append((item, reason.splitlines()[0] if reason else type(e).__name__))
            return
        self.keys[sample.key] = item
        self.report.written += 1

    def __enter__(self) -> _Importer:
        return self

    def __exit__(self, *exc) -> None:
        self.report.shards = self.writer.close()


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
                  allow_empty: bool = False, max_pixels: int | None = MAX_PIXELS,
                  encoding: str = "utf-8") -> ImportReport:
    target_dir, ref_dirs = Path(target_dir), [Path(d) for d in reference_dirs]
    meta = {"source": source or target_dir.name, **({"task": task} if task else {})}

    def build(path: Path, rel: Path) -> Sample:
        txt = path.with_suffix(".txt")
        text = _caption(txt, encoding) if txt.is_file() else None
        refs = [_find_reference(d, rel) for d in ref_dirs]
        key = str(rel.with_suffix("")).replace(os.sep, "__")
        return _pair(key, path, text, refs, meta, min_side, allow_empty, max_pixels)

    with _Importer(writer) as imp:
        for path, rel in folder_pairs(target_dir):
            imp.add(str(path), lambda path=path, rel=rel: build(path, rel))
    return imp.report


def _caption(txt: Path, encoding: str) -> str:
    try:
        return read_text(txt, encoding, "instruction file", "encoding")
    except KontextError as e:
        raise FormatError(f"unreadable instruction: {e}") from e


def check_record(row) -> str | None:
    """What is wrong with the fields of one manifest record, or None."""
    if not isinstance(row, dict):
        return f"not a JSON object: {row!r:.40}"
    if "target" not in row:
        return "no target"
    refs = row.get("reference")
    for key, ok, expected in [
        ("target", isinstance(row["target"], str) and row["target"], "a path"),
        ("reference", refs is None or isinstance(refs, str)
         or (isinstance(refs, list) and all(isinstance(r, str) for r in refs)), "a path, a list of paths or null"),
        ("instruction", isinstance(row.get("instruction"), (str, type(None))), "text"),
        ("task", isinstance(row.get("task"), (str, type(None))), "text or null"),
        ("key", isinstance(row.get("key"), (str, type(None))), "text or null"),
    ]:
        if not ok:
            return f"{key} must be {expected}, got {row[key]!r:.40}"
    return None


def import_jsonl(manifest: str | os.PathLike, writer: ShardWriter, *, base_dir: str | os.PathLike | None = None,
                 task: str | None = None, source: str | None = None, min_side: int = 16,
                 allow_empty: bool = False, max_pixels: int | None = MAX_PIXELS,
                 encoding: str = "utf-8") -> ImportReport:
    """Raises KontextError (before writing anything) if the manifest is not a readable `encoding` file."""
    manifest = Path(manifest)
    base = Path(base_dir) if base_dir is not None else manifest.parent
    if not manifest.is_file():
        raise KontextError(f"manifest {manifest} is {'a folder' if manifest.is_dir() else 'not found'}")
    lines = read_text(manifest, encoding, "manifest", "encoding").splitlines()

    def build(line: str, lineno: int) -> Sample:
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise FormatError(f"bad manifest line: {e}") from e
        problem = check_record(row)
        if problem:
            raise FormatError(f"bad manifest line: {problem}")
        target, refs = row["target"], row.get("reference")
        refs = [] if refs is None else [refs] if isinstance(refs, str) else refs
        meta = {"source": source or manifest.stem}
        if row.get("task") or task:
            meta["task"] = row.get("task") or task
        key = row.get("key") or f"{Path(target).stem}-{lineno:08d}"
        return _pair(key, base / target, row.get("instruction"), [base / r for r in refs], meta,
                     min_side, allow_empty, max_pixels)

    with _Importer(writer) as imp:
        for lineno, line in enumerate(lines, 1):
            if line.strip():
                imp.add(f"{manifest}:{lineno}", lambda line=line, lineno=lineno: build(line, lineno))
    return imp.report
