"""The GPU check: the 12B transformer's layout at reduced depth, trained through `train.py` under
FSDP2 over every GPU of this machine with the paper's recipe, saved, resumed, and measured.

    python benchmarks/gpu_check.py                          # every GPU, 2 double + 4 single blocks, 512 px
    python benchmarks/gpu_check.py --depth 4 --single 8 --resolution 1024 --batch 2
    python benchmarks/gpu_check.py --cpu                    # the same path on 2 CPU processes (gloo), narrow

What runs: FLUX.1 Kontext [dev]'s block layout (hidden 3072, 24 heads, MLP ratio 4, RoPE axes
16/56/56, guidance embedding; the text inputs take the embedded encoder's 384-d features instead
of T5 / CLIP, which only changes the two input projections), fine-tuned from a random
reference-format file of that layout (`stage.init_from`: built on `meta`, each rank reading its
slices, as with the official weights) with `trainer=fsdp parallel=paper`
(bf16 all-gathers and compute, fp32 reduce-scatter, selective activation checkpointing,
per-block compile), NCCL, `attention=flash` when flash-attn is installed, on Shapes-Edit at
`--resolution` (a target and one reference per sample). The first run trains `--steps` steps and
checkpoints (one shard per rank); a second run of the same command resumes from that checkpoint
and trains as many more. It prints each run's wall time, the training samples/s, the peak GPU
memory (the largest over the ranks) and whether the resumed run continued where the first
stopped. `--cpu` runs the same commands on 2 CPU processes with gloo, at hidden 128 and without
compile: a check of the script, not of a GPU.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def has_flash_attn() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def layout(a: argparse.Namespace) -> dict:
    """The model overrides: FLUX.1 Kontext [dev]'s blocks at reduced depth (narrow with --cpu)."""
    changes = {"depth": a.depth, "depth_single_blocks": a.single, "context_in_dim": 384, "vec_in_dim": 384}
    if a.cpu:
        changes.update(hidden_size=128, num_heads=2, axes_dim=[16, 24, 24])
    return changes


def write_base(a: argparse.Namespace) -> Path:
    """A random reference-format file of the layout, to fine-tune from: the runs start from
    `stage.init_from`, as fine-tuning the official weights does (meta build, per-rank slices)."""
    import dataclasses

    import torch

    from kontext.network.model import Flux, get_params, save_flux

    path = a.out / "base.safetensors"
    torch.manual_seed(0)
    save_flux(Flux(dataclasses.replace(get_params("flux-dev-kontext"), **layout(a))), path)
    return path


def commands(a: argparse.Namespace, base: Path) -> list[str]:
    """The overrides of `train.py` shared by both runs."""
    model = ["model=flux-dev-kontext", *(f"model.{k}={v}".replace(" ", "") for k, v in layout(a).items()),
             f"stage.init_from={base}", "stage.optimizer.lr=1e-5"]
    side = a.resolution
    data = [f"paths.data_dir={a.out}/data", f"prepare.shapes_edit.size={side}", "prepare.shapes_edit.n=256",
            "prepare.shapes_edit.shard_size=128", f"data.bucket_area={side * side}", f"data.batch_size={a.batch}"]
    where = (["trainer.accelerator=cpu", "trainer.devices=2", "parallel.compile=false"] if a.cpu
             else [f"attention={'flash' if has_flash_attn() else 'auto'}"])
    return [*model, *data, "trainer=fsdp", "parallel=paper", *where, "text=embedded", "logger=csv",
            f"paths.output_dir={a.out}/run", "trainer.log_every_n_steps=1", "stage.optimizer.warmup_steps=2",
            f"callbacks.checkpoint.every_n_train_steps={a.steps}", "callbacks.metrics.grid_every_n_steps=0",
            "callbacks.validation.every_n_steps=0", "stage.finish.benchmark.n_per_op=0", "stage.finish.export=false"]


