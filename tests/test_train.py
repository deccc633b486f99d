"""The real `train.py` composition: every config composes and instantiates, every stage runs a
`fast_dev_run` on the tiny preset, and bad input is a one-line error."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf

from kontext.latent.autoencoder import AE_PRESETS, AutoEncoder, save_autoencoder
from kontext.run import CONFIG_DIR, register_resolvers, run

ROOT = CONFIG_DIR.parent
register_resolvers()


@pytest.fixture(scope="module")
def random_ae(tmp_path_factory) -> str:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("ae") / "ae.safetensors"
    save_autoencoder(AutoEncoder(AE_PRESETS["embedded"]), path)
    return str(path)


def compose_train(overrides: list[str]):
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)


def group_options() -> list[tuple[str, str]]:
    return sorted((p.parent.name, p.stem) for p in CONFIG_DIR.glob("*/*.yaml") if p.parent.name != "hydra")


def tiny_overrides(tmp_path: Path, random_ae: str) -> list[str]:
    return [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", f"paths.autoencoder={random_ae}",
            "model=tiny", "logger=csv", "prepare.shapes_edit.n=64", "prepare.shapes_edit.shard_size=32",
            "data.batch_size=8", "data.epoch_samples=64"]


@pytest.mark.parametrize(("group", "option"), group_options())
def test_every_config_composes_and_instantiates(group, option, tmp_path, random_ae, monkeypatch):
    if group == "text" and option == "t5_clip":
        from test_text import save_tiny_clip, save_tiny_t5

        monkeypatch.setenv("KONTEXT_T5_PATH", str(save_tiny_t5(tmp_path / "t5")))
        monkeypatch.setenv("KONTEXT_CLIP_PATH", str(save_tiny_clip(tmp_path / "clip")))
    overrides = [f"{group}={option}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run",
                 f"paths.autoencoder={random_ae}"]
    if group == "text" and option == "t5_clip":
        overrides += ["text.txt_dim=null", "text.vec_dim=null"]  # the tiny folders are not 4096/768-d
    if group == "trainer" and not torch.cuda.is_available():
        overrides.append("trainer.accelerator=cpu")  # everything else of a GPU preset instantiates here
    if group == "experiment" and option == "photo_lora":  # a LoRA starts from a base file
        from kontext.data.photo_edits import write_random_base

        write_random_base(tmp_path / "data" / "photo_base.safetensors")
    cfg = compose_train(overrides)
    node = cfg[group] if group != "experiment" else cfg
    if group == "experiment":
        # An experiment is a whole run: its stage, data and trainer must instantiate.
        for key in ("data", "stage", "trainer"):
            assert instantiate(cfg[key]) is not None
        return
    if group == "prepare":
        return  # composing is checked here; running the steps is the fast_dev_run test's
    obj = instantiate(node)
    assert obj is not None


@pytest.mark.parametrize(("experiment", "stage"), [("embedded_guidance_distill", "guidance_distill"),
                                                   ("embedded_ladd", "ladd")])
def test_distillation_experiments_keep_their_stage_optimizer(experiment, stage):
    """They build on experiment=embedded; the flow stage's from-scratch lr must not leak in."""
    own = OmegaConf.load(CONFIG_DIR / "stage" / f"{stage}.yaml").optimizer
    chosen = OmegaConf.select(OmegaConf.load(CONFIG_DIR / "experiment" / f"{experiment}.yaml"),
                              "stage.optimizer", default={})
    assert compose_train([f"experiment={experiment}"]).stage.optimizer == OmegaConf.merge(own, chosen)


def test_model_yaml_mirrors_the_dataclass():
    from dataclasses import asdict, fields

    from kontext.network.model import FLUX_PRESETS, FluxParams

    names = {f.name for f in fields(FluxParams)}
    for name, preset in FLUX_PRESETS.items():
        node = OmegaConf.load(CONFIG_DIR / "model" / f"{name}.yaml")
        assert set(node) - {"_target_"} == names
        assert asdict(instantiate(node)) == asdict(preset)


