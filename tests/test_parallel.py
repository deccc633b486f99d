"""The parallelism recipe (kontext/scale/parallel.py): activation checkpointing changes no number and no
name; FSDP2 over 2 CPU processes (gloo) trains the same weights as one process on the same
global batch; a sharded checkpoint saves, loads back into a fresh sharded model, and
consolidates to the reference layout."""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from tiny_kontext import random_autoencoder
from tiny_kontext import random_flux as _random_flux

from kontext.diffusion import flow
from kontext.network import packing
from kontext.network.model import Flux
from kontext.scale.parallel import (
    ParallelConfig,
    blocks,
    cpu_mesh,
    is_sharded,
    parallelize,
    retained_bytes,
    shard_frozen,
)
from kontext.stages.ema import EMA

STEPS = 3
GLOBAL_BATCH = 4
LR = 1e-3
# fp32 on CPU: the sharded run averages two half-batch gradients where the single process takes
# one mean, so sums happen in another order, and AdamW's normalised update amplifies that rounding
# where a gradient is near zero. Weights agree to 1% of one step's update (lr), not bit for bit.
ATOL = 0.01 * LR


pytestmark = pytest.mark.usefixtures("one_thread")


def random_flux(seed: int) -> Flux:
    """The tiny preset with every weight perturbed; the same for a seed in every process."""
    torch.manual_seed(seed)
    return _random_flux(seed)


def flow_batch(seed: int, b: int = GLOBAL_BATCH) -> dict:
    """One global batch of the flow objective's inputs: target + one context latent, text, times, noise."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 16, 8, 8, generator=g)
    ctx = [torch.randn(b, 16, 8, 8, generator=g)]
    tokens = packing.prepare(x, ctx)
    noise = torch.randn(tokens.img.shape, generator=g)
    return {"tokens": tokens, "noise": noise, "t": flow.sample_t(b, 0.5, 1.0, generator=g),
            "txt": torch.randn(b, 7, 384, generator=g), "vec": torch.randn(b, 384, generator=g)}


def flow_loss(model: Flux, batch: dict, rows: slice = slice(None)) -> torch.Tensor:
    """The training objective of `FlowStage.training_step` on the rows `rows` of a global batch."""
    tokens, noise, t = batch["tokens"], batch["noise"][rows], batch["t"][rows]
    target = tokens.img[rows]
    z_t = flow.interpolate(target, noise, t)
    img = torch.cat((z_t, tokens.ctx[rows]), dim=1)
    ids = torch.cat((tokens.img_ids[rows], tokens.ctx_ids[rows]), dim=1)
    b, txt = target.shape[0], batch["txt"][rows]
    pred = model(img, ids, txt, packing.txt_ids(b, txt.shape[1]), t, batch["vec"][rows], torch.ones(b))
    return flow.flow_loss(packing.target_slice(pred, tokens.n_img), flow.velocity_target(target, noise))


def train(model: Flux, ema: EMA, rows: slice = slice(None), steps: int = STEPS) -> list[float]:
    opt = torch.optim.AdamW(model.parameters(), lr=LR)
    losses = []
    for step in range(steps):
        loss = flow_loss(model, flow_batch(step), rows)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 0.05)  # small enough to clip: checks the global norm
        opt.step()
        opt.zero_grad()
        ema.update(model)
        losses.append(loss.item())
    return losses


def full_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: (v.full_tensor() if hasattr(v, "full_tensor") else v).detach().clone()
            for k, v in model.state_dict().items()}


# ------------------------------------------------------------------------ single process

@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_keeps_names_and_numbers(mode):
    plain, ac = random_flux(1).train(), random_flux(1).train()
    parallelize(ac, ParallelConfig(activation_checkpointing=mode))
    assert all(type(b).__name__.startswith("Checkpointed") for b in blocks(ac))
    assert list(ac.state_dict()) == list(plain.state_dict())
    batch = flow_batch(0)
    loss_plain, loss_ac = flow_loss(plain, batch), flow_loss(ac, batch)
    loss_plain.backward()
    loss_ac.backward()
    assert loss_ac.item() == loss_plain.item()
    for (name, p), q in zip(plain.named_parameters(), ac.parameters(), strict=True):
        assert torch.equal(p.grad, q.grad), name
    with torch.no_grad():  # no grad (sampling, EMA): the plain forward, no recomputation
        assert torch.equal(flow_loss(ac, batch), flow_loss(plain, batch))


def test_activation_checkpointing_keeps_less_for_backward():
    """Full checkpointing keeps only block inputs for backward; selective also keeps matmul and
    attention outputs; both keep less than no checkpointing."""

    def kept(mode: str) -> int:
        model = random_flux(1).train()
        parallelize(model, ParallelConfig(activation_checkpointing=mode))
        batch = flow_batch(0)
        return retained_bytes(lambda: flow_loss(model, batch))

    none, selective, full = kept("none"), kept("selective"), kept("full")
    print(f"\nkept for backward (tiny, batch {GLOBAL_BATCH}): none {none}, selective {selective}, full {full} bytes")
    assert full < selective < none, (none, selective, full)


def _compiled(block: torch.nn.Module) -> bool:
    return getattr(block, "_compiled_call_impl", None) is not None


@pytest.mark.slow
@pytest.mark.parametrize("checkpointing", ["none", "full", "selective"])
def test_compiled_blocks_keep_names_and_numbers(checkpointing):
    """Per-block compile, also over checkpointed blocks (`parallel=paper` is selective + compile):
    eager's names, loss and gradients."""
    plain, compiled = random_flux(1).train(), random_flux(1).train()
    parallelize(compiled, ParallelConfig(compile=True, activation_checkpointing=checkpointing), device="cpu")
    assert all(_compiled(b) for b in blocks(compiled))
    assert list(compiled.state_dict()) == list(plain.state_dict())
    batch = flow_batch(0)
    loss_plain, loss_compiled = flow_loss(plain, batch), flow_loss(compiled, batch)
    loss_plain.backward()
    loss_compiled.backward()
    torch.testing.assert_close(loss_compiled, loss_plain, rtol=1e-5, atol=1e-6)
    for (name, p), q in zip(plain.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)


