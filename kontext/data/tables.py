"""Importers of tables: a `metadata.csv`, Parquet files, and Hugging Face datasets folders
(written by `save_to_disk`), into Kontext shards through the same checks and report as the
manifest (`kontext.data.importers`).

A row is one sample. Its columns are named by `fields`, over the defaults `reference`,
`instruction`, `target`, `task` and `key`; several reference columns (`reference=before+style`)
give their images in that order, and an empty cell gives none. Two common layouts:

    InstructPix2Pix   fields=reference=input_image,instruction=edit_prompt,target=edited_image
    MagicBrush        fields=reference=source_img,instruction=instruction,target=target_img

CSV cells are text: an image is a path relative to the CSV's folder. Parquet and Arrow cells may
also hold the image itself: encoded bytes or a Hugging Face Image struct {bytes, path} (a path
alone is relative to the table's folder), and a reference cell may hold a list of images.
Parquet and Arrow are read with pyarrow (the `import` extra), not the `datasets` package.
"""

from __future__ import annotations

import csv
import io
import json
import os
from collections.abc import Iterator, Mapping
from pathlib import Path

from kontext.cli import read_text
from kontext.data.format import MAX_PIXELS
from kontext.data.importers import Importer, ImportReport, record_sample
from kontext.data.records import BadRecord, parse_fields
from kontext.data.writers import ShardWriter
from kontext.errors import KontextError, first_line

BATCH_ROWS = 64  # rows decoded from Arrow at a time, so that a table of images is never all in memory


def import_csv(path: str | os.PathLike, writer: ShardWriter, *, base_dir: str | os.PathLike | None = None,
               fields: str | Mapping | None = None, task: str | None = None, source: str | None = None,
               min_side: int = 16, allow_empty: bool = False, max_pixels: int | None = MAX_PIXELS,
               encoding: str = "utf-8") -> ImportReport:
    """Rows of a CSV file with a header line; an item in the report is `file:line`. Raises
    KontextError (before writing anything) if the file cannot be read as CSV or lacks a column
    that `fields` names, or the target's or instruction's."""
    path = Path(path)
    base = Path(base_dir) if base_dir is not None else path.parent
    if not path.is_file():
        raise KontextError(f"CSV file {path} is {'a folder' if path.is_dir() else 'not found'}")
    fields = parse_fields(fields)
    reader = csv.reader(io.StringIO(read_text(path, encoding, "CSV file", "encoding"), newline=""))
    rows = []
    try:
        header = [c.strip() for c in next(reader, [])]
        line = reader.line_num  # where the next row starts, less one
        for cells in reader:
            if any(c.strip() for c in cells):
                rows.append((line + 1, cells))
            line = reader.line_num
    except csv.Error as e:
        raise KontextError(f"CSV file {path} line {reader.line_num}: {e}") from e
    twice = sorted({c for c in header if header.count(c) > 1})
    if twice:
        raise KontextError(f"CSV file {path} names the column {twice[0]!r} twice")
    fields.check(header, str(path), required=("target", "instruction"))
    meta = {"source": source or path.stem, **({"task": task} if task else {})}
    checks = {"min_side": min_side, "allow_empty": allow_empty, "max_pixels": max_pixels}

    def build(line: int, cells: list[str]):
        if len(cells) != len(header):
            raise BadRecord(f"bad row: {len(cells)} cells, the header has {len(header)}")
        row = dict(zip(header, cells, strict=True))  # an empty cell is no image, task or key
        return record_sample(row, fields, base, line, meta, checks, bad="bad row")

    with Importer(writer) as imp:
        for line, cells in rows:
            imp.add(f"{path}:{line}", lambda line=line, cells=cells: build(line, cells))
    return imp.report


def require_pyarrow():
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError as e:
        raise KontextError("reading Parquet or Arrow needs pyarrow: pip install 'kontext[import]' "
                           "(or pip install pyarrow)") from e
    return pyarrow


def table_files(path: str | os.PathLike) -> list[Path]:
    """The data files of a table: a .parquet or .arrow file; a folder of .parquet files (searched
    below it); or a datasets folder, whose state.json lists its .arrow files in order."""
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise KontextError(f"{path} does not exist")
    if (path / "dataset_dict.json").is_file():
        splits = _json(path / "dataset_dict.json").get("splits") or []
        raise KontextError(f"{path} holds the splits {', '.join(map(str, splits))}; give one: "
                           f"{path / str(splits[0] if splits else 'SPLIT')}")
    if (path / "state.json").is_file():
        files = [f.get("filename") for f in _json(path / "state.json").get("_data_files") or []]
        if not files or not all(isinstance(f, str) and (path / f).is_file() for f in files):
            raise KontextError(f"{path / 'state.json'} lists data files {files} that are not all in {path}")
        return [path / f for f in files]
    files = sorted(path.rglob("*.parquet")) or sorted(path.glob("*.arrow"))
    if not files:
        raise KontextError(f"no .parquet or .arrow files in {path}")
    return files


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KontextError(f"cannot read {path}: {first_line(e)}") from e
    if not isinstance(data, dict):
        raise KontextError(f"{path} is not a JSON object")
    return data


def _open(path: Path):
    """(column names, an iterator of record batches) of one Parquet or Arrow file."""
    pa = require_pyarrow()
    try:
        if path.suffix == ".parquet":
            table = pa.parquet.ParquetFile(path)
            return table.schema_arrow.names, table.iter_batches(batch_size=BATCH_ROWS)
        try:  # datasets writes the Arrow streaming format; the file format is read as well
            reader = pa.ipc.open_stream(pa.memory_map(str(path)))
        except pa.ArrowInvalid:
            reader = pa.ipc.open_file(pa.memory_map(str(path)))
            return reader.schema.names, (reader.get_batch(i) for i in range(reader.num_record_batches))
        return reader.schema.names, iter(reader)
    except (OSError, pa.ArrowException) as e:
        raise KontextError(f"cannot read {path} as {path.suffix.lstrip('.') or 'Arrow'}: {first_line(e)}") from e


def _rows(batches) -> Iterator[dict]:
    for batch in batches:
        for start in range(0, batch.num_rows, BATCH_ROWS):
            yield from batch.slice(start, BATCH_ROWS).to_pylist()


def import_table(path: str | os.PathLike, writer: ShardWriter, *, fields: str | Mapping | None = None,
                 task: str | None = None, source: str | None = None, min_side: int = 16,
                 allow_empty: bool = False, max_pixels: int | None = MAX_PIXELS) -> ImportReport:
    """Rows of Parquet or Arrow files (see `table_files`); an item in the report is `file:row N`,
    N counted from 0 in each file, as `datasets` indexes them. Raises KontextError (before writing
    anything) without pyarrow, or if a file cannot be read or lacks a column that `fields` names,
    or the target's or instruction's."""
    require_pyarrow()
    files, fields = table_files(path), parse_fields(fields)
    opened = []
    for f in files:
        columns, batches = _open(f)
        fields.check(columns, str(f), required=("target", "instruction"))
        opened.append((f, batches))
    meta = {"source": source or Path(path).stem, **({"task": task} if task else {})}
    checks = {"min_side": min_side, "allow_empty": allow_empty, "max_pixels": max_pixels}
    number = 0
    with Importer(writer) as imp:
        for f, batches in opened:
            for i, row in enumerate(_rows(batches)):
                item = f"{f}:row {i}"
                imp.add(item, lambda row=row, n=number, item=item, f=f: record_sample(
                    row, fields, f.parent, n, meta, checks, bad="bad row", name=item, inline=True, stem=f.stem))
                number += 1
    return imp.report
