"""The Shapes-Edit benchmark (spec v1, `shapes_edit.md`): does the model edit, and for how many turns?

    python -m kontext.benchmark checkpoint=outputs/train/default n=50 chains=20 out=bench/

Single edits: `n` cases of each of the six operations from the "bench" split (scene seeds that
training never uses), generated in batches and scored by `kontext.data.shapes_edit.score_case`
(class map over the 9-colour palette, pass = edit_acc >= 0.80 and keep_acc >= 0.95). Reported
per operation and overall: pass rate, mean edit_acc, mean keep_acc.

Multi-turn drift: `chains` chains of `turns` (8) edits on one starting scene, each turn's
reference being the model's own previous output and its target the exact rendering after that
many edits; the pass rate at every turn measures how quality decays under repeated editing
(FLUX.1 Kontext report, limitations). The edit region of a turn is taken from the exact
renderings before and after it, so a drifted reference does not move the goalposts.

The report records the sampler settings and wall time, and is written as JSON, a markdown
table and a picture grid (reference, instruction, output, target).
"""

from __future__ import annotations

import json
import os
import textwrap
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

from kontext.data.shapes_edit import DEFAULT_SIZE, OPS, benchmark_cases, make_chain, score_case

GRID_PER_OP = 2
USAGE = """usage: python -m kontext.benchmark checkpoint=RUN_DIR|CKPT|EXPORT [n=50] [chains=20] [turns=8] [out=FOLDER]
  checkpoint run directory, flow-stage .ckpt or export folder
  n          cases per operation (six operations)
  chains     multi-turn chains (0 = skip drift)
  turns      edits per chain
  steps, guidance, cfg, timesteps   sampler overrides (default: the model's own)
  seed       benchmark seed (scenes and sampling noise); size: canvas size (64)
  out        folder for benchmark.json, benchmark.md and grid.png (default: print only)
  batch_size cases per forward; device: cpu | cuda | auto"""


@dataclass
class CaseResult:
    op: str
    instruction: str
    seed: int  # sampling seed
    edit_acc: float
    keep_acc: float
    passed: bool


def _summary(results: list[CaseResult]) -> dict:
    n = len(results)
    if n == 0:
        return {"n": 0, "pass_rate": 0.0, "edit_acc": 0.0, "keep_acc": 0.0}
    return {
        "n": n,
        "pass_rate": sum(r.passed for r in results) / n,
        "edit_acc": sum(r.edit_acc for r in results) / n,
        "keep_acc": sum(r.keep_acc for r in results) / n,
    }


