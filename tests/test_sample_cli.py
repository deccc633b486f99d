"""`sample.py`: the real config composed with Hydra, every mode run on a tiny exported model."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image
from tiny_kontext import tiny_pipeline

from kontext.cli import text_overrides
from kontext.data.shapes_edit import make_case
from kontext.export import export
from kontext.pipeline import KontextPipeline
from kontext.sample import run_sample

ROOT = Path(__file__).resolve().parent.parent


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return export(tiny_pipeline(seed=2), tmp_path_factory.mktemp("model") / "export")


@pytest.fixture(scope="module")
def pipe(model_dir):
    return KontextPipeline.from_export(model_dir)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    a, b = make_case("recolor", split="bench", index=0), make_case("add", split="bench", index=1)
    a.reference.save(folder / "a.png")
    b.reference.resize((48, 32)).save(folder / "b.png")
    return folder


def sample(model_dir, *overrides) -> int:
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("sample", overrides=[f"checkpoint={model_dir}", "progress=false", *overrides])
    return run_sample(cfg)


def same(path, img) -> bool:
    return np.array_equal(np.asarray(Image.open(path).convert("RGB")), np.asarray(img))


def test_single_edit_is_deterministic(model_dir, pipe, images, tmp_path):
    out = tmp_path / "out.png"
    assert sample(model_dir, f"image={images / 'a.png'}", "prompt='make the blue square red'", f"output={out}",
                  "seed=4") == 0
    assert same(out, pipe(images / "a.png", "make the blue square red", seed=4))
    first = out.read_bytes()
    assert sample(model_dir, f"image={images / 'a.png'}", "prompt='make the blue square red'", f"output={out}",
                  "seed=4") == 0
    assert out.read_bytes() == first


def test_several_references_and_text_to_image(model_dir, pipe, images, tmp_path):
    both = [images / "a.png", images / "b.png"]
    assert sample(model_dir, f"image=[{both[0]},{both[1]}]", "prompt=combine", f"output={tmp_path / 'two.png'}") == 0
    assert same(tmp_path / "two.png", pipe(both, "combine", seed=0))
    assert sample(model_dir, "prompt='a red circle in the center on a white background'",
                  f"output={tmp_path / 't2i.jpg'}", "width=32", "height=48", "steps=3") == 0
    assert Image.open(tmp_path / "t2i.jpg").size == (32, 48)


def test_turns_chain_and_save_every_turn(model_dir, pipe, images, tmp_path):
    out = tmp_path / "chain.png"
    assert sample(model_dir, f"image={images / 'a.png'}", "turns=[remove the blue square,make it black]",
                  f"output={out}", "seed=1") == 0
    turn1, turn2 = tmp_path / "chain_turn1.png", tmp_path / "chain_turn2.png"
    assert not out.exists() and turn1.exists() and turn2.exists()
    first = pipe(images / "a.png", "remove the blue square", seed=1)
    assert same(turn1, first)
    assert same(turn2, pipe(first, "make it black", seed=1))  # each turn edits the previous output


def test_batch_keeps_going_past_bad_lines(model_dir, pipe, images, tmp_path, capsys):
    lines = [
        {"image": str(images / "a.png"), "prompt": "remove the square", "output": str(tmp_path / "o1.png"), "seed": 3},
        {"image": None, "prompt": "a blue circle", "output": str(tmp_path / "o2.png")},
        "{not json",
        {"image": str(images / "missing.png"), "prompt": "x", "output": str(tmp_path / "o4.png")},
        {"image": None, "promt": "typo", "output": str(tmp_path / "o5.png")},
        {"image": [str(images / "a.png"), str(images / "b.png")], "prompt": "mix", "output": str(tmp_path / "o6.png")},
        {"image": None, "prompt": "x", "output": str(tmp_path / "o7.txt")},
    ]
    batch = tmp_path / "cases.jsonl"
    batch.write_text("\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines) + "\n\n")
    assert sample(model_dir, f"batch={batch}", "seed=9") == 1
    captured = capsys.readouterr()
    assert "wrote 3 of 7 cases; 4 failed" in captured.out
    for number, text in ((3, "line 3:"), (4, "image not found"), (5, "missing keys ['prompt']"), (7, "extension")):
        assert any(f"line {number}:" in row and text in row for row in captured.err.splitlines())
    assert same(tmp_path / "o1.png", pipe(images / "a.png", "remove the square", seed=3))
    assert same(tmp_path / "o2.png", pipe(None, "a blue circle", seed=9))  # the command's seed by default
    assert same(tmp_path / "o6.png", pipe([images / "a.png", images / "b.png"], "mix", seed=9))
    assert not (tmp_path / "o4.png").exists() and not (tmp_path / "o7.txt").exists()


def test_batch_writes_every_valid_case_around_bad_ones(model_dir, pipe, images, tmp_path, capsys):
    (tmp_path / "a_file").write_text("x")
    lines = [
        {"image": None, "prompt": "a blue circle", "output": str(tmp_path / "o1.png")},
        {"image": None, "prompt": "x", "output": str(tmp_path / "a_file" / "o2.png")},  # parent is a file
        {"image": None, "prompt": "x", "output": str(tmp_path / "o3.png"), "seed": 2**64},  # over 64 bits
        {"image": str(images / "a.png"), "prompt": "x", "output": str(tmp_path / "o1.png")},  # o1.png again
        {"image": str(images / "a.png"), "prompt": "färbe den Kreis rot, then remove the couple's shadow",
         "output": str(tmp_path / "o5.png"), "seed": 2**64 - 1},
    ]
    batch = tmp_path / "cases.jsonl"
    batch.write_bytes("\n".join(json.dumps(line, ensure_ascii=False) for line in lines).encode("latin-1"))
    assert sample(model_dir, f"batch={batch}", "batch_encoding=latin-1") == 1
    out, err = capsys.readouterr()
    assert out.splitlines() == ["wrote 2 of 5 cases; 3 failed:"]
    assert err.splitlines() == [f"  line 2: output {tmp_path}/a_file/o2.png: {tmp_path}/a_file is a file, not a folder",
                                f"  line 3: seed must be a whole number from -2**63 to 2**64-1, got {2**64}",
                                f"  line 4: output {tmp_path}/o1.png is also the output of line 1"]
    assert same(tmp_path / "o1.png", pipe(None, "a blue circle", seed=0))
    assert same(tmp_path / "o5.png", pipe(images / "a.png", lines[4]["prompt"], seed=2**64 - 1))
    assert not (tmp_path / "o3.png").exists()


def test_a_prompt_is_text_as_typed(model_dir, pipe, images, tmp_path):
    text = "remove the couple's shadow, then make it \"red\""
    out = tmp_path / "out.png"
    args = text_overrides([f"prompt={text}"], ["prompt"], ["turns"])  # what sample.py does with its argv
    assert sample(model_dir, f"image={images / 'a.png'}", *args, f"output={out}") == 0
    assert same(out, pipe(images / "a.png", text, seed=0))
    assert sample(model_dir, "prompt=42", "width=32", "height=32", f"output={out}") == 0
    assert same(out, pipe(None, "42", seed=0, width=32, height=32))


def test_bad_invocations_are_one_line_errors(model_dir, tmp_path, capsys):
    assert sample(model_dir, f"image={tmp_path / 'nope.png'}", "prompt=x", f"output={tmp_path / 'o.png'}") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: image not found") and "\n" not in err
    assert not (tmp_path / "o.png").exists()
    assert sample(model_dir, "image=null") == 2
    assert "give prompt=" in capsys.readouterr().err
    assert sample(tmp_path / "no_model", "prompt=x", f"output={tmp_path / 'o.png'}") == 2
    assert "model source not found" in capsys.readouterr().err
    assert sample("", "prompt=x", "official.transformer=flux.safetensors", "official.t5=t5") == 2
    assert "need official.ae=..., official.clip=..." in capsys.readouterr().err


def test_entry_point_rejects_an_empty_batch_file(tmp_path):
    (tmp_path / "empty.jsonl").write_text("\n  \n")
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), f"batch={tmp_path / 'empty.jsonl'}",
                           f"checkpoint={tmp_path}"], capture_output=True, text=True, cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [f"error: batch file {tmp_path / 'empty.jsonl'} has no cases "
                                                "(one JSON object per line)"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["empty.jsonl"]  # no Hydra run folder either


def test_entry_point_rejects_an_unknown_option(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), "promt=x"], capture_output=True, text=True,
                          cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert proc.stderr.startswith("error: ") and "promt" in proc.stderr


def test_the_run_summary_command_runs_as_printed(model_dir, images, tmp_path):
    # A run directory named after its overrides holds `=` and `,`, which Hydra would parse.
    import shlex
    import shutil

    from kontext.stages.flow_finish import summary_text

    run_dir = tmp_path / "train" / "trainer.max_steps=3024,trainer.max_time=null"
    export_dir = Path(shutil.copytree(model_dir, run_dir / "export"))
    metrics = {"benchmark": None, "timings_s": {}, "training": None,
               "machine": {"cpu": "cpu", "cpu_capability": "AVX2", "threads": 1, "fp32_matmul_gflops": 101.4}}
    text = summary_text(run_dir, {"export": export_dir}, metrics)
    assert "  machine: cpu (AVX2, 1 threads, fp32 matmul peak 101 GFLOP/s)\n" in text
    [command] = [line.strip() for line in text.splitlines() if line.strip().startswith("python sample.py")]
    words = shlex.split(command.replace("path/to/image.png", str(images / "a.png")))
    proc = subprocess.run([sys.executable, str(ROOT / "sample.py"), *words[2:], "steps=2", "progress=false"],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert Image.open(tmp_path / "edited.png").size == Image.open(images / "a.png").size
