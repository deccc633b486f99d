"""Training-step throughput on this machine: its matmul peak, the flow model's training step
(achieved GFLOP/s, share of that peak, samples/s), and the same step of diffusers'
`FluxTransformer2DModel` built with the same configuration, measured in the same run.

    python benchmarks/throughput.py                       # small preset, batch 24, 30 steps
    python benchmarks/throughput.py --model tiny --steps 10
    python benchmarks/throughput.py --compile             # also the step with parallel.compile=true
    ATEN_CPU_CAPABILITY=avx2 ONEDNN_MAX_CPU_ISA=AVX2 MKL_ENABLE_INSTRUCTIONS=AVX2 python benchmarks/throughput.py

The batches are real Shapes-Edit training cases encoded by the shipped autoencoder and the
embedded text encoder, five edit batches (target + reference tokens) to one text-to-image
batch, as in the training mix. A step is what `python train.py` does per batch: forward
(`kontext.network.packing.predict`, text compacted), flow loss, backward, gradient clipping at 1,
fused AdamW and the EMA update. diffusers' transformer gets the converted weights (its
output is checked against ours first), the padded text (it has no compaction) and the same
loss, clipping, optimizer and EMA; it is also compared with ours at equal text length. The
steps of all variants are interleaved, so a shared machine's noise hits them alike; times
are medians after warm-up. `--compile` adds our step with each block compiled as
`parallel.compile=true` does, and the seconds its warm-up spent compiling.

FLOPs follow `kontext.stages.metrics.flux_flops` (linear layers and attention; backward = 2x
forward), for the work each model does: ours predicts the target tokens only. The peak is the best of repeated square matmuls (fp32; bf16 too when the CPU has
native bf16 instructions).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import time


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

    def __init__(self, name: str, model, forward, lr: float = 1e-4):
        import torch

        self.name, self.model, self.forward = name, model.train(), forward
        self.ema = copy.deepcopy(model).eval().requires_grad_(False)
        params = [p for p in model.parameters() if p.requires_grad]
        fused = all(p.device.type in ("cpu", "cuda") for p in params)
        self.opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), **({"fused": True} if fused else {}))
        self.times: dict[str, list[float]] = {"edit": [], "t2i": []}

    def step(self, b: dict, gen) -> tuple[float, tuple[int, int | None]]:
        """One step; returns (seconds, (text rows the model saw, image rows it predicted))."""
        import torch

        from kontext.diffusion import flow
        from kontext.network import packing

        sync = torch.cuda.synchronize if b["x"].is_cuda else (lambda: None)
        sync()
        start = time.perf_counter()
        tokens = packing.prepare(b["x"], b["refs"])
        noise = torch.randn(tokens.img.shape, generator=gen).to(tokens.img)
        t = flow.sample_t(tokens.img.shape[0], 0.5, 1.0, generator=gen).to(tokens.img)
        z_t = flow.interpolate(tokens.img, noise, t)
        pred, rows = self.forward(self.model, tokens, z_t, t, b["txt"], b["vec"])  # rows: (n_txt, n_out)
        loss = flow.flow_loss(pred, flow.velocity_target(tokens.img, noise))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0, foreach=True)  # as FlowStage clips
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            ema, live = list(self.ema.parameters()), list(self.model.parameters())
            torch._foreach_lerp_(ema, live, 0.005)
        sync()
        return time.perf_counter() - start, rows


# Where a step's time goes: the profiler's own time of each operator, by kind.
KINDS = {
    "linear layers (mm, addmm)": ("aten::mm", "aten::addmm", "aten::bmm", "aten::addbmm", "aten::baddbmm"),
    "attention (SDPA forward and backward)": ("aten::_scaled_dot_product", "aten::_flash_attention", "aten::_efficient_attention"),
    "copies, concatenation, layout": ("aten::copy_", "aten::cat", "aten::_to_copy", "aten::clone", "aten::stack",
                                      "aten::contiguous", "aten::fill_", "aten::zero_", "aten::zeros", "aten::empty"),
    "optimizer, clipping, EMA": ("aten::_fused_adam", "aten::_foreach_", "Optimizer."),
}
OTHER_ATEN = "element-wise, norms, activations, reductions"
OVERHEAD = "framework (autograd engine, Python, dispatch)"


def time_by_kind(trainer: Trainer, batches: list[dict], gen, rounds: int = 2) -> dict[str, float]:
    """Milliseconds per step spent in each kind of work, from `rounds` passes over `batches`.

    Each operator's own time goes to the first kind that it or an operator calling it belongs to
    (from the outside in), so the per-tensor kernels of a foreach optimizer or clipping call on a
    CPU count as the optimizer's."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            for b in batches:
                trainer.step(b, gen)

    def kind_of(event) -> str | None:
        return next((k for k, prefixes in KINDS.items() if event.name.startswith(prefixes)), None)

    ms = dict.fromkeys([*KINDS, OTHER_ATEN, OVERHEAD], 0.0)
    for event in prof.events():
        chain, parent = [event], event.cpu_parent
        while parent is not None:
            chain.append(parent)
            parent = parent.cpu_parent
        kind = next((k for k in map(kind_of, reversed(chain)) if k is not None), None)
        kind = kind or (OTHER_ATEN if event.name.startswith("aten::") else OVERHEAD)
        ms[kind] += event.self_cpu_time_total / 1e3 / (rounds * len(batches))
    return ms


