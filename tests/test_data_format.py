import hashlib
import json
import math

import numpy as np
import pytest
import webdataset as wds
from PIL import Image

from kontext.data import buckets
from kontext.data.format import (
    FormatError,
    Sample,
    encode_image,
    from_record,
    image_format,
    make_key,
    to_record,
)
from kontext.data.shapes_edit import make_case
from kontext.data.writers import ShardWriter, ensure_shapes_edit, shapes_edit_sample, write_shapes_edit


def _png(color=(1, 2, 3), size=(20, 16)):
    return encode_image(Image.new("RGB", size, color))


def _records(path):
    return list(wds.tariterators.tarfile_samples([{"url": str(path)}]))


def test_record_round_trip_and_names():
    s = Sample("k_1-a", "make it blue", _png(), [_png((9, 9, 9)), encode_image(Image.new("RGB", (8, 8)), "jpg")],
               {"task": "recolor", "source": "unit"}, {"target_latent": np.arange(6, dtype=np.float32).reshape(2, 3)})
    rec = to_record(s)
    assert set(rec) == {"__key__", "target.png", "ref0.png", "ref1.jpg", "instruction.txt", "meta.json",
                        "target_latent.npy"}
    assert json.loads(rec["meta.json"]) == {"task": "recolor", "source": "unit", "size": [20, 16]}
    back = from_record(rec, features=True)
    assert (back.key, back.instruction, back.target, back.references) == (s.key, s.instruction, s.target, s.references)
    assert np.array_equal(back.features["target_latent"], s.features["target_latent"])
    assert from_record(rec).features == {}
    assert Sample("a", "x", _png()).task == "t2i" and Sample("a", "x", _png(), [_png()]).task == "edit"


def test_format_refusals():
    with pytest.raises(FormatError, match="key"):
        to_record(Sample("a.b", "x", _png()))
    with pytest.raises(FormatError):
        to_record(Sample("a", "x", b"GIF89a"))
    with pytest.raises(FormatError, match="undecodable"):
        good = _png()
        to_record(Sample("a", "x", good, [good[:-30]]))
    with pytest.raises(FormatError, match="numbered"):
        from_record({"__key__": "a", "target.png": _png(), "ref1.png": _png(), "instruction.txt": b"x"})
    with pytest.raises(FormatError, match="instruction"):
        from_record({"__key__": "a", "target.png": _png()})
    assert image_format(encode_image(Image.new("RGB", (4, 4)), "webp")) == "webp"
    assert make_key("dir/a.b c").startswith("dir_a_b_c-") and make_key("ok-key_1") == "ok-key_1"
    assert make_key("über") != make_key("_ber") == "_ber"


def test_shard_writer_never_writes_a_half_sample(tmp_path):
    good = _png()
    with ShardWriter(str(tmp_path / "s-%02d.tar"), maxcount=2) as w:
        w.write(Sample("a", "one", good))
        with pytest.raises(FormatError):
            w.write(Sample("b", "two", good, [good[:-30]]))  # a broken reference: nothing written
        w.write(Sample("c", "three", good, [good]))
        assert not list(tmp_path.glob("*.tar"))  # the open shard is not visible yet
        w.write(Sample("d", "four", good))
        with pytest.raises(ValueError, match="duplicate"):
            w.write(Sample("a", "again", good))
    assert w.shards == [str(tmp_path / "s-00.tar"), str(tmp_path / "s-01.tar")] and w.count == 3
    assert [r["__key__"] for p in w.shards for r in _records(p)] == ["a", "c", "d"]
    assert not list(tmp_path.glob("*.tmp"))


def test_shard_writer_drops_a_shard_broken_mid_write(tmp_path, monkeypatch):
    w = ShardWriter(str(tmp_path / "s-%02d.tar"))
    w.write(Sample("a", "one", _png()))

    def boom(record):
        raise OSError("disk full")

    monkeypatch.setattr(w._tar, "write", boom)
    with pytest.raises(OSError):
        w.write(Sample("b", "two", _png()))
    assert w.close() == [] and not list(tmp_path.iterdir())


def test_shapes_edit_shards_are_deterministic(tmp_path):
    a = write_shapes_edit(tmp_path / "a", 30, seed=4, size=32, shard_size=16, mix="recolor=1,t2i=1")
    b = write_shapes_edit(tmp_path / "b", 30, seed=4, size=32, shard_size=16, mix="recolor=1,t2i=1")
    digest = [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in a]
    assert digest == [hashlib.sha256(open(p, "rb").read()).hexdigest() for p in b] and len(a) == 2
    recs = [r for p in a for r in _records(p)]
    case = make_case(None, seed=4, index=7, size=32, mix="recolor=1,t2i=1")
    rec = recs[7]
    assert rec["__key__"] == case.key and rec["instruction.txt"].decode() == case.instruction
    assert rec["target.png"] == shapes_edit_sample(case).target
    assert json.loads(rec["meta.json"])["task"] == case.op in ("recolor", "t2i")
    assert ("ref0.png" in rec) == (case.op != "t2i")
    # ensure_shapes_edit: writes once, then finds the complete shards again
    first = ensure_shapes_edit(tmp_path / "c", 10, size=32)
    mtime = [p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*.tar")]
    assert ensure_shapes_edit(tmp_path / "c", 10, size=32) == first
    assert [p.stat().st_mtime_ns for p in (tmp_path / "c").glob("*.tar")] == mtime
    assert sum(len(_records(p)) for p in ensure_shapes_edit(tmp_path / "c", 12, size=32)) == 12


def test_buckets_multiples_of_16_within_area():
    rng = np.random.default_rng(0)
    for _ in range(300):
        w, h = (int(v) for v in rng.integers(8, 3000, 2))
        area = int(rng.choice([32 * 32, 64 * 64, 512 * 512, 1024 * 1024]))
        bw, bh = buckets.bucket_size(w, h, area)
        assert bw % 16 == 0 and bh % 16 == 0 and bw * bh <= area and bw >= 16 and bh >= 16
        if 0.25 <= w / h <= 4 and area >= 64 * 64:  # aspect kept up to the 16-px rounding
            assert abs(math.log((bw / bh) / (w / h))) < math.log((bw + 16) / bw) + math.log((bh + 16) / bh)
    assert buckets.bucket_size(64, 64, 64 * 64) == (64, 64)
    assert buckets.bucket_size(1000, 10, 64 * 64) == (128, 32)  # aspect clamped to 4


def test_preferred_resolutions():
    res = buckets.PREFERRED_KONTEXT_RESOLUTIONS
    assert len(res) == 17 and res[0] == (672, 1568) and res[8] == (1024, 1024) and res[-1] == (1568, 672)
    assert all(w % 16 == 0 and h % 16 == 0 for w, h in res)
    assert all(buckets.preferred_size(w, h) == (w, h) for w, h in res)
    assert buckets.preferred_size(1920, 1080) == (1392, 752)
    assert buckets.preferred_size(1920, 1080, 512 * 512) == (688, 368)
    img = Image.new("RGB", (100, 50))
    assert buckets.fit(img, (48, 32)).size == (48, 32) and buckets.fit(img, (100, 50)) is img
