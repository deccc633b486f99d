"""Bad input to the data commands (`data/import_pairs.py`, `data/shapes_edit.py`): a bad record
is a skip with its reason and exact count, a bad argument one line before any work, never a
traceback or a lost sample."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import webdataset as wds
from test_bad_input_cli import ROOT, _bounded, _img, bomb_png  # noqa: F401  (_bounded: an autouse fixture)

from kontext.data.commands import import_main, shapes_edit_main
from kontext.data.importers import import_jsonl
from kontext.data.writers import ShardWriter
from kontext.errors import KontextError


# ------------------------------------------------------------------------------------- importers
def _manifest(d: Path, rows: list, encoding="utf-8") -> Path:
    text = "\n".join(r if isinstance(r, str) else json.dumps(r, ensure_ascii=False) for r in rows) + "\n"
    (d / "m.jsonl").write_bytes(text.encode(encoding))
    return d / "m.jsonl"


def _keys(shards) -> list[str]:
    return sorted(r["__key__"] for p in shards for r in wds.tariterators.tarfile_samples([{"url": p}]))


RECORD_CASES = [  # (record, reason of its skip)
    ({"reference": "a.png", "instruction": 42, "target": "t.png"}, "bad manifest line: instruction must be text, got 42"),
    ({"reference": 42, "instruction": "x", "target": "t.png"},
     "bad manifest line: reference must be a path, a list of paths or null, got 42"),
    ({"reference": "a.png", "instruction": "x", "target": None}, "bad manifest line: target must be a path, got None"),
    ({"reference": ["a.png", 1], "instruction": "x", "target": "t.png"},
     "bad manifest line: reference must be a path, a list of paths or null, got ['a.png', 1]"),
    ({"instruction": "x", "target": "t.png", "key": 7}, "bad manifest line: key must be text or null, got 7"),
    ({"instruction": "x", "target": "t.png", "task": ["edit"]},
     "bad manifest line: task must be text or null, got ['edit']"),
    ({"instruction": "x"}, "bad manifest line: no target"),
    ([1, 2], "bad manifest line: not a JSON object: [1, 2]"),
    ("null", "bad manifest line: not a JSON object: None"),
    ("{broken", "bad manifest line: Expecting property name enclosed in double quotes: line 1 column 2 (char 1)"),
    ({"instruction": "x", "target": "folder"}, "missing file: {d}/folder"),
    ({"instruction": "x", "target": "big.png"}, "image too large: {d}/big.png is 10000x10000 pixels (100.0 MP), "
                                                "over the limit of 64.0 MP (max_pixels=64000000)"),
    ({"instruction": None, "target": "t.png"}, "no instruction for {d}/t.png"),
]


def test_manifest_records_of_wrong_types_are_skipped_with_reasons(tmp_path):
    _img(tmp_path / "a.png")
    _img(tmp_path / "t.png", seed=1)
    (tmp_path / "folder").mkdir()
    (tmp_path / "big.png").write_bytes(bomb_png())
    good = {"reference": "a.png", "instruction": "make it red, then blue", "target": "t.png"}
    rows = [good] + [r for r, _ in RECORD_CASES] + [good]
    report = import_jsonl(_manifest(tmp_path, rows), ShardWriter(str(tmp_path / "o" / "m-%03d.tar")))
    assert report.written == 2 and len(report.skipped) == len(RECORD_CASES)
    # A record too malformed to read has no key; the others are named by the key they would have had.
    expected = [(f"{tmp_path}/m.jsonl:{i}", why.replace("{d}", str(tmp_path)),
                 None if why.startswith("bad manifest line") else f"{Path(row['target']).stem}-{i:08d}")
                for i, (row, why) in enumerate(RECORD_CASES, start=2)]
    assert report.skipped == expected
    assert _keys(report.shards) == ["t-00000001", f"t-{len(rows):08d}"]


def test_keys_that_sanitise_alike_stay_two_samples(tmp_path):
    for name in ["über", "_ber", "a b", "a_b"]:
        _img(tmp_path / "t" / f"{name}.png")
        (tmp_path / "t" / f"{name}.txt").write_text(f"edit {name}")
    report = import_main([f"out={tmp_path}/o", f"folder={tmp_path}/t"])
    assert report.written == 4 and not report.skipped
    keys = _keys(report.shards)
    assert len(set(keys)) == 4 and "_ber" in keys and "a_b" in keys


def test_a_latin1_manifest_is_one_line_or_read_with_its_encoding(tmp_path):
    _img(tmp_path / "t.png")
    manifest = _manifest(tmp_path, [{"instruction": "färbe den Kreis rot", "target": "t.png"}], "latin-1")
    with pytest.raises(KontextError) as err:
        import_main([f"out={tmp_path}/o", f"manifest={manifest}"])
    assert str(err.value) == (f"manifest {manifest} is not utf-8 text (line 1: byte 0xe4); convert it or give "
                              "encoding=latin-1 (or its encoding)")
    assert not (tmp_path / "o").exists()
    report = import_main([f"out={tmp_path}/o", f"manifest={manifest}", "encoding=latin-1"])
    [record] = [r for p in report.shards for r in wds.tariterators.tarfile_samples([{"url": p}])]
    assert record["instruction.txt"].decode() == "färbe den Kreis rot"


def test_a_folder_caption_in_another_encoding_is_a_skip_with_its_reason(tmp_path):
    _img(tmp_path / "t" / "a.png")
    (tmp_path / "t" / "a.txt").write_bytes("färbe".encode("latin-1"))
    _img(tmp_path / "t" / "b.png")
    (tmp_path / "t" / "b.txt").write_text("fine")
    report = import_main([f"out={tmp_path}/o", f"folder={tmp_path}/t"])
    assert report.written == 1 and [(s.reason.split(":")[0], s.key) for s in report.skipped] == [
        ("unreadable instruction", "a")]


IMPORT_CASES = [  # (arguments, the one-line error); {d} is the test's folder
    (["out={d}/a_file", "folder={d}/t"], "out {d}/a_file is a file, not a folder"),
    (["out={d}/a_file/o", "folder={d}/t"], "out {d}/a_file/o: {d}/a_file is a file, not a folder"),
    (["out={d}/o", "manifest={d}/t"], "manifest={d}/t is a folder; give the .jsonl file (or folder={d}/t)"),
    (["out={d}/o", "folder={d}/a_file"], "folder={d}/a_file is a file; give the folder of target images "
                                         "(or manifest={d}/a_file)"),
    (["out={d}/o", "folder={d}/t", "report={d}/a_file/r.json"], "report {d}/a_file/r.json: {d}/a_file is a file, "
                                                                 "not a folder"),
    (["out={d}/o", "folder={d}/t", "report={d}/t"], "report {d}/t is a folder"),
    (["out={d}/o", "folder={d}/t", "shard_size=abc"], "shard_size must be a whole number, got 'abc'"),
    (["out={d}/o", "folder={d}/t", "shard_size=0"], "shard_size must be at least 1, got 0"),
    (["out={d}/o", "folder={d}/t", "max_pixels=-1"], "max_pixels must be at least 1, got -1"),
    (["out={d}/o", "folder={d}/t", "allow_empty=maybe"], "allow_empty must be true or false, got 'maybe'"),
    (["out={d}/o", "folder={d}/t", "encoding=nope"], "encoding=nope: unknown text encoding"),
    (["out={d}/o", "folder={d}/t", "prefix=a/b"], "prefix is the start of a shard's file name (no /, \\ or %), "
                                                  "got 'a/b'"),
    (["out={d}/o", "folder={d}/empty"], "no samples written from {d}/empty: 0 skipped (reasons above)"),
    (["out={d}/o", "folder={d}/t", "min_side=1000"], "no samples written from {d}/t: 1 skipped (reasons above)"),
]


@pytest.mark.parametrize(("args", "line"), IMPORT_CASES, ids=[" ".join(c[0][2:]) or c[0][0] for c in IMPORT_CASES])
def test_import_argument_errors_are_one_line_before_any_work(tmp_path, args, line):
    _img(tmp_path / "t" / "a.png")
    (tmp_path / "t" / "a.txt").write_text("x")
    (tmp_path / "empty").mkdir()
    (tmp_path / "a_file").write_text("x")
    with pytest.raises(KontextError) as err:
        import_main([a.replace("{d}", str(tmp_path)) for a in args])
    assert str(err.value) == line.replace("{d}", str(tmp_path))
    assert not list(tmp_path.glob("o/*.tmp"))


def test_the_report_folder_is_made(tmp_path):
    _img(tmp_path / "t" / "a.png")
    (tmp_path / "t" / "a.txt").write_text("x")
    import_main([f"out={tmp_path}/o", f"folder={tmp_path}/t", f"report={tmp_path}/new/r.json"])
    assert json.loads((tmp_path / "new" / "r.json").read_text())["written"] == 1


def test_an_interrupted_import_publishes_the_samples_before_it(tmp_path, monkeypatch):
    from kontext.data import importers

    for i in range(4):
        _img(tmp_path / f"t{i}.png", seed=i)
    manifest = _manifest(tmp_path, [{"instruction": f"edit {i}", "target": f"t{i}.png"} for i in range(4)])
    read = importers.read_image

    def interrupted(path, *args, **kwargs):
        if path.name == "t2.png":
            raise KeyboardInterrupt
        return read(path, *args, **kwargs)

    monkeypatch.setattr(importers, "read_image", interrupted)
    with pytest.raises(KeyboardInterrupt):
        import_jsonl(manifest, ShardWriter(str(tmp_path / "o" / "m-%03d.tar")))
    assert sorted(p.name for p in (tmp_path / "o").iterdir()) == ["m-000.tar"]
    assert _keys([str(tmp_path / "o" / "m-000.tar")]) == ["t0-00000001", "t1-00000002"]


# ---------------------------------------------------------------------------------- shapes_edit
SHAPES_CASES = [
    (["n=abc"], "n must be a whole number, got 'abc'"),
    (["n=-5"], "n must be at least 1, got -5"),
    (["n=0"], "n must be at least 1, got 0"),
    (["n=2.5"], "n must be a whole number, got 2.5"),
    (["start=-1"], "start must be at least 0, got -1"),
    (["shard_size=0"], "shard_size must be at least 1, got 0"),
    (["seed=abc"], "seed must be a whole number, got 'abc'"),
    (["size=abc"], "size must be a whole number, got 'abc'"),
    (["mix=5"], "mix must be text such as recolor=1,t2i=1, got 5"),
    (["paraphrase=3"], "paraphrase must be true or false, got 3"),
]


@pytest.mark.parametrize(("args", "line"), SHAPES_CASES, ids=[c[0][0] for c in SHAPES_CASES])
def test_shapes_edit_arguments_are_checked(tmp_path, args, line):
    with pytest.raises(KontextError) as err:
        shapes_edit_main([f"out={tmp_path}/se", *args])
    assert str(err.value) == line and not (tmp_path / "se").exists()


def test_shapes_edit_out_must_be_a_folder(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(KontextError, match=f"^out {tmp_path}/f is a file, not a folder$"):
        shapes_edit_main([f"out={tmp_path}/f", "n=1"])


def test_entry_points_print_one_line(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "data" / "shapes_edit.py"), f"out={tmp_path}", "n=-5"],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.splitlines() == ["error: n must be at least 1, got -5"]
    assert proc.stdout == ""
    (tmp_path / "m.jsonl").mkdir()
    proc = subprocess.run([sys.executable, str(ROOT / "data" / "import_pairs.py"), f"out={tmp_path}/o",
                           f"manifest={tmp_path}/m.jsonl"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stderr.splitlines() == [
        f"error: manifest={tmp_path}/m.jsonl is a folder; give the .jsonl file (or folder={tmp_path}/m.jsonl)"]


def test_the_first_skips_are_printed_and_the_report_keeps_all(tmp_path, capsys):
    _img(tmp_path / "t.png")
    rows = [{"instruction": "x", "target": f"gone{i}.png", "key": f"k{i}"} for i in range(23)]
    rows.append({"instruction": "x", "target": "t.png"})
    import_main([f"out={tmp_path}/o", f"manifest={_manifest(tmp_path, rows)}"])
    printed = capsys.readouterr().out.splitlines()
    assert printed[:2] == ["wrote 1 samples to 1 shards; skipped 23", "      23  missing file"]
    assert printed[2] == f"  skipped {tmp_path}/m.jsonl:1 (key k0): missing file: {tmp_path}/gone0.png"
    assert len([p for p in printed if p.startswith("  skipped ")]) == 20
    assert printed[-1] == "  ... and 3 more (report=FILE lists all)"
    import_main([f"out={tmp_path}/o2", f"manifest={tmp_path}/m.jsonl", f"report={tmp_path}/r.json"])
    saved = json.loads((tmp_path / "r.json").read_text())["skipped"]
    assert [s["key"] for s in saved] == [f"k{i}" for i in range(23)]
    assert saved[22] == {"item": f"{tmp_path}/m.jsonl:23", "reason": f"missing file: {tmp_path}/gone22.png",
                         "key": "k22"}