def train(overrides: list[str], log: Path) -> float:
    start = time.perf_counter()
    with open(log, "w") as f:
        done = subprocess.run([sys.executable, str(ROOT / "train.py"), *overrides], cwd=ROOT, stdout=f,
                              stderr=subprocess.STDOUT)
    if done.returncode != 0:
        sys.exit(f"train.py failed (exit {done.returncode}); see {log}:\n" + log.read_text()[-3000:])
    return time.perf_counter() - start


def logged(run_dir: Path) -> list[list[dict]]:
    """The logged rows of each run (csv version) in order."""
    runs = []
    for path in sorted((run_dir / "csv").glob("version_*/metrics.csv"), key=lambda p: int(p.parent.name[8:])):
        with open(path) as f:
            runs.append(list(csv.DictReader(f)))
    return runs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--depth", type=int, default=2, help="double-stream blocks (the 12B model has 19)")
    parser.add_argument("--single", type=int, default=4, help="single-stream blocks (the 12B model has 38)")
    parser.add_argument("--resolution", type=int, default=512, help="target and reference side in pixels")
    parser.add_argument("--batch", type=int, default=1, help="samples per GPU")
    parser.add_argument("--steps", type=int, default=10, help="steps of each of the two runs")
    parser.add_argument("--out", type=Path, default=ROOT / "outputs" / "gpu_check")
    parser.add_argument("--cpu", action="store_true", help="2 CPU processes with gloo, narrow: checks the script")
    a = parser.parse_args()
    import torch

    if not a.cpu and not torch.cuda.is_available():
        sys.exit("no CUDA GPU here; run with --cpu to check the script on this machine")
    if a.cpu:
        a.resolution = min(a.resolution, 64)
    a.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(a.out / "run", ignore_errors=True)  # a fresh run; the data stays for the next check
    base = commands(a, write_base(a))
    device = "2 CPU processes (gloo)" if a.cpu else f"{torch.cuda.device_count()} x {torch.cuda.get_device_name(0)}"
    print(f"device: {device}; torch {torch.__version__}; flash-attn "
          f"{'installed' if has_flash_attn() else 'not installed'}")
    print("python train.py " + " ".join(base))

    first = train([*base, f"trainer.max_steps={a.steps}", "resume=null"], a.out / "first.log")
    second = train([*base, f"trainer.max_steps={2 * a.steps}", "resume=auto"], a.out / "resumed.log")
    runs = logged(a.out / "run")
    steps = [[int(r["step"]) for r in rows if r.get("train/loss")] for rows in runs]
    steps_first = len(steps[0])
    rows = [r for run in runs for r in run]
    losses = {int(r["step"]): float(r["train/loss"]) for r in rows if r.get("train/loss")}
    speed = [float(r["perf/samples_per_s"]) for r in rows if r.get("perf/samples_per_s")]
    memory = [float(r["memory/peak_gib"]) for r in rows if r.get("memory/peak_gib")]
    summary = json.loads((a.out / "run" / "metrics.json").read_text())
    report = {
        "device": device,
        "first run": f"{first:.0f} s, steps 1-{steps_first}",
        "resumed run": f"{second:.0f} s, steps {steps_first + 1}-{summary.get('steps')}",
        # the second run logged only the steps after the first run's last one
        "resumed where it stopped": len(steps) == 2 and steps_first == a.steps and summary.get("steps") == 2 * a.steps
                                    and steps[1] == list(range(max(steps[0]) + 1, max(steps[0]) + 1 + a.steps)),
        "samples/s (median of logged steps, all ranks)": round(statistics.median(speed), 2) if speed else None,
        "peak memory per rank (GiB, largest rank)": round(max(memory), 2) if memory else None,
        "final loss": round(losses[max(losses)], 4) if losses else None,
        "built on meta, init_from read by slices": "meta_build: true" in (a.out / "run" / "config.yaml").read_text(),
    }
    for key, value in report.items():
        print(f"{key:48s} {value}")
    (a.out / "report.json").write_text(json.dumps(report, indent=2))
    if not report["resumed where it stopped"]:
        sys.exit(f"the resumed run did not continue the first one: logged steps {steps}")


if __name__ == "__main__":
    main()
