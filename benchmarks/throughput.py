"""Training-step throughput on this machine: its matmul peak, the flow model's training step
(achieved GFLOP/s, share of that peak, samples/s), the same step of diffusers'
`FluxTransformer2DModel` built with the same configuration, measured in the same run, and where
our step's time goes.

    python benchmarks/throughput.py                       # small preset, batch 24, 30 steps
    python benchmarks/throughput.py --model tiny --steps 12
    python benchmarks/throughput.py --compile             # also the step with parallel.compile=true
    python benchmarks/throughput.py --no-breakdown        # without the profile of our step
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/throughput.py

The batches are real Shapes-Edit training cases encoded by the shipped autoencoder and the
embedded text encoder, five edit batches (target + reference tokens) to one text-to-image
batch, as in the training mix. A step is what `python train.py` does per batch: forward
(`kontext.network.packing.predict`, text compacted), flow loss, backward, gradient clipping at 1,
fused AdamW and the EMA update. diffusers' transformer gets the converted weights (its
output is checked against ours first), the padded text (it has no compaction) and the same
loss, clipping, optimizer and EMA; it is also compared with ours at equal text length. The
steps of all variants are interleaved, so a shared machine's noise hits them alike; times
are medians after a warm-up that passes over every batch. `--compile` adds our step with each
block compiled as `parallel.compile=true` does, and the seconds its warm-up spent compiling.

FLOPs follow `kontext.stages.metrics.flux_flops` (linear layers and attention; backward = 2x
forward), for the work each model does: ours predicts the target tokens only. The peak is the
best of repeated square matmuls (fp32; bf16 too when the CPU has native bf16 instructions).

The breakdown (CPU only) profiles two more passes of our step over the six batches and sorts
every operator's own time into kinds of work (`time_by_kind`); what the profiler does not see
(Python between operators, the profiler itself) is the difference to the wall time of those
steps. It ends with the time a step would take at 70% of the peak, and what that leaves for
everything but the linear layers.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time

MIX = {"edit": 5 / 6, "t2i": 1 / 6}  # the training mix: five edit batches to one text-to-image batch


def has_native_bf16() -> bool:
    import torch

    cap = torch.backends.cpu.get_cpu_capability()
    if cap == "AVX2" or cap == "DEFAULT":
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next(line for line in f if line.startswith("flags")).split()
    except (OSError, StopIteration):
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def make_batches(batch: int, device, seed: int = 0) -> list[dict]:
    """Five edit batches and one text-to-image batch of encoded Shapes-Edit training cases."""
    import torch

    from kontext.data.shapes_edit import OPS, make_case
    from kontext.images import to_tensor
    from kontext.latent.autoencoder import load_autoencoder
    from kontext.latent.text import build_text_encoder

    ae, text = load_autoencoder(), build_text_encoder("embedded", max_length=32)
    edit_ops = [op for op in OPS if op != "t2i"]
    out, index = [], 0
    for kind in ["edit"] * 5 + ["t2i"]:
        cases = []
        for i in range(batch):
            op = edit_ops[(index + i) % len(edit_ops)] if kind == "edit" else "t2i"
            cases.append(make_case(op, split="train", seed=seed, index=index + i))
        index += batch
        with torch.no_grad():
            x = ae.encode(to_tensor([c.target for c in cases]))
            refs = [ae.encode(to_tensor([c.reference for c in cases]))] if kind == "edit" else []
        feats = text.encode([c.instruction for c in cases])
        out.append({"kind": kind, "x": x.to(device), "refs": [r.to(device) for r in refs],
                    "txt": feats.txt.to(device), "vec": feats.vec.to(device)})
    return out


class Trainer:
    """One training step of a transformer on a batch: forward, flow loss, backward, clip, AdamW, EMA."""

    def __init__(self, name: str, model, forward, flops: list[tuple[float, float]], lr: float = 1e-4):
        import torch

        self.name, self.model, self.forward = name, model.train(), forward
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        self.opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), **({"fused": True} if fused else {}))
        self.flops = flops  # (all, attention) FLOPs of a step on each batch (`step_flops`)
        self.warmup_s = 0.0
        self.timed: dict[str, list[tuple[float, float]]] = {"edit": [], "t2i": []}  # kind -> (seconds, FLOPs)

    def step(self, b: dict, gen) -> float:
        """One step; returns its seconds."""
        import torch
        from torch.profiler import record_function

        from kontext.diffusion import flow
        from kontext.network import packing

        sync = torch.cuda.synchronize if b["x"].is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        tokens = packing.prepare(b["x"], b["refs"])
        noise = torch.randn(tokens.img.shape, generator=gen).to(tokens.img)
        t = flow.sample_t(tokens.img.shape[0], 0.5, 1.0, generator=gen).to(tokens.img)
        z_t = flow.interpolate(tokens.img, noise, t)
        pred = self.forward(self.model, tokens, z_t, t, b["txt"], b["vec"])
        loss = flow.flow_loss(pred, flow.velocity_target(tokens.img, noise))
        loss.backward()
        with record_function("Optimizer.clip_grad_norm"):  # (labels for the breakdown)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)  # as FlowStage clips
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad(), record_function("Optimizer.ema"):
            ema, live = list(self.ema.parameters()), list(self.model.parameters())
            torch._foreach_lerp_(ema, live, 0.005)
        sync()
        return time.perf_counter() - start


def ours(compact: bool):
    import torch

    from kontext.network import packing

    def forward(model, tokens, z_t, t, txt, vec):
        guidance = torch.ones_like(t) if model.params.guidance_embed else None  # a guidance-distilled preset (tiny)
        return packing.predict(model, tokens, z_t, t, txt, vec, guidance, compact)

    return forward


def theirs(model, tokens, z_t, t, txt, vec):
    import torch

    from kontext.network import packing

    img, ids = tokens.joint(z_t)
    pred = model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=vec, timestep=t,
                 img_ids=ids[0], txt_ids=packing.txt_ids(1, txt.shape[1], device=txt.device)[0],
                 guidance=torch.ones_like(t) if model.config.guidance_embeds else None,
                 return_dict=False)[0]
    return packing.target_slice(pred, tokens.n_img)


def step_flops(params, b: dict, compact: bool, predicts_all: bool = False) -> tuple[float, float]:
    """(all, attention) FLOPs of a training step on batch `b` (backward = 2x forward): text
    compacted or not; `predicts_all`: every image token predicted (diffusers' transformer, which
    also runs the text rows through its last block: a ~2% undercount of its work)."""
    from kontext.network import packing
    from kontext.stages.metrics import attention_flops, flux_flops

    tokens = packing.prepare(b["x"], b["refs"])
    n_img = tokens.img.shape[1] + tokens.ctx.shape[1]  # all image tokens (tokens.n_img: the target's)
    n_txt = packing.model_text(b["txt"], compact)[0].shape[1]
    n_out = None if predicts_all else tokens.n_img
    batch = tokens.img.shape[0]
    return (3 * batch * flux_flops(params, n_img, n_txt, n_out),
            3 * batch * attention_flops(params, n_img, n_txt, n_out))


def build_models(preset: str, device):
    """Our transformer (weights ~ N(0, 0.02), adaLN included, so every block matters) and
    diffusers' FluxTransformer2DModel holding the same weights; None for diffusers if absent."""
    import torch

    from kontext.network.model import build_flux, get_params

    torch.manual_seed(0)
    params = get_params(preset)
    model = build_flux(params)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    model.to(device)
    try:
        import diffusers

        from kontext.formats.diffusers_format import bfl_to_diffusers, diffusers_config
    except ImportError:
        return params, model, None
    config = {k: v for k, v in diffusers_config(params).items() if not k.startswith("_")}
    other = diffusers.FluxTransformer2DModel(**config)
    other.load_state_dict(bfl_to_diffusers(model.state_dict(), params), strict=True)
    return params, model, other.to(device)