def test_flow_stage_fast_dev_run_through_the_real_composition(tmp_path, random_ae):
    cfg = compose_train([*tiny_overrides(tmp_path, random_ae), "trainer.fast_dev_run=true"])
    run(cfg)
    # The prepare steps ran for real: shards and a feature cache exist.
    assert list((tmp_path / "data/shards/shapes_edit/train").glob("*.tar"))
    assert (tmp_path / "data/cache/shapes_edit/train/manifest.json").is_file()
    assert (tmp_path / "run/config.yaml").is_file()


def test_flow_stage_trains_and_finishes(tmp_path, random_ae):
    cfg = compose_train([*tiny_overrides(tmp_path, random_ae), "trainer.max_steps=4",
                         "stage.finish.benchmark.n_per_op=1", "stage.finish.benchmark.chains=0",
                         "stage.finish.sampler.steps=2", "logger=none"])  # also: no logger is a valid choice
    metrics = run(cfg)
    run_dir = tmp_path / "run"
    assert metrics["steps"] == 4
    for name in ("benchmark.json", "benchmark.md", "benchmark_grid.png", "metrics.json", "loss_curve.csv",
                 "export/transformer.safetensors", "export/config.json", "checkpoints/last.ckpt"):
        assert (run_dir / name).is_file(), name
    bench = metrics["benchmark"]  # one case per operation: the overall rate is the mean of the six
    ops = ("recolor", "remove", "add", "move", "background", "t2i")
    assert all(bench[f"{op}/pass_rate"] in (0.0, 1.0) for op in ops)
    assert bench["pass_rate"] == pytest.approx(sum(bench[f"{op}/pass_rate"] for op in ops) / len(ops))
    assert json.loads((run_dir / "benchmark.json").read_text())["overall"]["pass_rate"] == bench["pass_rate"]
    # What ran it, for comparing two machines' times: instruction set, threads, measured matmul peak.
    machine = json.loads((run_dir / "metrics.json").read_text())["machine"]
    assert machine["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert machine["threads"] == torch.get_num_threads() and machine["fp32_matmul_gflops"] > 0
    # resume=auto: the same command finds the finished checkpoint and trains no further step.
    again = run(cfg)
    assert again["steps"] == 4


def test_autoencoder_stage_fast_dev_run(tmp_path, random_ae):
    from fit_record import FitRecord

    FitRecord.last = None
    cfg = compose_train(["experiment=embedded_autoencoder", f"paths.root_dir={tmp_path}",
                         f"paths.output_dir={tmp_path}/run", f"paths.autoencoder={tmp_path}/ae_out.safetensors",
                         "logger=csv", "trainer.fast_dev_run=true", "trainer.precision=32-true",
                         "data.batch_size=2", "+callbacks.record._target_=fit_record.FitRecord"])
    run(cfg)
    fit = FitRecord.last
    assert fit.steps == 1 and int(fit.module.train_images) == 2  # one batch of two scenes, no references
    m, w = fit.metrics, cfg.stage.loss  # the loss is the configured sum of its logged terms
    terms = m["train/rec"] + w.kl_weight * m["train/kl"] + w.l2_weight * m["train/l2"]
    assert m["train/loss"] == pytest.approx(terms + w.palette_weight * m["train/palette"], rel=1e-5)
    assert {"ae.encoder.conv_in.weight", "ae.decoder.conv_out.weight"} <= fit.moved
    assert "val/psnr" in m and "val/class_agreement" in m  # fast_dev_run validates one batch
    assert not (tmp_path / "ae_out.safetensors").exists()  # a fast_dev_run exports nothing


def _train_cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "train.py"), *args], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_unknown_override_is_one_line_error(tmp_path):
    out = _train_cli("no_such_key=1", cwd=tmp_path)
    assert out.returncode == 2
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error:") and "no_such_key" in lines[0], out.stderr


