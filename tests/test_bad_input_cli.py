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
from kontext.data.format import ImageTooLarge, decode_image, image_size
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
    from safetensors.torch import save_file

    save_file({"w": torch.zeros(2)}, str(d / "not_lora.safetensors"))
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
    (["prompt=x", f"lora={F}/missing.safetensors"], 2, f"LoRA file not found: {F}/missing.safetensors"),
    (["prompt=x", f"lora=[{F}/not_lora.safetensors]"], 2,
     f"{F}/not_lora.safetensors: 'w' is not a LoRA weight (expected <layer>.lora_A.weight, .lora_B.weight, .alpha)"),
    (["prompt=x", f"lora={F}/a_file"], 2, f"cannot read {F}/a_file as safetensors: Error while deserializing header: "
                                          "header too small"),
    (["prompt=x", f"lora={F}/missing.safetensors", "lora_scale=[1,2]"], 2, "lora_scale has 2 values for 1 LoRA file(s)"),
    (["prompt=x", f"lora={F}/missing.safetensors", "lora_scale=abc"], 2,
     "lora_scale must be a number or a list of numbers, got 'abc'"),
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


def test_bomb_png_is_an_image():
    with Image.open(io.BytesIO(bomb_png(16, 8))) as img:
        img.load()
        assert img.size == (16, 8) and img.mode == "1"
