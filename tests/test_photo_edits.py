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
    b, bw = pe.red_border(a), pe.BORDER
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
    held = sorted((tmp_path / "data" / "photo_edits" / "heldout").glob("*.png"))
    assert [p.stem for p in held] == sorted(Path(h).stem for h in pe.HELDOUT)
    assert not any(Path(h).stem in row for row in csv.read_text().splitlines() for h in pe.HELDOUT)


@needs_skimage
@pytest.mark.slow
@pytest.mark.usefixtures("one_thread")
def test_the_photo_example_end_to_end(tmp_path):
    """What the README's three commands do, with a short run: 12 pairs, 4 steps."""
    from test_train import compose_train

    from kontext.run import run

    _, report = write_and_import(tmp_path, 12)
    assert report.written == 12 and report.skipped == []
    check_pairs(tmp_path, 12)
    run_dir = tmp_path / "run"
    metrics = run(compose_train(["experiment=photo_lora", f"paths.root_dir={tmp_path}", f"paths.output_dir={run_dir}",
                                 "trainer.max_steps=4", "callbacks.validation.every_n_steps=4",
                                 "callbacks.validation.steps=2", "data.epoch_samples=12"]))
    assert metrics["steps"] == 4 and metrics["benchmark"] is None
    assert metrics["data"]["corrupt"] == 0 and metrics["data"]["seen"] >= 16
    losses = [float(line.split(",")[1]) for line in (run_dir / "loss_curve.csv").read_text().splitlines()[1:]]
    assert losses and all(np.isfinite(losses))
    weights = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)["state_dict"]
    assert all(".lora_" in k for k in weights if k != "ema.num_updates")  # adapters only, no base
    from kontext.lora_files import read_adapter

    adapter = read_adapter(run_dir / "lora" / "adapter.safetensors")  # the averaged adapters left B = 0
    assert adapter.rank == 16 and max(w.up.abs().max() for w in adapter.layers.values()) > 0
    grid = Image.open(run_dir / "validation" / "step0000004.png")
    assert grid.height == 2 * (192 + 4)  # one row per held-out photo
    outputs = [Image.open(run_dir / "validation" / "step0000004" / f"{i}.png") for i in range(2)]
    refs = [Image.open(tmp_path / "data" / "photo_edits" / "heldout" / f"{Path(h).stem}.png") for h in pe.HELDOUT]
    assert [o.size for o in outputs] == [r.size for r in refs]  # the edit keeps the photo's size