def test_missing_data_path_is_one_line_error(tmp_path, random_ae):
    out = _train_cli("prepare=none", "data=shapes_edit", f"data.shards={tmp_path}/nowhere",
                     f"paths.autoencoder={random_ae}", f"paths.root_dir={tmp_path}",
                     "model=tiny", "logger=csv", cwd=tmp_path)
    assert out.returncode == 2, out.stderr[-2000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "nowhere" in errors[0], out.stderr[-2000:]
    assert "Traceback" not in out.stderr


class _Oracle(torch.nn.Module):
    """Returns the exact velocity of the straight path for known clean target tokens."""

    def __init__(self, x_tokens, offset: float = 0.0):
        super().__init__()
        self.x_tokens, self.offset = x_tokens, offset
        self.seen_lengths, self.asked = [], []

    def forward(self, img, img_ids, txt, txt_ids, timesteps, y, guidance=None, n_out=None):
        n = self.x_tokens.shape[1]
        self.seen_lengths.append(img.shape[1])
        self.asked.append(n_out)
        t = timesteps.reshape(-1, 1, 1)
        return (img[:, :n] - self.x_tokens) / t + self.offset  # the target rows: all that is asked for


@pytest.mark.parametrize("offset", [0.0, 0.5])
def test_flow_stage_loss_is_zero_exactly_for_the_true_velocity(offset):
    from kontext.network import packing
    from kontext.network.model import FLUX_PRESETS
    from kontext.stages.flow import FlowStage

    stage = FlowStage(FLUX_PRESETS["tiny"])
    x = torch.randn(4, 16, 8, 8, dtype=torch.float64)
    ctx = [torch.randn(4, 16, 8, 8, dtype=torch.float64)]
    stage.model = _Oracle(packing.pack(x), offset).double()
    batch = {"target_latent": x, "reference_latents": ctx, "txt": torch.randn(4, 5, 384, dtype=torch.float64),
             "vec": torch.randn(4, 384, dtype=torch.float64)}
    stage.log = lambda *a, **k: None
    from types import SimpleNamespace

    stage._trainer = SimpleNamespace(global_step=0, accumulate_grad_batches=1, global_rank=0,
                                     strategy=SimpleNamespace(distributed_sampler_kwargs={"rank": 0}))
    loss = stage.training_step(batch, batch_idx=1)
    assert stage.model.seen_lengths == [32]  # 16 target + 16 context tokens went in
    assert stage.model.asked == [16]  # and only the target's predictions came out
    if offset == 0.0:
        assert loss.item() < 1e-10
    else:
        assert loss.item() == pytest.approx(offset**2, rel=1e-4)


def test_lr_factor_warms_up_then_decays_to_the_floor():
    from kontext.stages.schedule import lr_factor

    kw = {"warmup": 10, "total": 110, "floor": 0.1}
    assert lr_factor(0, **kw) == pytest.approx(0.1) and lr_factor(9, **kw) == pytest.approx(1.0)
    assert lr_factor(10, **kw) == pytest.approx(1.0)
    assert lr_factor(60, **kw) == pytest.approx(0.55)  # cosine half-way: (1 + floor) / 2
    assert lr_factor(110, **kw) == pytest.approx(0.1) and lr_factor(500, **kw) == pytest.approx(0.1)
    assert lr_factor(60, kind="linear", **kw) == pytest.approx(0.55)
    assert lr_factor(60, kind="none", **kw) == 1.0
    # A spent time budget pulls the decay ahead of the step count, never behind it.
    assert lr_factor(20, time_progress=1.0, **kw) == pytest.approx(0.1)
    assert lr_factor(60, time_progress=0.1, **kw) == pytest.approx(0.55)
    assert lr_factor(5, time_progress=1.0, **kw) == pytest.approx(0.6)  # warm-up stays step-based


@pytest.mark.parametrize("decay_by", ["steps", "max_time"])
def test_flow_stage_schedule_follows_the_time_budget_when_asked(decay_by, monkeypatch):
    import lightning as L
    from lightning.pytorch.callbacks import Timer

    from kontext.network.model import FLUX_PRESETS
    from kontext.stages.flow import FlowStage
    from kontext.stages.schedule import lr_factor

    stage = FlowStage(FLUX_PRESETS["tiny"], optimizer={"warmup_steps": 10, "decay_by": decay_by})
    trainer = L.Trainer(max_steps=110, max_time="00:00:10:00", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, accelerator="cpu")
    stage.trainer = trainer
    timer = next(c for c in trainer.callbacks if isinstance(c, Timer))
    monkeypatch.setattr(timer, "time_elapsed", lambda stage="train": 450.0)  # 3/4 of the budget spent
    monkeypatch.setattr(timer, "time_remaining", lambda stage="train": 150.0)
    factor = stage.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    progress = 0.75 if decay_by == "max_time" else 0.0
    assert factor(20) == pytest.approx(lr_factor(20, warmup=10, total=110, time_progress=progress))
    assert (factor(20) < 0.5) == (decay_by == "max_time")
    if decay_by == "max_time":  # several ranks follow rank 0's clock, so they share one lr
        from types import SimpleNamespace

        stage._trainer = SimpleNamespace(max_steps=110, callbacks=[timer], world_size=2,
                                         strategy=SimpleNamespace(broadcast=lambda obj, src=0: 0.25))
        factor = stage.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
        assert factor(20) == pytest.approx(lr_factor(20, warmup=10, total=110, time_progress=0.25))
    # Without a max_time there is no clock: the steps alone set the decay.
    stage.trainer = L.Trainer(max_steps=110, logger=False, enable_checkpointing=False, accelerator="cpu")
    factor = stage.configure_optimizers()["lr_scheduler"]["scheduler"].lr_lambdas[0]
    assert factor(20) == pytest.approx(lr_factor(20, warmup=10, total=110))


def test_flow_stage_refuses_a_bad_schedule():
    """When the stage is built, before any trainer exists."""
    from kontext.errors import KontextError
    from kontext.network.model import FLUX_PRESETS
    from kontext.stages.flow import FlowStage

    for optimizer, message in (({"decay": "cosin"}, "optimizer.decay must be"),
                               ({"decay_by": "time"}, "optimizer.decay_by must be")):
        with pytest.raises(KontextError, match=message):
            FlowStage(FLUX_PRESETS["tiny"], optimizer=optimizer)


def test_ema_update_is_the_warmed_up_average():
    from kontext.stages.ema import EMA

    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.LayerNorm(4))
    ema = EMA(net, decay=0.9)
    start = [p.detach().clone() for p in net.parameters()]
    with torch.no_grad():
        for p in net.parameters():
            p.add_(1.0)
    ema.update(net)  # warm-up decay min(0.9, 1/10)
    for e, s, p in zip(ema.model.parameters(), start, net.parameters(), strict=True):
        torch.testing.assert_close(e, 0.1 * s + 0.9 * p)
    assert int(ema.num_updates) == 1 and ema.current_decay() == pytest.approx(2 / 11)


