"""Export: reference-layout files that reload to the identical model, a diffusers folder that
diffusers loads and that computes the same function, and an all-or-nothing write."""

import json
from dataclasses import replace

import numpy as np
import pytest
import torch
from tiny_kontext import random_autoencoder, random_flux, text_encoder, tiny_pipeline, write_run_dir

from kontext.data.shapes_edit import make_case
from kontext.errors import KontextError
from kontext.export import export, main
from kontext.formats.weights import read_safetensors
from kontext.network import packing
from kontext.network.model import load_flux
from kontext.pipeline import KontextPipeline

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def pipe():
    return tiny_pipeline(seed=1, timesteps=[1.0, 0.7, 0.0], negative_prompt="blurry")


def test_export_round_trip_gives_the_identical_model(tmp_path, pipe):
    out = export(pipe, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["ae.safetensors", "config.json", "transformer.safetensors"]
    # Reference key names, identical tensors, params recorded in the file.
    sd = read_safetensors(out / "transformer.safetensors")
    ref = pipe.model.state_dict()
    assert sorted(sd) == sorted(ref) and "double_blocks.0.img_attn.qkv.weight" in sd
    assert all(torch.equal(sd[k], ref[k]) for k in ref)
    assert load_flux(out / "transformer.safetensors").params == pipe.model.params

    config = json.loads((out / "config.json").read_text())
    assert config["model"]["hidden_size"] == pipe.model.params.hidden_size
    assert config["autoencoder"]["ch_mult"] == [1, 1, 1, 1]
    assert config["text"]["identity"] == text_encoder().identity and config["text"]["config"]["kind"] == "embedded"
    assert config["sampler"]["timesteps"] == [1.0, 0.7, 0.0]  # the student's explicit list

    loaded = KontextPipeline.from_export(out)
    assert loaded.sampler == pipe.sampler
    case = make_case("move", split="bench", seed=0, index=3)
    for ref_img in (case.reference, None):
        a = pipe(ref_img, case.instruction, seed=7, cfg=2.0)
        b = loaded(ref_img, case.instruction, seed=7, cfg=2.0)
        assert np.array_equal(np.asarray(a), np.asarray(b))


def test_export_from_a_run_directory_takes_the_ema_weights(tmp_path, pipe):
    run = write_run_dir(tmp_path / "run", pipe)
    main([f"source={run}", f"out={tmp_path / 'export'}"])
    sd = read_safetensors(tmp_path / "export" / "transformer.safetensors")
    assert all(torch.equal(sd[k], v) for k, v in pipe.model.state_dict().items())
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["sampler"]["steps"] == 2 and config["sampler"]["guidance"] == 1.0
    assert config["text"]["config"]["max_length"] == 32


def test_export_is_all_or_nothing(tmp_path, pipe):
    out = tmp_path / "export"
    export(pipe, out)
    before = (out / "transformer.safetensors").read_bytes()
    with pytest.raises(KontextError, match="already exists"):
        export(pipe, out)
    # A model diffusers cannot represent fails half-way: the old export stays, nothing else appears.
    odd = KontextPipeline(random_flux(params=replace(pipe.model.params, mlp_ratio=2.0)), random_autoencoder(),
                          text_encoder())
    with pytest.raises(KontextError, match="mlp_ratio"):
        export(odd, out, diffusers=True, overwrite=True)
    assert (out / "transformer.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]
    export(odd, out, overwrite=True)
    assert (out / "transformer.safetensors").read_bytes() != before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]


def test_diffusers_export_computes_the_same_function(tmp_path, pipe):
    diffusers = pytest.importorskip("diffusers")
    out = export(pipe, tmp_path / "export", diffusers=True)
    theirs = diffusers.FluxTransformer2DModel.from_pretrained(out / "transformer").eval()
    ours = pipe.model
    assert sum(p.numel() for p in theirs.parameters()) == sum(p.numel() for p in ours.parameters())

    g = torch.Generator().manual_seed(0)
    target, context = torch.randn(2, 16, 8, 8, generator=g), torch.randn(2, 16, 6, 4, generator=g)
    tokens = packing.prepare(target, [context])
    img, ids = tokens.joint()
    txt, vec = torch.randn(2, 9, 384, generator=g), torch.randn(2, 384, generator=g)
    t, guidance = torch.tensor([0.9, 0.25]), torch.tensor([2.5, 2.5])
    with torch.no_grad():
        a = ours(img, ids, txt, packing.txt_ids(2, 9), t, vec, guidance)
        b = theirs(hidden_states=img, encoder_hidden_states=txt, pooled_projections=vec, timestep=t,
                   img_ids=ids[0], txt_ids=packing.txt_ids(2, 9)[0], guidance=guidance, return_dict=False)[0]
    assert a.abs().max() > 0.1  # a real signal, not two zero outputs
    torch.testing.assert_close(b, a, rtol=0, atol=1e-5)


def test_export_command_errors_are_one_line(tmp_path, capsys):
    from kontext.cli import run_main

    with pytest.raises(SystemExit) as exit_:
        run_main(main, [f"source={tmp_path / 'missing'}", f"out={tmp_path / 'x'}"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: model source not found") and "\n" not in err
    with pytest.raises(SystemExit):
        run_main(main, ["source=a", "out=b", "difusers=true"])
    assert "unknown argument 'difusers'" in capsys.readouterr().err
