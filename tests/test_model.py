"""The FLUX transformer: presets, init, train-mode gradients, and the math against an
independent functional implementation written from the reference description."""

import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kontext.network.model import FLUX_PRESETS, Flux, FluxParams, build_flux, get_params
from kontext.network.packing import prepare, txt_ids

ROOT = Path(__file__).resolve().parents[1]
KEYS = Path(__file__).parent / "assets" / "flux_dev_kontext_keys.txt"


def randomize_(model: Flux, seed: int = 0) -> Flux:
    """Non-zero weights everywhere (adaLN-Zero would hide most of the network)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g)
            if name.endswith("scale"):
                p.copy_(1 + 0.2 * noise)
            elif p.ndim == 2:
                p.copy_(noise / math.sqrt(p.shape[1]))
            else:
                p.copy_(0.1 * noise)
    return model


def inputs(b=2, n_txt=5, h=8, w=8, ctx=((4, 6),), txt_dim=384, vec_dim=384, seed=1):
    g = torch.Generator().manual_seed(seed)
    tok = prepare(torch.randn(b, 16, h, w, generator=g), [torch.randn(b, 16, *s, generator=g) for s in ctx])
    img, img_ids = tok.joint()
    return dict(
        img=img, img_ids=img_ids, txt=torch.randn(b, n_txt, txt_dim, generator=g), txt_ids=txt_ids(b, n_txt),
        t=torch.rand(b, generator=g), y=torch.randn(b, vec_dim, generator=g),
        guidance=1 + 3 * torch.rand(b, generator=g),
    )


# --------------------------------------------------------------------------- presets


@pytest.mark.parametrize("name", sorted(FLUX_PRESETS))
def test_model_yaml_mirrors_preset(name):
    cfg = OmegaConf.load(ROOT / "configs" / "model" / f"{name}.yaml")
    assert cfg._target_ == "kontext.network.model.FluxParams"
    fields = {k for k in cfg if k != "_target_"}
    assert fields == set(FluxParams.__dataclass_fields__)
    params = instantiate(cfg)
    assert isinstance(params, FluxParams) and params == FLUX_PRESETS[name]
    assert type(params.axes_dim) is list


def test_flux_dev_kontext_on_meta_matches_reference_layout():
    model = build_flux("flux-dev-kontext", device="meta")
    assert sum(p.numel() for p in model.parameters()) == 11_901_408_320
    want = {}
    for line in KEYS.read_text().splitlines():
        if line and not line.startswith("#"):
            name, shape = line.split()
            want[name] = tuple(int(s) for s in shape.split(","))
    assert len(want) == 780
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == want
    assert FLUX_PRESETS["flux-dev"] == FLUX_PRESETS["flux-dev-kontext"]
    schnell = build_flux("flux-schnell", device="meta")
    assert sum(p.numel() for p in schnell.parameters()) == 11_891_178_560
    assert set(schnell.state_dict()) == {k for k in want if not k.startswith("guidance_in.")}
    assert len(model.double_blocks) == 19 and len(model.single_blocks) == 38


def test_invalid_params_are_rejected():
    bad = get_params("tiny")
    bad.axes_dim = [4, 4, 4]
    with pytest.raises(ValueError, match="axes_dim"):
        Flux(bad)
    with pytest.raises(KeyError, match="unknown FLUX preset"):
        get_params("flux-pro")


# --------------------------------------------------------------------------- training behaviour


def test_adaln_zero_init_starts_at_zero_output():
    model = build_flux("tiny")
    for blk in model.double_blocks:
        assert not blk.img_mod.lin.weight.any() and not blk.txt_mod.lin.weight.any()
    assert not model.final_layer.linear.weight.any()
    assert model.img_in.weight.std() > 0 and model.double_blocks[0].img_attn.qkv.weight.std() > 0
    out = model(**inputs())
    assert out.shape == (2, 16 + 6, 64) and not out.any()


def test_tiny_forward_backward_train_mode():
    model = build_flux("tiny").train()
    x = inputs()
    loss = model(**x).square().mean() + model(**x).sum()
    loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
    # at adaLN-Zero init only the output layer learns at step 0; with non-zero weights every tensor does
    assert model.final_layer.linear.weight.grad.abs().sum() > 0
    randomize_(model)
    model.zero_grad()
    out = model(**x)
    assert torch.isfinite(out).all()
    (out * torch.randn_like(out)).sum().backward()
    for name, p in model.named_parameters():
        assert torch.isfinite(p.grad).all() and p.grad.abs().sum() > 0, name


@pytest.mark.parametrize("compacted", [False, True])
def test_predicting_only_the_target_tokens_changes_nothing_else(compacted):
    """n_out: the last single block computes queries, MLP and output for the asked rows only;
    their predictions and every gradient equal those of the full forward."""
    model = build_flux("tiny")
    randomize_(model)
    x = inputs()
    if compacted:  # the attention bias of compacted text goes through the shortened block too
        x["txt_multiplicity"] = torch.rand(x["txt"].shape[:2]) + 1
    n_target = 16  # the 4x4 target of inputs(); the 6 context tokens follow
    g = torch.randn(2, n_target, 64)

    def run(n_out):
        model.zero_grad()
        out = model(**x, n_out=n_out)
        (out[:, :n_target] * g).sum().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    full, full_grads = run(None)
    part, part_grads = run(n_target)
    assert full.shape == (2, 16 + 6, 64) and part.shape == (2, n_target, 64)
    torch.testing.assert_close(part, full[:, :n_target], rtol=1e-5, atol=1e-6)
    for a, b in zip(part_grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_guidance_is_required_for_guidance_distilled_models():
    model = build_flux("tiny")
    x = inputs()
    x["guidance"] = None
    with pytest.raises(ValueError, match="guidance"):
        model(**x)


def test_build_dtype():
    model = build_flux("tiny", dtype=torch.bfloat16)
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())
    assert torch.get_default_dtype() == torch.float32
    out = randomize_(model)(**{k: v.bfloat16() if k in ("img", "txt", "y") else v for k, v in inputs().items()})
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()


# --------------------------------------------------------------------------- independent reference


def reference_flux(sd, p: FluxParams, img, img_ids, txt, txt_ids, t, y, guidance=None):
    """FLUX.1 forward written directly from the reference description, as plain functions of
    the state dict (RoPE with complex numbers, attention with an explicit softmax)."""
    H, D = p.num_heads, p.hidden_size // p.num_heads

    def lin(x, name):
        return x @ sd[f"{name}.weight"].T + sd[f"{name}.bias"]

    def sinusoid(t):
        k = torch.arange(128, dtype=torch.float32)
        angle = 1000 * t[:, None] * torch.exp(-math.log(10000) * k / 128)
        return torch.cat([angle.cos(), angle.sin()], dim=-1)

    def embedder(x, name):
        return lin(F.silu(lin(x, f"{name}.in_layer")), f"{name}.out_layer")

    def ln(x):
        return F.layer_norm(x, x.shape[-1:], eps=1e-6)

    def rms(x, w):
        return x * torch.rsqrt(x.square().mean(-1, keepdim=True) + 1e-6) * w

    ids = torch.cat([txt_ids, img_ids], dim=1)
    angles = torch.cat([
        ids[..., i, None] * p.theta ** (-torch.arange(0, d, 2, dtype=torch.float32) / d)
        for i, d in enumerate(p.axes_dim)
    ], dim=-1)
    rot = torch.polar(torch.ones_like(angles), angles)[:, None]  # (B, 1, L, D/2)

    def rotate(x):
        return torch.view_as_real(torch.view_as_complex(x.reshape(*x.shape[:-1], D // 2, 2)) * rot).flatten(-2)

    def heads(x):  # (B, L, H*D) -> (B, H, L, D)
        return x.reshape(x.shape[0], x.shape[1], H, D).transpose(1, 2)

    def qkv(x, norm):  # [q | k | v] rows
        q, k, v = (heads(part) for part in x.chunk(3, dim=-1))
        return rms(q, sd[f"{norm}.query_norm.scale"]), rms(k, sd[f"{norm}.key_norm.scale"]), v

    def attend(q, k, v):
        q, k = rotate(q), rotate(k)
        w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(D), dim=-1)
        out = w @ v
        return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], H * D)

    def mlp(x, name):
        return lin(F.gelu(lin(x, f"{name}.0"), approximate="tanh"), f"{name}.2")

    vec = embedder(sinusoid(t), "time_in")
    if p.guidance_embed:
        vec = vec + embedder(sinusoid(guidance), "guidance_in")
    vec = vec + embedder(y, "vector_in")
    img, txt = lin(img, "img_in"), lin(txt, "txt_in")
    n_txt = txt.shape[1]

    for i in range(p.depth):
        b = f"double_blocks.{i}"
        mi = lin(F.silu(vec), f"{b}.img_mod.lin")[:, None].chunk(6, dim=-1)
        mt = lin(F.silu(vec), f"{b}.txt_mod.lin")[:, None].chunk(6, dim=-1)
        qi, ki, vi = qkv(lin((1 + mi[1]) * ln(img) + mi[0], f"{b}.img_attn.qkv"), f"{b}.img_attn.norm")
        qt, kt, vt = qkv(lin((1 + mt[1]) * ln(txt) + mt[0], f"{b}.txt_attn.qkv"), f"{b}.txt_attn.norm")
        a = attend(torch.cat([qt, qi], 2), torch.cat([kt, ki], 2), torch.cat([vt, vi], 2))
        img = img + mi[2] * lin(a[:, n_txt:], f"{b}.img_attn.proj")
        img = img + mi[5] * mlp((1 + mi[4]) * ln(img) + mi[3], f"{b}.img_mlp")
        txt = txt + mt[2] * lin(a[:, :n_txt], f"{b}.txt_attn.proj")
        txt = txt + mt[5] * mlp((1 + mt[4]) * ln(txt) + mt[3], f"{b}.txt_mlp")

    x = torch.cat([txt, img], dim=1)
    h = p.hidden_size
    for i in range(p.depth_single_blocks):
        b = f"single_blocks.{i}"
        shift, scale, gate = lin(F.silu(vec), f"{b}.modulation.lin")[:, None].chunk(3, dim=-1)
        fused = lin((1 + scale) * ln(x) + shift, f"{b}.linear1")
        a = attend(*qkv(fused[..., : 3 * h], f"{b}.norm"))
        x = x + gate * lin(torch.cat([a, F.gelu(fused[..., 3 * h :], approximate="tanh")], -1), f"{b}.linear2")

    shift, scale = lin(F.silu(vec), "final_layer.adaLN_modulation.1").chunk(2, dim=-1)
    return lin((1 + scale[:, None]) * ln(x[:, n_txt:]) + shift[:, None], "final_layer.linear")


@pytest.mark.parametrize("guidance_embed", [True, False])
@pytest.mark.parametrize("ctx", [(), ((4, 6), (2, 2))])
def test_matches_independent_reference(guidance_embed, ctx):
    params = get_params("tiny")
    params.guidance_embed = guidance_embed
    model = randomize_(build_flux(params), seed=3).eval()
    x = inputs(ctx=ctx)
    if not guidance_embed:
        x["guidance"] = None
    with torch.no_grad():
        out = model(**x)
        want = reference_flux(model.state_dict(), params, **x)
    assert out.shape == want.shape == (2, x["img"].shape[1], 64)
    assert want.abs().mean() > 0.1
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
