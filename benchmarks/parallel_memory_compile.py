"""Memory and speed of the parallelism recipe (kontext/scale/parallel.py) on one process: peak memory
of a training step with activation checkpointing none / selective / full, and step time with
and without per-block torch.compile, for a model preset (default `small`) at the size it trains.

    python benchmarks/parallel_memory_compile.py                      # small, batch 64, 64x64 images
    python benchmarks/parallel_memory_compile.py --batch 8 --size 256 # more tokens per sample

Memory: each configuration in a fresh process, measured twice: the bytes of the tensors
kept for backward (counted at the dispatcher, exact and repeatable), and the rise of the
process's resident set during one step above the weights and optimizer state (the kernel's
peak-RSS counter, reset before the step; large allocations go straight to and from the OS, so
it tracks live memory). Speed: every configuration in one process, their steps interleaved, the
median over `--steps` steps after two warm-up steps (for compile, these include compilation).
The CPU may be shared: the thread count is fixed (`--threads`), times are interleaved medians,
yet they stay noisy.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def training_batch(params, batch: int, size: int, n_txt: int, seed: int = 0) -> dict:
    """Random latents shaped like a Kontext edit batch: target + one context of `size` pixels."""
    import torch

    from kontext.diffusion import flow
    from kontext.network import packing

    g = torch.Generator().manual_seed(seed)
    side = size // 8
    x = torch.randn(batch, 16, side, side, generator=g)
    tokens = packing.prepare(x, [torch.randn(batch, 16, side, side, generator=g)])
    return {"tokens": tokens, "noise": torch.randn(tokens.img.shape, generator=g),
            "t": flow.sample_t(batch, 0.5, 1.0, generator=g),
            "txt": torch.randn(batch, n_txt, params.context_in_dim, generator=g),
            "vec": torch.randn(batch, params.vec_in_dim, generator=g)}


def loss_of(model, b: dict):

    from kontext.diffusion import flow
    from kontext.network import packing

    tokens = b["tokens"]
    guidance = 1.0 if model.params.guidance_embed else None
    pred = packing.predict(model, tokens, flow.interpolate(tokens.img, b["noise"], b["t"]), b["t"], b["txt"], b["vec"],
                           guidance)
    return flow.flow_loss(pred, flow.velocity_target(tokens.img, b["noise"]))


def rss_mib() -> tuple[float, float]:
    """(current, peak) resident set of this process, MiB."""
    fields = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, value = line.partition(":")
            fields[key] = value
    return int(fields["VmRSS"].split()[0]) / 1024, int(fields["VmHWM"].split()[0]) / 1024


def reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def make(args: dict, ac: str, compile: bool):
    import torch

    from kontext.network.model import build_flux
    from kontext.scale.parallel import ParallelConfig, parallelize

    torch.manual_seed(0)
    model = build_flux(args["preset"]).train()
    parallelize(model, ParallelConfig(activation_checkpointing=ac, compile=compile))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    batch = training_batch(model.params, args["batch"], args["size"], args["n_txt"])

    def step():
        loss = loss_of(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss.item()

    return model, batch, step


def memory_child(args: dict) -> dict:
    """One configuration in this fresh process: what it keeps for backward, its step's peak."""
    from kontext.scale.parallel import retained_bytes

    model, batch, step = make(args, args["ac"], False)
    step()  # optimizer state exists from here on
    kept = retained_bytes(lambda: loss_of(model, batch))  # forward only; the graph is dropped unused
    before, _ = rss_mib()
    reset_peak_rss()
    step()
    _, peak = rss_mib()
    return {"kept_mib": kept / 2**20, "step_peak_mib": peak - before, "peak_rss_mib": peak,
            "params_m": sum(p.numel() for p in model.parameters()) / 1e6, "tokens": batch["tokens"].img.shape[1] * 2}


def speed_child(args: dict) -> dict:
    """Every timed configuration in one process, steps interleaved, so that a change in the load
    of a shared CPU hits all of them alike."""
    configs = {"none": ("none", False), "selective": ("selective", False), "full": ("full", False),
               "compile": ("none", True)}
    steps, times, warmup = {}, {name: [] for name in configs}, {}
    for name, (ac, compile) in configs.items():
        steps[name] = make(args, ac, compile)[2]
        start = time.perf_counter()
        steps[name]()  # warm-up: optimizer state, compilation
        steps[name]()
        warmup[name] = time.perf_counter() - start
    for _ in range(args["steps"]):
        for name, step in steps.items():
            start = time.perf_counter()
            step()
            times[name].append(time.perf_counter() - start)
    return {name: {"step_ms": 1000 * statistics.median(t), "warmup_s": warmup[name]} for name, t in times.items()}


def run_child(args: dict) -> dict:
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": str(args["threads"])}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(args)], env=env, capture_output=True,
                         text=True)
    if out.returncode != 0:
        raise SystemExit(f"configuration {args} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="small")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--size", type=int, default=64, help="image side in pixels (target and context)")
    parser.add_argument("--n-txt", type=int, default=32, help="text tokens (the embedded encoder's max_length)")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        job = json.loads(args.child)
        import torch

        torch.set_num_threads(job["threads"])
        print(json.dumps(memory_child(job) if job["kind"] == "memory" else speed_child(job)))
        return

    base = {"preset": args.preset, "batch": args.batch, "size": args.size, "n_txt": args.n_txt,
            "steps": args.steps, "threads": args.threads}
    memory = {mode: run_child({**base, "kind": "memory", "ac": mode}) for mode in ("none", "selective", "full")}
    speed = run_child({**base, "kind": "speed"})
    first, eager = memory["none"], speed["none"]
    print(f"preset {args.preset} ({first['params_m']:.2f}M parameters), batch {args.batch}, {args.size}x{args.size} "
          f"target + context ({first['tokens']} image tokens) + {args.n_txt} text tokens, fp32, CPU, "
          f"{args.threads} thread(s), median of {args.steps} interleaved steps\n")
    print("| activation checkpointing | kept for backward (MiB) | vs none | step peak above weights (MiB) "
          "| vs none | peak RSS (MiB) | step (ms) | vs none |")
    print("|---|---|---|---|---|---|---|---|")
    for mode, r in memory.items():
        ms = speed[mode]["step_ms"]
        print(f"| {mode} | {r['kept_mib']:.1f} | {r['kept_mib'] / first['kept_mib']:.2f} | {r['step_peak_mib']:.1f} "
              f"| {r['step_peak_mib'] / first['step_peak_mib']:.2f} | {r['peak_rss_mib']:.0f} | {ms:.1f} "
              f"| {ms / eager['step_ms']:.2f} |")
    print("\n| per-block compile | step (ms) | speed-up | first two steps (s) |")
    print("|---|---|---|---|")
    print(f"| off | {eager['step_ms']:.1f} | 1.00 | {eager['warmup_s']:.1f} |")
    compiled = speed["compile"]
    print(f"| on | {compiled['step_ms']:.1f} | {eager['step_ms'] / compiled['step_ms']:.2f} | {compiled['warmup_s']:.1f} |")


if __name__ == "__main__":
    main()
