"""The real-photo example (kontext/data/photo_edits.py): every edit against an independent
computation; the set written from scikit-image's photographs, imported from its metadata.csv
with nothing skipped and every shard pair exact; and (slow) the whole example, generate ->
import -> `experiment=photo_lora`, through the real composition."""

from __future__ import annotations

import importlib.util
import io
import json
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from kontext.data import photo_edits as pe
from kontext.errors import KontextError
from kontext.run import CONFIG_DIR

ROOT = CONFIG_DIR.parent
needs_skimage = pytest.mark.skipif(importlib.util.find_spec("skimage") is None, reason="needs scikit-image")


def photo(h: int = 48, w: int = 64, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_each_edit_is_its_independent_computation():
    a = photo()
    img = Image.fromarray(a)
    assert np.array_equal(pe.mirror(a), np.asarray(ImageOps.mirror(img)))
    assert np.array_equal(pe.upside_down(a), np.asarray(ImageOps.flip(img)))
    gray = pe.black_and_white(a).astype(float)
    assert (gray == gray[..., :1]).all()
    assert np.abs(gray[..., 0] - a.astype(float) @ [0.299, 0.587, 0.114]).max() <= 0.5 + 1e-9
    assert np.array_equal(pe.brighter(a), np.minimum(np.floor(a * 1.5), 255))
    assert (pe.brighter(a) == 255).any() and (pe.brighter(a) < 255).any()
    b, bw = pe.red_border(a), 3  # 48 // 16
    assert pe.border_width(np.zeros((384, 512, 3))) == 24 and pe.border_width(np.zeros((192, 256, 3))) == 12
    assert np.array_equal(b[bw:-bw, bw:-bw], a[bw:-bw, bw:-bw])
    ring = np.ones(a.shape[:2], bool)
    ring[bw:-bw, bw:-bw] = False
    assert (b[ring] == pe.RED).all() and ring.sum() == 48 * 64 - (48 - 2 * bw) * (64 - 2 * bw)
    centre = img.crop((16, 12, 48, 36)).resize((64, 48), Image.Resampling.NEAREST)
    assert np.array_equal(pe.zoom_centre(a), np.asarray(centre))
    assert all(edit(a).shape == a.shape and edit(a).dtype == np.uint8 for _, edit in pe.EDITS.values())


def test_without_scikit_image_one_line_names_the_install(monkeypatch, capsys):
    from kontext.cli import run_main
    from kontext.data.commands import photo_edits_main

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "skimage" else real(name, *a))
    with pytest.raises(KontextError, match=r"pip install scikit-image$"):
        pe.photo_dir()
    with pytest.raises(SystemExit) as exit_:
        run_main(photo_edits_main, ["out=/tmp/never-written-photo-edits"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.strip().endswith("pip install scikit-image")
    assert not Path("/tmp/never-written-photo-edits").exists()


def decode(data: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def shard_pairs(shard_dir: Path) -> list[tuple[np.ndarray, str, np.ndarray, str]]:
    """(reference, instruction, target, task) of every sample in the shards, decoded."""
    out = []
    for shard in sorted(shard_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            files = {m.name: tar.extractfile(m).read() for m in tar.getmembers()}
        for name in sorted(n for n in files if n.endswith(".meta.json")):
            key = name.removesuffix(".meta.json")
            out.append((decode(files[f"{key}.ref0.png"]), files[f"{key}.instruction.txt"].decode(),
                        decode(files[f"{key}.target.png"]), json.loads(files[name])["task"]))
    return out


def write_and_import(root: Path, n: int):
    from kontext.data.commands import import_main, photo_edits_main

    csv = photo_edits_main([f"out={root}/data/photo_edits", f"n={n}", f"base={root}/data/photo_base.safetensors"])
    report = import_main([f"out={root}/data/shards/photo_edits", f"csv={csv}"])
    return csv, report


def check_pairs(root: Path, n: int):
    pairs = shard_pairs(root / "data" / "shards" / "photo_edits")
    assert len(pairs) == n
    for ref, instruction, target, task in pairs:  # the shards hold the exact answer of each pair
        assert (ref.shape[1], ref.shape[0]) in pe.SIZES
        assert instruction == pe.EDITS[task][0]
        assert np.array_equal(target, pe.EDITS[task][1](ref)), task
    assert sorted({task for *_, task in pairs}) == sorted(pe.EDITS)


@needs_skimage
def test_the_set_imports_whole_and_every_pair_is_exact(tmp_path):
    csv, report = write_and_import(tmp_path, 6)
    assert report.written == 6 and report.skipped == []
    check_pairs(tmp_path, 6)
    again = pe.write_photo_edits(tmp_path / "again", 6)  # the same seed: the same files
    for row, other in zip(csv.read_text().splitlines(), again.read_text().splitlines(), strict=True):
        assert row == other
    for png in (tmp_path / "data" / "photo_edits" / "images").glob("*.png"):
        assert png.read_bytes() == (tmp_path / "again" / "images" / png.name).read_bytes()
    held = sorted(p for p in (tmp_path / "data" / "photo_edits" / "heldout").glob("*.png") if "_" not in p.stem)
    assert [p.stem for p in held] == sorted(Path(h).stem for h in pe.HELDOUT)
    for path in held:  # every edit's exact answer beside each held-out photo
        for task, (_, edit) in pe.EDITS.items():
            answer = np.asarray(Image.open(path.with_name(f"{path.stem}_{task}.png")))
            assert np.array_equal(answer, edit(np.asarray(Image.open(path)))), (path, task)
    assert not any(Path(h).stem in row for row in csv.read_text().splitlines() for h in pe.HELDOUT)


README_COMMANDS = [  # the README's "The same steps on this machine", verbatim
    "python data/photo_edits.py out=data/photo_edits base=data/photo_base.safetensors",
    "python data/import_pairs.py out=data/shards/photo_edits csv=data/photo_edits/metadata.csv",
    "python train.py experiment=photo_lora",
    "python data/inspect_shards.py shards=data/shards/photo_edits grid=pairs.png",
    "python sample.py \"checkpoint='outputs/photo_lora/experiment=photo_lora'\" "
    "image=data/photo_edits/heldout/chelsea.png \"prompt=mirror the image left to right\" output=edited.png",
]


@needs_skimage
@pytest.mark.slow
def test_the_photo_example_end_to_end(tmp_path):
    """The README's commands as a user types them, from a fresh folder: 60 pairs written and
    imported, 30 LoRA steps, the validation edits scored against their exact answers, the pairs'
    grid and an edit with the trained adapters."""
    import os
    import shlex
    import subprocess
    import sys
    import time

    readme = (ROOT / "README.md").read_text()
    assert all(line in readme.replace("\\\n    ", "") for line in README_COMMANDS), "the README's commands changed"
    env = {k: v for k, v in os.environ.items() if k != "KONTEXT_ROOT"} | {"PYTHONPATH": str(ROOT)}
    seconds = []
    for line in README_COMMANDS:
        argv = shlex.split(line)
        start = time.perf_counter()
        out = subprocess.run([sys.executable, str(ROOT / argv[1]), *argv[2:]], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=900)
        seconds.append(time.perf_counter() - start)
        assert out.returncode == 0, (line, out.stderr[-3000:])
    print("photo example, seconds per command:", [round(x, 1) for x in seconds])
    check_pairs(tmp_path, 60)
    run_dir = tmp_path / "outputs" / "photo_lora" / "experiment=photo_lora"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["steps"] == 30 and metrics["benchmark"] is None and metrics["data"]["corrupt"] == 0
    losses = [float(line.split(",")[1]) for line in (run_dir / "loss_curve.csv").read_text().splitlines()[1:]]
    assert len(losses) == 4 and all(np.isfinite(losses))  # steps 0, 10, 15, 25 (log_every_n_steps=5)
    weights = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(".lora_" in k for k in weights if k != "ema.num_updates")  # adapters only, no base
    from kontext.formats.lora_files import read_adapter

    adapter = read_adapter(run_dir / "lora" / "adapter.safetensors")
    assert adapter.rank == 16 and max(w.up.abs().max() for w in adapter.layers.values()) > 0
    # validation at steps 15 and 30: outputs at the photos' sizes, scored against the exact answers
    held = tmp_path / "data" / "photo_edits" / "heldout"
    for step in (15, 30):
        folder = run_dir / "validation" / f"step{step:07d}"
        outputs = [Image.open(folder / f"{i}.png") for i in range(2)]
        refs = [Image.open(held / f"{Path(h).stem}.png") for h in pe.HELDOUT]
        assert [o.size for o in outputs] == [r.size for r in refs]
        errors = json.loads((folder / "errors.json").read_text())
        for i, task in enumerate(("mirror", "border")):
            answer = np.asarray(Image.open(held / f"{Path(pe.HELDOUT[i]).stem}_{task}.png"), int)
            assert errors[str(i)]["error"] == pytest.approx(np.abs(np.asarray(outputs[i], int) - answer).mean())
            print(f"step {step}, {task}: error {errors[str(i)]['error']:.1f} levels "
                  f"(the unedited photo: {errors[str(i)]['reference_error']:.1f})")
    logged = [line.split(",") for line in (run_dir / "csv" / "version_0" / "metrics.csv").read_text().splitlines()]
    column = logged[0].index("validation/error")
    assert [float(row[column]) for row in logged[1:] if row[column]] == pytest.approx(
        [np.mean([e["error"] for e in json.loads((run_dir / "validation" / f"step{s:07d}" / "errors.json")
                                                 .read_text()).values()]) for s in (15, 30)])
    grid = Image.open(run_dir / "validation" / "step0000030.png")
    assert grid.height == 2 * (192 + 4)  # one row per held-out photo: photo | output | answer | instruction
    assert Image.open(tmp_path / "edited.png").size == refs[0].size
    assert Image.open(tmp_path / "pairs.png").width > 0
