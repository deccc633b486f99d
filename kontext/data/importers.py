"""Importers: a folder of image pairs, or a JSONL manifest, into Kontext shards; the same checks
and report for CSV, Parquet and Hugging Face datasets folders (`kontext.data.tables`).

Folder layout (the convention of common Kontext trainers): target images with a same-named
`.txt` instruction beside them, and one folder per reference holding files of the same relative
name (any image extension). No reference folder gives text-to-image samples.

    targets/cat_01.png  targets/cat_01.txt      refs_a/cat_01.jpg      refs_b/cat_01.png

Manifest: one JSON object per line, paths relative to the manifest's folder:

    {"reference": "a.jpg" | ["a.jpg", "b.png"] | null, "instruction": "...", "target": "t.png",
     "task": "...", "key": "..."}      (task and key optional)

Records of other trainers keep their own field names, mapped by `fields`
(`instruction=prompt,reference=input_images,target=output_image`); several reference fields
(`reference=before+style`) give their images in that order, each a path or a list of paths
(:mod:`kontext.data.records` reads them).

Every pair is checked (fields of the right types, files exist, decode, are at least `min_side`
and at most `max_pixels` pixels, instruction present, key unique) before it is written; a pair
that fails is skipped as a whole and listed in the report by its place (file and line or row), its
key when it has one (the sample's key in the shards) and the reason; the others are
written: whatever stops an import, the samples written so far are published. Text (manifest,
captions) is read as `encoding` (UTF-8 by default). A key that needs sanitising gets a short
hash of its original text, so two names never fall onto one key. PNG, JPEG and WebP bytes are
copied unchanged; other formats (BMP, TIFF, GIF, ...) are converted to PNG without loss.
"""

from __future__ import annotations

import io
import json
import os
import re
from collections import Counter
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

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
from kontext.data.records import BadRecord, Blob, Fields, parse_fields, read_record
from kontext.data.writers import ShardWriter
from kontext.errors import KontextError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff", ".gif")


class Skip(NamedTuple):
    """An item left out of an import: where it is, why, and its key (None when the record is too
    malformed to name one)."""

    item: str
    reason: str
    key: str | None = None

    def __str__(self) -> str:
        return f"{self.item}{f' (key {self.key})' if self.key else ''}: {self.reason}"


class KeyedError(Exception):
    """What went wrong (`cause`) with the sample called `key`."""

    def __init__(self, key: str, cause: Exception):
        super().__init__(key, cause)
        self.key, self.cause = key, cause


@contextmanager
def keyed(key: str):
    """Errors inside name the sample `key` (an error that names one already keeps it)."""
    try:
        yield
    except KeyedError:
        raise
    except Exception as e:
        raise KeyedError(key, e) from e


@dataclass
class ImportReport:
    written: int = 0
    skipped: list[Skip] = field(default_factory=list)
    shards: list[str] = field(default_factory=list)

    def summary(self) -> str:
        reasons = Counter(re.split(r": | for | '", skip.reason, maxsplit=1)[0].strip() for skip in self.skipped)
        lines = [f"wrote {self.written} samples to {len(self.shards)} shards; skipped {len(self.skipped)}"]
        lines += [f"  {n:6d}  {reason}" for reason, n in reasons.most_common()]
        return "\n".join(lines)

    def to_json(self, path: str | os.PathLike) -> None:
        skipped = [skip._asdict() for skip in self.skipped]
        Path(path).write_text(json.dumps({"written": self.written, "shards": self.shards, "skipped": skipped},
                                         indent=1))


def read_image(path: Path, min_side: int = 16, max_pixels: int | None = MAX_PIXELS) -> bytes:
    """Shard-ready bytes of one image file (see the module docstring); FormatError on failure."""
    if not path.is_file():
        raise FormatError(f"missing file: {path}")
    return check_image(path.read_bytes(), str(path), min_side, max_pixels)


def check_image(data: bytes, name: str, min_side: int = 16, max_pixels: int | None = MAX_PIXELS) -> bytes:
    """Shard-ready bytes of one encoded image called `name` in messages; FormatError on failure."""
    try:
        open_image(io.BytesIO(data), max_pixels, name=name).close()  # too large: refused unread
    except ImageTooLarge:
        raise
    except Exception as e:
        raise FormatError(f"unreadable image: {name}: {e}") from e
    try:
        image_format(data)
        img = decode_image(data, max_pixels)
    except FormatError:
        try:
            with open_image(io.BytesIO(data), max_pixels) as im:
                im.load()
                img = im.convert("RGBA" if "A" in im.getbands() else "RGB")
        except Exception as e:
            raise FormatError(f"unreadable image: {name}: {e}") from e
        data = encode_image(img, "png")
    if min(img.size) < min_side:
        raise FormatError(f"image smaller than {min_side} px: {name} is {img.size[0]}x{img.size[1]}")
    return data


def _load(image: Path | Blob, min_side: int, max_pixels: int | None) -> bytes:
    if isinstance(image, Blob):
        return check_image(image.data, image.name, min_side, max_pixels)
    return read_image(image, min_side, max_pixels)


