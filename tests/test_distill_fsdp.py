"""The distillation stages under FSDP2 on 2 CPU processes (gloo), through the real `train.py`:
the frozen teacher is sharded like the student (each rank holds half of it, in the run's
compute dtype), and sharding it changes no loss."""

from __future__ import annotations

import csv
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from distill_setup import shared_setting

from kontext.run import CONFIG_DIR

FSDP = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2"]
STEPS = 4


@pytest.fixture(scope="module")
def setting(tmp_path_factory) -> dict:
    return shared_setting(tmp_path_factory)


def _distill(setting: dict, experiment: str, run_dir: Path, *extra: str) -> str:
    """Run `train.py` for a distillation experiment on 2 processes; returns its output."""
    args = [f"experiment={experiment}", f"paths.root_dir={setting['root']}", f"paths.output_dir={run_dir}",
            f"paths.autoencoder={setting['ae']}", f"stage.teacher.source={setting['teacher']}", "model=tiny",
            "logger=csv", "prepare.shapes_edit.n=32", "prepare.shapes_edit.shard_size=16", "data.batch_size=2",
            "data.epoch_samples=32", f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1",
            "stage.finish.benchmark.n_per_op=0", "stage.finish.export=false", "stage.optimizer.decay_by=steps",
            *FSDP, *extra]
    if experiment == "embedded_ladd":  # the student starts from the teacher, not from a distilled run
        args += ["stage.student_init=null", "stage.reals.steps=2"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(CONFIG_DIR.parent / "train.py"), *args], cwd=setting["root"], env=env,
                         capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    return out.stdout + out.stderr


def _losses(run_dir: Path) -> list[float]:
    """Every logged loss: the guidance-distillation loss, or LADD's generator and discriminator losses."""
    (metrics,) = (run_dir / "csv").glob("version_*/metrics.csv")
    with open(metrics) as f:
        return [float(r[k]) for r in csv.DictReader(f) for k in ("train/loss", "train/g_loss", "train/d_loss") if r.get(k)]


def _teacher_lines(log: str) -> list[tuple[str, float, float]]:
    """(dtype, MiB held by the rank, MiB of the whole teacher) of each 'teacher sharded' line."""
    pattern = r"teacher sharded over 2 ranks in (\w+): ([\d.]+) MiB on rank \d of ([\d.]+) MiB"
    return [(d, float(held), float(whole)) for d, held, whole in re.findall(pattern, log)]


@pytest.mark.slow
@pytest.mark.parametrize("experiment", ["embedded_guidance_distill", "embedded_ladd"])
def test_teacher_is_sharded_under_fsdp_and_changes_no_loss(setting, tmp_path, experiment):
    """Under FSDP the student and its EMA are built on `meta` and the teacher is read by rows, each
    rank reading only its shard: the same losses as whole copies, read whole, on each rank."""
    sharded = _distill(setting, experiment, tmp_path / "sharded")
    whole = _distill(setting, experiment, tmp_path / "whole", "parallel.shard_teacher=false",
                     "parallel.meta_build=false")
    lines = _teacher_lines(sharded)
    assert lines and not _teacher_lines(whole), sharded[-2000:]
    assert sharded.count("(each rank reads its rows)") == 2 and "read whole" not in sharded, sharded[-2000:]
    for dtype, held, total in lines:  # fp32, half of the teacher on each rank
        assert dtype == "float32" and abs(held - total / 2) <= 0.02 * total, lines
    assert "meta_build: true" in (tmp_path / "sharded" / "config.yaml").read_text()
    a, b = _losses(tmp_path / "sharded"), _losses(tmp_path / "whole")
    print(f"\n{experiment}: teacher per rank {lines[0][1]:.2f} of {lines[0][2]:.2f} MiB (fp32, 2 ranks); "
          f"losses sharded {a}, whole {b}")
    assert len(a) == len(b) >= STEPS, (a, b)
    assert all(abs(x - y) <= 1e-5 * max(1.0, abs(y)) for x, y in zip(a, b, strict=True)), (a, b)


@pytest.mark.slow
def test_teacher_under_bf16_compute_is_stored_in_bf16(setting, tmp_path):
    """parallel.param_dtype=bfloat16 (the paper's recipe): the teacher is held in bf16, half its
    fp32 size per rank again, and the student trains against it."""
    log = _distill(setting, "embedded_guidance_distill", tmp_path / "bf16", "parallel.param_dtype=bfloat16")
    lines = _teacher_lines(log)
    assert lines and all(dtype == "bfloat16" for dtype, _, _ in lines), log[-2000:]
    losses = _losses(tmp_path / "bf16")
    assert len(losses) == STEPS and all(x == x and x < 100 for x in losses), losses
