"""Importing the layouts of other trainers: JSONL records with their own field names, through the
same checks and skip report, read back from the shards."""

import json

import pytest
from test_data_importers import _img, _read_all

from kontext.data.importers import import_jsonl, parse_fields
from kontext.data.writers import ShardWriter
from kontext.errors import KontextError


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
        (f"{m}:4", f"missing file: {tmp_path}/gone.png"),
        (f"{m}:5", f"empty instruction for {tmp_path}/t1.png"),
        (f"{m}:6", "duplicate key 'one': also " + f"{m}:2"),
        (f"{m}:7", f"unreadable image: {tmp_path}/broken.png: Truncated File Read"),
        (f"{m}:8", "bad manifest line: input_images must be a path, a list of paths or null, got 5"),
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