def _pair(key: str, target: Path | Blob, instruction: str | None, refs: list[Path | Blob], meta: dict,
          min_side: int, allow_empty: bool, max_pixels: int | None) -> Sample:
    key = make_key(key)
    with keyed(key):
        if instruction is None:
            raise FormatError(f"no instruction for {target}")
        instruction = instruction.strip()
        if not instruction and not allow_empty:
            raise FormatError(f"empty instruction for {target}")
        target_bytes = _load(target, min_side, max_pixels)
        ref_bytes = [_load(r, min_side, max_pixels) for r in refs]
    meta = {"task": "edit" if refs else "t2i", **meta}
    return Sample(key, instruction, target_bytes, ref_bytes, meta)


class Importer:
    """Adds one item at a time; an item that fails in any way is a skip with its reason. Used as a
    context manager, so the shards are closed and published however the import ends."""

    def __init__(self, writer: ShardWriter):
        self.writer, self.report, self.keys = writer, ImportReport(), {}

    def add(self, item: str, build) -> None:
        try:
            sample = build()
            if sample.key in self.keys:
                raise KeyedError(sample.key, FormatError(f"duplicate key {sample.key!r}: also {self.keys[sample.key]}"))
            self.writer.write(sample)
        except Exception as e:  # one bad item never stops the others
            key, e = (e.key, e.cause) if isinstance(e, KeyedError) else (None, e)
            reason = str(e) if isinstance(e, (FormatError, OSError)) else f"{type(e).__name__}: {e}"
            self.report.skipped.append(Skip(item, reason.splitlines()[0] if reason else type(e).__name__, key))
            return
        self.keys[sample.key] = item
        self.report.written += 1

    def __enter__(self) -> Importer:
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
        key = str(rel.with_suffix("")).replace(os.sep, "__")
        with keyed(make_key(key)):
            txt = path.with_suffix(".txt")
            text = _caption(txt, encoding) if txt.is_file() else None
            refs = [_find_reference(d, rel) for d in ref_dirs]
        return _pair(key, path, text, refs, meta, min_side, allow_empty, max_pixels)

    with Importer(writer) as imp:
        for path, rel in folder_pairs(target_dir):
            imp.add(str(path), lambda path=path, rel=rel: build(path, rel))
    return imp.report


def _caption(txt: Path, encoding: str) -> str:
    try:
        return read_text(txt, encoding, "instruction file", "encoding")
    except KontextError as e:
        raise FormatError(f"unreadable instruction: {e}") from e


def record_sample(row, fields: Fields, base: Path, number: int, meta: dict, checks: dict, *, bad: str,
                  name: str = "", inline: bool = False, stem: str = "row") -> Sample:
    """The Sample of one record (manifest line, CSV row, table row) numbered `number`; its key is
    its own or `<target file name>-<number>` (`<stem>-<number>` for an image without a name). A
    BadRecord says `bad` and what is wrong."""
    try:
        rec = read_record(row, fields, base, name, inline)
    except BadRecord as e:
        own = row.get(fields.names["key"][0]) if isinstance(row, Mapping) else None
        error = BadRecord(f"{bad}: {e}")
        raise (KeyedError(make_key(own), error) if isinstance(own, str) and own else error) from e
    target = rec["target"]
    path = target.path if isinstance(target, Blob) else target
    meta = {**meta, **({"task": rec["task"]} if rec["task"] else {})}
    key = rec["key"] or f"{Path(path).stem if path else stem}-{number:08d}"
    return _pair(key, target, rec["instruction"], rec["reference"], meta, **checks)


def import_jsonl(manifest: str | os.PathLike, writer: ShardWriter, *, base_dir: str | os.PathLike | None = None,
                 fields: str | Mapping | None = None, task: str | None = None, source: str | None = None,
                 min_side: int = 16, allow_empty: bool = False, max_pixels: int | None = MAX_PIXELS,
                 encoding: str = "utf-8") -> ImportReport:
    """Raises KontextError (before writing anything) if the manifest is not a readable `encoding`
    file, or if no record has a field that `fields` names."""
    manifest = Path(manifest)
    base = Path(base_dir) if base_dir is not None else manifest.parent
    if not manifest.is_file():
        raise KontextError(f"manifest {manifest} is {'a folder' if manifest.is_dir() else 'not found'}")
    fields = parse_fields(fields)
    lines = read_text(manifest, encoding, "manifest", "encoding").splitlines()
    rows = {}
    for lineno, line in enumerate(lines, 1):
        if line.strip():
            try:
                rows[lineno] = json.loads(line)
            except json.JSONDecodeError as e:
                rows[lineno] = e
    seen = dict.fromkeys(k for r in rows.values() if isinstance(r, dict) for k in r)
    if seen:
        fields.check(list(seen), f"the records of {manifest}", kind="field")
    meta = {"source": source or manifest.stem, **({"task": task} if task else {})}
    checks = {"min_side": min_side, "allow_empty": allow_empty, "max_pixels": max_pixels}

    def build(row, lineno: int) -> Sample:
        if isinstance(row, json.JSONDecodeError):
            raise BadRecord(f"bad manifest line: {row}")
        return record_sample(row, fields, base, lineno, meta, checks, bad="bad manifest line")

    with Importer(writer) as imp:
        for lineno, row in rows.items():
            imp.add(f"{manifest}:{lineno}", lambda row=row, lineno=lineno: build(row, lineno))
    return imp.report
