"""The memory plan (`python -m kontext.memory_plan`) against memory measured on models this
machine runs: the activations its `meta` forward counts are those a real forward keeps, and its
sharded state is what a training step holds."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kontext import memory_plan
from kontext.memory_plan import PlanConfig, activation_bytes, plan
from kontext.network.model import build_flux
from kontext.scale import parallel
from kontext.stages.ema import EMA

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "parallel"


@pytest.mark.parametrize("ac", ["none", "full", "selective"])
def test_activations_counted_on_meta_are_those_a_real_forward_keeps(ac):
    """The plan's count (meta device, attention as a fused kernel) against the bytes a real
    fp32 forward on CPU keeps for backward with PyTorch's own SDPA kernel."""

    def build(device):
        torch.manual_seed(0)
        model = build_flux("tiny", device=device)
        for block in parallel.blocks(model):
            parallel.checkpoint_block(block, ac)
        return model

    counted = activation_bytes(build("meta"), 4, 128, 64, 16, torch.float32)
    measured = activation_bytes(build("cpu"), 4, 128, 64, 16, torch.float32, fused_attention=False)
    assert counted == pytest.approx(measured, rel=0.02), (counted, measured)
    assert counted > 0


def test_checkpointing_modes_order_and_block_inputs():
    """Full checkpointing keeps about the blocks' inputs: one (B, L, d) tensor per block."""
    kept = {ac: plan(PlanConfig(model="tiny", gpus=1, param_dtype="float32", ac=ac, resolution=128,
                                batch=4, txt_tokens=16, encoders_on_gpu=False)).gpu["activations kept for backward"]
            for ac in ("none", "selective", "full")}
    assert kept["full"] < kept["selective"] < kept["none"]
    tokens = (128 // 16) ** 2 * 2 + 16
    inputs = 4 * tokens * 64 * 4 * 4  # batch x tokens x hidden x fp32 x (2 + 2 blocks)
    assert inputs <= kept["full"] < 2 * inputs, (kept["full"], inputs)


def test_state_per_gpu_is_what_a_training_step_holds():
    """Weights, gradients, AdamW moments and EMA of one process after a real step, in bytes."""
    torch.manual_seed(0)
    model = build_flux("tiny")
    ema = EMA(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sum(p.float().pow(2).sum() for p in model.parameters()).backward()
    opt.step()

    def nbytes(tensors):
        return sum(t.numel() * t.element_size() for t in tensors)

    measured = {
        "weights (sharded, fp32)": nbytes(model.parameters()),
        "gradients (sharded, fp32)": nbytes(p.grad for p in model.parameters()),
        "AdamW moments (sharded, fp32)": nbytes(v for s in opt.state.values() for k, v in s.items() if k != "step"),
        "EMA (sharded, fp32)": nbytes(ema.model.parameters()),
    }
    planned = plan(PlanConfig(model="tiny", gpus=1, resolution=64, encoders_on_gpu=False)).gpu
    assert {k: planned[k] for k in measured} == measured
    halves = plan(PlanConfig(model="tiny", gpus=2, resolution=64, encoders_on_gpu=False)).gpu
    assert all(halves[k] == measured[k] / 2 for k in measured)


def test_twelve_billion_plan_counts_the_reference_model():
    result = plan(PlanConfig(model="flux-dev-kontext", gpus=8, ac="full", resolution=512, encoders_on_gpu=False))
    assert result.params == 11_901_408_320
    double = build_flux("flux-dev-kontext", device="meta").double_blocks[0]
    assert result.largest_unit == sum(p.numel() for p in double.parameters())
    assert result.gpu["weights (sharded, fp32)"] == 4 * result.params / 8
    # Under FSDP everything is built on meta and filled by rows: the host holds at most one tensor,
    # fine-tuning, from scratch or distilling alike; one process builds whole.
    largest = max(p.numel() for p in build_flux("flux-dev-kontext", device="meta").parameters())
    assert result.host_per_rank == 4 * largest
    for changes in ({"init_from": False}, {"teacher": True}):
        assert plan(PlanConfig(model="flux-dev-kontext", gpus=8, encoders_on_gpu=False, **changes)).host_per_rank \
            == 4 * largest
    scratch = plan(PlanConfig(model="flux-dev-kontext", gpus=1, init_from=False, encoders_on_gpu=False))
    assert scratch.host_per_rank == 8 * result.params  # one process from scratch: fp32 model + deep-copied EMA
    teacher = plan(PlanConfig(model="flux-dev-kontext", gpus=1, init_from=False, teacher=True, encoders_on_gpu=False))
    assert teacher.host_per_rank == 12 * result.params  # ... and a whole fp32 teacher
    lora = plan(PlanConfig(model="flux-dev-kontext", gpus=1, ac="full", resolution=512, lora_rank=16,
                           encoders_on_gpu=False))
    assert 0 < lora.trained < result.params / 100
    assert lora.gpu["weights (sharded)"] == 2 * lora.params + 4 * lora.trained
    assert lora.host_per_rank == 2 * lora.params  # the base is the bf16 file's tensors, no fp32 build


def test_cli_prints_a_table():
    cmd = [sys.executable, "-m", "kontext.memory_plan", "--model", "tiny", "--gpus", "2", "--resolution", "64",
           "--cached-features", "--gpu-gib", "1"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "| **total** |" in out.stdout and "1 GiB GPUs: fits" in out.stdout


@pytest.mark.parametrize("bad, says", [(["--gpus", "0"], "--gpus must be at least 1"),
                                       (["--resolution", "100"], "positive multiple of 16"),
                                       (["--model", "nope"], "unknown FLUX preset 'nope'"),
                                       (["--quantize-base", "int8", "--gpus", "8", "--lora-rank", "16"],
                                        "give --lora-rank and --gpus 1")])
def test_cli_refuses_bad_values_in_one_line(bad, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        memory_plan.main(bad)
    assert exit_.value.code == 2
    assert says in capsys.readouterr().err


def test_recipes_mirror_the_parallel_configs():
    from omegaconf import OmegaConf

    for name, recipe in memory_plan.RECIPES.items():
        cfg = OmegaConf.merge(OmegaConf.load(CONFIGS / "default.yaml"),
                              OmegaConf.load(CONFIGS / f"{name}.yaml"))
        assert recipe == {"param_dtype": cfg.param_dtype, "reduce_dtype": cfg.reduce_dtype,
                          "ac": cfg.activation_checkpointing}, name


@pytest.mark.parametrize("kind", [None, "int8", "fp8"])
def test_lora_base_counted_as_a_real_quantised_model_holds_it(kind):
    """A LoRA run's weights in the plan (frozen base in fp32 or weight-only quantised, adapters
    on every block linear) against the bytes of the tensors of the real model."""
    from kontext.network.lora import add_adapters, lora_options
    from kontext.network.quantized import quantize_base

    if kind:
        pytest.importorskip("torchao")
    model = build_flux("tiny")
    targets = [f"{kind_}_blocks.*" for kind_ in ("double", "single")]
    add_adapters(model, lora_options({"rank": 16, "targets": targets}))
    if kind:
        quantize_base(model, kind)

    def nbytes(t):
        if hasattr(t, "qdata"):  # torchao's weight tensors: their stored parts
            return sum(nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
        return t.numel() * t.element_size()

    measured = sum(nbytes(p) for p in model.parameters())
    planned = plan(PlanConfig(model="tiny", gpus=1, param_dtype="float32", resolution=64, lora_rank=16,
                              quantize_base=kind, encoders_on_gpu=False))
    assert planned.gpu["weights (sharded)"] == measured
    if kind:
        fp32 = plan(PlanConfig(model="tiny", gpus=1, param_dtype="float32", resolution=64, lora_rank=16,
                               encoders_on_gpu=False)).gpu["weights (sharded)"]
        assert measured < 0.6 * fp32  # the tiny preset's embedders and norms, not quantised, are a large share
    assert "gathered weights (2 units)" not in planned.gpu  # one GPU gathers nothing
