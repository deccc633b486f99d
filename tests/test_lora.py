"""LoRA training (kontext/network/lora.py, through peft): the presets name exactly the layers they say,
adapters start as the identity and alone train, their EMA and checkpoints hold the adapters
only, and the base is stored in the compute dtype. Runs through the real composition:
tests/test_lora_runs.py."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import OmegaConf
from test_train import compose_train, random_ae, tiny_overrides  # noqa: F401  (random_ae is a fixture)
from tiny_kontext import random_autoencoder, random_flux

from kontext.diffusion import flow
from kontext.errors import KontextError
from kontext.memory_plan import lora_parameters
from kontext.network import packing
from kontext.network.lora import LORA, add_adapters, lora_options, matches, resolve_targets, unwrap
from kontext.network.model import FLUX_PRESETS, build_flux, load_flux, save_flux
from kontext.run import CONFIG_DIR
from kontext.stages.flow import FlowStage

TINY = FLUX_PRESETS["tiny"]


pytestmark = pytest.mark.usefixtures("one_thread")


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
    assert {k: tuple(v) if isinstance(v, list) else v for k, v in yaml.items()} == dataclasses.asdict(LORA)
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
    add_adapters(model, dataclasses.replace(LORA, rank=4, targets=("linear1",)))
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
    from kontext.scale.parallel import ParallelConfig, parallelize

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
@pytest.mark.parametrize(("quantize", "checkpointing"), [(None, "none"), ("int8", "none"), (None, "full")])
def test_compiled_blocks_with_adapters_keep_names_and_numbers(base_file, quantize, checkpointing):
    """Per-block torch.compile over peft's layers (inductor on CPU), also over an int8 base and
    with activation checkpointing: every block is compiled, with the same names, loss and adapter
    gradients as eager."""
    from kontext.network.quantized import quantize_base
    from kontext.scale.parallel import ParallelConfig, blocks, parallelize

    eager, compiled = lora_stage(base_file), lora_stage(base_file)
    with torch.no_grad():
        for name, p in eager.model.named_parameters():
            if ".lora_B." in name:
                p.fill_(0.01)
    compiled.model.load_state_dict(eager.model.state_dict())  # the same A (drawn at random) and B
    if quantize:
        pytest.importorskip("torchao")
        for stage in (eager, compiled):
            quantize_base(stage.model, quantize)
    parallelize(compiled.model, ParallelConfig(compile=True, activation_checkpointing=checkpointing), device="cpu")
    assert all(getattr(b, "_compiled_call_impl", None) is not None for b in blocks(compiled.model))
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


# ------------------------------------------------------------------------ quantised base

def _quantized_stage(base_file, kind: str, precision: str = "32-true") -> FlowStage:
    stage = lora_stage(base_file, quantize_base=kind)
    stage._trainer = SimpleNamespace(precision=precision, strategy=SimpleNamespace(root_device=torch.device("cpu")))
    stage.configure_model()
    return stage


@pytest.mark.parametrize("kind", ["int8", "fp8"])
def test_quantized_base_stores_block_linears_in_one_byte_and_trains_the_adapters(base_file, kind):
    pytest.importorskip("torchao")
    stage = _quantized_stage(base_file, kind)
    quantized = {n: m.weight for n, m in stage.model.named_modules()
                 if isinstance(m, torch.nn.Linear) and type(m.weight) is not torch.nn.Parameter}
    linears = [n for n, m in unwrap(build_flux(TINY)).named_modules()
               if isinstance(m, torch.nn.Linear) and n.startswith(("double_blocks", "single_blocks"))]
    assert len(quantized) == len(linears) == 26  # 20 adapted base layers and 6 frozen modulations
    assert all(".lora_" not in n for n in quantized)
    assert {w.qdata.element_size() for w in quantized.values()} == {1}
    assert all(p.dtype == torch.float32 and type(p) is torch.nn.Parameter
               for n, p in stage.model.named_parameters() if ".lora_" in n)
    # Before the adapters move, the model is the base up to the quantisation's rounding.
    base = load_flux(base_file).eval()
    stage.model.eval()
    with torch.no_grad():
        want, got = loss_of(base), loss_of(stage.model)
    assert 0 < abs(got - want) < 1e-3 * want  # measured: 4.7e-5 (int8), 3.2e-5 (fp8) of the loss
    loss = loss_of(stage.model)
    loss.backward()
    assert all(p.grad is not None for n, p in stage.model.named_parameters() if ".lora_B." in n)
    assert all(p.grad is None for n, p in stage.model.named_parameters() if ".lora_" not in n)


def test_quantized_base_merges_as_the_weights_it_trained_with(base_file):
    pytest.importorskip("torchao")
    stage = _quantized_stage(base_file, "int8", precision="bf16-mixed")
    with torch.no_grad():
        for name, p in stage.model.named_parameters():
            if ".lora_" in name:
                p.normal_(std=0.01)
    stage.ema.update(stage.model)
    base = {n: m.weight.dequantize() for n, m in stage.model.named_modules()
            if isinstance(m, torch.nn.Linear) and hasattr(m.weight, "qdata")}
    adapter = stage.merge_adapters()
    merged = stage.model.state_dict()
    assert {(type(p).__name__, p.dtype) for p in stage.model.parameters()} == {("Parameter", torch.bfloat16)}
    for name, weight in base.items():
        layer = name.removesuffix(".base_layer")
        want = weight.float()
        if layer in adapter.layers:
            want = want + adapter.alpha / adapter.rank * adapter.layers[layer].up @ adapter.layers[layer].down
        torch.testing.assert_close(merged[f"{layer}.weight"].float(), want, atol=1e-2, rtol=1e-2)
    # The base's other parameters are the file's (in the compute dtype).
    assert torch.equal(merged["img_in.weight"], load_flux(base_file).img_in.weight.bfloat16())


def test_quantized_base_needs_one_process(base_file):
    pytest.importorskip("torchao")
    stage = lora_stage(base_file, quantize_base="int8")
    stage.sharding_mesh = lambda: SimpleNamespace(size=lambda: 2)  # FSDP over two ranks
    stage._trainer = SimpleNamespace(precision="bf16-mixed", strategy=SimpleNamespace(root_device=torch.device("cpu")))
    with pytest.raises(KontextError, match="quantize_base=int8 trains in one process"):
        stage.configure_model()
    ddp = lora_stage(base_file, quantize_base="int8")  # several ranks without FSDP (DDP): refused too
    ddp._trainer = SimpleNamespace(precision="bf16-mixed", world_size=2,
                                   strategy=SimpleNamespace(root_device=torch.device("cpu")))
    with pytest.raises(KontextError, match="use trainer=fsdp"):
        ddp.configure_model()
    with pytest.raises(KontextError, match="adapter.quantize_base"):
        lora_options({"quantize_base": "int4"})


def test_base_is_built_from_the_file_in_its_dtype(base_file, tmp_path):
    """A LoRA stage holds the file's tensors (a bf16 file: a bf16 base, no fp32 copy while it
    builds); adapters are fp32; an fp32 run casts the base up in configure_model."""
    bf16_file = save_flux(load_flux(base_file, dtype=torch.bfloat16), tmp_path / "base_bf16.safetensors")
    stage = lora_stage(bf16_file)
    dtypes = {n: p.dtype for n, p in stage.model.named_parameters()}
    assert all(d == (torch.float32 if ".lora_" in n else torch.bfloat16) for n, d in dtypes.items())
    stage._trainer = SimpleNamespace(precision="32-true", strategy=SimpleNamespace(root_device=torch.device("cpu")))
    stage.configure_model()
    assert {p.dtype for p in stage.model.parameters()} == {torch.float32}
    assert torch.equal(stage.model.get_submodule("img_in").weight, load_flux(bf16_file).img_in.weight.float())
    assert torch.isfinite(loss_of(stage.model))


@pytest.mark.parametrize("precision", ["32-true", "bf16-mixed"])
def test_quantized_base_keeps_no_dequantised_weight_for_backward(base_file, precision):
    """Backward through a quantised base layer dequantises its weight again: the forward keeps
    for backward what it keeps over the plain base, and the adapters' gradients are those of
    torchao's own linear (which keeps a dequantised copy of every weight)."""
    pytest.importorskip("torchao")
    import copy

    from kontext.network.quantized import FrozenQuantizedLinear
    from kontext.scale import parallel

    bf16 = precision.startswith("bf16")
    plain, stage = lora_stage(base_file), _quantized_stage(base_file, "int8", precision=precision)
    plain._trainer = stage._trainer
    plain.configure_model()
    theirs = copy.deepcopy(stage.model)
    for m in theirs.modules():
        if isinstance(m, FrozenQuantizedLinear):
            m.__class__ = torch.nn.Linear
    kept = {}
    for name, model in (("plain", plain.model), ("ours", stage.model), ("theirs", theirs)):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            kept[name] = parallel.retained_bytes(lambda model=model: loss_of(model))
    assert kept["ours"] == kept["plain"] < kept["theirs"]
    losses = []
    for model in (stage.model, theirs):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            losses.append(loss_of(model))
        losses[-1].backward()
    torch.testing.assert_close(losses[0], losses[1])
    grads = [{n: p.grad for n, p in model.named_parameters() if p.grad is not None} for model in (stage.model, theirs)]
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) == 40
    for name, g in grads[0].items():
        torch.testing.assert_close(g, grads[1][name], rtol=1e-2 if bf16 else 1e-5, atol=1e-4 if bf16 else 1e-6, msg=name)
