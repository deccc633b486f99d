import json

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from kontext.data.commands import import_main, inspect_main, shapes_edit_main
from kontext.data.format import decode_image
from kontext.data.importers import import_folder, import_jsonl
from kontext.data.loader import KontextLoader
from kontext.data.stream import StreamConfig
from kontext.data.writers import ShardWriter
from kontext.errors import KontextError


def _img(path, size=(48, 32), seed=0, fmt=None):
    rng = np.random.default_rng(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path, format=fmt)
    return path


def _read_all(shards):
    return {r["__key__"]: r for p in shards for r in wds.tariterators.tarfile_samples([{"url": p}])}


def test_folder_import_round_trips_bits_and_reports_skips(tmp_path):
    t, ra, rb = tmp_path / "targets", tmp_path / "refs_a", tmp_path / "refs_b"
    for i, name in enumerate(["cat", "dog", "sub/owl"]):
        _img(t / f"{name}.png", seed=i)
        (t / f"{name}.txt").write_text(f"edit the {name}\n")
        _img(ra / f"{name}.jpg", (32, 32), seed=10 + i, fmt="JPEG")
        _img(rb / f"{name}.webp", (48, 16), seed=20 + i, fmt="WEBP")
    _img(ra / "bmp.bmp", seed=3, fmt="BMP")  # BMP reference: converted to PNG without loss
    _img(t / "bmp.jpg", seed=4, fmt="JPEG")
    (t / "bmp.txt").write_text("from a bitmap")
    _img(rb / "bmp.png", seed=5)
    _img(t / "nocaption.png", seed=6)  # no .txt
    _img(ra / "nocaption.png", seed=6)
    _img(rb / "nocaption.png", seed=6)
    _img(t / "noref.png", seed=7)
    (t / "noref.txt").write_text("x")
    _img(ra / "noref.png", seed=7)  # missing in refs_b
    (t / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 50)
    (t / "broken.txt").write_text("x")
    _img(ra / "broken.png", seed=8)
    _img(rb / "broken.png", seed=8)
    for suffix in ("png", "webp"):  # two targets of one name: the second is a duplicate key
        _img(t / f"dup.{suffix}", seed=9, fmt=suffix.upper())
    (t / "dup.txt").write_text("x")
    _img(ra / "dup.png", seed=9)
    _img(rb / "dup.png", seed=9)
    _img(t / "tiny.png", (8, 8))
    (t / "tiny.txt").write_text("x")
    _img(ra / "tiny.png", (8, 8))
    _img(rb / "tiny.png", (8, 8))
    _img(t / "empty.png")
    (t / "empty.txt").write_text("  \n")
    _img(ra / "empty.png")
    _img(rb / "empty.png")

    writer = ShardWriter(str(tmp_path / "out" / "pairs-%06d.tar"), maxcount=2)
    report = import_folder(t, [ra, rb], writer, task="edit")
    assert report.written == 5 and len(report.shards) == 3
    reasons = {skip.item.split("/")[-1]: skip.reason for skip in report.skipped}
    assert set(reasons) == {"nocaption.png", "noref.png", "broken.png", "tiny.png", "empty.png", "dup.webp"}
    assert [skip.key for skip in report.skipped] == ["broken", "dup", "empty", "nocaption", "noref", "tiny"]
    assert reasons["dup.webp"] == f"duplicate key 'dup': also {t}/dup.png"
    assert "no instruction" in reasons["nocaption.png"] and "missing reference" in reasons["noref.png"]
    assert "smaller than 16" in reasons["tiny.png"] and "empty instruction" in reasons["empty.png"]
    assert reasons["broken.png"].startswith(f"unreadable image: {t}/broken.png: ")
    assert "skipped 6" in report.summary()

    recs = _read_all(report.shards)
    assert set(recs) == {"cat", "dog", "sub__owl", "bmp", "dup"}
    for name in ["cat", "dog", "sub/owl"]:
        r = recs[name.replace("/", "__")]
        assert r["target.png"] == (t / f"{name}.png").read_bytes()  # bit-exact
        assert r["ref0.jpg"] == (ra / f"{name}.jpg").read_bytes()
        assert r["ref1.webp"] == (rb / f"{name}.webp").read_bytes()
        assert r["instruction.txt"].decode() == f"edit the {name}"
        assert json.loads(r["meta.json"]) == {"task": "edit", "source": "targets", "size": [48, 32]}
    bmp = recs["bmp"]
    assert np.array_equal(np.asarray(decode_image(bmp["ref0.png"])), np.asarray(Image.open(ra / "bmp.bmp")))
    assert bmp["target.jpg"] == (t / "bmp.jpg").read_bytes()

    # the loader decodes exactly the original pixels (area large enough that nothing is resized)
    cfg = StreamConfig(batch_size=1, mode="exact", max_area=48 * 32, shuffle_buffer=0)
    for batch in KontextLoader(report.shards, cfg):
        if batch["key"] == ["cat"]:
            pixels = ((batch["target"][0] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
            assert np.array_equal(pixels, np.asarray(Image.open(t / "cat.png")))


def test_jsonl_import(tmp_path):
    _img(tmp_path / "a.png", seed=1)
    _img(tmp_path / "b.jpg", seed=2, fmt="JPEG")
    _img(tmp_path / "c.png", seed=3)
    _img(tmp_path / "t1.png", seed=4)
    _img(tmp_path / "t2.webp", seed=5, fmt="WEBP")
    lines = [
        {"reference": "a.png", "instruction": "one", "target": "t1.png"},
        {"reference": ["a.png", "b.jpg", "c.png"], "instruction": "three", "target": "t2.webp", "key": "multi"},
        {"reference": None, "instruction": "text only", "target": "t1.png", "task": "t2i"},
        {"reference": "missing.png", "instruction": "x", "target": "t1.png"},
        {"instruction": "no target"},
        {"reference": None, "instruction": "dup", "target": "t1.png", "key": "multi"},
    ]
    text = "\n".join(json.dumps(x) for x in lines[:3]) + "\n{broken json\n\n"
    text += "\n".join(json.dumps(x) for x in lines[3:]) + "\n"
    (tmp_path / "m.jsonl").write_text(text)
    report = import_jsonl(tmp_path / "m.jsonl", ShardWriter(str(tmp_path / "o" / "m-%03d.tar")))
    assert report.written == 3 and len(report.skipped) == 4
    assert [(s.reason.split(":")[0], s.key) for s in report.skipped] == [
        ("bad manifest line", None), ("missing file", "t1-00000006"), ("bad manifest line", None),
        ("duplicate key 'multi'", "multi")]
    recs = _read_all(report.shards)
    multi = recs["multi"]
    assert [multi[f"ref{i}.{e}"] for i, e in enumerate(["png", "jpg", "png"])] == [
        (tmp_path / n).read_bytes() for n in ["a.png", "b.jpg", "c.png"]]
    assert multi["target.webp"] == (tmp_path / "t2.webp").read_bytes()
    t2i = recs["t1-00000003"]
    assert json.loads(t2i["meta.json"])["task"] == "t2i" and not any(k.startswith("ref") for k in t2i)
    assert json.loads(recs["t1-00000001"]["meta.json"])["task"] == "edit"


def test_commands(tmp_path, capsys):
    shards = shapes_edit_main([f"out={tmp_path}/se", "n=12", "size=32", "shard_size=5", "mix=t2i=1,remove=2"])
    assert len(shards) == 3
    summary = inspect_main([f"shards={tmp_path}/se", f"grid={tmp_path}/g.png", "grid_samples=4",
                            f"json={tmp_path}/s.json"])
    assert summary.samples == 12 and set(summary.tasks) <= {"t2i", "remove"} and summary.sizes == {"32x32": 12}
    assert Image.open(tmp_path / "g.png").size[1] == 4 * (128 + 4)
    assert json.loads((tmp_path / "s.json").read_text())["samples"] == 12
    with pytest.raises(KontextError, match="multiple of 16"):
        shapes_edit_main([f"out={tmp_path}/x", "size=40"])
    with pytest.raises(KontextError, match="exactly one"):
        import_main([f"out={tmp_path}/x"])
    _img(tmp_path / "t" / "a.png")
    (tmp_path / "t" / "a.txt").write_text("hello")
    report = import_main([f"out={tmp_path}/imp", f"folder={tmp_path}/t", f"report={tmp_path}/r.json"])
    assert report.written == 1 and json.loads((tmp_path / "r.json").read_text())["written"] == 1
    assert "wrote 1 samples" in capsys.readouterr().out
