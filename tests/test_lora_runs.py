"""LoRA runs through the real composition (tiny preset, `stage.init_from` a reference-format
file): a run trains, finishes with adapter files whose merge by hand is its exported model, keeps
its base in bf16 under bf16 compute, and resumes bit for bit, in one process and under FSDP on two."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch import Callback
from omegaconf import OmegaConf
from test_lora import base_file  # noqa: F401  (a fixture)
from test_resume import assert_same_run, final_state, step_losses
from test_resume import overrides as resume_overrides
from test_train import compose_train, random_ae, tiny_overrides  # noqa: F401  (random_ae is a fixture)

from kontext.formats.lora_files import read_adapter
from kontext.network.lora import LORA, resolve_targets, unwrap
from kontext.network.model import FLUX_PRESETS, build_flux, load_flux
from kontext.run import CONFIG_DIR, run

TINY = FLUX_PRESETS["tiny"]
pytestmark = pytest.mark.usefixtures("one_thread")


# ----------------------------------------------------------------------- the real composition

@pytest.fixture(scope="module")
def data_root(tmp_path_factory, random_ae):  # noqa: F811
    root = tmp_path_factory.mktemp("lora")
    cfg = compose_train(tiny_overrides(root, random_ae))
    for step in cfg.prepare.values():
        instantiate(step)
    return root


def lora_overrides(base_file) -> list[str]:  # noqa: F811
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
                                    if n in resolve_targets(build_flux(TINY), LORA.targets))
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
    # The run starts another: full training (whole, or built on meta) or a new LoRA on its merge.
    from kontext.stages.flow import FlowStage

    for kwargs in ({}, {"parallel": {"meta_build": True}}, {"lora": {"rank": 2}}):
        stage = FlowStage(TINY, init_from=str(run_dir), **kwargs)
        if kwargs.get("parallel"):
            stage.model.to_empty(device="cpu")
            stage.initialise_shards()
            assert stage._init_rows is None  # the merged rows are not kept
        start = unwrap(stage.model).state_dict() if "lora" in kwargs else stage.model.state_dict()
        assert start.keys() == exported.keys() and all(torch.equal(start[k], exported[k]) for k in start), kwargs
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


def test_lora_run_on_an_int8_base_resumes_exactly_and_exports_the_merge(data_root, random_ae, base_file):  # noqa: F811
    """`adapter.quantize_base=int8`: the base's block linears train as torchao int8 weights; the
    run resumes bit for bit, checkpoints the adapters alone and exports the dequantised base with
    the EMA adapters merged."""
    pytest.importorskip("torchao")
    from torchao.quantization import Int8WeightOnlyConfig, quantize_

    def cfg(run_dir, *extra):
        return compose_train([*resume_overrides(data_root, random_ae, run_dir), *lora_overrides(base_file),
                              "adapter.quantize_base=int8", *extra])

    straight, resumed = data_root / "int8_straight", data_root / "int8_resumed"
    run(cfg(straight, "stage.finish.export=true"))
    run(cfg(resumed, "+callbacks.preempt._target_=test_resume.SignalAt", "+callbacks.preempt.step=5"))
    run(cfg(resumed))
    assert_same_run(resumed, straight)
    assert all(k == "ema.num_updates" or ".lora_" in k for k in final_state(resumed)["weights"])
    adapter = read_adapter(straight / "lora" / "adapter.safetensors")
    base = load_flux(base_file).state_dict()
    exported = load_flux(straight / "export" / "transformer.safetensors").state_dict()
    rounded = 0
    for key, value in exported.items():
        layer = key.removesuffix(".weight")
        want = base[key]
        if key.endswith(".weight") and key.startswith(("double_blocks", "single_blocks")) and want.ndim == 2:
            linear = torch.nn.Linear(want.shape[1], want.shape[0], bias=False)
            linear.weight.data.copy_(want)
            quantize_(linear, Int8WeightOnlyConfig())
            want, rounded = linear.weight.dequantize().to(want.dtype), rounded + 1
        if layer in adapter.layers:
            want = want + adapter.alpha / adapter.rank * adapter.layers[layer].up @ adapter.layers[layer].down
        torch.testing.assert_close(value, want, atol=1e-6, rtol=0, msg=key)
    assert rounded == 26
    # sample.py checkpoint=<run> merges the checkpoint's adapters into the same rounded base.
    from kontext.pipeline import KontextPipeline

    merged = KontextPipeline.from_run_dir(straight).model.state_dict()
    assert all(torch.equal(merged[k], v) for k, v in exported.items())


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


class RecordShards(Callback):
    """Writes, per rank at the start of training, each parameter's kind (DTensor or not), global
    and local shape, dtype and whether it trains, and which blocks are compiled: `<out>/rank<R>.json`."""

    def __init__(self, out: str):
        self.out = Path(out)

    def on_train_start(self, trainer, pl_module):
        from torch.distributed.tensor import DTensor

        seen = {name: {"dtensor": isinstance(p, DTensor), "shape": list(p.shape), "dtype": str(p.dtype),
                       "local": list(p.to_local().shape if isinstance(p, DTensor) else p.shape),
                       "trains": p.requires_grad}
                for name, p in pl_module.model.named_parameters()}
        from kontext.scale.parallel import blocks

        seen["compiled blocks"] = [getattr(b, "_compiled_call_impl", None) is not None for b in blocks(pl_module.model)]
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / f"rank{trainer.global_rank}.json").write_text(json.dumps(seen))


@pytest.mark.slow
def test_lora_under_fsdp_two_processes_resumes_exactly(data_root, random_ae, base_file):  # noqa: F811
    """FSDP2 per block over 2 CPU processes (gloo) with peft's layers inside the blocks: the base
    is sharded and frozen in bf16 (param_dtype bfloat16, selective checkpointing), the fp32
    adapters train; a sharded checkpoint holds the adapters alone (one shard per rank), and a run
    preempted halfway and resumed matches an uninterrupted one at every step, bit for bit. The
    interrupted run also samples grids with the EMA adapters swapped into the sharded model
    (steps 6 and 12), which must leave training as it was."""
    from kontext.formats.consolidate import consolidate

    def args(run_dir: Path, grids: bool = True) -> list[str]:
        grid = ["callbacks.metrics.grid_every_n_steps=6", "callbacks.metrics.grid_steps=2"] if grids else []
        return [*resume_overrides(data_root, random_ae, run_dir), *lora_overrides(base_file), *FSDP, *grid,
                "parallel.param_dtype=bfloat16", "parallel.activation_checkpointing=selective"]

    straight_dir, resumed_dir = data_root / "fsdp_lora_straight", data_root / "fsdp_lora_resumed"
    shards = data_root / "fsdp_lora_shards"
    _train_cli([*args(straight_dir, grids=False), "+callbacks.shards._target_=test_lora_runs.RecordShards",
                f"+callbacks.shards.out={shards}"], data_root)
    first = _train_cli([*args(resumed_dir), "+callbacks.preempt._target_=test_resume.SignalAt",
                        "+callbacks.preempt.step=5"], data_root)
    assert "stopped at step 6 for a requeue" in first.stdout
    last = resumed_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and len(list(last.glob("*.distcp"))) == 2
    _train_cli(args(resumed_dir), data_root)

    # Each rank holds half of every block's frozen base (dim 0 split in two, in bf16) and half
    # of each adapter tensor in fp32.
    ranks = [json.loads((shards / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert not any(flag for seen in ranks for flag in seen.pop("compiled blocks"))  # eager here
    blocks = [n for n in ranks[0] if n.startswith(("double_blocks.", "single_blocks."))]
    base = [n for n in blocks if not ranks[0][n]["trains"]]
    adapters = [n for n in ranks[0] if ranks[0][n]["trains"]]
    assert len(adapters) == 40 and all(".lora_" in n for n in adapters) and len(base) > 40
    for n in base + adapters:
        for seen in ranks:
            p = seen[n]
            assert p["dtensor"] and p["dtype"] == ("torch.float32" if p["trains"] else "torch.bfloat16"), n
            assert p["local"][1:] == p["shape"][1:] and sum(s[n]["local"][0] for s in ranks) == p["shape"][0], n
            assert p["local"][0] == -(-p["shape"][0] // 2) or seen is ranks[1], n
    adapter_bytes = 4 * sum(torch.Size(ranks[0][n]["shape"]).numel() for n in adapters)
    base_bytes = 2 * sum(torch.Size(ranks[0][n]["shape"]).numel() for n in ranks[0] if not ranks[0][n]["trains"])
    # The checkpoint's tensors: the adapters, their EMA and AdamW's two moments (4 x the
    # adapters' fp32 bytes), plus step counters; no byte of the base.
    from torch.distributed.checkpoint import FileSystemReader

    entries = FileSystemReader(str(last)).read_metadata().state_dict_metadata.values()
    payload = sum(e.size.numel() * e.properties.dtype.itemsize for e in entries if hasattr(e, "size"))
    folder = sum(f.stat().st_size for f in last.iterdir())
    print(f"LoRA FSDP checkpoint: {payload:,} bytes of tensors ({folder:,} on disk) for {adapter_bytes // 4:,} "
          f"adapter weights (4 x {adapter_bytes:,} = {4 * adapter_bytes:,}); the bf16 base: {base_bytes:,} bytes")
    assert 4 * adapter_bytes <= payload <= 4 * adapter_bytes + 1024

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
    """The paper's recipe (`parallel=paper`: param_dtype bfloat16, selective checkpointing,
    per-block compile) over peft's layers: every block compiled on both ranks; the frozen base is
    stored in bf16 (the export, its merge, comes out in bf16), the adapters and their EMA in fp32."""
    run_dir, shards = data_root / "fsdp_lora_bf16", data_root / "fsdp_lora_bf16_shards"
    _train_cli([*tiny_overrides(data_root, random_ae), *lora_overrides(base_file), *FSDP, f"paths.output_dir={run_dir}",
                "trainer.max_steps=4", "stage.optimizer.warmup_steps=1", "stage.finish.benchmark.n_per_op=0",
                "parallel=paper", "parallel.compile=true",  # (the embedded experiment turns compile off)
                "+callbacks.shards._target_=test_lora_runs.RecordShards",
                f"+callbacks.shards.out={shards}"], data_root)
    for r in (0, 1):
        compiled = json.loads((shards / f"rank{r}.json").read_text())["compiled blocks"]
        assert len(compiled) == 4 and all(compiled), compiled
    adapter = read_adapter(run_dir / "lora" / "adapter.safetensors")
    assert all(w.up.dtype == w.down.dtype == torch.float32 for w in adapter.layers.values())
    base = load_flux(base_file).state_dict()
    exported = load_flux(run_dir / "export" / "transformer.safetensors").state_dict()
    assert {v.dtype for v in exported.values()} == {torch.bfloat16}
    for name, w in adapter.layers.items():
        want = base[f"{name}.weight"].bfloat16().float() + 2.0 * w.up @ w.down
        torch.testing.assert_close(exported[f"{name}.weight"].float(), want, atol=0, rtol=2**-8)
    assert max(w.up.abs().max() for w in adapter.layers.values()) > 1e-3  # the adapters trained
