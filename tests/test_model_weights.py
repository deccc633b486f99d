"""Reference-format (BFL) transformer files: strict loading, prefixes, bit-exact round trips."""

import json

import pytest
import torch
from safetensors import safe_open

from kontext.formats.weights import WeightsError, save_safetensors
from kontext.network.model import PARAMS_METADATA_KEY, build_flux, get_params, load_flux, save_flux


def random_tiny(dtype=torch.float32):
    model = build_flux("tiny", dtype=dtype)
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
    return model


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_is_bit_exact(tmp_path, dtype):
    model = random_tiny(dtype)
    path = save_flux(model, tmp_path / "flux.safetensors", metadata={"step": 3})
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
    assert keys == set(model.state_dict())
    assert json.loads(meta[PARAMS_METADATA_KEY])["hidden_size"] == 64 and meta["step"] == "3"

    loaded = load_flux(path, "tiny")
    assert loaded.params == model.params
    for name, want in model.state_dict().items():
        got = loaded.state_dict()[name]
        assert got.dtype == dtype and got.device.type == "cpu"
        assert torch.equal(got.view(torch.int16 if dtype == torch.bfloat16 else torch.int32),
                           want.view(torch.int16 if dtype == torch.bfloat16 else torch.int32)), name
    # params come from the file's metadata when not given
    assert load_flux(path).params == model.params
    assert load_flux(path, dtype=torch.float64).img_in.weight.dtype == torch.float64


def test_single_file_prefix_is_accepted(tmp_path):
    model = random_tiny()
    sd = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    path = save_safetensors(sd, tmp_path / "single_file.safetensors")
    loaded = load_flux(path, get_params("tiny"))
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in model.state_dict().items())
    assert not any(p.is_meta for p in loaded.parameters())


def test_misshaped_tensor_is_named(tmp_path):
    sd = random_tiny().state_dict()
    sd["double_blocks.1.txt_attn.qkv.weight"] = torch.zeros(3, 3)
    path = save_safetensors(sd, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=r"double_blocks\.1\.txt_attn\.qkv\.weight"):
        load_flux(path, "tiny")


def test_missing_and_unexpected_tensors_are_named(tmp_path):
    sd = random_tiny().state_dict()
    del sd["final_layer.linear.bias"]
    sd["extra.weight"] = torch.zeros(1)
    path = save_safetensors(sd, tmp_path / "bad.safetensors")
    with pytest.raises(WeightsError, match=r"final_layer\.linear\.bias") as err:
        load_flux(path, "tiny")
    assert "extra.weight" in str(err.value)
    # a dev-shaped file does not load into a schnell-shaped model (guidance_in is unexpected)
    params = get_params("tiny")
    params.guidance_embed = False
    with pytest.raises(WeightsError, match="guidance_in"):
        load_flux(save_flux(random_tiny(), tmp_path / "dev.safetensors"), params)


def test_file_without_params_needs_them(tmp_path):
    path = save_safetensors(random_tiny().state_dict(), tmp_path / "plain.safetensors")
    with pytest.raises(WeightsError, match="FluxParams"):
        load_flux(path)
