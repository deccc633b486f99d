"""The data commands behind the thin scripts in `data/` (`key=value` arguments, see kontext.cli)."""

from __future__ import annotations

import json
import time
from pathlib import Path

from kontext.cli import check_int, check_writable, parse_args
from kontext.errors import KontextError

SHAPES_USAGE = """usage: python data/shapes_edit.py out=DIR [n=10000] [seed=0] [split=train] [size=64]
    [mix=recolor=1,remove=1,add=1,move=1,background=1,t2i=1] [shard_size=1000] [start=0] [paraphrase=false]
Writes Shapes-Edit cases start..start+n-1 of (split, seed) as PNG shards DIR/shapes-SPLIT-SEED-%06d.tar."""

IMPORT_USAGE = """usage: python data/import_pairs.py out=DIR (folder=TARGETS [references=[REFS_A,REFS_B]] | manifest=FILE.jsonl
    | csv=metadata.csv | table=FILE.parquet|DIR) [fields=instruction=prompt,reference=input_images,target=output_image]
    [prefix=pairs] [shard_size=1000] [task=null] [source=null] [min_side=16] [allow_empty=false] [report=FILE.json]
    [max_pixels=64000000] [encoding=utf-8]
Checks every pair and writes whole samples only; prints (and saves) what was skipped and why.
fields: the names of the record's fields or columns, over reference, instruction, target, task, key
(several reference columns: reference=a+b). table: Parquet files, or a folder that datasets' save_to_disk
wrote (needs pyarrow: pip install 'kontext[import]').
Text (manifest, captions, CSV) is read as `encoding` (e.g. latin-1); larger images than max_pixels are skipped."""

SHOWN_SKIPS = 20  # skips printed one per line; report= saves all of them

PHOTO_USAGE = """usage: python data/photo_edits.py out=DIR [n=60] [seed=0] [base=null]
Writes n real-photo edits with exact answers (kontext/data/photo_edits.py), made from the colour photographs
inside scikit-image, as DIR/metadata.csv with DIR/images, and two held-out photos as DIR/heldout/<photo>.png
with every edit's exact answer as DIR/heldout/<photo>_<task>.png.
base=FILE.safetensors: also a random `tiny` transformer to start a LoRA from (stage.init_from)."""

INSPECT_USAGE = """usage: python data/inspect_shards.py shards=SPEC [grid=FILE.png] [grid_samples=16] [cell=128] [json=FILE.json]
SPEC: a directory, a brace pattern (dir/shapes-{000000..000009}.tar), a glob or a URL."""


def shapes_edit_main(argv: list[str]) -> list[str]:
    from kontext.data import shapes_edit
    from kontext.data.writers import write_shapes_edit

    a = parse_args(argv, {"out": "???", "n": 10000, "seed": 0, "split": "train", "size": 64, "mix": None,
                          "shard_size": 1000, "start": 0, "paraphrase": False}, SHAPES_USAGE)
    check_int("n", a["n"], 1)
    check_int("start", a["start"], 0)
    check_int("shard_size", a["shard_size"], 1)
    check_writable(a["out"], "out", folder=True)
    if not (a["mix"] is None or isinstance(a["mix"], str)):
        raise KontextError(f"mix must be text such as recolor=1,t2i=1, got {a['mix']!r}")
    try:
        shapes_edit.check_size(a["size"])
        shapes_edit.parse_mix(a["mix"])
        shapes_edit.case_rng(a["split"], 0, 0)
    except ValueError as e:
        raise KontextError(str(e)) from e
    t0 = time.perf_counter()
    shards = write_shapes_edit(a["out"], a["n"], seed=a["seed"], split=a["split"], size=a["size"], mix=a["mix"],
                               shard_size=a["shard_size"], start=a["start"], paraphrase=a["paraphrase"])
    print(f"wrote {a['n']} samples in {len(shards)} shards to {a['out']} ({time.perf_counter() - t0:.1f} s)")
    return shards


def photo_edits_main(argv: list[str]) -> Path:
    from kontext.data.photo_edits import photo_dir, write_photo_edits, write_random_base

    a = parse_args(argv, {"out": "???", "n": 60, "seed": 0, "base": None}, PHOTO_USAGE)
    check_int("n", a["n"], 1)
    check_int("seed", a["seed"])
    check_writable(a["out"], "out", folder=True)
    if a["base"] is not None:
        check_writable(a["base"], "base")
    photo_dir()
    t0 = time.perf_counter()
    path = write_photo_edits(a["out"], a["n"], seed=a["seed"])
    print(f"wrote {a['n']} photo edits to {path} ({time.perf_counter() - t0:.1f} s)")
    if a["base"] is not None:
        print(f"random tiny transformer: {write_random_base(a['base'], seed=a['seed'])}")
    return path