def ours(compact: bool):
    import torch

    from kontext.network import packing

    def forward(model, tokens, z_t, t, txt, vec):
        rows = packing.model_text(txt, compact)[0].shape[1]
        guidance = torch.ones_like(t) if model.params.guidance_embed else None  # a guidance-distilled preset (tiny)
        return packing.predict(model, tokens, z_t, t, txt, vec, guidance, compact), (rows, tokens.n_img)

    return forward


def theirs(model, tokens, z_t, t, txt, vec):
    import torch

    from kontext.network import packing

    img, ids = tokens.joint(z_t)
    pred = model(hidden_states=img, encoder_hidden_states=txt, pooled_projections=vec, timestep=t,
                 img_ids=ids[0], txt_ids=packing.txt_ids(1, txt.shape[1], device=txt.device)[0],
                 guidance=torch.ones_like(t) if model.config.guidance_embeds else None,
                 return_dict=False)[0]
    # It predicts every image token (and runs the text rows through its last block too, which
    # the count below leaves out: a ~2% undercount of its work).
    return packing.target_slice(pred, tokens.n_img), (txt.shape[1], None)


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
    """Largest difference between our and diffusers' predictions on one batch (no guidance)."""
    import torch

    from kontext.network import packing

    tokens = packing.prepare(b["x"], b["refs"])
    t = torch.full((tokens.img.shape[0],), 0.5, device=b["x"].device)
    with torch.no_grad():
        a, _ = ours(compact=True)(model, tokens, tokens.img, t, b["txt"], b["vec"])
        c, _ = theirs(other, tokens, tokens.img, t, b["txt"], b["vec"])
    return (a - c).abs().max().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch", type=int, default=24)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=6)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--no-breakdown", action="store_true", help="skip the profile of where our step's time goes")
    parser.add_argument("--compile", action="store_true",
                        help="also time our step with per-block torch.compile (minutes of compiling on a CPU)")
    args = parser.parse_args()

    import torch

    from kontext.stages.metrics import attention_flops, cpu_name, flux_flops, matmul_peak

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
    trainers = [Trainer("ours", model, ours(compact=True)),
                Trainer("ours, full text", copy.deepcopy(model), ours(compact=False))]
    if args.compile:
        from kontext.scale.parallel import ParallelConfig, parallelize

        compiled = parallelize(copy.deepcopy(model), ParallelConfig(compile=True), device=device)
        trainers.append(Trainer("ours, compiled", compiled, ours(compact=True)))
    if other is not None:
        print(f"diffusers FluxTransformer2DModel vs ours on the same weights: max |diff| "
              f"{check_same_function(model, other, batches[0]):.1e}")
        trainers.append(Trainer("diffusers", other, theirs))
    else:
        print("diffusers is not installed: no comparison (pip install diffusers)")

    gen = torch.Generator().manual_seed(0)
    flops: dict[str, dict[str, float]] = {tr.name: {} for tr in trainers}
    attn_flops: dict[str, float] = {}  # ours: the attention part of its FLOPs, per batch kind
    warmup_s = {tr.name: 0.0 for tr in trainers}
    # The warm-up covers every batch (each text length a compiled block meets) at least once.
    for i in range(max(args.warmup, len(batches)) + args.steps):  # every variant steps on batch i before any takes i + 1
        b = batches[i % len(batches)]
        n_img = sum(x.shape[-2] * x.shape[-1] // 4 for x in [b["x"], *b["refs"]])
        for tr in trainers:
            seconds, rows = tr.step(b, gen)
            if i < max(args.warmup, len(batches)):
                warmup_s[tr.name] += seconds
            else:
                tr.times[b["kind"]].append(seconds)
                flops[tr.name][b["kind"]] = 3 * args.batch * flux_flops(params, n_img, *rows)
                if tr.name == "ours":
                    attn_flops[b["kind"]] = 3 * args.batch * attention_flops(params, n_img, *rows)

    results = {}
    for tr in trainers:
        med = {k: statistics.median(v) for k, v in tr.times.items() if v}
        # The training mix: five edit batches to one text-to-image batch.
        weights = {"edit": 5 / 6, "t2i": 1 / 6}
        step = sum(weights[k] * med[k] for k in med) / sum(weights[k] for k in med)
        gflop = sum(weights[k] * flops[tr.name][k] for k in med) / sum(weights[k] for k in med) / 1e9
        results[tr.name] = {"ms_edit": med.get("edit", 0) * 1e3, "ms_t2i": med.get("t2i", 0) * 1e3,
                            "ms_step": step * 1e3, "samples_per_s": args.batch / step,
                            "gflop_per_step": gflop, "gflops": gflop / step, "peak_share": gflop / step / peak["fp32"],
                            "warmup_s": warmup_s[tr.name]}

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
    breakdown = {}
    if not args.no_breakdown:
        mix = {"edit": 5 / 6, "t2i": 1 / 6}
        attn = sum(mix[k] * attn_flops[k] for k in attn_flops) / sum(mix[k] for k in attn_flops) / 1e9
        linear = results["ours"]["gflop_per_step"] - attn
        breakdown = time_by_kind(trainers[0], batches, gen)
        print_breakdown(breakdown, linear, attn, peak["fp32"])
    print(json.dumps({"cpu": cpu_name(), "capability": cap, "threads": torch.get_num_threads(),
                      "peak_gflops": peak, "model": args.model, "batch": args.batch,
                      "results": {k: {m: round(v, 4) for m, v in r.items()} for k, r in results.items()},
                      "ours_ms_by_kind": {k: round(v, 2) for k, v in breakdown.items()}}))


def print_breakdown(ms: dict[str, float], linear_gflop: float, attn_gflop: float, peak: float) -> None:
    """Where our step's time goes, and what the rest of the step would have to shrink to for a
    given share of the matmul peak."""
    total = sum(ms.values())
    print(f"\nwhere our step's time goes (profiled steps: {total:.1f} ms each, the profiler's overhead included)")
    for kind, t in ms.items():
        line = f"  {kind:46s} {t:6.1f} ms {t / total:5.1%}"
        if kind.startswith("linear"):
            line += f"   {linear_gflop:.2f} GFLOP at {linear_gflop / t * 1e3:.1f} GFLOP/s, {linear_gflop / t * 1e3 / peak:.0%} of the peak"
        elif kind.startswith("attention"):
            line += f"   {attn_gflop:.2f} GFLOP"
        print(line)
    lin = next(t for kind, t in ms.items() if kind.startswith("linear"))
    goal = (linear_gflop + attn_gflop) / (0.7 * peak) * 1e3
    print(f"a step at 70% of the peak takes {goal:.1f} ms: that leaves {max(goal - lin, 0):.1f} ms for everything "
          f"but the linear layers ({total - lin:.1f} ms here)")


if __name__ == "__main__":
    main()
