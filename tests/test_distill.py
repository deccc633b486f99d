"""Distillation math against hand computations, students made from teachers, and the guidance
distillation stage (its loss against an independent computation, a fast_dev_run and a short
run with export through the real `train.py` composition)."""

from __future__ import annotations

import dataclasses
import json
import math

import pytest
import torch
from distill_setup import TINY_NO_GUIDANCE, compose_distill, one_thread, shared_setting  # noqa: F401
from fit_record import FitRecord
from tiny_kontext import random_flux, text_encoder

from kontext.diffusion import distill, flow, sampling
from kontext.errors import KontextError
from kontext.network import packing
from kontext.network.model import build_flux, get_params, load_flux
from kontext.run import run
from kontext.stages.teacher import Teacher, init_student, load_teacher


# ----------------------------------------------------------------------------- plain math
def test_guided_velocity_by_hand():
    cond = torch.tensor([[[1.0, 2.0]], [[0.0, -1.0]]])
    uncond = torch.tensor([[[0.5, 1.0]], [[1.0, 1.0]]])
    assert torch.equal(flow.cfg_velocity(cond, uncond, 3.0), torch.tensor([[[2.0, 4.0]], [[-2.0, -5.0]]]))
    # one scale per sample: w = 1 gives the conditional velocity, w = 0 the unconditional one
    out = flow.cfg_velocity(cond, uncond, torch.tensor([1.0, 0.0]))
    assert torch.equal(out, torch.stack([cond[0], uncond[1]]))


def test_guidance_scales_are_uniform_in_the_range():
    g = torch.Generator().manual_seed(1)
    w = distill.sample_guidance(20000, 1.5, 4.5, generator=g)
    assert w.shape == (20000,) and w.min() >= 1.5 and w.max() <= 4.5
    assert abs(w.mean().item() - 3.0) < 0.03 and abs(w.var().item() - 9 / 12) < 0.03
    assert torch.equal(w, distill.sample_guidance(20000, 1.5, 4.5, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError):
        distill.sample_guidance(2, 3.0, 1.0)


def test_x0_prediction_and_renoising_by_hand():
    # x_t = 1, v = 2 at t = 0.25: x0_hat = 1 - 0.25 * 2 = 0.5
    assert distill.predict_x0(torch.ones(1, 1, 1), torch.full((1, 1, 1), 2.0), 0.25).item() == 0.5
    # x0 = 2, eps = -1 at t_hat = 0.25: 0.75 * 2 + 0.25 * (-1) = 1.25; per-sample t_hat broadcasts
    x0, eps = torch.tensor([[[2.0]], [[2.0]]]), torch.tensor([[[-1.0]], [[-1.0]]])
    assert distill.renoise(x0, eps, torch.tensor([0.25, 1.0])).flatten().tolist() == [1.25, -1.0]
    # the exact velocity makes x0_hat the clean sample again, at any time
    x, noise, t = torch.randn(3, 5, 4), torch.randn(3, 5, 4), torch.tensor([1.0, 0.6, 0.1])
    x_t = flow.interpolate(x, noise, t)
    torch.testing.assert_close(distill.predict_x0(x_t, flow.velocity_target(x, noise), t), x)


def test_renoise_levels_are_logit_normal():
    t = distill.sample_renoise_t(20000, m=1.0, s=1.0, generator=torch.Generator().manual_seed(0))
    z = torch.randn(20000, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(t, torch.sigmoid(1.0 + z).clamp(1e-3, 1 - 1e-3))
    assert abs(t.median().item() - 1 / (1 + math.exp(-1))) < 0.01  # median sigmoid(m): biased to noise
    assert t.min() >= 1e-3 and t.max() <= 1 - 1e-3


def test_student_times_come_from_the_set():
    times = [1.0, 0.75, 0.5, 0.25]
    t = distill.sample_student_t(400, times, generator=torch.Generator().manual_seed(0))
    assert set(t.tolist()) == set(times)
    assert set(distill.sample_student_t(50, times, [1, 0, 0, 0]).tolist()) == {1.0}
    with pytest.raises(ValueError):
        distill.sample_student_t(4, times, [0.5, 0.5])


def test_few_step_timesteps():
    times = [1.0, 0.75, 0.5, 0.25]
    assert distill.few_step_timesteps(times, 4) == [1.0, 0.75, 0.5, 0.25, 0.0]
    assert distill.few_step_timesteps(times, 2) == [1.0, 0.5, 0.0]
    assert distill.few_step_timesteps(times, 1) == [1.0, 0.0]
    with pytest.raises(ValueError):
        distill.few_step_timesteps(times, 3)


def test_hinge_losses_by_hand():
    real = torch.tensor([[2.0, 0.5], [-1.0, 0.0]])  # relu(1 - real): [[0, .5], [2, 1]] -> sums .5, 3
    fake = torch.tensor([[-2.0, 0.5], [0.0, -0.5]])  # relu(1 + fake): [[0, 1.5], [1, .5]] -> sums 1.5, 1.5
    assert distill.hinge_d_loss(real, fake).item() == pytest.approx(1.75 + 1.5)
    assert distill.hinge_g_loss(fake).item() == pytest.approx(1.0)  # -mean(-1.5, -0.5)
    d, g = distill.gan_losses("hinge")
    assert d is distill.hinge_d_loss and g is distill.hinge_g_loss
    with pytest.raises(ValueError):
        distill.gan_losses("wasserstein")


def test_non_saturating_losses_by_hand():
    real, fake = torch.tensor([[0.0, 1.0]]), torch.tensor([[2.0, -1.0]])
    sp = lambda v: math.log1p(math.exp(v))
    assert distill.ns_d_loss(real, fake).item() == pytest.approx(sp(0) + sp(-1) + sp(2) + sp(-1))
    assert distill.ns_g_loss(fake).item() == pytest.approx(sp(-2) + sp(1))


def test_r1_penalty_is_the_squared_input_gradient():
    a, c = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 0.5])
    x = torch.randn(4, 3, requires_grad=True)
    y = torch.randn(4, 2, requires_grad=True)
    logits = torch.stack([(x * a).sum(-1), (y * c).sum(-1) + x.pow(2).sum(-1)], dim=-1)  # (B, 2)
    # d(sum_k D_k)/dx = a + 2x, d/dy = c
    expected = ((a + 2 * x).pow(2).sum(-1) + c.pow(2).sum()).mean()
    penalty = distill.r1_penalty(logits, [x, y])
    torch.testing.assert_close(penalty, expected)
    penalty.backward()  # the graph is kept for the discriminator's update
    assert x.grad is not None