def check_same_function(model, other, b: dict) -> float:
    """Largest difference between our and diffusers' predictions on one batch (guidance 1 for
    a guidance-distilled preset)."""
    import torch

    from kontext.network import packing

    tokens = packing.prepare(b["x"], b["refs"])
    t = torch.full((tokens.img.shape[0],), 0.5, device=b["x"].device)
    with torch.no_grad():
        a = ours(compact=True)(model, tokens, tokens.img, t, b["txt"], b["vec"])
        c = theirs(other, tokens, tokens.img, t, b["txt"], b["vec"])
    return (a - c).abs().max().item()


# Where a step's time goes. An operator's own time belongs to the outermost operator around it
# (itself included) that names a kind here; the optimizer's labels are Trainer.step's.
LINEAR = "linear layers (linear, mm, addmm)"
ENGINE_NODE = "autograd::engine::evaluate_function: "
CLAIMING_KINDS = {
    LINEAR: ("aten::linear", "aten::matmul", "aten::mm", "aten::addmm", "aten::bmm", "aten::addbmm", "aten::baddbmm",
             *(prefix + node for prefix in ("", ENGINE_NODE) for node in ("AddmmBackward0", "MmBackward0"))),
    "attention (SDPA forward and backward)": (
        "aten::scaled_dot_product_attention", "aten::_scaled_dot_product", "aten::_flash_attention",
        "aten::_efficient_attention", "ScaledDotProduct", ENGINE_NODE + "ScaledDotProduct"),
    "copies and concatenation": ("aten::copy_", "aten::cat", "aten::_to_copy", "aten::clone", "aten::stack",
                                 "aten::contiguous"),
    "optimizer, clipping, EMA": ("Optimizer.", "aten::_fused_adam", "aten::_foreach_"),
}
ELEMENTWISE = "element-wise, norms, activations, reductions"
VIEWS = "views, reshapes and allocation"
ENGINE = "autograd engine"
UNSEEN = "outside any operator (Python, the profiler)"
VIEW_OPS = {"aten::" + name for name in (
    "view", "_unsafe_view", "view_as", "t", "transpose", "permute", "movedim", "as_strided", "reshape",
    "_reshape_alias", "expand", "expand_as", "unsqueeze", "squeeze", "slice", "select", "narrow", "split",
    "split_with_sizes", "chunk", "unflatten", "flatten", "detach", "alias", "to", "type_as", "unbind",
    "view_as_real", "view_as_complex", "empty", "empty_like", "empty_strided", "new_empty", "resize_",
    "lift_fresh", "result_type")}  # (no-op `to` and `type_as` calls: one that converts runs `_to_copy`)


