"""The LADD discriminator and stage: features are the target image tokens of the chosen
blocks (checked against an independent forward), a generator update moves the student only
(through the frozen teacher, whose weights get no gradient and stay bit-identical), a
discriminator update moves the heads only, and the stage runs through the real composition."""

from __future__ import annotations

import json

import lightning as L
import pytest
import torch
from distill_setup import compose_distill, one_thread, shared_setting  # noqa: F401
from fit_record import FitRecord
from tiny_kontext import random_flux, text_encoder

from kontext.errors import KontextError
from kontext.network import packing
from kontext.network.discriminator import Discriminator, block_features, resolve_blocks
from kontext.network.layers import timestep_embedding
from kontext.network.model import TIME_EMBED_DIM, get_params
from kontext.run import run
from kontext.stages.ladd import LADDStage
from kontext.stages.teacher import Teacher, load_teacher


def _inputs(b: int = 2, target_hw=(8, 8), ctx_hw=(12, 8), n_txt: int = 5):
    tokens = packing.prepare(torch.randn(b, 16, *target_hw), [torch.randn(b, 16, *ctx_hw)])
    img, ids = tokens.joint()
    return tokens, img, ids, torch.randn(b, n_txt, 384), packing.txt_ids(b, n_txt), torch.rand(b), torch.randn(b, 384)


def _manual_image_streams(model, img, ids, txt, txt_ids, t, y, guidance) -> list[torch.Tensor]:
    """The image-token stream after every block, by an independent walk through the network."""
    x = model.img_in(img)
    vec = model.time_in(timestep_embedding(t, TIME_EMBED_DIM)) + model.guidance_in(
        timestep_embedding(guidance, TIME_EMBED_DIM)) + model.vector_in(y)
    txt = model.txt_in(txt)
    pe = model.pe_embedder(torch.cat((txt_ids, ids), dim=1))
    out = []
    for block in model.double_blocks:
        x, txt = block(img=x, txt=txt, vec=vec, pe=pe)
        out.append(x)
    h = torch.cat((txt, x), dim=1)
    for block in model.single_blocks:
        h = block(h, vec=vec, pe=pe)
        out.append(h[:, txt.shape[1]:])
    return out


def test_features_are_the_target_image_tokens_on_their_grid():
    model = random_flux(1)
    tokens, img, ids, txt, txt_ids, t, y = _inputs()
    g = torch.full((2,), 2.0)
    blocks = resolve_blocks(model, None)
    assert blocks == [0, 1, 2, 3]
    with torch.no_grad():
        feats = block_features(model, blocks, tokens, tokens.img, t, txt, y, g)
        streams = _manual_image_streams(model, img, ids, txt, txt_ids, t, y, g)
    assert img.shape[1] == 16 + 24  # target 4x4 tokens, then a 6x4 context
    for feat, stream in zip(feats, streams, strict=True):
        assert feat.shape == (2, 64, 4, 4)  # (B, D, h, w): no text and no context token
        target = stream[:, :16]  # the target tokens, row-major over the 4x4 grid
        torch.testing.assert_close(feat.flatten(2).transpose(1, 2), target, atol=1e-5, rtol=1e-5)
        assert torch.equal(feat[:, :, 1, 2], feat.flatten(2)[:, :, 1 * 4 + 2])


def test_features_with_compacted_text_equal_the_full_padding():
    model = random_flux(1)
    tokens, img, ids, txt, txt_ids, t, y = _inputs()
    g, blocks = torch.full((2,), 2.0), resolve_blocks(model, None)
    padded = torch.cat([txt, torch.zeros(2, 32 - txt.shape[1], txt.shape[2])], dim=1)
    short, mult = packing.compact_text(padded)
    assert mult is not None and short.shape[1] < 32
    with torch.no_grad():
        full = block_features(model, blocks, tokens, tokens.img, t, padded, y, g, compact=False)
        compact = block_features(model, blocks, tokens, tokens.img, t, padded, y, g)
    for a, b in zip(compact, full, strict=True):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_features_stop_after_the_deepest_chosen_block():
    model = random_flux(2)
    calls = []
    model.single_blocks[1].register_forward_hook(lambda *a: calls.append("single1"))
    model.final_layer.register_forward_hook(lambda *a: calls.append("final"))
    tokens, _, _, txt, _, t, y = _inputs(target_hw=(8, 12), ctx_hw=(8, 8))
    feats = block_features(model, resolve_blocks(model, [0, -2]), tokens, tokens.img, t, txt, y, torch.ones(2))
    assert [f.shape for f in feats] == [(2, 64, 4, 6)] * 2
    assert calls == []
    assert not model.double_blocks[0]._forward_hooks and not model.single_blocks[0]._forward_hooks  # removed
    with pytest.raises(ValueError):
        resolve_blocks(model, [4])


