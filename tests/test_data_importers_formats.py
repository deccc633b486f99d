"""Importing the layouts of other trainers: JSONL records with their own field names, a
metadata.csv, Parquet files and a Hugging Face datasets folder (save_to_disk), each through the
same checks and skip report, read back from the shards."""

import io
import json
import sys

import numpy as np
import pytest
from PIL import Image
from test_data_importers import _img, _read_all

from kontext.data.commands import import_main
from kontext.data.format import decode_image
from kontext.data.importers import import_jsonl
from kontext.data.records import parse_fields
from kontext.data.tables import import_csv, import_table
from kontext.data.writers import ShardWriter
from kontext.errors import KontextError

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")


def _png(seed: int, size=(40, 24)) -> bytes:
    rng = np.random.default_rng(seed)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(buf, format="PNG")
    return buf.getvalue()


def _pixels(data: bytes) -> np.ndarray:
    return np.asarray(decode_image(data))


def _refs(record) -> list[bytes]:
    return [record[k] for k in sorted(k for k in record if k.startswith("ref"))]


def _writer(tmp_path):
    return ShardWriter(str(tmp_path / "out" / "pairs-%06d.tar"), maxcount=2)


# ----------------------------------------------------------------------------------------- JSONL
def test_jsonl_with_other_field_names_and_a_list_of_references(tmp_path):
    for i, name in enumerate(["a.png", "b.png", "s.png", "t1.png", "t2.png", "t3.png"]):
        _img(tmp_path / name, seed=i)
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"0" * 40)
    rows = [
        {"id": "two", "prompt": "put the hat on", "input_images": ["a.png", "b.png"], "style": "s.png",
         "output_image": "t1.png"},
        {"id": "one", "prompt": "make it red", "input_images": ["a.png"], "output_image": "t2.png"},
        {"id": "none", "prompt": "a red car", "input_images": [], "output_image": "t3.png"},
        {"id": "missing", "prompt": "x", "input_images": ["gone.png"], "output_image": "t1.png"},
        {"id": "empty", "prompt": "  ", "input_images": ["a.png"], "output_image": "t1.png"},
        {"id": "one", "prompt": "again", "input_images": ["a.png"], "output_image": "t2.png"},
        {"id": "corrupt", "prompt": "x", "input_images": ["broken.png"], "output_image": "t1.png"},
        {"id": "typed", "prompt": "x", "input_images": 5, "output_image": "t1.png"},
    ]
    (tmp_path / "m.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    fields = "instruction=prompt, reference=input_images+style, target=output_image, key=id"
    report = import_jsonl(tmp_path / "m.jsonl", _writer(tmp_path), fields=fields)
    m = tmp_path / "m.jsonl"
    assert report.written == 3
    assert report.skipped == [
        (f"{m}:4", f"missing file: {tmp_path}/gone.png", "missing"),
        (f"{m}:5", f"empty instruction for {tmp_path}/t1.png", "empty"),
        (f"{m}:6", "duplicate key 'one': also " + f"{m}:2", "one"),
        (f"{m}:7", f"unreadable image: {tmp_path}/broken.png: Truncated File Read", "corrupt"),
        (f"{m}:8", "bad manifest line: input_images must be a path, a list of paths or null, got 5", "typed"),
    ]
    recs = _read_all(report.shards)
    assert set(recs) == {"two", "one", "none"}
    assert _refs(recs["two"]) == [(tmp_path / n).read_bytes() for n in ["a.png", "b.png", "s.png"]]
    assert recs["two"]["instruction.txt"].decode() == "put the hat on"
    assert recs["two"]["target.png"] == (tmp_path / "t1.png").read_bytes()
    assert len(_refs(recs["one"])) == 1 and _refs(recs["none"]) == []
    assert json.loads(recs["none"]["meta.json"])["task"] == "t2i"


def test_a_field_no_record_has_is_one_line_naming_the_fields(tmp_path):
    (tmp_path / "m.jsonl").write_text(json.dumps({"prompt": "x", "output_image": "t.png"}) + "\n")
    with pytest.raises(KontextError) as err:
        import_jsonl(tmp_path / "m.jsonl", _writer(tmp_path), fields="instruction=promt,target=output_image")
    assert str(err.value) == (f"no field 'promt' in the records of {tmp_path}/m.jsonl; "
                              "the fields are: prompt, output_image")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize(("spec", "line"), [
    ("prompt", "fields is field=column[,field=column...], got 'prompt' in 'prompt'"),
    ("caption=text", "fields: unknown field 'caption'; the fields are reference, instruction, target, task, key"),
    ("target=a+b", "fields: only reference takes several columns, got target=a+b"),
    ("reference=a+", "fields: reference needs a column name, got 'a+'"),
    (5, "fields is field=column[,field=column...], got 5"),
])
def test_bad_field_specs_are_one_line(spec, line):
    with pytest.raises(KontextError) as err:
        parse_fields(spec)
    assert str(err.value) == line


def test_field_specs_as_text_or_a_dict_agree():
    text = parse_fields("instruction=edit_prompt,reference=input_image+mask,target=edited_image")
    assert text == parse_fields({"instruction": "edit_prompt", "reference": ["input_image", "mask"],
                                 "target": "edited_image"})
    assert text.names["key"] == ("key",) and text["reference"] == "input_image+mask"


# ------------------------------------------------------------------------------------------- CSV
def test_metadata_csv_with_two_reference_columns(tmp_path):
    for name, seed in [("t/a.png", 1), ("t/b.png", 2), ("t/c.png", 3), ("r/a.png", 4), ("r/b.png", 5),
                       ("s/a.png", 6)]:
        _img(tmp_path / name, seed=seed)
    (tmp_path / "t" / "bad.png").write_bytes(b"not an image")
    csv_text = (
        "file_name,before,style,text,id\n"
        't/a.png,r/a.png,s/a.png,"make it red, then blue",first\n'
        "t/b.png,r/b.png,,turn it over,second\n"       # one reference: the empty cell is none
        "t/c.png,,,\"a line\nand another\",third\n"    # no reference, an instruction of two lines
        "t/gone.png,r/a.png,,x,fourth\n"
        "t/a.png,r/a.png,,,fifth\n"                     # empty instruction
        "t/b.png,r/b.png,,again,second\n"               # duplicate key
        "t/bad.png,r/a.png,,x,sixth\n"
        "t/a.png,r/a.png\n"                             # short row
        "\n"
    )
    (tmp_path / "metadata.csv").write_text(csv_text)
    fields = "target=file_name,reference=before+style,instruction=text,key=id"
    report = import_csv(tmp_path / "metadata.csv", _writer(tmp_path), fields=fields, source="mine")
    c = tmp_path / "metadata.csv"
    assert report.written == 3
    assert [(item, why.split(": cannot identify")[0], key) for item, why, key in report.skipped] == [
        (f"{c}:6", f"missing file: {tmp_path}/t/gone.png", "fourth"),
        (f"{c}:7", f"empty instruction for {tmp_path}/t/a.png", "fifth"),
        (f"{c}:8", f"duplicate key 'second': also {c}:3", "second"),
        (f"{c}:9", f"unreadable image: {tmp_path}/t/bad.png", "sixth"),
        (f"{c}:10", "bad row: 2 cells, the header has 5", None),
    ]
    recs = _read_all(report.shards)
    assert set(recs) == {"first", "second", "third"}
    assert _refs(recs["first"]) == [(tmp_path / n).read_bytes() for n in ["r/a.png", "s/a.png"]]
    assert _refs(recs["second"]) == [(tmp_path / "r/b.png").read_bytes()] and _refs(recs["third"]) == []
    assert recs["first"]["instruction.txt"].decode() == "make it red, then blue"
    assert recs["third"]["instruction.txt"].decode() == "a line\nand another"
    assert np.array_equal(_pixels(recs["second"]["target.png"]), np.asarray(Image.open(tmp_path / "t/b.png")))
    assert json.loads(recs["first"]["meta.json"]) == {"task": "edit", "source": "mine", "size": [48, 32]}


def test_a_csv_without_the_named_columns_is_one_line_naming_its_columns(tmp_path):
    (tmp_path / "metadata.csv").write_text("file_name,text\nt.png,x\n")
    with pytest.raises(KontextError) as err:
        import_csv(tmp_path / "metadata.csv", _writer(tmp_path), fields="target=file_name,instruction=prompt")
    assert str(err.value) == f"no column 'prompt' in {tmp_path}/metadata.csv; the columns are: file_name, text"
    with pytest.raises(KontextError) as err:
        import_csv(tmp_path / "metadata.csv", _writer(tmp_path))
    assert str(err.value) == (f"no column 'target' in {tmp_path}/metadata.csv (name the target column with "
                              "fields=target=NAME); the columns are: file_name, text")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------------- Parquet, Arrow
def _image_struct(data, path=None):
    return {"bytes": data, "path": path}


IMAGE = pa.struct([("bytes", pa.binary()), ("path", pa.string())])


def test_parquet_in_the_magicbrush_layout(tmp_path):
    _img(tmp_path / "src_on_disk.png", seed=9)
    src = [_png(1), _png(2), _png(3), b"garbage", _png(5), None, _png(7)]
    tgt = [_png(11), _png(12), _png(13), _png(14), _png(15), _png(16), _png(17)]
    table = pa.table({
        "img_id": ["242679", "242679", "1111", "2222", "3333", "4444", "5555"],
        "source_img": pa.array([_image_struct(src[0], "242679-input.png"), _image_struct(src[1]),
                                _image_struct(None, "src_on_disk.png"), _image_struct(src[3]),
                                _image_struct(src[4]), _image_struct(None, "not_on_disk.png"),
                                _image_struct(src[6])], IMAGE),
        "instruction": ["let the dog wear a hat", "make it night", "add snow", "x", "", "x", "the same key"],
        "target_img": pa.array([_image_struct(t) for t in tgt], IMAGE),
        "key": ["k0", "k1", "k2", "k3", "k4", "k5", "k1"],
    })
    pq.write_table(table, tmp_path / "train.parquet", row_group_size=2)
    fields = "reference=source_img,instruction=instruction,target=target_img"
    report = import_table(tmp_path / "train.parquet", _writer(tmp_path), fields=fields)
    p = tmp_path / "train.parquet"
    assert report.written == 3
    assert [(item, why.split(": cannot identify")[0], key) for item, why, key in report.skipped] == [
        (f"{p}:row 3", f"unreadable image: {p}:row 3 source_img", "k3"),
        (f"{p}:row 4", f"empty instruction for {p}:row 4 target_img", "k4"),
        (f"{p}:row 5", f"missing file: {tmp_path}/not_on_disk.png", "k5"),
        (f"{p}:row 6", f"duplicate key 'k1': also {p}:row 1", "k1"),
    ]
    recs = _read_all(report.shards)
    assert set(recs) == {"k0", "k1", "k2"}
    for i in range(3):
        r = recs[f"k{i}"]
        assert r["target.png"] == tgt[i] and len(_refs(r)) == 1
        assert np.array_equal(_pixels(r["target.png"]), _pixels(tgt[i]))
    assert _refs(recs["k0"]) == [src[0]]
    assert _refs(recs["k2"]) == [(tmp_path / "src_on_disk.png").read_bytes()]
    assert recs["k1"]["instruction.txt"].decode() == "make it night"


def test_a_datasets_folder_in_the_instructpix2pix_layout(tmp_path):
    """save_to_disk's layout: Arrow stream files listed in state.json, beside dataset_info.json."""
    d = tmp_path / "ip2p"
    d.mkdir()
    _img(d / "edited.png", seed=7)
    schema = pa.schema([("input_image", IMAGE), ("extra", pa.list_(IMAGE)), ("edit_prompt", pa.string()),
                        ("edited_image", pa.binary()), ("key", pa.string())])
    shards = [
        [(_png(1), [_png(2)], "turn the sky pink", _png(3), "k0"), (_png(4), [], "add fireworks", _png(5), "k1")],
        [(_png(6), [_png(7), _png(8)], "make it winter", _png(9), "k2"), (_png(6), [], "again", _png(9), "k2"),
         (None, [], "no target", None, "k3")],
    ]
    files = []
    for n, rows in enumerate(shards):
        name = f"data-{n:05d}-of-00002.arrow"
        cols = list(zip(*rows, strict=True))
        batch = pa.record_batch([pa.array([_image_struct(x) if x else None for x in cols[0]], IMAGE),
                                 pa.array([[_image_struct(x) for x in xs] for xs in cols[1]], pa.list_(IMAGE)),
                                 pa.array(cols[2]), pa.array(cols[3], pa.binary()), pa.array(cols[4])], schema=schema)
        with pa.ipc.new_stream(str(d / name), schema) as w:
            w.write_batch(batch)
        files.append({"filename": name})
    (d / "state.json").write_text(json.dumps({"_data_files": files, "_split": "train"}))
    (d / "dataset_info.json").write_text(json.dumps({"features": {}}))

    report = import_main([f"out={tmp_path}/out", f"table={d}",
                          "fields=reference=input_image+extra,instruction=edit_prompt,target=edited_image"])
    f1 = d / "data-00001-of-00002.arrow"
    assert report.written == 3
    assert report.skipped == [(f"{f1}:row 1", f"duplicate key 'k2': also {f1}:row 0", "k2"),
                              (f"{f1}:row 2", "bad row: edited_image must be an image (a path, bytes or "
                                              "{bytes, path}), got None", "k3")]
    recs = _read_all(report.shards)
    assert _refs(recs["k0"]) == [_png(1), _png(2)] and _refs(recs["k1"]) == [_png(4)]
    assert _refs(recs["k2"]) == [_png(6), _png(7), _png(8)]
    assert [recs[k]["target.png"] for k in ("k0", "k1", "k2")] == [_png(3), _png(5), _png(9)]
    assert recs["k2"]["instruction.txt"].decode() == "make it winter"
    assert json.loads(recs["k0"]["meta.json"])["source"] == "ip2p"


def test_a_folder_written_by_datasets_save_to_disk(tmp_path, capsys):
    """A real `datasets.Dataset.save_to_disk` folder (Image features, a list of images as the
    second reference), with a row without target, an unreadable image, an empty instruction and a
    duplicate key among its rows. (save_to_disk embeds images given by path, so a missing file
    cannot occur in one.)"""
    hf = pytest.importorskip("datasets")
    _img(tmp_path / "on_disk.png", seed=30)
    features = hf.Features({"id": hf.Value("string"), "before": hf.Image(), "more": hf.List(hf.Image()),
                            "instruction": hf.Value("string"), "after": hf.Image()})
    rows = [  # (id, before, more, instruction, after)
        ("a", {"bytes": _png(1), "path": None}, [{"bytes": _png(2), "path": None}], "make it red", _png(3)),
        ("b", str(tmp_path / "on_disk.png"), [], "turn it over", _png(4)),
        ("c", {"bytes": _png(5), "path": None}, [], "no target", None),
        ("d", {"bytes": _png(6), "path": None}, [{"bytes": b"garbage", "path": "g.png"}], "x", _png(7)),
        ("e", {"bytes": _png(8), "path": None}, [], "", _png(9)),
        ("a", {"bytes": _png(10), "path": None}, [], "again", _png(11)),
        ("f", {"bytes": _png(12), "path": None}, [{"bytes": _png(13), "path": None}] * 2, "two more", _png(14)),
    ]
    columns = dict(zip(["id", "before", "more", "instruction", "after"], map(list, zip(*rows, strict=True)),
                       strict=True))
    columns["after"] = [b and {"bytes": b, "path": None} for b in columns["after"]]
    hf.Dataset.from_dict(columns, features=features).save_to_disk(str(tmp_path / "ds"), num_shards=2)
    arrow = sorted((tmp_path / "ds").glob("*.arrow"))
    assert len(arrow) == 2

    report = import_main([f"out={tmp_path}/o", f"table={tmp_path}/ds",
                          "fields=key=id,reference=before+more,instruction=instruction,target=after"])
    assert report.written == 3
    rows_in = {item: key for item, _, key in report.skipped}
    assert sorted(rows_in.values()) == ["a", "c", "d", "e"]
    reasons = {key: why for _, why, key in report.skipped}
    assert reasons["c"] == "bad row: after must be an image (a path, bytes or {bytes, path}), got None"
    assert reasons["d"].startswith(f"unreadable image: {arrow[0]}:row 3 more (g.png): ")
    assert reasons["e"].startswith("empty instruction for ")
    assert reasons["a"].startswith("duplicate key 'a': also ")
    printed = capsys.readouterr().out
    assert "skipped 4" in printed and f"{arrow[0]}:row 2 (key c): bad row: after must be" in printed
    assert [line.split(maxsplit=1) for line in printed.splitlines()[1:5]] == [
        ["1", "bad row"], ["1", "unreadable image"], ["1", "empty instruction"], ["1", "duplicate key"]]
    recs = _read_all(report.shards)
    assert set(recs) == {"a", "b", "f"}
    assert _refs(recs["a"]) == [_png(1), _png(2)] and recs["a"]["target.png"] == _png(3)
    assert _refs(recs["b"]) == [(tmp_path / "on_disk.png").read_bytes()]
    assert _refs(recs["f"]) == [_png(12), _png(13), _png(13)]


def test_table_options_are_one_line(tmp_path, monkeypatch):
    pq.write_table(pa.table({"input_image": [b"x"], "edit_prompt": ["x"], "edited_image": [b"x"]}),
                   tmp_path / "t.parquet")
    with pytest.raises(KontextError) as err:
        import_main([f"out={tmp_path}/o", f"table={tmp_path}/t.parquet", "fields=target=edited_img"])
    assert str(err.value) == (f"no column 'edited_img' in {tmp_path}/t.parquet; the columns are: input_image, "
                              "edit_prompt, edited_image")
    (tmp_path / "dd").mkdir()
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(KontextError) as err:
        import_table(tmp_path / "dd", _writer(tmp_path))
    assert str(err.value) == f"{tmp_path}/dd holds the splits train, test; give one: {tmp_path}/dd/train"
    for name in ("pyarrow", "pyarrow.parquet", "pyarrow.ipc"):
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(KontextError) as err:
        import_main([f"out={tmp_path}/o", f"table={tmp_path}/t.parquet"])
    assert str(err.value) == ("reading Parquet or Arrow needs pyarrow: pip install 'kontext[import]' "
                              "(or pip install pyarrow)")
    assert not (tmp_path / "o").exists()


def test_the_command_reads_a_csv(tmp_path, capsys):
    _img(tmp_path / "a.png", seed=1)
    _img(tmp_path / "t.png", seed=2)
    (tmp_path / "metadata.csv").write_text("image, input ,prompt\nt.png,a.png,make it red\n")  # names stripped
    report = import_main([f"out={tmp_path}/o", f"csv={tmp_path}/metadata.csv",
                          "fields=target=image,reference=input,instruction=prompt"])
    [record] = _read_all(report.shards).values()
    assert record["__key__"] == "t-00000002" and _refs(record) == [(tmp_path / "a.png").read_bytes()]
    assert "wrote 1 samples" in capsys.readouterr().out
    with pytest.raises(KontextError) as err:
        import_main([f"out={tmp_path}/o", f"folder={tmp_path}", "fields=target=image"])
    assert str(err.value) == "fields= names the fields of a manifest, CSV or table, not of folder="
    with pytest.raises(KontextError) as err:
        import_main([f"out={tmp_path}/o", f"csv={tmp_path}/metadata.csv", f"references=[{tmp_path}]"])
    assert str(err.value) == ("references= are folders of reference images for folder=; csv= names its "
                              "reference column with fields=reference=NAME")
    with pytest.raises(KontextError) as err:
        import_main([f"out={tmp_path}/o", f"csv={tmp_path}"])
    assert str(err.value) == f"csv={tmp_path} is a folder; give the .csv file (such as {tmp_path}/metadata.csv)"
