"""Bad input to the user-facing commands: every case is one line (or an exact skip count), never a
traceback, a hang or a silent success. `sample.py` cases use a checkpoint that does not exist:
an input error found before the model loads is reported instead of "model source not found"."""

import io
import json
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
import webdataset as wds
from hydra import compose, initialize_config_dir
from PIL import Image

from kontext.cli import text_overrides
from kontext.data.commands import import_main, shapes_edit_main
from kontext.data.format import ImageTooLarge, decode_image, image_size
from kontext.data.importers import import_jsonl
from kontext.data.writers import ShardWriter
from kontext.errors import KontextError
from kontext.sample import run_sample

ROOT = Path(__file__).resolve().parent.parent
TEXTS = ["remove the couple's shadow", "make it red, then blue", "färbe den Kreis rot", "42", 'say "hi"', "[a,b]",
         "x=y", "cost ${x}", "a\\", "it's \\'quoted\\'", "日本語の猫", "true", "1e3"]


@pytest.fixture(autouse=True)
def _bounded():
    """No case may hang: each is stopped after 60 s."""
    def stop(*_):
        raise TimeoutError("a bad-input case ran for 60 s")

    previous = signal.signal(signal.SIGALRM, stop)
    signal.alarm(60)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, previous)


def bomb_png(width: int = 10_000, height: int = 10_000) -> bytes:
    """A valid 1-bit PNG of width x height black pixels in a few kilobytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = zlib.compress(bytes((width + 7) // 8 + 1) * height, 9)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


def _img(path: Path, size=(48, 32), seed=0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8)).save(path)
    return path


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("bad")
    _img(d / "ok.png")
    (d / "big.png").write_bytes(bomb_png())
    (d / "a_file").write_text("x")
    (d / "x_turn2.png").mkdir()  # in the way of the second turn's output
    (d / "folder").mkdir()
    (d / "dir.png").mkdir()
    (d / "latin1.jsonl").write_bytes('{"image": null, "prompt": "färbe", "output": "o.png"}\n'.encode("latin-1"))
    (d / "all_bad.jsonl").write_text("\n".join(json.dumps(c) for c in [
        {"image": str(d / "missing.png"), "prompt": "x", "output": str(d / "o1.png")},
        {"image": None, "prompt": "x", "output": str(d / "a_file" / "o2.png")},
        {"image": None, "prompt": "x", "output": str(d / "o3.png"), "seed": 2**64},
        {"image": str(d / "big.png"), "prompt": "x", "output": str(d / "o4.png")},
        {"image": None, "prompt": 42, "output": str(d / "o5.png")},
        {"image": None, "prompt": "x", "output": str(d / "dir.png")},
    ]))
    return d


def sample(*overrides) -> int:
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("sample", overrides=["checkpoint=/nonexistent/model", "progress=false", *overrides])
    return run_sample(cfg)


F = "{files}"
SAMPLE_CASES = [  # (overrides, exit status, the one line on stderr, starting "error: ")
    ([f"image={F}/missing.png", "prompt=x"], 2, f"image not found: {F}/missing.png"),
    ([f"image={F}/folder", "prompt=x"], 2, f"image {F}/folder is a folder"),
    ([f"image={F}/big.png", "prompt=x"], 2, f"image too large: {F}/big.png is 10000x10000 pixels (100.0 MP), "
                                            "over the limit of 64.0 MP (max_pixels=64000000)"),
    ([f"image={F}/ok.png", "prompt=x", "max_pixels=1000"], 2,
     f"image too large: {F}/ok.png is 48x32 pixels (0.0 MP), over the limit of 0.0 MP (max_pixels=1000)"),
    (["prompt=x", "max_pixels=abc"], 2, "max_pixels must be a whole number, got 'abc'"),
    (["prompt=x", "steps=abc"], 2, "steps must be a whole number, got 'abc'"),
    (["prompt=x", "steps=-1"], 2, "steps must be at least 1, got -1"),
    (["prompt=x", "steps=2.5"], 2, "steps must be a whole number, got 2.5"),
    (["prompt=x", "seed=abc"], 2, "seed must be a whole number from -2**63 to 2**64-1, got 'abc'"),
    (["prompt=x", f"seed={2**64}"], 2, f"seed must be a whole number from -2**63 to 2**64-1, got {2**64}"),
    (["prompt=x", "width=abc"], 2, "width must be a whole number, got 'abc'"),
    (["prompt=x", "height=0"], 2, "height must be at least 1, got 0"),
    (["prompt=x", "guidance=abc"], 2, "guidance must be a number or null, got 'abc'"),
    (["prompt=x", "timesteps=[1.0,abc]"], 2, "timesteps must be a list of numbers such as [1.0,0.5,0.0], "
                                              "got [1.0, 'abc']"),
    (["prompt=x", "timesteps=[0.0,1.0]"], 2, "timesteps must be at least two strictly decreasing times in [0, 1], "
                                             "got [0.0, 1.0]"),
    (["prompt=x", "batch_size=0"], 2, "batch_size must be at least 1, got 0"),
    (["prompt=x", "device=gpu"], 2, "device must be auto, cpu, cuda, cuda:N or mps, got 'gpu'"),
    (["prompt=x", "dtype=int8"], 2, "dtype must be float32, bfloat16 or float16, got 'int8'"),
    (["prompt=x", f"output={F}/dir.png"], 2, f"output {F}/dir.png is a folder"),
    (["prompt=x", f"output={F}/folder"], 2, f"output {F}/folder: unknown image extension '' (use .png, .jpg, .webp, ...)"),
    (["prompt=x", f"output={F}/a_file/out.png"], 2, f"output {F}/a_file/out.png: {F}/a_file is a file, not a folder"),
    (["turns=[a,b]", f"output={F}/x.png"], 2, f"output {F}/x_turn2.png is a folder"),
    ([f"batch={F}/latin1.jsonl"], 2, f"batch file {F}/latin1.jsonl is not utf-8 text (line 1: byte 0xe4); "
                                     "convert it or give batch_encoding=latin-1 (or its encoding)"),
    ([f"batch={F}/latin1.jsonl", "batch_encoding=nope"], 2, "batch_encoding=nope: unknown text encoding"),
    ([f"batch={F}/folder"], 2, f"batch file {F}/folder is a folder"),
    (["prompt=42"], 2, "model source not found: /nonexistent/model (give a run directory, a .ckpt file or an "
                       "export folder)"),  # the prompt is text; nothing else is wrong
]
if not torch.cuda.is_available():
    SAMPLE_CASES.append((["prompt=x", "device=cuda"], 2,
                         "device=cuda, but torch finds no CUDA GPU here; use device=cpu or device=auto"))


@pytest.mark.parametrize(("overrides", "status", "line"), SAMPLE_CASES, ids=[" ".join(c[0]) for c in SAMPLE_CASES])
def test_sample_input_errors_are_one_line_before_the_model_loads(files, capsys, overrides, status, line):
    assert sample(*[o.replace(F, str(files)) for o in overrides]) == status
    assert capsys.readouterr().err.splitlines() == [f"error: {line.replace(F, str(files))}"]


def test_a_batch_of_bad_cases_reports_each_without_loading_the_model(files, capsys):
    assert sample(f"batch={files}/all_bad.jsonl") == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == ["wrote 0 of 6 cases; 6 failed:"]
    assert err.replace(str(files), F).splitlines() == [
        f"  line 1: image not found: {F}/missing.png",
        f"  line 2: output {F}/a_file/o2.png: {F}/a_file is a file, not a folder",
        f"  line 3: seed must be a whole number from -2**63 to 2**64-1, got {2**64}",
        f"  line 4: image too large: {F}/big.png is 10000x10000 pixels (100.0 MP), over the limit of 64.0 MP "
        "(max_pixels=64000000)",
        "  line 5: prompt must be a string",
        f"  line 6: output {F}/dir.png is a folder",
    ]


@pytest.mark.parametrize("text", TEXTS)
def test_any_prompt_is_text_without_hydra_quoting(text):
    args = text_overrides([f"prompt={text}", f"negative_prompt={text}", f"turns=[{text.replace(',', '')},b]"],
                          ["prompt", "negative_prompt"], ["turns"])
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("sample", overrides=args)
    assert cfg.prompt == text and cfg.negative_prompt == text and list(cfg.turns) == [text.replace(",", ""), "b"]


def test_quoted_and_listed_forms_keep_working():
    args = text_overrides(["prompt='make the blue square red'", "checkpoint='a=b,c'",
                           "turns=['make it red, then blue', remove the couple's shadow]"], ["prompt"], ["turns"])
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("sample", overrides=args)
    assert cfg.prompt == "make the blue square red" and cfg.checkpoint == "a=b,c"
    assert list(cfg.turns) == ["make it red, then blue", "remove the couple's shadow"]


def test_entry_point_takes_a_prompt_with_comma_apostrophe_and_umlaut(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "prompt=entferne den Schatten, des Paares' Schatten",
                           f"checkpoint={tmp_path / 'none'}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2  # past the prompt, stopped at the missing model
    assert proc.stderr.splitlines() == [f"error: model source not found: {tmp_path / 'none'} (give a run directory, "
                                        "a .ckpt file or an export folder)"]


# ---------------------------------------------------------------------------------------- images
def test_a_decompression_bomb_is_refused_from_its_header():
    data = bomb_png()
    t0 = time.perf_counter()
    for read in (decode_image, image_size):
        with pytest.raises(ImageTooLarge, match=r"^image too large: 10000x10000 pixels \(100.0 MP\), over the limit "
                                                r"of 64.0 MP \(max_pixels=64000000\)$"):
            read(data)
    assert time.perf_counter() - t0 < 5  # whole, it is 100 MP of pixels to decode
    assert decode_image(bomb_png(64, 64), max_pixels=64 * 64).size == (64, 64)
    with pytest.raises(ImageTooLarge, match="over the limit"):
        decode_image(bomb_png(64, 64), max_pixels=64 * 64 - 1)
    with pytest.raises(ImageTooLarge, match=r"image too large: .*exceeds limit"):  # past Pillow's own guard
        image_size(bomb_png(20_000, 20_000), max_pixels=None)


def test_the_loader_skips_a_bomb_with_its_reason(tmp_path):
    from kontext.data.format import encode_image
    from kontext.data.loader import KontextLoader
    from kontext.data.stream import StreamConfig

    good = encode_image(Image.new("RGB", (32, 32), (10, 200, 30)))
    records = [{"__key__": f"k{i}", "target.png": bomb_png() if i in (1, 3) else good, "ref0.png": good,
                "instruction.txt": b"x", "meta.json": b'{"task": "edit"}'} for i in range(5)]
    with wds.TarWriter(str(tmp_path / "a.tar")) as tar:
        for r in records:
            tar.write(r)
    loader = KontextLoader(str(tmp_path), StreamConfig(batch_size=1, mode="exact", max_area=32 * 32, shuffle_buffer=0))
    keys = [k for batch in loader for k in batch["key"]]
    assert keys == ["k0", "k2", "k4"]
    assert loader.stats["corrupt"] == 2 and loader.stats["reasons"] == {"image too large": 2}


def test_data_max_pixels_sets_the_loaders_limit(tmp_path):
    from kontext.data.format import encode_image
    from kontext.data.loader import KontextDataModule, KontextLoader
    from kontext.data.stream import StreamConfig

    small, large = (encode_image(Image.new("RGB", (n, n), (10, 200, 30))) for n in (16, 32))
    with wds.TarWriter(str(tmp_path / "a.tar")) as tar:
        for i in range(4):
            target = large if i % 2 else small
            tar.write({"__key__": f"k{i}", "target.png": target, "ref0.png": target, "instruction.txt": b"x",
                       "meta.json": b'{"task": "edit"}'})
    loader = KontextLoader(str(tmp_path), StreamConfig(batch_size=1, mode="exact", max_area=32 * 32,
                                                      shuffle_buffer=0, max_pixels=1000))
    assert [k for batch in loader for k in batch["key"]] == ["k0", "k2"]  # 32 x 32 = 1,024 pixels > 1,000
    assert loader.stats["reasons"] == {"image too large": 2}
    module = KontextDataModule(str(tmp_path), max_pixels=1000)
    assert module.train_cfg.max_pixels == module.val_cfg.max_pixels == 1000


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
    expected = [(f"{tmp_path}/m.jsonl:{i}", why.replace("{d}", str(tmp_path))) for i, (_, why) in
                enumerate(RECORD_CASES, start=2)]
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
    assert report.written == 1 and [r.split(":")[0] for _, r in report.skipped] == ["unreadable instruction"]


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


def test_bomb_png_is_an_image():
    with Image.open(io.BytesIO(bomb_png(16, 8))) as img:
        img.load()
        assert img.size == (16, 8) and img.mode == "1"