def test_discriminator_logits_per_head_conditioned_on_t_hat_and_text():
    disc = Discriminator(dim=64, vec_dim=384, n_heads=3, channels=16)
    feats = [torch.randn(2, 64, 4, 4) for _ in range(3)]
    y, t = torch.randn(2, 384), torch.tensor([0.2, 0.9])
    logits = disc(feats, t, y)
    assert logits.shape == (2, 3)
    for head in disc.heads:  # FiLM starts neutral; once trained it reads t_hat and the text vector
        torch.nn.init.normal_(head.film.weight, std=0.5)
    assert not torch.allclose(disc(feats, t, y), disc(feats, t.flip(0), y))
    assert not torch.allclose(disc(feats, t, y), disc(feats, t, torch.randn(2, 384)))


# ------------------------------------------------------------------------------ stage updates
def _stage(**kwargs) -> LADDStage:
    settings = {"reals": {"steps": 2, "cfg": 2.0}, "optimizer": {"lr": 1e-3, "warmup_steps": 1},
                "discriminator_optimizer": {"lr": 1e-3}, "discriminator": {"blocks": [1, 3], "channels": 16},
                "finish": {"sampler": {"t2i_size": 64}}, **kwargs}
    stage = LADDStage(get_params("tiny"), teacher=Teacher(random_flux(7)), text=text_encoder(), **settings)
    stage.setup("fit")
    return stage


