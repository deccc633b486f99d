"""Validation edits while training (kontext/stages/validation.py) through the real composition: the
user's cases are edited at exactly the asked steps with the EMA weights (the outputs equal
an independent pipeline over the run's EMA checkpoint), and a bad case is one line before
training starts."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image
from test_train import compose_train, random_ae, tiny_overrides  # noqa: F401  (random_ae is a fixture)

from kontext.data.shapes_edit import make_case
from kontext.errors import KontextError
from kontext.formats.weights import load_into, read_safetensors
from kontext.latent.autoencoder import AE_PRESETS, AutoEncoder
from kontext.run import run
from kontext.stages.validation import ValidationEdits, edit_grid, read_cases


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("photos")
    make_case("recolor", split="bench", index=0).reference.save(folder / "a.png")
    make_case("add", split="bench", index=1).reference.resize((96, 64)).save(folder / "wide.png")
    return folder


def test_validation_edits_are_the_ema_models_edits_at_the_asked_steps(tmp_path, random_ae, photos):  # noqa: F811
    from kontext.pipeline import KontextPipeline

    cases = [{"image": str(photos / "a.png"), "prompt": "make the blue square red", "expected": str(photos / "wide.png")},
             {"image": [str(photos / "wide.png"), str(photos / "a.png")], "prompt": "put them together"},
             {"image": None, "prompt": "a red circle in the center on a white background"}]
    cfg = compose_train([*tiny_overrides(tmp_path, random_ae), "trainer.max_steps=4", "stage.ema_decay=0.5",
                         "stage.optimizer.warmup_steps=1",
                         "callbacks.validation.every_n_steps=2", "callbacks.validation.steps=2",
                         "callbacks.validation.seed=3", "stage.finish.benchmark.n_per_op=0", "stage.finish.export=false",
                         "logger=wandb"])  # offline: the grids land in the run's wandb folder
    OmegaConf.update(cfg, "callbacks.validation.cases", cases, force_add=True)
    run(cfg)
    folder = tmp_path / "run" / "validation"
    assert sorted(p.name for p in folder.iterdir()) == ["step0000002", "step0000002.png", "step0000004", "step0000004.png"]
    outputs = [Image.open(folder / "step0000004" / f"{i}.png") for i in range(3)]
    assert [img.size for img in outputs] == [(64, 64), (96, 64), (64, 64)]  # the first reference's size, or t2i
    pipe = KontextPipeline.from_run_dir(tmp_path / "run")  # the EMA weights of the last checkpoint, step 4
    trained_with = AutoEncoder(AE_PRESETS["embedded"])  # the run's own autoencoder, not the shipped one
    load_into(trained_with, read_safetensors(random_ae))
    assert all(torch.equal(v, trained_with.state_dict()[k]) for k, v in pipe.autoencoder.state_dict().items())
    want = pipe.edit([[photos / "a.png"], [photos / "wide.png", photos / "a.png"], None], [c["prompt"] for c in cases],
                     3, steps=2)
    # The same computation; a reloaded model's weights sit elsewhere in memory, which can move the
    # last float bits of a matmul and so one 8-bit level in a rare pixel.
    assert all(np.abs(np.asarray(a).astype(int) - np.asarray(b)).max() <= 1 for a, b in zip(outputs, want, strict=True))
    earlier = [np.asarray(Image.open(folder / "step0000002" / f"{i}.png")) for i in range(3)]
    assert max(np.abs(a.astype(int) - np.asarray(b)).max() for a, b in zip(earlier, want, strict=True)) > 8  # it moved
    grid = Image.open(folder / "step0000004.png")
    assert grid.height == 3 * (192 + 4)
    # The error from the expected answer (case 0 only), its answer resized to the output's size by PIL
    answer = np.asarray(Image.open(photos / "wide.png").convert("RGB").resize((64, 64), Image.Resampling.LANCZOS), int)
    errors = json.loads((folder / "step0000004" / "errors.json").read_text())
    assert list(errors) == ["0"] and errors["0"]["error"] == pytest.approx(np.abs(np.asarray(outputs[0], int) - answer).mean())
    reference = np.asarray(Image.open(photos / "a.png").convert("RGB"), int)
    assert errors["0"]["reference_error"] == pytest.approx(np.abs(reference - answer).mean())
    # the widest row, case 1's (wide 288 px, square 192 px, output 288 px); case 0's has its expected answer
    assert grid.width == (288 + 4) + (192 + 4) + (288 + 4) + 2 * 192
    assert np.asarray(grid)[96, 192 + 4 + 192 + 4 + 100].tolist() != [255, 255, 255]
    logged = sorted((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/images/validation/edits_*.png"))
    assert len(logged) == 2 and [np.asarray(Image.open(p)).shape for p in logged] == [np.asarray(grid).shape] * 2
    assert np.array_equal(np.asarray(Image.open(logged[-1]).convert("RGB")), np.asarray(grid.convert("RGB")))


def test_a_bad_case_is_one_line_before_training(tmp_path, random_ae, photos, capsys):  # noqa: F811
    cfg = compose_train([*tiny_overrides(tmp_path, random_ae), "trainer.max_steps=2"])
    OmegaConf.update(cfg, "callbacks.validation.cases", [{"image": str(photos / "missing.png"), "prompt": "x"}],
                     force_add=True)
    with pytest.raises(SystemExit) as exit_:
        run(cfg)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines() == [f"error: image not found: {photos / 'missing.png'}"]
    assert not (tmp_path / "run" / "checkpoints").exists()
    for bad, message in (([{"prompt": 3}], "validation case 0 must be {image: path"),
                         ([{"image": 3, "prompt": "x"}], "validation case 0: image must be a path"),
                         ([{"image": None, "prompt": "x", "seed": 1}], "validation case 0 must be {image: path"),
                         ([{"image": None, "prompt": "x", "expected": 1}], "validation case 0: expected must be"),
                         ([{"image": None, "prompt": "x", "expected": str(photos / "gone.png")}],
                          f"^validation case 0: its expected answer: image not found: {photos / 'gone.png'}$")):
        with pytest.raises(KontextError, match=message):
            read_cases(bad)


def test_no_cases_edit_nothing_and_the_grid_has_a_row_per_case(photos):
    assert ValidationEdits().cases == [] and ValidationEdits(cases=None, every_n_steps=1).cases == []
    cases = read_cases([{"image": [str(photos / "wide.png"), str(photos / "a.png")], "prompt": "p"},
                        {"image": None, "prompt": ""}])
    grid = edit_grid(cases, [Image.new("RGB", (64, 64)), Image.new("RGB", (32, 64))], height=32)
    # the widest row: 48 + 32 + 32 px of images with 4 px gaps, then 64 px of text
    assert grid.size == (48 + 4 + 32 + 4 + 32 + 4 + 64, 2 * (32 + 4))
