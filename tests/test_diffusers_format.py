"""Export to diffusers, checked against diffusers' own FluxTransformer2DModel: an independent
implementation of the same network must give the same output from the converted weights."""

import math

import pytest
import torch

from kontext.formats.diffusers_format import bfl_to_diffusers, diffusers_config
from kontext.network.model import build_flux, get_params
from kontext.network.packing import prepare, txt_ids

diffusers = pytest.importorskip("diffusers")


def random_model(guidance_embed: bool):
    params = get_params("tiny")
    params.guidance_embed = guidance_embed
    model = build_flux(params).eval()
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for name, p in model.named_parameters():  # non-zero everywhere, modulation included
            noise = torch.randn(p.shape, generator=g)
            p.copy_(1 + 0.2 * noise if name.endswith("scale") else noise / math.sqrt(p.shape[-1]) if p.ndim == 2 else 0.1 * noise)
    return model, params


@pytest.mark.parametrize("guidance_embed", [True, False])
@pytest.mark.parametrize("contexts", [(), ((4, 6),)])
def test_diffusers_transformer_matches(guidance_embed, contexts):
    model, params = random_model(guidance_embed)
    config = {k: v for k, v in diffusers_config(params).items() if not k.startswith("_")}
    theirs = diffusers.FluxTransformer2DModel(**config).eval()
    theirs.load_state_dict(bfl_to_diffusers(model.state_dict(), params), strict=True)

    g = torch.Generator().manual_seed(5)
    b, n_txt = 2, 6
    tok = prepare(torch.randn(b, 16, 8, 8, generator=g), [torch.randn(b, 16, *s, generator=g) for s in contexts])
    img, img_ids = tok.joint()
    txt, y = torch.randn(b, n_txt, 384, generator=g), torch.randn(b, 384, generator=g)
    t = torch.rand(b, generator=g)
    guidance = torch.full((b,), 2.5) if guidance_embed else None

    with torch.no_grad():
        ours = model(img, img_ids, txt, txt_ids(b, n_txt), t, y, guidance=guidance)
        # diffusers takes t in [0, 1] and the raw guidance scale (it multiplies both by 1000
        # itself, like the reference) and 2-D ids shared by the batch.
        want = theirs(
            hidden_states=img, encoder_hidden_states=txt, pooled_projections=y, timestep=t,
            img_ids=img_ids[0], txt_ids=txt_ids(b, n_txt)[0], guidance=guidance, return_dict=False,
        )[0]
    assert want.shape == ours.shape == (b, 16 + 6 * len(contexts), 64)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(ours, want, atol=1e-5, rtol=1e-5)


def test_config_and_keys_cover_the_12b_layout():
    params = get_params("flux-dev-kontext")
    model = build_flux(params, device="meta")
    converted = bfl_to_diffusers(model.state_dict(), params)
    with torch.device("meta"):
        theirs = diffusers.FluxTransformer2DModel(
            **{k: v for k, v in diffusers_config(params).items() if not k.startswith("_")}
        )
    assert {k: v.shape for k, v in converted.items()} == {k: v.shape for k, v in theirs.state_dict().items()}
    # the single-file prefix is accepted too
    prefixed = {f"model.diffusion_model.{k}": v for k, v in model.state_dict().items()}
    assert set(bfl_to_diffusers(prefixed, params)) == set(converted)


def test_unrepresentable_params_are_rejected():
    params = get_params("tiny")
    params.mlp_ratio = 2.0
    with pytest.raises(ValueError, match="mlp_ratio"):
        diffusers_config(params)