def _fit(stage: LADDStage, steps: int) -> None:
    feats = text_encoder().encode(["make the red circle blue", "remove the green square"])
    batch = {"target_latent": torch.randn(2, 16, 8, 8), "reference_latents": [torch.randn(2, 16, 8, 8)],
             "txt": feats.txt, "vec": feats.vec}
    trainer = L.Trainer(accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(stage, train_dataloaders=torch.utils.data.DataLoader([batch] * steps, batch_size=None))


def _snapshot(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _changed(before: dict, module) -> set[str]:
    return {k for k, v in module.state_dict().items() if not torch.equal(before[k], v)}


def test_generator_update_trains_the_student_through_the_frozen_teacher():
    stage = _stage(updates={"generator": 1, "discriminator": 1})
    teacher = stage.teacher.model
    before = {"teacher": _snapshot(teacher), "student": _snapshot(stage.model), "heads": _snapshot(stage.discriminator)}
    assert not any(p.requires_grad for p in teacher.parameters())
    _fit(stage, 1)  # update 0 of the cycle is the student's
    assert all(p.grad is None for p in teacher.parameters())
    assert _changed(before["teacher"], teacher) == set()  # bit-identical
    # The generator loss reaches the student only through the teacher's features.
    assert "img_in.weight" in _changed(before["student"], stage.model)
    assert _changed(before["heads"], stage.discriminator) == set()
    assert stage.loss_history and stage.trainer.global_step == 1


@pytest.mark.parametrize("adversarial_weight", [1.0, 0.5, 0.0])
def test_generator_loss_weighs_adversarial_and_regression_terms(adversarial_weight):
    stage = _stage(reals={"source": "data"}, distill_weight=3.0, adversarial_weight=adversarial_weight)
    _fit(stage, 1)
    m = stage.trainer.callback_metrics
    expected = adversarial_weight * m["train/g_adv"] + 3.0 * m["train/g_distill"]
    torch.testing.assert_close(m["train/g_loss"], expected)
    assert m["train/g_adv"].abs() > 0 and m["train/g_distill"] > 0


def test_discriminator_update_trains_the_heads_only():
    stage = _stage(updates={"generator": 0, "discriminator": 1}, r1_weight=0.1, reals={"source": "data"})
    before = {"teacher": _snapshot(stage.teacher.model), "student": _snapshot(stage.model),
              "heads": _snapshot(stage.discriminator)}
    _fit(stage, 1)
    assert _changed(before["teacher"], stage.teacher.model) == set()
    assert _changed(before["student"], stage.model) == set()
    assert "heads.0.conv_in.weight" in _changed(before["heads"], stage.discriminator)
    assert {"train/d_loss", "train/r1", "train/d_real", "train/d_fake"} <= set(stage.trainer.callback_metrics)


def test_teacher_reals_come_with_the_noise_they_were_sampled_from():
    from kontext.diffusion.flow import schedule
    from kontext.diffusion.sampling import denoise

    stage = _stage()
    tokens, _, _, _, _, _, _ = _inputs(ctx_hw=(8, 8))
    feats = text_encoder().encode(["remove the red circle", "add a blue square in the top left"])
    stage._gen = torch.Generator().manual_seed(3)
    x0, noise = stage.clean_samples(tokens.img, tokens, feats.txt, feats.vec)
    empty = text_encoder().encode([""])
    expected = denoise(stage.teacher.model, tokens, noise, feats.txt, feats.vec, schedule(2, tokens.n_img), guidance=1.0,
                       cfg_scale=2.0, uncond=(empty.txt, empty.vec))
    torch.testing.assert_close(x0, expected)  # the teacher's CFG sample of exactly this noise
    stage.reals_cfg.source = "data"
    x0, noise = stage.clean_samples(tokens.img, tokens, feats.txt, feats.vec)
    assert torch.equal(x0, tokens.img) and noise.shape == x0.shape


def test_simulated_student_inputs_are_its_own_sampler_path():
    from kontext.diffusion.sampling import denoise

    stage = _stage(student_inputs="simulate", student_guidance=2.0)
    tokens, _, _, _, _, _, _ = _inputs(b=4, ctx_hw=(8, 8))
    feats = text_encoder().encode(["remove the red circle", "add a blue square in the top left", "make it red",
                                   "remove the square"])
    noise = torch.randn_like(tokens.img)
    t = torch.tensor([1.0, 0.75, 0.5, 0.25])
    x_t = stage.simulate(noise, t, tokens, feats.txt, feats.vec)
    assert torch.equal(x_t[0], noise[0])  # t = 1: the sampler's start
    for i, times in [(1, [1.0, 0.75]), (2, [1.0, 0.75, 0.5]), (3, [1.0, 0.75, 0.5, 0.25])]:
        expected = denoise(stage.model, tokens, noise, feats.txt, feats.vec, times, guidance=2.0)
        torch.testing.assert_close(x_t[i], expected[i], rtol=1e-4, atol=1e-5)
    assert not torch.allclose(x_t[3], torch.lerp(tokens.img, noise, 0.25)[3])  # not the data's point
    # A batch all at t = 1 stays at its noise.
    assert torch.equal(stage.simulate(noise, torch.ones(4), tokens, feats.txt, feats.vec), noise)


def test_unknown_student_inputs_are_refused():
    with pytest.raises(KontextError, match="student_inputs"):
        _stage(student_inputs="teacher")


def test_update_cycle_and_sampler():
    stage = _stage(updates={"generator": 1, "discriminator": 2}, student_guidance=2.0,
                   finish={"sampler": {"timesteps": [1.0, 0.5, 0.0]}})
    assert [stage.is_generator_update(i) for i in range(6)] == [True, False, False, True, False, False]
    from tiny_kontext import random_autoencoder

    stage._frozen["autoencoder"] = random_autoencoder()
    sampler = stage.pipeline().sampler
    assert sampler.timesteps == [1.0, 0.5, 0.0] and sampler.cfg == 1.0 and sampler.guidance == 2.0
    with pytest.raises(KontextError, match="student timesteps"):
        _stage(finish={"sampler": {"timesteps": [1.0, 0.3, 0.0]}})


# --------------------------------------------------------------------- the real composition
@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> dict:
    return shared_setting(tmp_path_factory)


@pytest.mark.parametrize(("reals", "inputs"), [("teacher", "data"), ("data", "data"), ("data", "simulate")])
def test_ladd_fast_dev_run(setting, tmp_path, reals, inputs):
    FitRecord.last = None
    run(compose_distill(setting, "embedded_ladd", tmp_path / "run",
                        ["trainer.fast_dev_run=true", f"stage.reals.source={reals}", "stage.reals.steps=2",
                         "stage.distill_weight=0.5", f"stage.student_inputs={inputs}",
                         "+callbacks.record._target_=fit_record.FitRecord"]))
    fit = FitRecord.last
    # Update 0 of the cycle is the student's: its loss is the weighted sum of its two terms.
    assert fit.steps == 1 and {"train/g_loss", "train/g_adv", "train/g_distill"} <= set(fit.metrics)
    assert "train/d_loss" not in fit.metrics
    assert fit.metrics["train/g_loss"] == pytest.approx(fit.metrics["train/g_adv"] + 0.5 * fit.metrics["train/g_distill"],
                                                        rel=1e-5)
    # The student and its EMA moved, the discriminator's heads did not; the teacher is the run it was read from.
    assert "model.img_in.weight" in fit.moved and "ema.model.img_in.weight" in fit.moved
    assert not any(name.startswith("discriminator.") for name in fit.moved)
    teacher = fit.module.teacher.model
    for name, value in load_teacher(setting["teacher"]).state_dict().items():
        assert torch.equal(teacher.state_dict()[name], value), name


def test_ladd_trains_and_exports_its_few_step_sampler(setting, tmp_path):
    cfg = compose_distill(setting, "embedded_ladd", tmp_path / "run",
                          ["trainer.max_steps=4", "stage.reals.steps=2", "stage.finish.benchmark.n_per_op=1"])
    metrics = run(cfg)
    assert metrics["steps"] == 4  # two student and two discriminator updates
    sampler = json.loads((tmp_path / "run" / "export" / "config.json").read_text())["sampler"]
    assert sampler["timesteps"] == [1.0, 0.75, 0.5, 0.25, 0.0] and sampler["cfg"] == 1.0
    bench = json.loads((tmp_path / "run" / "benchmark.json").read_text())
    assert bench["sampler"]["timesteps"] == [1.0, 0.75, 0.5, 0.25, 0.0]


def test_ladd_refuses_trainer_gradient_clipping(setting, tmp_path, capsys):
    cfg = compose_distill(setting, "embedded_ladd", tmp_path / "run",
                          ["trainer.fast_dev_run=true", "trainer.gradient_clip_val=1.0"])
    with pytest.raises(SystemExit):
        run(cfg)
    assert "trainer.gradient_clip_val=null" in capsys.readouterr().err


@pytest.mark.slow
def test_distillation_benchmark_measures_every_row(tmp_path):
    import importlib.util

    from tiny_kontext import tiny_pipeline

    from kontext.export import export
    from kontext.run import CONFIG_DIR

    script = CONFIG_DIR.parent / "benchmarks" / "distillation.py"
    spec = importlib.util.spec_from_file_location("distillation", script)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    export(tiny_pipeline(seed=1), tmp_path / "teacher")
    export(tiny_pipeline(seed=2), tmp_path / "guided")
    export(tiny_pipeline(seed=3, timesteps=[1.0, 0.75, 0.5, 0.25, 0.0]), tmp_path / "ladd")
    result = bench.main([f"teacher={tmp_path / 'teacher'}", f"guidance_student={tmp_path / 'guided'}",
                         f"ladd_student={tmp_path / 'ladd'}", "n=1", "steps=2", "full_steps=3",
                         f"out={tmp_path / 'out'}"])
    rows = {r["key"]: r for r in result["rows"]}
    assert list(rows) == ["teacher", "guidance", "ladd_1", "ladd_2", "ladd_4", "teacher_1", "teacher_2",
                          "teacher_4", "teacher_full"]
    assert [rows[k]["nfe_per_image"] for k in rows] == [4, 2, 1, 2, 4, 2, 4, 8, 6]
    assert rows["ladd_2"]["sampler"]["timesteps"] == [1.0, 0.5, 0.0]
    assert all(r["images"] == 6 and r["seconds_per_image"] > 0 for r in rows.values())
    assert [c["check"].split()[0] for c in result["checks"]] == ["guidance-distilled", "LADD"]
    assert (tmp_path / "out" / "distillation.md").is_file()