def test_flow_stage_optimizer_is_fused_unless_autocast_clips():
    import lightning as L

    from kontext.network.model import FLUX_PRESETS
    from kontext.stages.flow import FlowStage

    for precision, fused in (("32-true", True), ("bf16-mixed", False)):
        stage = FlowStage(FLUX_PRESETS["tiny"])
        stage.trainer = L.Trainer(max_steps=10, logger=False, enable_checkpointing=False, accelerator="cpu",
                                  precision=precision)
        opt = stage.configure_optimizers()["optimizer"]
        assert bool(opt.defaults["fused"]) == fused and bool(opt.defaults["foreach"]) == (not fused)


def test_flow_stage_clips_the_gradient_norm_in_one_pass():
    from kontext.network.model import FLUX_PRESETS
    from kontext.stages.flow import FlowStage

    stage = FlowStage(FLUX_PRESETS["tiny"])
    params = list(stage.model.parameters())
    grads = [torch.randn_like(p) for p in params]
    norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    params[0].grad = None  # a parameter without gradient is left alone
    opt = torch.optim.AdamW(params)
    stage.configure_gradient_clipping(opt, gradient_clip_val=0.5, gradient_clip_algorithm="norm")
    kept = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads[1:]]))
    for p, g in zip(params[1:], grads[1:], strict=True):  # every gradient scaled by 0.5 / norm
        torch.testing.assert_close(p.grad, g * (0.5 / (kept + 1e-6)))
    assert params[0].grad is None and norm > 0.5