# --------------------------------------------------------------------------- teacher & student
def _tokens(b: int = 2, ctx_hw: tuple[int, int] = (8, 8)):
    tokens = packing.prepare(torch.randn(b, 16, 8, 8), [torch.randn(b, 16, *ctx_hw)])
    img, ids = tokens.joint()
    return tokens, img, ids, torch.randn(b, 6, 384), packing.txt_ids(b, 6), torch.randn(b, 384)


def test_teacher_guided_velocity_equals_two_forwards():
    """`sampling.velocity` with one guidance scale per sample (the teacher's target) against two
    plain forwards combined by hand."""
    teacher = random_flux(3, TINY_NO_GUIDANCE)
    tokens, img, ids, txt, txt_ids, vec = _tokens()
    t, w = torch.tensor([0.3, 0.8]), torch.tensor([2.0, 4.0])
    u_txt, u_vec = torch.randn(1, 6, 384), torch.randn(1, 384)
    with torch.no_grad():
        got = sampling.velocity(teacher, tokens, tokens.img, t, txt, vec, cfg_scale=w, uncond=(u_txt, u_vec))
        cond = teacher(img, ids, txt, txt_ids, t, vec)[:, : tokens.n_img]
        neg = teacher(img, ids, u_txt.expand(2, -1, -1), txt_ids, t, u_vec.expand(2, -1))[:, : tokens.n_img]
    torch.testing.assert_close(got, neg + w[:, None, None] * (cond - neg), atol=1e-5, rtol=1e-5)
    # Zero-padded text (the embedded encoder's) runs compacted, with the same result.
    pad = torch.zeros(2, 26, 384)
    txt, u_txt = torch.cat([txt, pad], 1), torch.cat([u_txt[:, :2], torch.zeros(1, 30, 384)], 1)
    txt_ids = packing.txt_ids(2, 32)
    with torch.no_grad():
        got = sampling.velocity(teacher, tokens, tokens.img, t, txt, vec, cfg_scale=w, uncond=(u_txt, u_vec))
        cond = teacher(img, ids, txt, txt_ids, t, vec)[:, : tokens.n_img]
        neg = teacher(img, ids, u_txt.expand(2, -1, -1), txt_ids, t, u_vec.expand(2, -1))[:, : tokens.n_img]
    torch.testing.assert_close(got, neg + w[:, None, None] * (cond - neg), atol=1e-5, rtol=1e-5)