def kind_of(chain: list[str]) -> str:
    """The kind of one operator's own time, from the names of the operators around it (outermost
    first, itself last)."""
    for name in chain:
        kind = next((k for k, prefixes in CLAIMING_KINDS.items() if name.startswith(prefixes)), None)
        if kind is not None:
            return kind
    outermost = next((name for name in chain if name.startswith("aten::")), None)
    if outermost is None:
        return ENGINE  # the engine's own nodes (evaluate_function, *Backward0, AccumulateGrad)
    return VIEWS if outermost in VIEW_OPS else ELEMENTWISE


def time_by_kind(trainer: Trainer, batches: list[dict], gen, rounds: int = 2) -> tuple[dict[str, float], float]:
    """(milliseconds per step of each kind of work, wall milliseconds per step) over `rounds`
    profiled passes over `batches` (CPU)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        wall = sum(trainer.step(b, gen) for _ in range(rounds) for b in batches)
    steps = rounds * len(batches)
    ms = dict.fromkeys([*CLAIMING_KINDS, ELEMENTWISE, VIEWS, ENGINE, UNSEEN], 0.0)
    for event in prof.events():
        chain, parent = [event.name], event.cpu_parent
        while parent is not None:
            chain.append(parent.name)
            parent = parent.cpu_parent
        ms[kind_of(chain[::-1])] += event.self_cpu_time_total / 1e3 / steps
    wall_ms = wall * 1e3 / steps
    ms[UNSEEN] = wall_ms - sum(ms.values())  # negative only if the operators' times did not add up
    return ms, wall_ms


def print_breakdown(ms: dict[str, float], wall_ms: float, linear_gflop: float, attn_gflop: float, peak: float) -> float:
    """Print where our step's time goes; returns the milliseconds of a step at 70% of `peak`."""
    linear = ms[LINEAR]
    print(f"\nwhere our step's time goes (profiled steps, {wall_ms:.1f} ms each with the profiler's overhead)")
    for kind, t in ms.items():
        line = f"  {kind:46s} {t:6.1f} ms {t / wall_ms:5.1%}"
        if kind == LINEAR:
            rate = linear_gflop / t * 1e3
            line += f"   {linear_gflop:.2f} GFLOP at {rate:.1f} GFLOP/s, {rate / peak:.0%} of the peak"
        elif kind.startswith("attention"):
            line += f"   {attn_gflop:.2f} GFLOP"
        print(line)
    goal = (linear_gflop + attn_gflop) / (0.7 * peak) * 1e3
    print(f"a step at 70% of the peak takes {goal:.1f} ms: that leaves {max(goal - linear, 0):.1f} ms for everything "
          f"but the linear layers ({wall_ms - linear:.1f} ms here)")
    return goal


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=6, help="untimed steps first (at least one per batch: 6)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the profile of where our step's time goes")
    parser.add_argument("--compile", action="store_true",
                        help="also time our step with per-block torch.compile (minutes of compiling on a CPU)")
    args = parser.parse_args()

    import torch

    from kontext.scale.parallel import ParallelConfig, compile_problem, parallelize
    from kontext.stages.metrics import cpu_name, matmul_peak

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    cap = torch.backends.cpu.get_cpu_capability()
    print(f"machine: {cpu_name()}; torch {torch.__version__}; CPU capability {cap}; "
          f"{torch.get_num_threads()} threads" + (f"; {torch.cuda.get_device_name(device)}" if device.type == "cuda" else ""))
    peak = {"fp32": matmul_peak(torch.float32, device)}
    if device.type == "cuda" or has_native_bf16():
        peak["bf16"] = matmul_peak(torch.bfloat16, device)
    print("matmul peak (2048^3): " + ", ".join(f"{k} {v:.1f} GFLOP/s" for k, v in peak.items())
          + ("" if "bf16" in peak else " (no native bf16 on this CPU: bf16 would be emulated)"))

    params, model, other = build_models(args.model, device)
    batches = make_batches(args.batch, device)
    compact_flops = [step_flops(params, b, compact=True) for b in batches]
    trainers = [Trainer("ours", model, ours(compact=True), compact_flops),
                Trainer("ours, full text", copy.deepcopy(model), ours(compact=False),
                        [step_flops(params, b, compact=False) for b in batches])]
    problem = compile_problem(device) if args.compile else None
    if problem:
        print(f"no compiled variant: {problem}")
    elif args.compile:
        compiled = parallelize(copy.deepcopy(model), ParallelConfig(compile=True), device=device)
        trainers.append(Trainer("ours, compiled", compiled, ours(compact=True), compact_flops))
    max_abs_diff = None
    if other is not None:
        max_abs_diff = check_same_function(model, other, batches[0])
        print(f"diffusers FluxTransformer2DModel vs ours on the same weights: max |diff| {max_abs_diff:.1e}")
        trainers.append(Trainer("diffusers", other, theirs,
                                [step_flops(params, b, compact=False, predicts_all=True) for b in batches]))
    else:
        print("diffusers is not installed: no comparison (pip install diffusers)")

    gen = torch.Generator().manual_seed(0)
    warmup = max(args.warmup, len(batches))  # every batch (each text length a compiled block meets) once
    for i in range(warmup + args.steps):  # every variant steps on batch i before any takes i + 1
        b = batches[i % len(batches)]
        for tr in trainers:
            seconds = tr.step(b, gen)
            if i < warmup:
                tr.warmup_s += seconds
            else:
                tr.timed[b["kind"]].append((seconds, tr.flops[i % len(batches)][0]))

    results = {}
    for tr in trainers:
        med = {k: statistics.median(s for s, _ in v) for k, v in tr.timed.items() if v}
        step = sum(MIX[k] * med[k] for k in med) / sum(MIX[k] for k in med)
        gflop = sum(MIX[k] * statistics.mean(f for _, f in tr.timed[k]) for k in med) / sum(MIX[k] for k in med) / 1e9
        results[tr.name] = {"ms_edit": med.get("edit", 0) * 1e3, "ms_t2i": med.get("t2i", 0) * 1e3,
                            "ms_step": step * 1e3, "samples_per_s": args.batch / step,
                            "gflop_per_step": gflop, "gflops": gflop / step, "peak_share": gflop / step / peak["fp32"],
                            "warmup_s": tr.warmup_s}

    print(f"\n{args.model} preset, batch {args.batch}, {args.steps} timed steps per variant (median; mix 5 edit : 1 t2i)")
    print(f"{'':18s} {'edit ms':>8s} {'t2i ms':>8s} {'step ms':>8s} {'samples/s':>10s} {'GFLOP/step':>11s} "
          f"{'GFLOP/s':>8s} {'of fp32 peak':>13s}")
    for name, r in results.items():
        print(f"{name:18s} {r['ms_edit']:8.1f} {r['ms_t2i']:8.1f} {r['ms_step']:8.1f} {r['samples_per_s']:10.1f} "
              f"{r['gflop_per_step']:11.2f} {r['gflops']:8.1f} {r['peak_share']:13.1%}")
    if "ours, compiled" in results:
        c = results["ours, compiled"]
        print(f"\nper-block compile: {results['ours']['ms_step'] / c['ms_step']:.2f}x our eager step, after "
              f"{c['warmup_s'] - results['ours']['warmup_s']:.0f} s more in its warm-up (compiling)")
    if "diffusers" in results:
        d = results["diffusers"]["ms_step"]
        print(f"\nours vs diffusers on the same batches: {d / results['ours']['ms_step']:.2f}x faster "
              f"(at equal text length: {d / results['ours, full text']['ms_step']:.2f}x)")

    breakdown = None
    if not args.no_breakdown and device.type != "cpu":
        print("\nno breakdown: it profiles CPU operators only")
    elif not args.no_breakdown:
        total, attn = (statistics.mean(f[i] for f in compact_flops) / 1e9 for i in (0, 1))  # the six batches: the mix
        ms, wall_ms = time_by_kind(trainers[0], batches, gen)
        goal = print_breakdown(ms, wall_ms, total - attn, attn, peak["fp32"])
        breakdown = {"ms": ms, "wall_ms": wall_ms, "linear_gflop": total - attn, "attention_gflop": attn,
                     "ms_at_70pct_of_peak": goal}
    print(json.dumps({"cpu": cpu_name(), "capability": cap, "threads": torch.get_num_threads(),
                      "peak_gflops": peak, "model": args.model, "batch": args.batch, "max_abs_diff": max_abs_diff,
                      "results": {k: {m: round(v, 4) for m, v in r.items()} for k, r in results.items()},
                      "breakdown": breakdown}))


if __name__ == "__main__":
    main()
