"""Fast sampling, measured in one run: Shapes-Edit pass rate and sampling wall time per image
for the teacher and its distilled students.

    python benchmarks/distillation.py teacher=outputs/train/default \\
        guidance_student=outputs/guidance_distill/experiment=embedded_guidance_distill/export \\
        ladd_student=outputs/ladd/experiment=embedded_ladd/export n=50 steps=20 cfg=4.0 out=bench/distill

Rows (each model given as a run directory, checkpoint or export folder; a student left out
is skipped):

- teacher, true CFG at ``cfg``, ``steps`` steps: two evaluations per step;
- guidance-distilled student at ``steps`` steps, ``guidance=cfg``: one evaluation per step;
- LADD student at 1, 2 and 4 steps (``ladd_steps``), on its exported time list;
- with ``baselines=true``, the teacher (CFG) on those same few-step time lists: what the
  step count alone gives without LADD;
- teacher, true CFG, ``full_steps`` (28) steps: the quality reference.

Every row samples the same benchmark cases with the same seeds (``kontext.benchmark``, the
"bench" split, ``n`` cases per operation). Wall time counts sampling only (text and image
encoding, the Euler loop and decoding, in batches of ``batch_size``), after one warm-up batch
per model, on ``device`` with ``threads`` CPU threads. The acceptance checks printed at the
end: guidance student within 2 points of the CFG teacher at the same step count; LADD at 4
steps at least 95% of the teacher's pass rate at 28 steps. Writes ``distillation.json`` and
``distillation.md`` to ``out``.
"""

from __future__ import annotations

import json
import platform
import sys
import time
from pathlib import Path

import torch

from kontext.benchmark import run_benchmark
from kontext.cli import parse_args, run_main
from kontext.data.shapes_edit import benchmark_cases
from kontext.diffusion.distill import few_step_timesteps
from kontext.pipeline import KontextPipeline

USAGE = """usage: python benchmarks/distillation.py teacher=SOURCE [guidance_student=SOURCE] [ladd_student=SOURCE]
    [n=50] [steps=20] [cfg=4.0] [full_steps=28] [ladd_steps=[1,2,4]] [seed=0] [batch_size=64]
    [device=cpu] [threads=null] [baselines=true] [out=FOLDER]"""
DEFAULTS = {"teacher": "???", "guidance_student": None, "ladd_student": None, "n": 50, "steps": 20, "cfg": 4.0,
            "full_steps": 28, "ladd_steps": [1, 2, 4], "seed": 0, "batch_size": 64, "device": "cpu",
            "threads": None, "baselines": True, "out": None}


class TimedPipeline:
    """A pipeline whose `edit` calls are timed (everything else is the pipeline's own)."""

    def __init__(self, pipe):
        self.pipe, self.seconds, self.images = pipe, 0.0, 0

    def edit(self, *args, **kwargs):
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        out = self.pipe.edit(*args, **kwargs)
        if self.pipe.device.type == "cuda":
            torch.cuda.synchronize()
        self.seconds += time.perf_counter() - start
        self.images += len(out)
        return out

    def __getattr__(self, name):
        return getattr(self.pipe, name)


def measure(key: str, name: str, pipe, n: int, seed: int, nfe: int, **sampling) -> dict:
    """Pass rate and seconds per image of one sampler setting of one model."""
    case = next(iter(benchmark_cases(1, seed=seed + 1)))
    pipe.edit([case.reference], [case.instruction], [0], **sampling)  # warm-up, not timed
    timed = TimedPipeline(pipe)
    report = run_benchmark(timed, n, chains=0, seed=seed, **sampling)
    row = {"key": key, "name": name, "nfe_per_image": nfe, "sampler": report.sampler, **report.overall,
           "per_op": {op: r["pass_rate"] for op, r in report.per_op.items()},
           "seconds_per_image": timed.seconds / max(timed.images, 1), "images": timed.images}
    print(f"{name:<34} pass {row['pass_rate']:.3f}  {row['seconds_per_image'] * 1000:8.1f} ms/image  "
          f"({nfe} evaluations)", flush=True)
    return row