def test_teacher_is_frozen_and_runs_with_its_own_guidance_input():
    """`Teacher` against the functions it stands for: CFG against the empty prompt of the text
    encoder it was given, its guidance input only when it has a guidance embedding."""
    tokens = packing.prepare(torch.randn(2, 16, 8, 8), [torch.randn(2, 16, 8, 8)])
    feats, empty = text_encoder().encode(["remove the red circle", "make it blue"]), text_encoder().encode([""])
    t, w = torch.tensor([0.3, 0.8]), torch.tensor([2.0, 4.0])
    for params, guidance in [("tiny", 2.5), (TINY_NO_GUIDANCE, None)]:
        model = random_flux(3, params).train()
        teacher = Teacher(model, guidance=2.5)
        assert teacher.load("cpu", text_encoder()) is model and teacher.guidance_input == guidance
        assert not model.training and not any(p.requires_grad for p in model.parameters())
        got = teacher.guided_velocity(tokens, tokens.img, t, feats.txt, feats.vec, w)
        expected = sampling.velocity(model, tokens, tokens.img, t, feats.txt, feats.vec, guidance, cfg_scale=w,
                                     uncond=(empty.txt, empty.vec))
        assert torch.equal(got, expected)
        times = [1.0, 0.5, 0.0]
        assert torch.equal(teacher.sample(tokens, tokens.img, feats.txt, feats.vec, times, 3.0),
                           sampling.denoise(model, tokens, tokens.img, feats.txt, feats.vec, times, guidance=guidance,
                                            cfg_scale=3.0, uncond=(empty.txt, empty.vec)))
    no_text = Teacher(random_flux(3))
    no_text.load("cpu")
    no_text.sample(tokens, tokens.img, feats.txt, feats.vec, [1.0, 0.0], 1.0)  # no CFG: no empty prompt needed
    with pytest.raises(KontextError, match="text encoder"):
        no_text.guided_velocity(tokens, tokens.img, t, feats.txt, feats.vec, w)


def test_student_gets_a_zero_output_guidance_embedding_that_learns():
    teacher = random_flux(4, TINY_NO_GUIDANCE)
    student = build_flux("tiny")
    added = init_student(student, teacher)
    assert sorted(added) == ["guidance_in.in_layer.bias", "guidance_in.in_layer.weight",
                             "guidance_in.out_layer.bias", "guidance_in.out_layer.weight"]
    for name, p in teacher.state_dict().items():
        assert torch.equal(student.state_dict()[name], p), name
    tokens, img, ids, txt, txt_ids, vec = _tokens()
    t = torch.tensor([0.5, 0.9])
    with torch.no_grad():
        ref = teacher(img, ids, txt, txt_ids, t, vec)
    for g in (1.0, 5.0):  # the student is the teacher for every guidance value
        assert torch.equal(student(img, ids, txt, txt_ids, t, vec, torch.full((2,), g)), ref)
    student(img, ids, txt, txt_ids, t, vec, torch.tensor([1.0, 5.0])).square().mean().backward()
    assert student.guidance_in.out_layer.weight.grad.abs().sum() > 0  # not a dead embedder


def test_student_architecture_must_match_the_teacher():
    teacher = random_flux(0, TINY_NO_GUIDANCE)
    with pytest.raises(KontextError, match="architecture"):
        init_student(build_flux(dataclasses.replace(get_params("tiny"), depth=3)), teacher)
    with pytest.raises(KontextError, match="guidance_embed"):
        init_student(build_flux(TINY_NO_GUIDANCE), random_flux(0, "tiny"))


