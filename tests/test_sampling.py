"""The Euler sampler: oracle velocity fields, context tokens, guidance, CFG, explicit times, seeds.

The tests run what `KontextPipeline` runs between the encoders: its starting noise, its
packing of target and context latents, and `denoise`.
"""

import pytest
import torch
from PIL import Image
from torch import nn

from kontext.diffusion.flow import schedule
from kontext.diffusion.sampling import denoise, get_noise
from kontext.network import packing


class OracleModel(nn.Module):
    """The exact velocity field of straight paths ending at known data ``x`` (B, L_img, C).

    At time t the point z lies on the line from x to some noise, whose velocity is
    (z - x) / t; Euler steps along it land on x exactly at t = 0 for any schedule. Context
    positions get a large constant, so any leak of them into the sample shows. Every call is
    recorded.
    """

    def __init__(self, x: torch.Tensor):
        super().__init__()
        self.x = x
        self.calls = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, n_out=None):
        self.calls.append(dict(img=img.clone(), img_ids=img_ids, txt=txt, t=timesteps, guidance=guidance, n_out=n_out))
        n_img = self.x.shape[1]
        t = timesteps[:, None, None]
        v_img = (img[:, :n_img] - self.x.repeat(img.shape[0] // self.x.shape[0], 1, 1)) / t
        v_ctx = torch.full_like(img[:, n_img:], 1e3)
        return torch.cat([v_img, v_ctx], dim=1)


class TextShiftModel(nn.Module):
    """Velocity = z + mean of the text features per sample: CFG's effect is computable by hand."""

    def __init__(self):
        super().__init__()
        self.batch_sizes = []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, n_out=None):
        self.batch_sizes.append(img.shape[0])
        return img + txt.mean(dim=(1, 2))[:, None, None] + y.mean(dim=1)[:, None, None]


def _text(b=2, length=5, dim=8, vec_dim=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(b, length, dim, generator=g), torch.randn(b, vec_dim, generator=g)


def _sample(model, contexts, txt, vec, height, width, seed, timesteps, **kwargs):
    """Target latents (B, 16, height, width): the pipeline's packing, `denoise` and unpacking, from
    `get_noise` of one seed for the whole batch (the pipeline draws one seed per case)."""
    noise = get_noise(txt.shape[0], height, width, seed, txt.device, txt.dtype)
    tokens = packing.prepare(noise, contexts)
    return tokens.unpack(denoise(model, tokens, tokens.img, txt, vec, timesteps, **kwargs))


def test_get_noise_is_deterministic_for_a_seed():
    a = get_noise(2, 8, 6, seed=7, device="cpu", dtype=torch.float32)
    torch.manual_seed(123)  # the global RNG state plays no part
    b = get_noise(2, 8, 6, seed=7, device="cpu", dtype=torch.float32)
    c = get_noise(2, 8, 6, seed=8, device="cpu", dtype=torch.float32)
    assert a.shape == (2, 16, 8, 6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    # A bf16 run starts from the same numbers, rounded.
    assert torch.equal(get_noise(2, 8, 6, seed=7, device="cpu", dtype=torch.bfloat16), a.bfloat16())
    with pytest.raises(ValueError, match="even"):
        get_noise(1, 7, 6, seed=0, device="cpu", dtype=torch.float32)


@pytest.mark.parametrize("context_sizes", [[], [(8, 8)], [(8, 8), (4, 6)]])
def test_oracle_field_recovers_the_data_with_contexts_in_the_input_only(context_sizes):
    b, h, w = 2, 8, 6
    x = torch.randn(b, 16, h, w)
    contexts = [torch.randn(b, 16, ch, cw) for ch, cw in context_sizes]
    ref = packing.prepare(x, contexts)
    n_img, n_ctx = ref.img.shape[1], sum(ch * cw // 4 for ch, cw in context_sizes)
    model = OracleModel(ref.img)
    txt, vec = _text(b)

    out = _sample(model, contexts, txt, vec, h, w, seed=3, timesteps=schedule(6, n_img))

    assert out.shape == (b, 16, h, w)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    assert len(model.calls) == 6
    for call in model.calls:
        # The model sees [img | ctx] with [img_ids | ctx_ids]; contexts are never modified, and
        # only the target's predictions are asked for.
        assert call["img"].shape == (b, n_img + n_ctx, 64) and call["n_out"] == n_img
        if n_ctx:
            torch.testing.assert_close(call["img"][:, n_img:], ref.ctx)
            torch.testing.assert_close(call["img_ids"], torch.cat([ref.img_ids, ref.ctx_ids], dim=1))
        else:
            torch.testing.assert_close(call["img_ids"], ref.img_ids)


def test_pipeline_schedule_uses_target_tokens_only():
    from tiny_kontext import tiny_pipeline

    pipe = tiny_pipeline()
    seen = []
    handle = pipe.model.register_forward_pre_hook(lambda module, args: seen.append((args[0].shape[1], args[4][0])))
    try:  # a 128x128 reference (16x16 latent, 64 tokens) and a 64x64 output (8x8 latent, 16 tokens)
        pipe(Image.new("RGB", (128, 128), "white"), "make it red", seed=0, steps=5, width=64, height=64)
    finally:
        handle.remove()
    assert [n for n, _ in seen] == [16 + 64] * 5
    torch.testing.assert_close(torch.stack([t for _, t in seen]), schedule(5, 16)[:-1])
    assert not torch.allclose(schedule(5, 16), schedule(5, 16 + 64))  # the test can tell them apart


def test_constant_velocity_walks_the_straight_line_from_noise_to_data():
    b, n, c = 2, 12, 64
    x, noise = torch.randn(b, n, c), torch.randn(b, n, c)

    class Straight(nn.Module):
        def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, n_out=None):
            return noise - x

    tokens = packing.prepare(torch.zeros(b, 16, 6, 8))  # 12 target tokens, no context
    txt, vec = _text(b)
    out = denoise(Straight(), tokens, noise, txt, vec, schedule(7, n))
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)


def test_explicit_timesteps_are_used_as_given():
    b, h, w = 2, 4, 4
    x = torch.randn(b, 16, h, w)
    model = OracleModel(packing.pack(x))
    txt, vec = _text(b)
    times = [1.0, 0.9, 0.4, 0.0]
    out = _sample(model, [], txt, vec, h, w, seed=1, timesteps=times)
    torch.testing.assert_close(out, x, rtol=0, atol=1e-5)
    assert [round(c["t"][0].item(), 6) for c in model.calls] == times[:-1]
    assert all(c["t"].shape == (b,) for c in model.calls)
    # Stopping early leaves the sample on the line at the last time: x + t (noise - x).
    model = OracleModel(packing.pack(x))
    part = _sample(model, [], txt, vec, h, w, seed=1, timesteps=torch.tensor([1.0, 0.5]))
    noise = get_noise(b, h, w, seed=1, device="cpu", dtype=torch.float32)
    torch.testing.assert_close(part, 0.5 * x + 0.5 * noise)


def test_guidance_vector_is_filled_when_given():
    b, h, w = 3, 4, 4
    x = torch.randn(b, 16, h, w)
    txt, vec = _text(b)
    model = OracleModel(packing.pack(x))
    _sample(model, [], txt, vec, h, w, seed=0, timesteps=schedule(2, 4), guidance=2.5)
    assert all(torch.equal(c["guidance"], torch.full((b,), 2.5)) for c in model.calls)
    model = OracleModel(packing.pack(x))
    _sample(model, [], txt, vec, h, w, seed=0, timesteps=schedule(2, 4))
    assert all(c["guidance"] is None for c in model.calls)


def _one_step(model, txt, vec, cfg_scale=1.0, uncond=None, timesteps=(1.0, 0.0)):
    img = torch.randn(2, 4, 64, generator=torch.Generator().manual_seed(0))
    tokens = packing.prepare(torch.zeros(2, 16, 4, 4))  # a 2x2 grid of target tokens
    out = denoise(model, tokens, img, txt, vec, timesteps, cfg_scale=cfg_scale, uncond=uncond)
    return img, out


def test_cfg_scale_one_is_the_conditional_path():
    txt, vec = _text(2, seed=1)
    neg = _text(2, seed=2)
    model = TextShiftModel()
    _, plain = _one_step(model, txt, vec)
    _, with_uncond = _one_step(model, txt, vec, cfg_scale=1.0, uncond=neg)
    assert torch.equal(plain, with_uncond)
    assert model.batch_sizes == [2, 2]  # the unconditional branch is not evaluated


def test_true_cfg_combines_conditional_and_unconditional():
    txt, vec = _text(2, seed=1)
    neg_txt, neg_vec = _text(2, seed=2)
    model = TextShiftModel()
    img, out = _one_step(model, txt, vec, cfg_scale=4.0, uncond=(neg_txt, neg_vec))
    shift = lambda t, v: (t.mean(dim=(1, 2)) + v.mean(dim=1))[:, None, None]
    cond, neg = img + shift(txt, vec), img + shift(neg_txt, neg_vec)
    torch.testing.assert_close(out, img - (neg + 4.0 * (cond - neg)))
    assert model.batch_sizes == [4]  # both branches in one forward of 2B
    # One guidance scale per sample (guidance distillation's teacher).
    w = torch.tensor([4.0, 2.0])
    _, per_sample = _one_step(TextShiftModel(), txt, vec, cfg_scale=w, uncond=(neg_txt, neg_vec))
    torch.testing.assert_close(per_sample, img - (neg + w[:, None, None] * (cond - neg)))
    with pytest.raises(ValueError, match="must match"):  # text of another length
        _one_step(TextShiftModel(), txt, vec, cfg_scale=4.0, uncond=_text(2, length=9, seed=2))


def test_cfg_accepts_one_empty_prompt_for_the_batch_and_needs_one():
    txt, vec = _text(2, seed=1)
    neg_txt, neg_vec = _text(1, seed=2)
    _, out = _one_step(TextShiftModel(), txt, vec, cfg_scale=3.0, uncond=(neg_txt, neg_vec))
    _, ref = _one_step(
        TextShiftModel(), txt, vec, cfg_scale=3.0, uncond=(neg_txt.repeat(2, 1, 1), neg_vec.repeat(2, 1))
    )
    torch.testing.assert_close(out, ref)
    with pytest.raises(ValueError, match="uncond"):
        _one_step(TextShiftModel(), txt, vec, cfg_scale=3.0)
    with pytest.raises(ValueError, match="two timesteps"):
        _one_step(TextShiftModel(), txt, vec, timesteps=[1.0])


def _tiny_flux():
    from kontext.network.model import FLUX_PRESETS, Flux

    torch.manual_seed(0)
    model = Flux(FLUX_PRESETS["tiny"]).eval()
    with torch.no_grad():  # the training init zeroes the output layer; make every path matter
        for p in model.parameters():
            p.normal_(0, 0.2)
    return model


def _prompt(p, b: int, length: int, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Random (txt, vec) sized for the model params `p`, drawn from `g`."""
    return torch.randn(b, length, p.context_in_dim, generator=g), torch.randn(b, p.vec_in_dim, generator=g)


def test_real_model_sampling_is_deterministic_for_a_seed():
    model = _tiny_flux()
    p = model.params
    b, h, w = 2, 8, 8
    g = torch.Generator().manual_seed(0)
    txt, vec = _prompt(p, b, 7, g)
    ctx = [torch.randn(b, 16, h, w, generator=g)]
    kw = dict(height=h, width=w, timesteps=schedule(3, h * w // 4), guidance=2.5 if p.guidance_embed else None)
    a = _sample(model, ctx, txt, vec, seed=11, **kw)
    torch.manual_seed(999)
    b_ = _sample(model, ctx, txt, vec, seed=11, **kw)
    c = _sample(model, ctx, txt, vec, seed=12, **kw)
    assert a.shape == (b, 16, h, w) and torch.isfinite(a).all()
    assert torch.equal(a, b_) and not torch.equal(a, c)
    # The context changes the sample: it reaches the model.
    d = _sample(model, [ctx[0] + 1], txt, vec, seed=11, **kw)
    assert not torch.allclose(a, d)


def test_real_model_batched_cfg_equals_separate_forwards():
    model = _tiny_flux()
    p = model.params
    b, h, w = 2, 4, 4
    g = torch.Generator().manual_seed(1)
    txt, vec = _prompt(p, b, 5, g)
    neg_same = _prompt(p, b, 5, g)
    # The 2B forward of both branches against two plain conditional runs combined by hand.
    kw = dict(height=h, width=w, seed=2, timesteps=[1.0, 0.0], guidance=2.5 if p.guidance_embed else None)
    guided = _sample(model, [], txt, vec, cfg_scale=3.0, uncond=neg_same, **kw)
    cond = _sample(model, [], txt, vec, **kw)
    neg = _sample(model, [], *neg_same, **kw)
    noise = get_noise(b, h, w, seed=2, device="cpu", dtype=torch.float32)
    # One step from t=1 to 0: sample = noise - v, so v = noise - sample for each branch.
    v = (noise - neg) + 3.0 * ((noise - cond) - (noise - neg))
    torch.testing.assert_close(guided, noise - v, rtol=1e-4, atol=1e-4)


def test_zero_padded_text_is_compacted_without_changing_the_sample():
    model = _tiny_flux()
    p = model.params
    b, h, w = 2, 4, 4
    g = torch.Generator().manual_seed(3)
    txt, vec = _prompt(p, b, 32, g)
    txt[0, 4:], txt[1, 9:] = 0, 0  # zero-padded prompts, as the embedded encoder gives them
    neg = (torch.cat([torch.randn(1, 2, p.context_in_dim, generator=g), torch.zeros(1, 30, p.context_in_dim)], 1),
           torch.randn(1, p.vec_in_dim, generator=g))
    seen = []

    class Recording(nn.Module):
        def forward(self, *args, **kwargs):
            seen.append(args[2].shape[1])
            return model(*args, **kwargs)

    times = [1.0, 0.6, 0.0]
    kw = dict(height=h, width=w, seed=4, timesteps=times, guidance=2.5 if p.guidance_embed else None)
    out = _sample(Recording(), [], txt, vec, cfg_scale=3.0, uncond=neg, **kw)
    assert seen == [10, 10]  # one 2B forward per step, on 10 of the 32 text rows (longest prompt + 1)
    # The same Euler steps by hand on the full 32 rows.
    x = packing.pack(get_noise(b, h, w, seed=4, device="cpu", dtype=torch.float32))
    ids, full_txt = packing.make_ids(b, h, w), torch.cat([txt, neg[0].expand(b, -1, -1)])
    for t_curr, t_prev in zip(times[:-1], times[1:], strict=True):
        tt = torch.full((2 * b,), t_curr)
        gg = None if kw["guidance"] is None else torch.full((2 * b,), 2.5)
        with torch.no_grad():
            v_cond, v_neg = model(x.repeat(2, 1, 1), ids.repeat(2, 1, 1), full_txt, packing.txt_ids(2 * b, 32), tt,
                                  torch.cat([vec, neg[1].expand(b, -1)]), guidance=gg).chunk(2)
        x = x + (t_prev - t_curr) * (v_neg + 3.0 * (v_cond - v_neg))
    torch.testing.assert_close(out, packing.unpack(x, h, w), rtol=1e-4, atol=1e-4)
