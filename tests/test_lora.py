"""LoRA training (kontext/lora.py, through peft): the presets name exactly the layers they say,
adapters start as the identity and alone train, their EMA and checkpoints hold the adapters
only, the base is stored in the compute dtype, and a run through the real composition (tiny
preset, `stage.init_from` a reference-format file) trains, finishes with adapter files whose
merge by hand is its exported model, and resumes bit for bit."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf
from test_resume import assert_same_run, final_state, step_losses
from test_resume import overrides as resume_overrides
from test_train import compose_train, random_ae, tiny_overrides  # noqa: F401  (random_ae is a fixture)
from tiny_kontext import random_autoencoder, random_flux

from kontext import flow, packing
from kontext.errors import KontextError
from kontext.lora import LORA, add_adapters, lora_options, matches, resolve_targets, unwrap
from kontext.lora_files import read_adapter
from kontext.memory_plan import lora_parameters
from kontext.model import FLUX_PRESETS, build_flux, load_flux, save_flux
from kontext.run import CONFIG_DIR, run
from kontext.stages.flow import FlowStage

TINY = FLUX_PRESETS["tiny"]


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def base_file(tmp_path_factory) -> Path:
    """A trained-looking tiny model in the reference format: what `stage.init_from` points at."""
    return save_flux(random_flux(5), tmp_path_factory.mktemp("base") / "base.safetensors")


def lora_stage(base_file, **lora) -> FlowStage:
    return FlowStage(TINY, init_from=str(base_file), lora={"rank": 4, "alpha": 8.0, **lora})


def batch(seed: int = 0, b: int = 2) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {"target_latent": torch.randn(b, 16, 8, 8, generator=g), "reference_latents": [torch.randn(b, 16, 8, 8, generator=g)],
            "txt": torch.randn(b, 5, 384, generator=g), "vec": torch.randn(b, 384, generator=g)}


def loss_of(model, seed: int = 0) -> torch.Tensor:
    """The flow objective of `FlowStage.training_step` on a fixed batch, noise and times."""
    data = batch(seed)
    tokens = packing.prepare(data["target_latent"], data["reference_latents"])
    g = torch.Generator().manual_seed(seed + 100)
    noise = torch.randn(tokens.img.shape, generator=g)
    t = flow.sample_t(tokens.img.shape[0], 0.5, 1.0, generator=g)
    pred = packing.predict(model, tokens, flow.interpolate(tokens.img, noise, t), t, data["txt"], data["vec"],
                           torch.ones(t.shape[0]), True)
    return flow.flow_loss(pred, flow.velocity_target(tokens.img, noise))


# ------------------------------------------------------------------------------- the options

def test_default_preset_is_the_module_defaults_and_every_preset_names_exact_layers():
    yaml = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "adapter" / "lora.yaml"))
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in yaml.items()} == LORA
    # tiny: 2 double blocks (img and txt: qkv, proj, mlp.0, mlp.2, mod.lin), 2 single blocks (linear1, linear2, modulation.lin)
    expected = {"lora": 2 * 8 + 2 * 2, "lora_attention": 2 * 4 + 2 * 1, "lora_all": 2 * 10 + 2 * 3}
    for preset, count in expected.items():
        cfg = lora_options(OmegaConf.to_container(compose_train([f"adapter={preset}"]).stage.lora))
        model = build_flux(TINY)
        names = add_adapters(model, cfg)
        assert len(names) == count, preset
        trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
        assert len(trained) == 2 * count and all(".lora_" in n for n in trained)
        assert sum(p.numel() for p in trained.values()) == sum(
            16 * (m.in_features + m.out_features) for n, m in unwrap(build_flux(TINY)).named_modules() if n in names)
    model = build_flux(TINY)  # the memory plan's "every block linear" is the `lora_all` preset
    add_adapters(model, lora_options(OmegaConf.to_container(compose_train(["adapter=lora_all"]).stage.lora)))
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == lora_parameters(build_flux(TINY), 16)


def test_targets_by_reference_names():
    assert matches("double_blocks.0.img_mlp.2", "img_mlp") and matches("double_blocks.0.img_mlp.0", "double_blocks.*.img_mlp")
    assert matches("double_blocks.1.txt_attn.qkv", "txt_*") and matches("double_blocks.1.txt_mod.lin", "txt_*")
    assert matches("double_blocks.1.img_attn.proj", "*.proj") and not matches("double_blocks.1.img_attn.qkv", "*.proj")
    assert matches("single_blocks.0.modulation.lin", "modulation") and not matches("double_blocks.0.img_mod.lin", "modulation")
    assert not matches("single_blocks.0.linear1", "linear") and not matches("img_in", "img")
    assert resolve_targets(build_flux(TINY), ["linear2", "single_blocks.1.linear1"]) == [
        "single_blocks.0.linear2", "single_blocks.1.linear1", "single_blocks.1.linear2"]
    with pytest.raises(KontextError, match=r"adapter.targets: 'img_attn.qkvv' names no linear layer") as err:
        resolve_targets(build_flux(TINY), ["img_attn.qkv", "img_attn.qkvv"])
    assert "\n" not in str(err.value)
    with pytest.raises(KontextError, match=r"unknown adapter option\(s\) \['ranks'\]"):
        lora_options({"ranks": 4})
    with pytest.raises(KontextError, match=r"adapter.rank=0: expected an integer >= 1"):
        lora_options({"rank": 0})


def test_lora_needs_a_base():
    with pytest.raises(KontextError, match="give stage.init_from"):
        FlowStage(TINY, lora={})


# ------------------------------------------------------------------------------- the stage

def test_adapters_start_as_the_base_and_alone_train(base_file):
    stage = lora_stage(base_file)
    base = load_flux(base_file)
    with torch.no_grad():
        assert torch.equal(loss_of(stage.model), loss_of(base))  # B = 0: exactly the base at the start
    groups = stage.param_groups()
    trained = [p for g in groups for p in g["params"]]
    assert len(trained) == 2 * 20 and all(p.requires_grad for p in trained)
    assert {id(p) for p in trained} == {id(p) for n, p in stage.model.named_parameters() if ".lora_" in n}
    loss_of(stage.model).backward()
    grads = {n: p.grad for n, p in stage.model.named_parameters() if p.grad is not None}
    assert grads and all(".lora_B." in n for n in grads if grads[n].abs().sum() > 0)  # B = 0: only B moves first
    assert all(p.grad is None for n, p in stage.model.named_parameters() if ".lora_" not in n)


def test_last_block_predicts_target_rows_with_an_adapted_linear1(base_file):
    """The last single block computes only the rows asked for by slicing linear1's weight; with
    an adapter on linear1 that slice would drop the adapter. It must equal the full forward."""
    model = load_flux(base_file).eval()
    add_adapters(model, {**LORA, "rank": 4, "targets": ("linear1",)})
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(2, 24, 64, generator=g), torch.randn(2, 5, 384, generator=g)
    ids, t_ids = torch.zeros(2, 24, 3), torch.zeros(2, 5, 3)
    args = (img, ids, txt, t_ids, torch.rand(2, generator=g), torch.randn(2, 384, generator=g), torch.ones(2))
    with torch.no_grad():
        full, part = model(*args), model(*args, n_out=16)
        without = unwrap(load_flux(base_file).eval())(*args, n_out=16)
    torch.testing.assert_close(part, full[:, :16], atol=1e-6, rtol=1e-6)
    assert (part - without).abs().max() > 1e-2


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_with_adapters_changes_no_number(base_file, mode):
    from kontext.parallel import ParallelConfig, parallelize

    a, b = lora_stage(base_file), lora_stage(base_file)
    b.model.load_state_dict(a.model.state_dict())
    parallelize(b.model, ParallelConfig(activation_checkpointing=mode))
    names = [n for n, _ in a.model.named_parameters()]
    assert [n for n, _ in b.model.named_parameters()] == names
    for stage in (a, b):
        with torch.no_grad():
            for name, p in stage.model.named_parameters():
                if ".lora_B." in name:
                    p.fill_(0.01)
        loss_of(stage.model).backward()
    for (name, p), q in zip(a.model.named_parameters(), b.model.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, atol=1e-6, rtol=1e-5, msg=name)


@pytest.mark.slow
def test_compiled_blocks_with_adapters_keep_names_and_numbers(base_file):
    """Per-block torch.compile over peft's layers (inductor on CPU): the same names, loss and
    adapter gradients as eager."""
    from kontext.parallel import ParallelConfig, parallelize

    eager, compiled = lora_stage(base_file), lora_stage(base_file)
    with torch.no_grad():
        for name, p in eager.model.named_parameters():
            if ".lora_B." in name:
                p.fill_(0.01)
    compiled.model.load_state_dict(eager.model.state_dict())  # the same A (drawn at random) and B
    parallelize(compiled.model, ParallelConfig(compile=True), device="cpu")
    assert [n for n, _ in compiled.model.named_parameters()] == [n for n, _ in eager.model.named_parameters()]
    losses = [loss_of(stage.model) for stage in (eager, compiled)]
    for loss in losses:
        loss.backward()
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(eager.model.named_parameters(), compiled.model.parameters(), strict=True):
        if p.grad is not None:
            torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_base_in_bf16_when_the_run_computes_in_bf16(base_file):
    stage = lora_stage(base_file)
    stage._trainer = SimpleNamespace(precision="bf16-mixed", strategy=SimpleNamespace(root_device=torch.device("cpu")))
    stage.configure_model()
    dtypes = {n: p.dtype for n, p in stage.model.named_parameters()}
    assert all(d == (torch.float32 if ".lora_" in n else torch.bfloat16) for n, d in dtypes.items())
    assert all(p.dtype == torch.float32 for p in stage.ema.model.parameters())
    base = load_flux(base_file)
    assert torch.equal(stage.model.get_submodule("img_in").weight, base.img_in.weight.bfloat16())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = loss_of(stage.model)
    loss.backward()
    grads = [p.grad for n, p in stage.model.named_parameters() if ".lora_A." in n]
    assert torch.isfinite(loss) and all(g is not None and g.dtype == torch.float32 for g in grads)
    assert FlowStage(TINY).compute_dtype() is None  # no trainer: fp32, nothing cast


def test_checkpoint_state_is_the_adapters_and_loads_back(base_file):
    stage = lora_stage(base_file)
    with torch.no_grad():
        for name, p in stage.model.named_parameters():
            if ".lora_" in name:
                p.normal_()
    stage.ema.update(stage.model)
    state = stage.state_dict()
    adapters_only = [k for k in state if k.startswith("model.")]
    assert len(adapters_only) == 40 and all(".lora_A.default.weight" in k or ".lora_B.default.weight" in k
                                            for k in adapters_only)
    assert sorted(k for k in state if k.startswith("ema.")) == sorted(
        ["ema.num_updates", *(f"ema.{k}" for k in adapters_only)])
    fresh = lora_stage(base_file)
    fresh.load_state_dict(state)  # strict: only the base may be absent
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in state.items())
    with pytest.raises(RuntimeError, match="Missing key"):
        fresh.load_state_dict({k: v for k, v in state.items() if "lora_B" not in k})
    with pytest.raises(RuntimeError, match="Unexpected key"):
        fresh.load_state_dict({**state, "model.img_in.weight": torch.zeros(64, 64)})


def test_ema_averages_the_adapters_and_is_swapped_in_for_sampling(base_file):
    stage = lora_stage(base_file, dropout=0.5)
    start = {n: p.detach().clone() for n, p in stage.model.named_parameters() if ".lora_" in n}
    assert {n for n, _ in stage.ema.model.named_parameters()} == set(start)  # the average holds adapters only
    with torch.no_grad():
        for name, p in stage.model.named_parameters():
            if ".lora_" in name:
                p.add_(1.0)
    stage.ema.update(stage.model)  # warm-up decay 1/10
    live = {n: p.detach().clone() for n, p in stage.model.named_parameters() if ".lora_" in n}
    for name, ema in stage.ema.model.named_parameters():
        torch.testing.assert_close(ema, 0.1 * start[name] + 0.9 * live[name])
    stage.model.train()
    stage._frozen = {"autoencoder": random_autoencoder(), "text": object()}  # what a pipeline holds besides the model
    with stage.averaged():
        inside = {n: p.detach().clone() for n, p in stage.model.named_parameters() if ".lora_" in n}
        pipe_model = stage.pipeline().model
        assert pipe_model is stage.model and not stage.model.training  # the pipeline samples in eval mode
    assert all(torch.equal(inside[n], e) for n, e in stage.ema.model.named_parameters())
    assert all(torch.equal(p, live[n]) for n, p in stage.model.named_parameters() if ".lora_" in n)
    assert stage.model.training  # back to training, dropout on

    adapter = stage.merge_adapters()  # the finish: EMA adapters merged into the base, a plain Flux again
    assert all(".lora_" not in n and ".base_layer" not in n for n in stage.model.state_dict())
    base = load_flux(base_file).state_dict()
    for name, w in adapter.layers.items():
        by_hand = base[f"{name}.weight"] + 2.0 * w.up @ w.down  # alpha / rank = 8 / 4
        torch.testing.assert_close(stage.model.state_dict()[f"{name}.weight"], by_hand, atol=1e-6, rtol=0)
        assert torch.equal(w.down, stage.ema.model.get_parameter(f"{name}.lora_A.default.weight"))


def test_adapter_dropout_draws_from_the_step_seed_alone(base_file):
    stage = lora_stage(base_file, dropout=0.5)
    with torch.no_grad():
        for name, p in stage.model.named_parameters():
            if ".lora_B." in name:
                p.normal_(0, 0.1)
    stage.model.train()
    state = torch.get_rng_state()
    with torch.no_grad():
        losses = []
        for seed in (7, 7, 8):
            with stage.dropout_rng(seed, torch.device("cpu")):
                losses.append(loss_of(stage.model))
    assert torch.equal(torch.get_rng_state(), state)  # the global stream is untouched
    assert losses[0] == losses[1] and losses[0] != losses[2]  # dropout is on, and follows the seed


# ----------------------------------------------------------------------- the real composition

@pytest.fixture(scope="module")
def data_root(tmp_path_factory, random_ae):  # noqa: F811
    root = tmp_path_factory.mktemp("lora")
    cfg = compose_train(tiny_overrides(root, random_ae))
    for step in cfg.prepare.values():
        instantiate(step)
    return root


def lora_overrides(base_file) -> list[str]:
    return ["adapter=lora", "adapter.rank=4", "adapter.alpha=8", "adapter.dropout=0.1", f"stage.init_from={base_file}",
            "stage.optimizer.lr=1e-2"]


def test_lora_run_trains_adapters_and_exports_them(data_root, random_ae, base_file):  # noqa: F811
    run_dir = data_root / "run"
    cfg = compose_train([*tiny_overrides(data_root, random_ae), *lora_overrides(base_file),
                         f"paths.output_dir={run_dir}", "trainer.max_steps=4", "stage.ema_decay=0.5",
                         "stage.optimizer.warmup_steps=1", "stage.finish.benchmark.n_per_op=0",
                         "callbacks.validation.every_n_steps=4", "callbacks.validation.steps=2"])
    OmegaConf.update(cfg, "callbacks.validation.cases", [{"image": None, "prompt": "a red circle"}], force_add=True)
    metrics = run(cfg)
    assert metrics["steps"] == 4
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    weights = ckpt["state_dict"]
    # Only the 20 adapted layers' A and B, their average and its step count; 40 optimizer states.
    assert len(weights) == 2 * 40 + 1 and all(".lora_" in k for k in weights if k != "ema.num_updates")
    assert len(ckpt["optimizer_states"][0]["state"]) == 40
    adapter_numel = sum(v.numel() for k, v in weights.items() if k.startswith("model."))
    assert adapter_numel == 4 * sum(m.in_features + m.out_features for n, m in build_flux(TINY).named_modules()
                                    if n in resolve_targets(build_flux(TINY), LORA["targets"]))
    assert adapter_numel < 0.05 * sum(p.numel() for p in build_flux(TINY).parameters())

    adapter = read_adapter(run_dir / "lora" / "adapter.safetensors")
    assert adapter.rank == 4 and adapter.alpha == 8.0 and len(adapter.layers) == 20
    for name, w in adapter.layers.items():  # the file holds the EMA adapters, and they moved from B = 0
        assert torch.equal(w.up, weights[f"ema.model.{name}.lora_B.default.weight"])
    assert max(w.up.abs().max() for w in adapter.layers.values()) > 1e-3
    base = load_flux(base_file).state_dict()
    exported = load_flux(run_dir / "export" / "transformer.safetensors").state_dict()
    assert exported.keys() == base.keys()
    for key, value in exported.items():  # the export is the base with the EMA adapters merged, by hand
        layer = key.removesuffix(".weight")
        want = base[key] + 2.0 * adapter.layers[layer].up @ adapter.layers[layer].down if layer in adapter.layers \
            and key.endswith(".weight") else base[key]
        torch.testing.assert_close(value, want, atol=1e-6, rtol=0, msg=key)
    # The run's checkpoint loads as the same merged model (sample.py checkpoint=<run>).
    from kontext.pipeline import KontextPipeline

    pipe = KontextPipeline.from_run_dir(run_dir)
    merged = pipe.model.state_dict()
    assert all(torch.equal(merged[k], v) for k, v in exported.items())
    # The validation edit at step 4 sampled the EMA adapters swapped into the training model.
    import numpy as np
    from PIL import Image

    edited = np.asarray(Image.open(run_dir / "validation" / "step0000004" / "0.png")).astype(int)
    assert np.abs(edited - np.asarray(pipe.edit([None], ["a red circle"], 0, steps=2)[0])).max() <= 1
    # diffusers' own model, from the base, with the run's diffusers-layout file: ours with the adapters.
    diffusers = pytest.importorskip("diffusers")
    from test_lora_files import inputs, run_theirs, theirs_from

    theirs = theirs_from(base, TINY)
    theirs.load_lora_adapter(str(run_dir / "lora" / "diffusers" / "pytorch_lora_weights.safetensors"))
    ours = load_flux(run_dir / "export" / "transformer.safetensors").eval()
    with torch.no_grad():
        want, got = run_theirs(theirs, inputs()), ours(**inputs())
        plain = run_theirs(theirs_from(base, TINY), inputs())
    torch.testing.assert_close(want, got, atol=1e-5, rtol=1e-5)
    assert (want - plain).abs().max() > 1e-4  # the adapters matter at this scale
    assert isinstance(theirs, diffusers.FluxTransformer2DModel)


def test_lora_run_under_bf16_autocast_keeps_the_base_in_bf16(data_root, random_ae, base_file):  # noqa: F811
    """One process, Lightning's bf16-mixed precision: the base is stored in bf16, the adapters,
    their EMA and their optimizer state in fp32; the export (the merge) comes out in bf16."""
    run_dir = data_root / "bf16"
    run(compose_train([*tiny_overrides(data_root, random_ae), *lora_overrides(base_file), f"paths.output_dir={run_dir}",
                       "trainer.max_steps=2", "trainer.precision=bf16-mixed", "stage.optimizer.warmup_steps=1",
                       "stage.finish.benchmark.n_per_op=0"]))
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    assert {v.dtype for k, v in ckpt["state_dict"].items() if ".lora_" in k} == {torch.float32}
    assert {v.dtype for s in ckpt["optimizer_states"][0]["state"].values() for v in s.values()
            if v.is_floating_point() and v.ndim} == {torch.float32}
    exported = load_flux(run_dir / "export" / "transformer.safetensors").state_dict()
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}
    moved = [v for k, v in ckpt["state_dict"].items() if k.startswith("model.") and ".lora_B." in k]
    assert max(v.abs().max() for v in moved) > 1e-4


def test_lora_resume_after_preemption_is_exact(data_root, random_ae, base_file):  # noqa: F811
    """Dropout on, so the resumed run must also continue the random stream exactly."""
    def cfg(run_dir, *extra):
        return compose_train([*resume_overrides(data_root, random_ae, run_dir), *lora_overrides(base_file), *extra])

    straight, resumed = data_root / "lora_straight", data_root / "lora_resumed"
    run(cfg(straight))
    first = run(cfg(resumed, "+callbacks.preempt._target_=test_resume.SignalAt", "+callbacks.preempt.step=5"))
    assert first["steps"] == 6
    run(cfg(resumed))
    assert_same_run(resumed, straight)
    assert all(k == "ema.num_updates" or ".lora_" in k for k in final_state(resumed)["weights"])
    assert len(step_losses(resumed)) == 12


# ------------------------------------------------------------------------------ 2 processes

def _train_cli(args: list[str], cwd: Path):
    import os
    import subprocess
    import sys

    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(CONFIG_DIR.parent / "train.py"), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2", "trainer.accumulate_grad_batches=2"]


@pytest.mark.slow
def test_lora_under_fsdp_two_processes_resumes_exactly(data_root, random_ae, base_file):  # noqa: F811
    """FSDP2 per block over 2 CPU processes (gloo) with peft's layers inside the blocks: the base
    is sharded and frozen, the adapters train; a sharded checkpoint holds the adapters alone
    (one shard per rank), and a run preempted halfway and resumed matches an uninterrupted one
    at every step, bit for bit. The interrupted run also samples grids with the EMA adapters
    swapped into the sharded model (steps 6 and 12), which must leave training as it was."""
    from kontext.checkpoint import consolidate

    def args(run_dir: Path, grids: bool = True) -> list[str]:
        grid = ["callbacks.metrics.grid_every_n_steps=6", "callbacks.metrics.grid_steps=2"] if grids else []
        return [*resume_overrides(data_root, random_ae, run_dir), *lora_overrides(base_file), *FSDP, *grid]

    straight_dir, resumed_dir = data_root / "fsdp_lora_straight", data_root / "fsdp_lora_resumed"
    _train_cli(args(straight_dir, grids=False), data_root)
    first = _train_cli([*args(resumed_dir), "+callbacks.preempt._target_=test_resume.SignalAt",
                        "+callbacks.preempt.step=5"], data_root)
    assert "stopped at step 6 for a requeue" in first.stdout
    last = resumed_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2
    _train_cli(args(resumed_dir), data_root)

    expected, got = step_losses(straight_dir), step_losses(resumed_dir)
    assert len(expected) == 12 and got == expected
    assert sorted(p.name for p in (resumed_dir / "grids").iterdir()) == ["step0000006.png", "step0000012.png"]
    for prefix in ("state_dict.model.", "state_dict.ema.model.", "optimizer_0.state."):
        a = consolidate(straight_dir / "checkpoints" / "last.ckpt", prefix)
        b = consolidate(last, prefix)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), prefix
        # 40 adapter tensors; AdamW keeps exp_avg, exp_avg_sq and step for each
        assert len(a) == (40 if "optimizer" not in prefix else 3 * 40) and all(".lora_" in k for k in a), prefix
    # The finish gathers the shards: its adapter file is the EMA of the sharded checkpoint.
    ema = consolidate(last, "state_dict.ema.model.")
    adapter = read_adapter(resumed_dir / "lora" / "adapter.safetensors")
    assert all(torch.equal(w.up, ema[f"{n}.lora_B.default.weight"]) for n, w in adapter.layers.items())


@pytest.mark.slow
def test_lora_under_fsdp_with_bf16_compute_keeps_the_base_in_bf16(data_root, random_ae, base_file):  # noqa: F811
    """param_dtype bfloat16 (the paper's recipe) with selective checkpointing: the frozen base is
    stored in bf16 (the export, its merge, comes out in bf16), the adapters and their EMA in fp32."""
    run_dir = data_root / "fsdp_lora_bf16"
    _train_cli([*tiny_overrides(data_root, random_ae), *lora_overrides(base_file), *FSDP, f"paths.output_dir={run_dir}",
                "trainer.max_steps=4", "stage.optimizer.warmup_steps=1", "stage.finish.benchmark.n_per_op=0",
                "parallel.param_dtype=bfloat16", "parallel.activation_checkpointing=selective"], data_root)
    adapter = read_adapter(run_dir / "lora" / "adapter.safetensors")
    assert all(w.up.dtype == w.down.dtype == torch.float32 for w in adapter.layers.values())
    base = load_flux(base_file).state_dict()
    exported = load_flux(run_dir / "export" / "transformer.safetensors").state_dict()
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}
    for name, w in adapter.layers.items():
        want = base[f"{name}.weight"].bfloat16().float() + 2.0 * w.up @ w.down
        torch.testing.assert_close(exported[f"{name}.weight"].float(), want, atol=0, rtol=2**-8)
    assert max(w.up.abs().max() for w in adapter.layers.values()) > 1e-3  # the adapters trained
