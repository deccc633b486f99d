"""The autoencoder: reference layout and size, file round trips and errors, the latent
convention, and its math against an independent implementation (diffusers' AutoencoderKL)."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from kontext.formats.weights import WeightsError, read_metadata
from kontext.latent.autoencoder import (
    AE_PRESETS,
    EMBEDDED_PATH,
    AutoEncoder,
    AutoEncoderParams,
    load_autoencoder,
    save_autoencoder,
)

KEYS = Path(__file__).parent / "assets" / "flux_ae_keys.txt"


def small_params(**kw) -> AutoEncoderParams:
    p = dict(resolution=32, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 2, 2], num_res_blocks=1, z_channels=8,
             scale_factor=0.5, shift_factor=0.25)
    return AutoEncoderParams(**(p | kw))


def randomized(ae: AutoEncoder) -> AutoEncoder:
    """Perturb every tensor (GroupNorm affines included) so that no default value hides a mistake."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in ae.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return ae.eval()


def test_flux_preset_matches_reference_keys_and_count():
    with torch.device("meta"):
        ae = AutoEncoder(AE_PRESETS["flux"])
    ours = {k: tuple(v.shape) for k, v in ae.state_dict().items()}
    ref = {}
    for line in KEYS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split()
            ref[name] = tuple(int(s) for s in shape.split(","))
    assert len(ref) == 244
    assert ours == ref
    assert sum(v.numel() for v in ae.state_dict().values()) == 83_819_683


def test_params_validation():
    with pytest.raises(ValueError, match="divisible by 32"):
        small_params(ch=48)
    p = small_params(ch_mult=(1, 2))  # Hydra hands lists over as ListConfig/tuples
    assert p.ch_mult == [1, 2] and p.downsample == 2
    assert AE_PRESETS["flux"].downsample == AE_PRESETS["embedded"].downsample == 8


@pytest.mark.parametrize("name", ["flux", "embedded"])
def test_config_mirrors_the_preset_field_for_field(name):
    from dataclasses import fields

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(Path(__file__).parents[1] / "configs" / "autoencoder" / f"{name}.yaml")
    assert set(cfg) - {"_target_"} == {f.name for f in fields(AutoEncoderParams)}
    assert instantiate(cfg) == AE_PRESETS[name]


def test_encode_decode_shapes_and_convention():
    ae = randomized(AutoEncoder(AE_PRESETS["embedded"]))
    ae.scale_factor, ae.shift_factor = 0.7, -0.3
    x = torch.rand(2, 3, 64, 48) * 2 - 1
    z = ae.encode(x)
    assert z.shape == (2, 16, 8, 6)  # 8x down, 16 channels
    mean = ae.posterior(x).mean
    torch.testing.assert_close(z, 0.7 * (mean + 0.3))
    assert ae.decode(z).shape == (2, 3, 64, 48)
    torch.testing.assert_close(ae.decode(z), ae.decoder(mean), atol=1e-5, rtol=1e-5)
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1, s2 = ae.encode(x, sample=True, generator=g1), ae.encode(x, sample=True, generator=g2)
    torch.testing.assert_close(s1, s2)
    assert not torch.allclose(s1, z)


def test_shape_errors_are_clear():
    ae = AutoEncoder(small_params())
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\) with H, W divisible by 4"):
        ae.encode(torch.zeros(1, 3, 30, 32))
    with pytest.raises(ValueError, match="images must be"):
        ae.encode(torch.zeros(1, 4, 32, 32))
    with pytest.raises(ValueError, match=r"latents must be \(B, 8, H, W\)"):
        ae.decode(torch.zeros(1, 16, 8, 8))


def test_kl_is_zero_for_the_prior_and_positive_otherwise():
    from kontext.latent.autoencoder import DiagonalGaussian

    zero = DiagonalGaussian.from_moments(torch.zeros(2, 8, 3, 3))
    torch.testing.assert_close(zero.kl(), torch.zeros(2))
    other = DiagonalGaussian(torch.ones(1, 4, 2, 2), torch.zeros(1, 4, 2, 2))
    torch.testing.assert_close(other.kl(), torch.tensor([0.5 * 16]))