def test_distill_loss_regresses_onto_the_guided_teacher():
    from kontext.stages.guidance_distill import GuidanceDistillStage

    teacher = random_flux(5, TINY_NO_GUIDANCE)
    stage = GuidanceDistillStage(get_params("tiny"), teacher=Teacher(teacher), text=text_encoder())
    stage.setup("fit")
    x, ctx = torch.randn(2, 16, 8, 8), [torch.randn(2, 16, 8, 8)]
    feats = text_encoder().encode(["make the red circle blue", "remove the square"])
    u = text_encoder().encode([""])
    # At w = 1 the target is the teacher's conditional velocity, which the fresh student equals.
    torch.manual_seed(0)
    assert stage.distill_loss(x, ctx, feats.txt, feats.vec, torch.ones(2)).item() == pytest.approx(0.0, abs=1e-10)
    # At w = 3 the student (= conditional) misses by 2 (cond - uncond): an independent computation.
    torch.manual_seed(1)
    loss = stage.distill_loss(x, ctx, feats.txt, feats.vec, torch.full((2,), 3.0))
    torch.manual_seed(1)
    tokens = packing.prepare(x, ctx)
    noise = torch.randn_like(tokens.img)
    t = flow.sample_t(2, flow.mu_for_tokens(tokens.n_img), 1.0)
    img, ids = tokens.joint(flow.interpolate(tokens.img, noise, t))
    with torch.no_grad():
        cond = teacher(img, ids, feats.txt, packing.txt_ids(2, 32), t, feats.vec)[:, : tokens.n_img]
        neg = teacher(img, ids, u.txt.expand(2, -1, -1), packing.txt_ids(2, 32), t, u.vec.expand(2, -1))
    expected = (2 * (cond - neg[:, : tokens.n_img])).square().mean()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-7)


def test_teacher_paths_follow_the_guided_sampler_and_start_staggered():
    from kontext.diffusion.sampling import denoise
    from kontext.stages.guidance_distill import GuidanceDistillStage

    teacher = random_flux(7, TINY_NO_GUIDANCE)
    steps = 3
    stage = GuidanceDistillStage(get_params("tiny"), teacher=Teacher(teacher), text=text_encoder(), points="teacher",
                                 trajectory_steps=steps, guidance_range=(4.0, 4.0))
    stage.setup("fit")
    feats = text_encoder().encode(["make the red circle blue", "remove the green square"])
    # A different batch at every call: a path must keep the batch it started with.
    batches = [{"target_latent": torch.randn(2, 16, 8, 8), "reference_latents": [torch.randn(2, 16, 8, 8)],
                "txt": feats.txt, "vec": feats.vec} for _ in range(steps * steps + 1)]
    gen = torch.Generator().manual_seed(0)
    for i in range(steps * steps):
        if i == steps:  # slot 0's second visit: its loss is taken at the point before the step
            path = stage._paths[0]
            x, t = path.x.clone(), torch.full((2,), path.times[1])
            img, ids = path.tokens.joint(x)
            empty, n = text_encoder().encode([""]), path.tokens.n_img
            with torch.no_grad():  # the teacher's CFG target and the student's prediction, by plain forwards
                cond = teacher(img, ids, feats.txt, packing.txt_ids(2, 32), t, feats.vec)[:, :n]
                neg = teacher(img, ids, empty.txt.expand(2, -1, -1), packing.txt_ids(2, 32), t,
                              empty.vec.expand(2, -1))[:, :n]
                pred = stage.model(img, ids, feats.txt, packing.txt_ids(2, 32), t, feats.vec, torch.full((2,), 4.0))
            expected_loss = flow.flow_loss(pred[:, :n], neg + 4.0 * (cond - neg))
            loss = stage.path_loss(batches[i], gen)[0]
            torch.testing.assert_close(loss.detach(), expected_loss, rtol=1e-4, atol=1e-7)
            assert loss.item() > 0  # w = 4: the fresh student (= conditional) misses
            continue
        stage.path_loss(batches[i], gen)
        if i < steps:  # slot i's first path starts at step i (slot 0 from noise), then takes one step
            assert stage._paths[i].step == i + 1
    path = stage._paths[0]
    assert path.done and path.step == steps
    # Slot 0 took three guided Euler steps from its noise (the generator's first draw), on its
    # own batch: exactly the teacher's CFG sampler.
    tokens = packing.prepare(batches[0]["target_latent"], batches[0]["reference_latents"])
    x0 = torch.randn(tokens.img.shape, generator=torch.Generator().manual_seed(0))
    expected = denoise(teacher, tokens, x0, feats.txt, feats.vec, flow.schedule(steps, tokens.n_img), cfg_scale=4.0,
                       uncond=text_encoder().encode([""]))
    torch.testing.assert_close(path.x, expected, rtol=1e-4, atol=1e-5)
    # The next visit of slot 0 starts a new path, from noise, on the batch it is given.
    stage.path_loss(batches[-1], gen)
    assert stage._paths[0].step == 1
    assert torch.equal(stage._paths[0].tokens.ctx, packing.prepare(batches[-1]["target_latent"],
                                                                   batches[-1]["reference_latents"]).ctx)


