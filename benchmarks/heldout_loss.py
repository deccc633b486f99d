"""Held-out flow loss: the training objective on Shapes-Edit cases that training never saw, per
operation, for one or more models. A smooth signal for ablations, measured in seconds, next to
the pass rate of the benchmark (`python -m kontext.benchmark`), which needs sampling and is
coarse for weak models.

    python benchmarks/heldout_loss.py models=[RUN_A/export,RUN_B/export] n=48 out=bench/loss

For each operation, `n` cases of the "bench" split (`split=train` scores the training split's
first cases instead, to compare the two and see overfitting) are encoded by the model's own
autoencoder and text encoder, noised at each of the fixed times `t` (the same noise for every
model: `seed`), and scored with the stage's loss, the mean squared error between the predicted
and the true velocity over the target tokens. Context tokens and guidance input are those of
training (guidance: `guidance`, default 1). Prints one table row per model; `out` also gets
`heldout_loss.json`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from kontext.cli import parse_args, run_main
from kontext.data.shapes_edit import OPS, generate, make_case
from kontext.diffusion import flow
from kontext.errors import KontextError
from kontext.network import packing
from kontext.pipeline import KontextPipeline

USAGE = """usage: python benchmarks/heldout_loss.py models=[SOURCE,...] [n=48] [t=[0.1,0.3,0.5,0.7,0.9]]
    [split=bench] [seed=0] [guidance=1.0] [threads=null] [out=FOLDER]"""
DEFAULTS = {"models": "???", "n": 48, "t": [0.1, 0.3, 0.5, 0.7, 0.9], "split": "bench", "seed": 0,
            "guidance": 1.0, "threads": None, "out": None}


def cases_by_op(n: int, split: str) -> dict[str, list]:
    """`n` cases of every operation: bench-split cases by index, or the training split's first
    cases of each operation (the order the training shards hold them in)."""
    if split == "bench":
        return {op: [make_case(op, split="bench", seed=1, index=i) for i in range(n)] for op in OPS}
    if split != "train":
        raise KontextError(f"split must be bench or train, not {split!r}")
    out: dict[str, list] = {op: [] for op in OPS}
    for case in generate(100 * n * len(OPS), split="train", seed=0):
        if len(out[case.op]) < n:
            out[case.op].append(case)
        if all(len(v) == n for v in out.values()):
            break
    return out


@torch.no_grad()
def heldout_loss(pipe, cases: dict[str, list], times: list[float], seed: int = 0,
                 guidance: float = 1.0) -> dict[str, float]:
    """Mean flow loss per operation (and `mean` over operations) of `pipe`'s transformer."""
    model = pipe.model
    result = {}
    for op, group in cases.items():
        n = len(group)
        x = pipe.encode_images([c.target for c in group])
        ctx = [pipe.encode_images([c.reference for c in group])] if group[0].reference is not None else []
        feats = pipe.text.encode([c.instruction for c in group])
        txt, vec = feats.txt.to(x.dtype), feats.vec.to(x.dtype)
        tokens = packing.prepare(x, ctx)
        gen = torch.Generator().manual_seed(seed)
        g = torch.full((n,), float(guidance), dtype=x.dtype) if pipe.guidance_embed else None
        losses = []
        for value in times:
            noise = torch.randn(tokens.img.shape, generator=gen).to(x)
            t = torch.full((n,), float(value), dtype=x.dtype, device=x.device)
            pred = packing.predict(model, tokens, flow.interpolate(tokens.img, noise, t), t, txt, vec,
                                   None if g is None else g.to(x.device))
            losses.append(flow.flow_loss(pred, flow.velocity_target(tokens.img, noise)).item())
        result[op] = sum(losses) / len(losses)
    result["mean"] = sum(result.values()) / len(result)
    return result


def to_markdown(rows: list[dict]) -> str:
    keys = [k for k in rows[0]["loss"]]
    lines = ["| model | " + " | ".join(keys) + " |", "|---|" + "---:|" * len(keys)]
    for row in rows:
        lines.append(f"| {row['model']} | " + " | ".join(f"{row['loss'][k]:.4f}" for k in keys) + " |")
    return "\n".join(lines)


def main(argv: list[str]) -> list[dict]:
    args = parse_args(argv, DEFAULTS, USAGE)
    if args["threads"]:
        torch.set_num_threads(int(args["threads"]))
    models = args["models"] if isinstance(args["models"], list) else [args["models"]]
    times = [float(t) for t in (args["t"] if isinstance(args["t"], list) else [args["t"]])]
    if not times or any(not 0.0 < t <= 1.0 for t in times):
        raise KontextError(f"t must be times in (0, 1], got {args['t']}")
    cases = cases_by_op(int(args["n"]), str(args["split"]))
    rows = []
    for source in models:
        pipe = KontextPipeline.load(str(source))
        rows.append({"model": str(source), "loss": heldout_loss(pipe, cases, times, int(args["seed"]),
                                                                float(args["guidance"]))})
        print(f"{source}: mean {rows[-1]['loss']['mean']:.4f}", flush=True)
    print("\n" + to_markdown(rows))
    if args["out"]:
        out = Path(str(args["out"]))
        out.mkdir(parents=True, exist_ok=True)
        settings = {k: args[k] for k in ("n", "split", "seed", "guidance")} | {"t": times}
        (out / "heldout_loss.json").write_text(json.dumps({"rows": rows, "settings": settings}, indent=2) + "\n")
        print(f"wrote {out}/heldout_loss.json")
    return rows


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