def test_reference_format_file_round_trips_exactly(tmp_path):
    p = small_params()
    ae = randomized(AutoEncoder(p))
    # A reference-format file: bare tensors, no metadata (as the official ae.safetensors).
    save_file({k: v.contiguous() for k, v in ae.state_dict().items()}, str(tmp_path / "ref.safetensors"))
    loaded = load_autoencoder(tmp_path / "ref.safetensors", p)
    assert loaded.state_dict().keys() == ae.state_dict().keys()
    for k, v in ae.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert (loaded.scale_factor, loaded.shift_factor) == (0.5, 0.25)

    # Our own files carry params and scale/shift; loading needs no params and keeps every bit.
    loaded.scale_factor, loaded.shift_factor = 1.75, -0.125
    save_autoencoder(loaded, tmp_path / "ours.safetensors", {"metrics": {"psnr": 30.0}})
    meta = read_metadata(tmp_path / "ours.safetensors")
    assert json.loads(meta["metrics"]) == {"psnr": 30.0}
    again = load_autoencoder(tmp_path / "ours.safetensors")
    assert again.current_params() == loaded.current_params()
    for k, v in ae.state_dict().items():
        assert torch.equal(again.state_dict()[k], v), k
    # The file's measured scale/shift win over the config's (same architecture).
    assert load_autoencoder(tmp_path / "ours.safetensors", p).scale_factor == 1.75
    x = torch.rand(1, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(again.encode(x), loaded.encode(x))


def test_file_errors_are_clear(tmp_path):
    p = small_params()
    with pytest.raises(WeightsError, match="weight file not found"):
        load_autoencoder(tmp_path / "missing.safetensors", p)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read"):
        load_autoencoder(tmp_path / "junk.safetensors", p)
    sd = AutoEncoder(p).state_dict()
    bad = dict(sd, **{"decoder.conv_out.weight": torch.zeros(3, 64, 3, 3)})
    save_file(bad, str(tmp_path / "bad.safetensors"))
    with pytest.raises(WeightsError, match=r"decoder\.conv_out\.weight: file \(3, 64, 3, 3\) vs model \(3, 32, 3, 3\)"):
        load_autoencoder(tmp_path / "bad.safetensors", p)
    # A bare small file read as the official architecture (the default without params).
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "small.safetensors"))
    with pytest.raises(WeightsError, match="do not match the model"):
        load_autoencoder(tmp_path / "small.safetensors")
    save_autoencoder(AutoEncoder(p), tmp_path / "ours.safetensors")
    with pytest.raises(WeightsError, match="another architecture.*ch: file 32 vs config 64"):
        load_autoencoder(tmp_path / "ours.safetensors", small_params(ch=64))


