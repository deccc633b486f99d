"""Records of other trainers' layouts (JSONL lines, CSV rows, Parquet and Arrow rows) read under
their own field names: `Fields` says which column holds the target, the instruction, the
reference image(s), the task and the key (`parse_fields`: `instruction=prompt,
reference=input_images+style,target=output_image`), and `read_record` takes one record apart,
its images as paths relative to the record's folder or as bytes stored in the table (`Blob`).
A record that cannot be read says why (`BadRecord`); :mod:`kontext.data.importers` checks and
writes what it reads."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from kontext.data.format import FormatError
from kontext.errors import KontextError


@dataclass(frozen=True)
class Blob:
    """An image stored inside a table cell: its bytes, its name in messages and the file name it
    came from, if the cell says."""

    data: bytes
    name: str
    path: str | None = None

    def __str__(self) -> str:
        return self.name


FIELDS = ("reference", "instruction", "target", "task", "key")


@dataclass(frozen=True)
class Fields:
    """Where each field of a sample is in a record: one field (column) name each, and for
    `reference` one or several, whose images are taken in order. `given` holds the names the user
    chose; the others are the defaults, each field's own name."""

    names: dict[str, tuple[str, ...]] = field(default_factory=lambda: {f: (f,) for f in FIELDS})
    given: frozenset[str] = frozenset()

    def __getitem__(self, name: str) -> str:
        return "+".join(self.names[name])

    def check(self, columns: list[str], where: str, required: tuple[str, ...] = (), kind: str = "column") -> None:
        """One-line KontextError, listing the columns there are, if a chosen column or one of the
        `required` fields' is not among `columns`."""
        for name in dict.fromkeys((*required, *FIELDS)):
            for col in self.names[name]:
                if col not in columns and (col in self.given or name in required):
                    hint = "" if col in self.given else f" (name the {name} {kind} with fields={name}=NAME)"
                    raise KontextError(f"no {kind} {col!r} in {where}{hint}; the {kind}s are: {', '.join(columns)}")


def parse_fields(spec: str | Mapping | None) -> Fields:
    """Fields from `instruction=prompt,reference=input_images,target=output_image` (several
    reference columns joined by `+`: `reference=before+style`) or the same as a dict; the fields
    not named keep their default names. A bad spec is a one-line KontextError."""
    if spec is None or spec == "":
        items = []
    elif isinstance(spec, str):
        items = []
        for part in spec.split(","):
            name, sep, cols = (x.strip() for x in part.partition("="))
            if not sep or not name or not cols:
                raise KontextError(f"fields is field=column[,field=column...], got {part.strip()!r} in {spec!r}")
            items.append((name, tuple(c.strip() for c in cols.split("+"))))
    elif isinstance(spec, Mapping):
        items = [(str(k), (v,) if isinstance(v, str) else tuple(v or ())) for k, v in spec.items()]
    else:
        raise KontextError(f"fields is field=column[,field=column...], got {spec!r}")
    names = Fields().names
    for name, cols in items:
        if name not in names:
            raise KontextError(f"fields: unknown field {name!r}; the fields are {', '.join(FIELDS)}")
        if not cols or not all(isinstance(c, str) and c for c in cols):
            raise KontextError(f"fields: {name} needs a column name, got {'+'.join(map(str, cols))!r}")
        if len(cols) > 1 and name != "reference":
            raise KontextError(f"fields: only reference takes several columns, got {name}={'+'.join(cols)}")
        names[name] = cols
    return Fields(names, frozenset(c for _, cols in items for c in cols))


def _images(value, base: Path, name: str, inline: bool, several: bool) -> list[Path | Blob] | None:
    """The images of one cell, or None if it is not images: paths (relative to `base`), and with
    `inline` also encoded bytes or a Hugging Face Image struct {bytes, path}; with `several`, a
    list of these. None and "" are no image."""
    if several and isinstance(value, list):
        found = [_images(v, base, name, inline, False) for v in value]
        return None if any(f is None for f in found) else [i for f in found for i in f]
    if value is None or value == "":
        return []
    if isinstance(value, str):
        return [base / value]
    if inline and isinstance(value, bytes):
        return [Blob(value, name)]
    if inline and isinstance(value, Mapping) and set(value) <= {"bytes", "path"}:
        data, path = value.get("bytes"), value.get("path")
        if data and isinstance(data, bytes):
            return [Blob(data, f"{name} ({path})" if path else name, path)]
        return _images(path, base, name, inline, False)
    return None


class BadRecord(FormatError):
    """A record whose fields are missing or of the wrong type."""


def read_record(row, fields: Fields, base: Path, name: str = "", inline: bool = False) -> dict:
    """A record's fields under their own names, its images as paths relative to `base` (or Blobs
    called `name` and the column); BadRecord saying what is wrong with it."""
    if not isinstance(row, Mapping):
        raise BadRecord(f"not a JSON object: {row!r:.40}")
    out, image = {}, "an image (a path, bytes or {bytes, path})" if inline else "a path"
    for f in ("instruction", "task", "key"):
        value = row.get(fields.names[f][0])
        if not isinstance(value, (str, type(None))):
            raise BadRecord(f"{fields[f]} must be {'text' if f == 'instruction' else 'text or null'}, "
                            f"got {value!r:.40}")
        out[f] = value
    if fields.names["target"][0] not in row:
        raise BadRecord(f"no {fields['target']}")
    target = row[fields.names["target"][0]]
    found = _images(target, base, f"{name} {fields['target']}", inline, False)
    if not found:
        raise BadRecord(f"{fields['target']} must be {image}, got {target!r:.40}")
    out["target"], out["reference"] = found[0], []
    for col in fields.names["reference"]:
        found = _images(row.get(col), base, f"{name} {col}", inline, True)
        if found is None:
            raise BadRecord(f"{col} must be {image}, a list of {'them' if inline else 'paths'} or null, "
                            f"got {row[col]!r:.40}")
        out["reference"] += found
    return out