def run(args: dict) -> dict:
    if args["threads"]:
        torch.set_num_threads(int(args["threads"]))
    load = dict(device=args["device"], batch_size=int(args["batch_size"]))
    n, seed, steps, cfg = int(args["n"]), int(args["seed"]), int(args["steps"]), float(args["cfg"])
    rows = []
    teacher = KontextPipeline.load(str(args["teacher"]), **load)
    rows.append(measure("teacher", f"teacher CFG {cfg:g}, {steps} steps", teacher, n, seed, 2 * steps, steps=steps, cfg=cfg))
    if args["guidance_student"]:
        student = KontextPipeline.load(str(args["guidance_student"]), **load)
        rows.append(measure("guidance", f"guidance-distilled, {steps} steps", student, n, seed, steps, steps=steps,
                            guidance=cfg, cfg=1.0))
        del student
    if args["ladd_student"]:
        ladd = KontextPipeline.load(str(args["ladd_student"]), **load)
        trained = ladd.sampler.timesteps
        if not trained:
            raise SystemExit(f"{args['ladd_student']} has no explicit timestep list; is it a LADD export?")
        for k in args["ladd_steps"]:
            times = few_step_timesteps(trained[:-1], int(k))
            rows.append(measure(f"ladd_{k}", f"LADD, {k} step{'s' * (k > 1)}", ladd, n, seed, int(k),
                                timesteps=times, cfg=1.0))
        del ladd
        if args["baselines"]:  # what the few steps give without LADD: the teacher on the same times
            for k in args["ladd_steps"]:
                times = few_step_timesteps(trained[:-1], int(k))
                rows.append(measure(f"teacher_{k}", f"teacher CFG {cfg:g}, LADD's {k}-step times", teacher, n,
                                    seed, 2 * int(k), timesteps=times, cfg=cfg))
    full = int(args["full_steps"])
    rows.append(measure("teacher_full", f"teacher CFG {cfg:g}, {full} steps", teacher, n, seed, 2 * full, steps=full, cfg=cfg))

    result = {"rows": rows, "checks": checks(rows, steps, full), "settings": {
        **{k: args[k] for k in ("teacher", "guidance_student", "ladd_student", "n", "steps", "cfg", "full_steps",
                                "seed", "batch_size", "device")},
        "threads": torch.get_num_threads(), "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__}}
    print("\n" + to_markdown(result))
    if args["out"]:
        out = Path(str(args["out"]))
        out.mkdir(parents=True, exist_ok=True)
        (out / "distillation.json").write_text(json.dumps(result, indent=2) + "\n")
        (out / "distillation.md").write_text(to_markdown(result) + "\n")
        print(f"wrote {out}/distillation.json and distillation.md")
    return result


def checks(rows: list[dict], steps: int, full: int) -> list[dict]:
    """The acceptance targets that the measured rows allow to check."""
    row = {r["key"]: r for r in rows}
    out = []
    if "guidance" in row:
        gap = 100 * (row["guidance"]["pass_rate"] - row["teacher"]["pass_rate"])
        out.append({"check": f"guidance-distilled within 2 points of the CFG teacher at {steps} steps",
                    "measured": f"{gap:+.1f} points", "passed": gap >= -2.0})
    if "ladd_4" in row:
        reference = row["teacher_full"]["pass_rate"]
        ratio = row["ladd_4"]["pass_rate"] / reference if reference else float("nan")
        out.append({"check": f"LADD at 4 steps >= 95% of the teacher's pass rate at {full} steps",
                    "measured": f"{100 * ratio:.1f}%", "passed": ratio >= 0.95})
    return out


def to_markdown(result: dict) -> str:
    s = result["settings"]
    lines = ["| model, sampler | evaluations / image | pass rate | edit acc | keep acc | ms / image |",
             "|---|---:|---:|---:|---:|---:|"]
    for r in result["rows"]:
        lines.append(f"| {r['name']} | {r['nfe_per_image']} | {r['pass_rate']:.3f} | {r['edit_acc']:.3f} | "
                     f"{r['keep_acc']:.3f} | {1000 * r['seconds_per_image']:.1f} |")
    lines += ["", f"Shapes-Edit bench split, {s['n']} cases per operation ({result['rows'][0]['n']} per row), "
              f"seed {s['seed']}; {s['device']}, {s['threads']} threads, batch {s['batch_size']}."]
    for c in result["checks"]:
        lines.append(f"- {c['check']}: {c['measured']} ({'met' if c['passed'] else 'missed'})")
    return "\n".join(lines)


def main(argv: list[str]) -> dict:
    return run(parse_args(argv, DEFAULTS, USAGE))


if __name__ == "__main__":
    run_main(main, sys.argv[1:])