def test_guidance_distill_points_must_be_known():
    from kontext.stages.guidance_distill import GuidanceDistillStage

    with pytest.raises(KontextError, match="stage.points"):
        GuidanceDistillStage(get_params("tiny"), teacher="unused", points="student")
    with pytest.raises(KontextError, match="trajectory_steps"):
        GuidanceDistillStage(get_params("tiny"), teacher="unused", points="teacher", trajectory_steps=0)


def test_guidance_embedder_learns_at_its_own_rate():
    import lightning as L

    from kontext.stages.guidance_distill import GuidanceDistillStage

    stage = GuidanceDistillStage(get_params("tiny"), teacher=Teacher(random_flux(6, TINY_NO_GUIDANCE)),
                                 text=text_encoder(), guidance_lr=1e-2, optimizer={"lr": 1e-4, "warmup_steps": 10})
    stage.setup("fit")
    before = {k: v.clone() for k, v in stage.model.state_dict().items()}
    feats = text_encoder().encode(["make the red circle blue", "remove the green square"])
    batch = {"target_latent": torch.randn(2, 16, 8, 8), "reference_latents": [torch.randn(2, 16, 8, 8)],
             "txt": feats.txt, "vec": feats.vec}
    trainer = L.Trainer(accelerator="cpu", max_steps=1, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader([batch], batch_size=None))
    groups = trainer.optimizers[0].param_groups
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == sum(1 for p in stage.model.parameters() if p.requires_grad)
    # Adam's first step moves each weight by lr * sign(grad); the warm-up factor is 1/10.
    step = {k: (v - before[k]).abs().max().item() for k, v in stage.model.state_dict().items()}
    assert step["guidance_in.out_layer.weight"] == pytest.approx(1e-2 / 10, rel=1e-2)
    assert step["img_in.weight"] == pytest.approx(1e-4 / 10, rel=1e-2)


# --------------------------------------------------------------------- the real composition
@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> dict:
    return shared_setting(tmp_path_factory)


def test_guidance_distill_fast_dev_run(setting, tmp_path):
    FitRecord.last = None
    run(compose_distill(setting, "embedded_guidance_distill", tmp_path / "run",
                        ["trainer.fast_dev_run=true", "+callbacks.record._target_=fit_record.FitRecord"]))
    fit = FitRecord.last
    assert fit.steps == 1 and fit.metrics["train/loss"] > 0  # w in [3, 5]: the fresh student misses
    # The student and its EMA took the step; the teacher, frozen, is the run it was read from.
    assert "model.img_in.weight" in fit.moved and "ema.model.img_in.weight" in fit.moved
    teacher = fit.module.teacher.model
    assert not any(p.requires_grad for p in teacher.parameters())
    for name, value in load_teacher(setting["teacher"]).state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name


@pytest.mark.parametrize("points", ["data", "teacher"])
def test_guidance_distill_trains_and_exports_a_guidance_model(setting, tmp_path, points):
    cfg = compose_distill(setting, "embedded_guidance_distill", tmp_path / "run",
                          ["trainer.max_steps=3", f"stage.points={points}", "stage.finish.benchmark.n_per_op=1",
                           "stage.finish.sampler.steps=2", "stage.finish.sampler.guidance=2.5"])
    metrics = run(cfg)
    assert metrics["steps"] == 3
    export = tmp_path / "run" / "export"
    config = json.loads((export / "config.json").read_text())
    assert config["model"]["guidance_embed"] is True
    assert config["sampler"]["cfg"] == 1.0 and config["sampler"]["guidance"] == 2.5
    student = load_flux(export / "transformer.safetensors")
    teacher = load_teacher(setting["teacher"])
    assert student.params.guidance_embed and not teacher.params.guidance_embed
    assert not torch.equal(student.img_in.weight, teacher.img_in.weight)  # trained, from the teacher