def import_main(argv: list[str]):
    """Every argument is checked before any work; an import that writes nothing is an error."""
    import codecs

    from kontext.data.format import MAX_PIXELS
    from kontext.data.importers import import_folder, import_jsonl
    from kontext.data.records import parse_fields
    from kontext.data.tables import import_csv, import_table, require_pyarrow
    from kontext.data.writers import ShardWriter

    sources = ("folder", "manifest", "csv", "table")
    a = parse_args(argv, {"out": "???", "folder": None, "references": [], "manifest": None, "csv": None,
                          "table": None, "fields": None, "prefix": "pairs", "shard_size": 1000, "task": None,
                          "source": None, "min_side": 16, "allow_empty": False, "report": None,
                          "max_pixels": MAX_PIXELS, "encoding": "utf-8"},
                   IMPORT_USAGE)
    given = [s for s in sources if a[s] is not None]
    if len(given) != 1:
        raise KontextError("give exactly one of folder=..., manifest=..., csv=... or table=...")
    kind = given[0]
    src = Path(str(a[kind]))
    if not src.exists():
        raise KontextError(f"{src} does not exist")
    if kind == "folder" and not src.is_dir():
        raise KontextError(f"folder={src} is a file; give the folder of target images (or manifest={src})")
    if kind == "manifest" and not src.is_file():
        raise KontextError(f"manifest={src} is a folder; give the .jsonl file (or folder={src})")
    if kind == "csv" and not src.is_file():
        raise KontextError(f"csv={src} is a folder; give the .csv file (such as {src / 'metadata.csv'})")
    if kind != "folder" and a["references"]:
        raise KontextError(f"references= are folders of reference images for folder=; {kind}= names its "
                           "reference column with fields=reference=NAME")
    if kind == "folder" and a["fields"] is not None:
        raise KontextError("fields= names the fields of a manifest, CSV or table, not of folder=")
    parse_fields(a["fields"])
    if kind == "table":
        require_pyarrow()
    refs = [a["references"]] if isinstance(a["references"], str) else list(a["references"] or [])
    for r in refs:
        if not Path(str(r)).is_dir():
            raise KontextError(f"reference folder {r} does not exist")
    for key, minimum in (("shard_size", 1), ("min_side", 1), ("max_pixels", 1)):
        check_int(key, a[key], minimum)
    if not str(a["prefix"]) or any(c in str(a["prefix"]) for c in "/\\%"):
        raise KontextError(f"prefix is the start of a shard's file name (no /, \\ or %), got {a['prefix']!r}")
    try:
        codecs.lookup(str(a["encoding"]))
    except LookupError as e:
        raise KontextError(f"encoding={a['encoding']}: unknown text encoding") from e
    out = check_writable(a["out"], "out", folder=True)
    if a["report"]:
        check_writable(a["report"], "report")
    writer = ShardWriter(str(out / f"{a['prefix']}-%06d.tar"), maxcount=a["shard_size"])
    common = {"task": a["task"], "source": a["source"], "min_side": a["min_side"], "allow_empty": a["allow_empty"],
              "max_pixels": a["max_pixels"]}
    text = {"encoding": str(a["encoding"])}
    if kind == "folder":
        report = import_folder(src, refs, writer, **common, **text)
    elif kind == "manifest":
        report = import_jsonl(src, writer, fields=a["fields"], **common, **text)
    elif kind == "csv":
        report = import_csv(src, writer, fields=a["fields"], **common, **text)
    else:
        report = import_table(src, writer, fields=a["fields"], **common)
    print(report.summary())
    for skip in report.skipped[:SHOWN_SKIPS]:
        print(f"  skipped {skip}")
    if len(report.skipped) > SHOWN_SKIPS:
        print(f"  ... and {len(report.skipped) - SHOWN_SKIPS} more" + ("" if a["report"] else " (report=FILE lists all)"))
    if a["report"]:
        Path(a["report"]).expanduser().parent.mkdir(parents=True, exist_ok=True)
        report.to_json(Path(a["report"]).expanduser())
    if not report.written:
        raise KontextError(f"no samples written from {src}: {len(report.skipped)} skipped (reasons above)")
    return report


def inspect_main(argv: list[str]):
    from kontext.data.inspect import picture_grid, summarize

    a = parse_args(argv, {"shards": "???", "grid": None, "grid_samples": 16, "cell": 128, "json": None},
                   INSPECT_USAGE)
    try:
        summary, keep = summarize(a["shards"], a["grid_samples"] if a["grid"] else 0)
    except FileNotFoundError as e:
        raise KontextError(str(e)) from e
    print(summary.table())
    if a["grid"]:
        picture_grid(keep, a["cell"]).save(a["grid"])
        print(f"picture grid of {len(keep)} samples: {a['grid']}")
    if a["json"]:
        Path(a["json"]).write_text(json.dumps(summary.to_dict(), indent=1))
    return summary