@dataclass
class BenchmarkReport:
    per_op: dict[str, dict]  # op -> {n, pass_rate, edit_acc, keep_acc}
    overall: dict  # {n, pass_rate, edit_acc, keep_acc} over all single-edit cases
    drift: list[dict]  # one per turn: {turn, n, pass_rate, edit_acc, keep_acc}; empty without chains
    sampler: dict  # steps / timesteps, guidance, cfg, seed, ...
    wall_time: float  # seconds, generation and scoring
    settings: dict  # n_per_op, chains, turns, size, model source
    cases: list[CaseResult] = field(default_factory=list)
    # (reference or None, instruction, output, target) of a few cases per op, for the grid.
    examples: list[tuple] = field(default_factory=list, repr=False)

    def flat_metrics(self) -> dict[str, float]:
        """Scalars for loggers: `pass_rate`, `edit_acc`, `keep_acc`, `<op>/...`, `drift/turn_<k>`."""
        out = {k: float(self.overall[k]) for k in ("pass_rate", "edit_acc", "keep_acc")}
        for op, stats in self.per_op.items():
            out.update({f"{op}/{k}": float(stats[k]) for k in ("pass_rate", "edit_acc", "keep_acc")})
        for row in self.drift:
            out[f"drift/turn_{row['turn']}"] = float(row["pass_rate"])
        return out

    def to_dict(self) -> dict:
        return {"overall": self.overall, "per_op": self.per_op, "drift": self.drift, "sampler": self.sampler,
                "wall_time": self.wall_time, "settings": self.settings, "cases": [asdict(c) for c in self.cases]}

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2)
        if path is not None:
            Path(path).write_text(text + "\n")
        return text

    def to_markdown(self) -> str:
        lines = ["| operation | cases | pass rate | edit acc | keep acc |", "|---|---:|---:|---:|---:|"]
        for op, s in [*self.per_op.items(), ("**overall**", self.overall)]:
            lines.append(f"| {op} | {s['n']} | {s['pass_rate']:.3f} | {s['edit_acc']:.3f} | {s['keep_acc']:.3f} |")
        if self.drift:
            lines += ["", f"Multi-turn drift over {self.drift[0]['n']} chains:", "",
                      "| turn | " + " | ".join(str(r["turn"]) for r in self.drift) + " |",
                      "|---|" + "---:|" * len(self.drift),
                      "| pass rate | " + " | ".join(f"{r['pass_rate']:.2f}" for r in self.drift) + " |"]
        settings = ", ".join(f"{k}={v}" for k, v in self.sampler.items() if v is not None)
        lines += ["", f"Sampler: {settings}. Wall time: {self.wall_time:.1f} s."]
        return "\n".join(lines)

    def save_grid(self, path: str | os.PathLike, scale: int = 2) -> Path:
        """A picture of the kept examples: one row each of reference | instruction | output | target."""
        if not self.examples:
            raise ValueError("this report kept no examples")
        cell = self.examples[0][3].size[0] * scale
        text_w = 4 * cell
        grid = Image.new("RGB", (3 * cell + text_w, cell * len(self.examples)), (255, 255, 255))
        draw = ImageDraw.Draw(grid)
        for row, (ref, instruction, output, target) in enumerate(self.examples):
            y = row * cell
            for x, img in ((0, ref), (cell + text_w, output), (2 * cell + text_w, target)):
                if img is not None:
                    grid.paste(img.convert("RGB").resize((cell, cell), Image.NEAREST), (x, y))
            lines = textwrap.wrap(instruction, text_w // 6 - 2)  # about 6 px per character of the default font
            draw.multiline_text((cell + 6, y + 6), "\n".join(lines), fill=(0, 0, 0))
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        grid.save(path)
        return path


def run_benchmark(pipeline, n_per_op: int = 50, *, chains: int = 20, turns: int = 8, steps: int | None = None,
                  guidance: float | None = None, cfg: float | None = None, timesteps: list[float] | None = None,
                  seed: int = 0, size: int = DEFAULT_SIZE, grid_per_op: int = GRID_PER_OP) -> BenchmarkReport:
    """Score `pipeline` (anything with `edit(references, prompts, seeds, ...)`) on Shapes-Edit.

    Sampler settings left None are the pipeline's defaults. Case i of the benchmark is sampled
    with seed `seed + i`; chain j with `seed + 10**6 + j` at every turn.
    """
    start = time.perf_counter()
    sampling = {"steps": steps, "guidance": guidance, "cfg": cfg, "timesteps": timesteps}
    cases = list(benchmark_cases(n_per_op, seed=seed, size=size))
    seeds = [seed + i for i in range(len(cases))]
    edits = [i for i, c in enumerate(cases) if c.reference is not None]
    t2i = [i for i, c in enumerate(cases) if c.reference is None]
    outputs: dict[int, Image.Image] = {}
    if edits:
        outs = pipeline.edit([cases[i].reference for i in edits], [cases[i].instruction for i in edits],
                             [seeds[i] for i in edits], **sampling)
        outputs.update(zip(edits, outs, strict=True))
    if t2i:
        outs = pipeline.edit([None] * len(t2i), [cases[i].instruction for i in t2i], [seeds[i] for i in t2i],
                             width=size, height=size, **sampling)
        outputs.update(zip(t2i, outs, strict=True))

    results, examples = [], []
    for i, case in enumerate(cases):
        score = score_case(outputs[i], case.reference, case.target, case.op, size=size)
        results.append(CaseResult(case.op, case.instruction, seeds[i], score.edit_acc, score.keep_acc, score.passed))
        if sum(1 for e in examples if e[4] == case.op) < grid_per_op:
            examples.append((case.reference, case.instruction, outputs[i], case.target, case.op))
    per_op = {op: _summary([r for r in results if r.op == op]) for op in OPS if n_per_op > 0}

    drift = run_drift(pipeline, chains, turns, seed, size, sampling) if chains > 0 else []
    report_sampler = _sampler_settings(pipeline, sampling)
    report_sampler["seed"] = seed
    return BenchmarkReport(
        per_op=per_op, overall=_summary(results), drift=drift, sampler=report_sampler,
        wall_time=time.perf_counter() - start,
        settings={"n_per_op": n_per_op, "chains": chains, "turns": turns, "size": size,
                  "model": getattr(pipeline, "source", None)},
        cases=results, examples=[e[:4] for e in examples],
    )


def run_drift(pipeline, chains: int, turns: int, seed: int, size: int, sampling: dict) -> list[dict]:
    """Pass rate (and mean accuracies) at every turn over `chains` chains, all chains of a turn in one batch."""
    chain_list = [make_chain(turns, split="bench", seed=seed, index=j, size=size) for j in range(chains)]
    current = [c.renders[0] for c in chain_list]
    rows = []
    for k in range(turns):
        prompts = [c.edits[k].instruction for c in chain_list]
        current = pipeline.edit(current, prompts, [seed + 10**6 + j for j in range(chains)], **sampling)
        turn = [score_case(out, c.renders[k], c.renders[k + 1], c.edits[k].op, size=size)
                for out, c in zip(current, chain_list, strict=True)]
        rows.append({"turn": k + 1, "n": chains, "pass_rate": sum(s.passed for s in turn) / chains,
                     "edit_acc": sum(s.edit_acc for s in turn) / chains,
                     "keep_acc": sum(s.keep_acc for s in turn) / chains})
    return rows


def _sampler_settings(pipeline, sampling: dict) -> dict:
    """The settings the pipeline actually sampled with: its defaults, overridden by the call."""
    defaults = pipeline.sampler.to_dict() if hasattr(pipeline, "sampler") else {}
    settings = {k: defaults.get(k) for k in ("steps", "guidance", "cfg", "shift", "timesteps")}
    settings.update({k: v for k, v in sampling.items() if v is not None})
    if sampling.get("steps") is not None and sampling.get("timesteps") is None:
        settings["timesteps"] = None  # explicit steps replace a default timestep list
    if not getattr(pipeline, "guidance_embed", True):
        settings["guidance"] = None  # the model has no guidance input
    return settings


def main(argv: list[str]) -> BenchmarkReport:
    from kontext.cli import parse_args
    from kontext.pipeline import KontextPipeline

    defaults = {"checkpoint": "???", "n": 50, "chains": 20, "turns": 8, "steps": None, "guidance": None, "cfg": None,
                "timesteps": None, "seed": 0, "size": DEFAULT_SIZE, "out": None, "batch_size": 32, "device": "auto"}
    args = parse_args(argv, defaults, USAGE)
    device = args["device"]
    if device == "auto":
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    pipe = KontextPipeline.load(str(args["checkpoint"]), device=device, batch_size=int(args["batch_size"]))
    report = run_benchmark(pipe, int(args["n"]), chains=int(args["chains"]), turns=int(args["turns"]),
                           steps=args["steps"], guidance=args["guidance"], cfg=args["cfg"],
                           timesteps=args["timesteps"], seed=int(args["seed"]), size=int(args["size"]))
    print(report.to_markdown())
    if args["out"]:
        out = Path(str(args["out"]))
        out.mkdir(parents=True, exist_ok=True)
        report.to_json(out / "benchmark.json")
        (out / "benchmark.md").write_text(report.to_markdown() + "\n")
        report.save_grid(out / "grid.png")
        print(f"wrote {out}/benchmark.json, benchmark.md, grid.png")
    return report


if __name__ == "__main__":
    from kontext.cli import run_main

    run_main(main)