# ---------------------------------------------------------------- independent implementation
def to_diffusers(sd: dict[str, torch.Tensor], levels: int) -> dict[str, torch.Tensor]:
    """LDM/BFL autoencoder keys -> diffusers AutoencoderKL keys (the standard conversion)."""
    out = {}
    for k, v in sd.items():
        n = k
        n = re.sub(r"encoder\.down\.(\d+)\.block\.(\d+)", r"encoder.down_blocks.\1.resnets.\2", n)
        n = re.sub(r"encoder\.down\.(\d+)\.downsample", r"encoder.down_blocks.\1.downsamplers.0", n)
        n = re.sub(r"decoder\.up\.(\d+)\.block\.(\d+)",
                   lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.resnets.{m[2]}", n)
        n = re.sub(r"decoder\.up\.(\d+)\.upsample",
                   lambda m: f"decoder.up_blocks.{levels - 1 - int(m[1])}.upsamplers.0", n)
        n = re.sub(r"mid\.block_(\d)", lambda m: f"mid_block.resnets.{int(m[1]) - 1}", n)
        n = n.replace("mid.attn_1.norm", "mid_block.attentions.0.group_norm")
        n = re.sub(r"mid\.attn_1\.([qkv])\.", r"mid_block.attentions.0.to_\1.", n)
        n = n.replace("mid.attn_1.proj_out", "mid_block.attentions.0.to_out.0")
        n = n.replace("nin_shortcut", "conv_shortcut").replace("norm_out", "conv_norm_out")
        if "attentions" in n and n.endswith("weight") and v.ndim == 4:
            v = v[:, :, 0, 0]  # 1x1 conv -> linear
        out[n] = v
    return out


def diffusers_vae(p: AutoEncoderParams):
    diffusers = pytest.importorskip("diffusers")
    n = len(p.ch_mult)
    return diffusers.AutoencoderKL(
        in_channels=p.in_channels, out_channels=p.out_ch, down_block_types=["DownEncoderBlock2D"] * n,
        up_block_types=["UpDecoderBlock2D"] * n, block_out_channels=[p.ch * m for m in p.ch_mult],
        layers_per_block=p.num_res_blocks, latent_channels=p.z_channels, norm_num_groups=32,
        sample_size=p.resolution, scaling_factor=p.scale_factor, shift_factor=p.shift_factor,
        use_quant_conv=False, use_post_quant_conv=False,
    )


def test_flux_layout_maps_onto_diffusers_flux_vae():
    p = AE_PRESETS["flux"]
    with torch.device("meta"):
        ours = AutoEncoder(p).state_dict()
        theirs = diffusers_vae(p).state_dict()
    mapped = to_diffusers(ours, len(p.ch_mult))
    assert {k: tuple(v.shape) for k, v in mapped.items()} == {k: tuple(v.shape) for k, v in theirs.items()}


def test_math_matches_diffusers_autoencoderkl():
    p = small_params(ch_mult=[1, 2, 2, 2], num_res_blocks=2, z_channels=16)
    ae = randomized(AutoEncoder(p))
    ref = diffusers_vae(p).eval()
    ref.load_state_dict(to_diffusers(ae.state_dict(), len(p.ch_mult)), strict=True)
    x = torch.rand(2, 3, 32, 40) * 2 - 1
    with torch.no_grad():
        dist = ref.encode(x).latent_dist
        post = ae.posterior(x)
        torch.testing.assert_close(post.mean, dist.mean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(post.logvar, dist.logvar, atol=1e-5, rtol=1e-5)
        z = ae.encode(x)  # scaled: a pipeline feeds decode() z / scaling_factor + shift_factor
        torch.testing.assert_close(ae.decode(z), ref.decode(z / p.scale_factor + p.shift_factor).sample,
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not EMBEDDED_PATH.is_file(), reason="the embedded autoencoder is not built yet")
def test_embedded_file_loads_with_preset_and_metadata():
    ae = load_autoencoder(EMBEDDED_PATH)
    preset = AE_PRESETS["embedded"]
    assert ae.current_params() == preset  # the preset states the shipped file's scale/shift
    meta = read_metadata(EMBEDDED_PATH)
    metrics = json.loads(meta["metrics"])
    assert metrics["class_agreement"] >= 0.995
    assert meta["command"].startswith("python train.py")
    assert EMBEDDED_PATH.stat().st_size < 8 * 2**20


@pytest.mark.skipif(not EMBEDDED_PATH.is_file(), reason="the embedded autoencoder is not built yet")
def test_embedded_autoencoder_reconstructs_unseen_scenes():
    """The acceptance bar, re-measured with the spec's own scorer on scenes from a seed that
    neither training nor the file's reported evaluation used."""
    import numpy as np

    from kontext.data import shapes_edit as se
    from kontext.data.rendered import render_batch

    ae = load_autoencoder(EMBEDDED_PATH)
    x = render_batch("val", 1234, 0, 96)["target"]
    with torch.no_grad():
        out = ((ae.decode(ae.encode(x)).clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    src = ((x + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
    agree = np.mean([np.mean(se.class_map(o, 64) == se.class_map(s, 64)) for o, s in zip(out, src, strict=True)])
    assert agree >= 0.995