def test_compile_without_a_compiler_warns_and_runs_eagerly(monkeypatch):
    from torch._inductor import config

    monkeypatch.setattr(config.cpp, "cxx", (None, "/nonexistent/c++"))
    model = random_flux(1)
    with pytest.warns(UserWarning, match="C\\+\\+ compiler.*without compile"):
        parallelize(model, ParallelConfig(compile=True), device="cpu")
    assert not any(_compiled(b) for b in blocks(model))
    flow_loss(model, flow_batch(0)).backward()  # runs


def test_unknown_checkpointing_mode_is_refused():
    with pytest.raises(ValueError, match="activation_checkpointing"):
        ParallelConfig(activation_checkpointing="some")


# ---------------------------------------------------------------------------- 2 processes

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, out: str, mode: str) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # The reference: one process, the whole global batch.
        ref = random_flux(3).train()
        ref_ema = EMA(ref, decay=0.9)
        ref_losses = train(ref, ref_ema)

        model = random_flux(3).train()
        ema = EMA(model, decay=0.9)
        parallelize(model, ParallelConfig(activation_checkpointing=mode), cpu_mesh(), ema=ema.model)
        assert is_sharded(model) and is_sharded(ema.model)
        local = next(p for n, p in model.named_parameters() if n == "double_blocks.0.img_attn.qkv.weight")
        assert local.to_local().shape[0] == local.shape[0] // world  # really sharded, dim 0
        per_rank = GLOBAL_BATCH // world
        losses = train(model, ema, slice(rank * per_rank, (rank + 1) * per_rank))
        mean_losses = torch.tensor(losses)
        dist.all_reduce(mean_losses)
        mean_losses /= world

        report = {"max_weight_diff": 0.0, "max_ema_diff": 0.0,
                  "loss_diff": (mean_losses - torch.tensor(ref_losses)).abs().max().item()}
        for name, value in full_weights(model).items():
            report["max_weight_diff"] = max(report["max_weight_diff"], (value - ref.state_dict()[name]).abs().max().item())
        for name, value in full_weights(ema).items():
            if value.is_floating_point():
                diff = (value - ref_ema.state_dict()[name]).abs().max().item()
                report["max_ema_diff"] = max(report["max_ema_diff"], diff)
        moved = (full_weights(model)["double_blocks.0.img_attn.qkv.weight"]
                 - random_flux(3).state_dict()["double_blocks.0.img_attn.qkv.weight"]).abs().max().item()
        assert moved > 1e-4  # training moved the weights: the comparison is not vacuous

        # A sharded checkpoint: each rank writes its shard; a fresh sharded model loads it back.
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
        flow_loss(model, flow_batch(9), slice(rank * per_rank, (rank + 1) * per_rank)).backward()
        opt.step()
        state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt)}
        dcp.save(state, checkpoint_id=out + "/dcp")
        fresh = random_flux(4).train()
        parallelize(fresh, ParallelConfig(), cpu_mesh())
        fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
        fresh(**_zero_inputs()).sum().backward()  # materialise optimizer state to load into
        fresh_opt.step()
        fresh_state = {"model": get_model_state_dict(fresh), "optim": get_optimizer_state_dict(fresh, fresh_opt)}
        dcp.load(fresh_state, checkpoint_id=out + "/dcp")
        from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

        set_model_state_dict(fresh, fresh_state["model"])
        set_optimizer_state_dict(fresh, fresh_opt, fresh_state["optim"])
        a, b = full_weights(model), full_weights(fresh)
        report["checkpoint_weights_equal"] = all(torch.equal(a[k], b[k]) for k in a)
        sa, sb = opt.state_dict()["state"], fresh_opt.state_dict()["state"]
        report["checkpoint_optimizer_equal"] = all(
            torch.equal(sa[i]["exp_avg"].full_tensor(), sb[i]["exp_avg"].full_tensor()) for i in sa)
        # A frozen encoder sharded by layer (parallel.shard_frozen) encodes as an unsharded copy does.
        torch.manual_seed(5)
        image = torch.rand(2, 3, 64, 64) * 2 - 1
        encoder, sharded_encoder = random_autoencoder(5), random_autoencoder(5)
        shard_frozen(sharded_encoder, cpu_mesh())
        with torch.no_grad():
            report["frozen_encoder_diff"] = (sharded_encoder.encode(image) - encoder.encode(image)).abs().max().item()
        report["frozen_encoder_sharded"] = any(hasattr(p, "to_local") for p in sharded_encoder.parameters())
        if mode == "none":  # and the embedded text encoder (MiniLM layers), as T5 would be
            from tiny_kontext import TEXT_CONFIG

            from kontext.latent.text import build_text_encoder

            config = {k: v for k, v in TEXT_CONFIG.items() if k != "_target_"}
            text, sharded_text = build_text_encoder(**config), build_text_encoder(**config)
            shard_frozen(sharded_text, cpu_mesh())
            prompts = ["make the red circle blue", "move the square left"]
            with torch.no_grad():
                a_feats, b_feats = text.encode(prompts), sharded_text.encode(prompts)
            report["frozen_encoder_diff"] = max(report["frozen_encoder_diff"],
                                                (a_feats.txt - b_feats.txt).abs().max().item(),
                                                (a_feats.vec - b_feats.vec).abs().max().item())
        if rank == 0:
            torch.save(a, out + "/full.pt")
            Path(out, "report.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


def _zero_inputs() -> dict:
    b, n, lt = 1, 4, 2
    return {"img": torch.zeros(b, n, 64), "img_ids": torch.zeros(b, n, 3), "txt": torch.zeros(b, lt, 384),
            "txt_ids": torch.zeros(b, lt, 3), "t": torch.zeros(b), "y": torch.zeros(b, 384),
            "guidance": torch.ones(b)}


@pytest.mark.parametrize("mode", ["none", "selective"])
def test_fsdp_two_processes_match_one_process(mode, tmp_path):
    mp.start_processes(_worker, args=(2, _free_port(), str(tmp_path), mode), nprocs=2, start_method="fork")
    report = json.loads((tmp_path / "report.json").read_text())
    print(f"\nFSDP2 2 ranks vs 1 process, {STEPS} steps, AC {mode}: {report}")
    assert report["max_weight_diff"] <= ATOL, report
    assert report["max_ema_diff"] <= ATOL, report
    assert report["loss_diff"] <= ATOL, report
    assert report["checkpoint_weights_equal"] and report["checkpoint_optimizer_equal"], report
    assert report["frozen_encoder_sharded"] and report["frozen_encoder_diff"] <= 1e-6, report

    # The sharded checkpoint, consolidated without any process group, is the trained model.
    from kontext.formats.consolidate import consolidate

    sd = consolidate(tmp_path / "dcp", prefix="model.")
    full = torch.load(tmp_path / "full.pt")
    assert sd.keys() == full.keys()
    assert all(torch.equal(sd[k], full[k]) for k in sd)
    assert os.listdir(tmp_path / "dcp") and (tmp_path / "dcp" / ".metadata").is_file()


def _paper_worker(rank: int, world: int, port: int, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        ref = random_flux(3).train()
        ref_losses = train(ref, EMA(ref, decay=0.9), steps=PAPER_STEPS)

        model = random_flux(3).train()
        ema = EMA(model, decay=0.9)
        recipe = ParallelConfig(param_dtype="bfloat16", reduce_dtype="float32", activation_checkpointing="selective")
        parallelize(model, recipe, cpu_mesh(), ema=ema.model)
        seen = set()  # the dtype of the weights a block computes with, after FSDP's all-gather
        qkv = model.double_blocks[0].img_attn.qkv
        hook = qkv.register_forward_pre_hook(lambda m, args: seen.add((m.weight.dtype, args[0].dtype)))
        per_rank = GLOBAL_BATCH // world
        losses = torch.tensor(train(model, ema, slice(rank * per_rank, (rank + 1) * per_rank), steps=PAPER_STEPS))
        hook.remove()
        dist.all_reduce(losses)
        losses /= world
        flow_loss(model, flow_batch(0), slice(rank * per_rank, (rank + 1) * per_rank)).backward()
        report = {
            "ref_losses": ref_losses, "losses": losses.tolist(), "compute_dtypes": sorted(str(d) for d in seen),
            "master_dtypes": sorted({str(p.dtype) for p in model.parameters()}),
            "grad_dtypes": sorted({str(p.grad.dtype) for p in model.parameters() if p.grad is not None}),
            "sharded": is_sharded(model) and is_sharded(ema.model),
            "ema_dtypes": sorted({str(p.dtype) for p in ema.model.parameters()}),
        }
        if rank == 0:
            Path(out, "report.json").write_text(json.dumps(report))
    finally:
        dist.destroy_process_group()


PAPER_STEPS = 12


@pytest.mark.slow
def test_paper_mixed_precision_under_fsdp_two_processes(tmp_path):
    """The paper's recipe (parallel=paper: bf16 all-gathers and compute, fp32 gradient
    reduce-scatter, fp32 master weights, selective checkpointing) trains under FSDP2 on 2 CPU
    processes with gloo, and its losses track one fp32 process's on the same global batches."""
    mp.start_processes(_paper_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, start_method="fork")
    report = json.loads((tmp_path / "report.json").read_text())
    print(f"\nparallel=paper, 2 ranks vs fp32 1 process: {report}")
    assert report["sharded"]
    assert report["compute_dtypes"] == [str((torch.bfloat16, torch.bfloat16))], report  # weights and activations
    assert report["master_dtypes"] == report["grad_dtypes"] == report["ema_dtypes"] == ["torch.float32"], report
    ref, got = torch.tensor(report["ref_losses"]), torch.tensor(report["losses"])
    assert got[-4:].mean() < got[:4].mean() - 0.05, report  # it trains
    assert ((got - ref).abs() / ref).max() < 0.02, report  # within bf16 rounding of the fp32 run