STAGE_OPTIONS = {  # stage yaml: {option group: the module's constant, a dataclass instance}
    "flow": ("kontext.stages.flow", {"optimizer": "OPTIMIZER", "time_sampling": "TIME_SAMPLING",
                                     "validation": "VALIDATION"}),
    "guidance_distill": ("kontext.stages.guidance_distill", {"optimizer": "OPTIMIZER", "validation": "VALIDATION"}),
    "ladd": ("kontext.stages.ladd", {"optimizer": "OPTIMIZER", "discriminator_optimizer": "DISCRIMINATOR_OPTIMIZER",
                                     "validation": "VALIDATION", "reals": "REALS", "renoise": "RENOISE",
                                     "discriminator": "DISCRIMINATOR", "updates": "UPDATES"}),
    "autoencoder": ("kontext.stages.autoencoder", {"optimizer": "OPTIMIZER", "loss": "LOSS",
                                                   "discriminator": "DISCRIMINATOR", "finish": "FINISH"}),
}


@pytest.mark.parametrize("name", list(STAGE_OPTIONS))
def test_stage_options_are_written_once(name):
    """Each stage's YAML mirrors its Python defaults: each option group field for field and value
    for value, and every scalar parameter the YAML sets equals the signature's default."""
    import importlib
    import inspect

    from hydra.utils import get_object

    module_name, constants = STAGE_OPTIONS[name]
    module = importlib.import_module(module_name)
    yaml = OmegaConf.load(CONFIG_DIR / "stage" / f"{name}.yaml")

    def plain(value):
        return tuple(value) if isinstance(value, list) else value

    for key, constant in constants.items():
        given = OmegaConf.to_container(yaml[key])
        assert {k: plain(v) for k, v in given.items()} == dataclasses.asdict(getattr(module, constant)), key

    def check_scalars(node, skip=()):  # and those of a nested part built from its own _target_
        signature = inspect.signature(get_object(node._target_).__init__)
        for key, param in signature.parameters.items():
            child = node._get_node(key) if key in node else None
            if child is None or key in skip or OmegaConf.is_interpolation(node, key):
                continue
            if OmegaConf.is_config(child):
                if "_target_" in child:
                    check_scalars(child)
                continue
            default = param.default
            assert plain(node[key]) == (plain(default) if not isinstance(default, tuple) else default), key

    check_scalars(yaml, skip=constants)


def test_an_unknown_stage_option_is_an_error():
    from kontext.errors import KontextError
    from kontext.network.model import FLUX_PRESETS
    from kontext.stages.flow import FlowStage

    with pytest.raises(KontextError, match=r"unknown optimizer option\(s\) \['learning_rate'\]"):
        FlowStage(FLUX_PRESETS["tiny"], optimizer={"learning_rate": 1e-3})


def test_stage_options_are_typed_and_their_defaults_written_once():
    """A stage holds each option group as its dataclass: the given fields over the defaults; the
    distillation stages' defaults are the flow stage's with their own changes."""
    from kontext.network.model import FLUX_PRESETS
    from kontext.stages import flow, guidance_distill, ladd
    from kontext.stages.flow import FlowStage
    from kontext.stages.options import AdamWOptions

    stage = FlowStage(FLUX_PRESETS["tiny"], optimizer={"lr": 1e-3, "betas": [0.8, 0.9]}, time_sampling={"mu": 0.5})
    assert stage.optim_cfg == dataclasses.replace(flow.OPTIMIZER, lr=1e-3, betas=(0.8, 0.9))
    assert isinstance(stage.optim_cfg, AdamWOptions) and stage.time_cfg.mu == 0.5 and stage.mu(16) == 0.5
    assert guidance_distill.OPTIMIZER == dataclasses.replace(flow.OPTIMIZER, lr=3e-5, warmup_steps=50)
    assert ladd.OPTIMIZER.decay == "none" and ladd.VALIDATION.steps is None and flow.VALIDATION.steps == 8
