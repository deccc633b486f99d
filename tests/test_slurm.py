"""Preemption on a real SLURM cluster: a single-node cluster on this machine
(slurm/local_cluster.sh; Debian's slurm-wlm and munge, installed here when missing), the
project's sbatch script with 2 tasks on CPU (FSDP2 over gloo), USR1 sent to the job's tasks
mid-run as `--signal=USR1@90` would. The job must save at the next step boundary, requeue
itself, resume from that checkpoint in its next allocation, keep its wandb run, and finish
with the full step count: every step trained exactly once."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from test_resume import step_losses
from test_train import compose_train, random_ae, tiny_overrides  # noqa: F401  (random_ae is a fixture)

from kontext.formats.checkpoint import checkpoint_step
from kontext.scale import slurm
from kontext.stages.metrics import persistent_run_id
from kontext.sweep import collect, markdown

ROOT = Path(__file__).resolve().parent.parent
STEPS = 40
SIGNAL_AFTER = 10  # send USR1 once the checkpoint of this step exists


def ensure_slurm() -> None:
    if all(shutil.which(t) for t in ("sbatch", "slurmctld", "slurmd", "munged")):
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        pytest.skip("SLURM is not installed and cannot be (needs root and apt-get): apt-get install -y slurm-wlm munge")
    out = subprocess.run("apt-get update -q && apt-get install -y -q slurm-wlm munge", shell=True,
                         capture_output=True, text=True, env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})
    if out.returncode != 0:
        pytest.skip(f"apt-get install slurm-wlm munge failed (offline?): {out.stderr.strip()[-300:]}")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> dict:
    """A running single-node cluster with 2 CPUs; yields the environment that talks to it."""
    ensure_slurm()
    state = tmp_path_factory.mktemp("slurm")
    env = {**os.environ, "SLURMCTLD_PORT": str(free_port()), "SLURMD_PORT": str(free_port())}
    out = subprocess.run([str(ROOT / "slurm/local_cluster.sh"), "start", str(state), "2"], env=env,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr + "".join(p.read_text() for p in state.glob("*.log"))
    env["SLURM_CONF"] = out.stdout.strip().split("=", 1)[1]
    yield env
    subprocess.run([str(ROOT / "slurm/local_cluster.sh"), "stop", str(state)], env=env)


def job_info(job: str, env: dict) -> dict:
    out = subprocess.run(["scontrol", "show", "job", job], env=env, capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S+)", out))


def node_idle(env: dict) -> bool:
    states = subprocess.run(["sinfo", "-h", "-o", "%T"], env=env, capture_output=True, text=True).stdout.split()
    return bool(states) and all(state.startswith("idle") for state in states)


def wait_for(what: str, condition, timeout: float, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := condition():
            return result
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}; job log:\n{log.read_text()[-4000:] if log.exists() else ''}")


@pytest.mark.slow
def test_sbatch_requeues_on_usr1_and_finishes(cluster, tmp_path, random_ae):  # noqa: F811
    # Shards and feature cache before submitting: the job's ranks then only find and reuse them.
    overrides = [*tiny_overrides(tmp_path, random_ae), f"paths.output_dir={tmp_path}/run",
                 f"trainer.max_steps={STEPS}", "trainer.log_every_n_steps=1", "trainer.accelerator=cpu",
                 "callbacks.checkpoint.every_n_train_steps=5", "stage.finish.benchmark.n_per_op=0",
                 "stage.finish.export=false", "logger=[csv,wandb]", "data.shuffle_buffer=16"]
    for step in compose_train(overrides).prepare.values():
        instantiate(step)
    run_dir, log = tmp_path / "run", tmp_path / "job.out"
    env = {**cluster, "KONTEXT_PYTHON": sys.executable, "OMP_NUM_THREADS": "1", "WANDB_MODE": "offline"}
    job = subprocess.run(["sbatch", "--parsable", "--ntasks-per-node=2", "--cpus-per-task=1", f"--output={log}",
                          str(ROOT / "slurm/train.sbatch"), *overrides], cwd=ROOT, env=env,
                         capture_output=True, text=True, check=True).stdout.strip()

    ckpts = run_dir / "checkpoints"
    wait_for(f"step {SIGNAL_AFTER}", lambda: (ckpts / f"step{SIGNAL_AFTER:07d}.ckpt" / "meta.pt").is_file()
             or (ckpts / f"step{SIGNAL_AFTER + 5:07d}.ckpt").exists(), 600, log)
    # What --signal=USR1@90 does near the time limit: USR1 to every task of the job's steps.
    subprocess.run(["scancel", "--signal=USR1", job], env=env, check=True)

    # The job requeues itself; SLURM holds a requeued job back ~2 min: release it now.
    wait_for("the requeue", lambda: int(job_info(job, env).get("Restarts", 0)) >= 1, 300, log)
    # Release it only once the node has torn down the first allocation, and not within the
    # second of the requeue: slurmd revokes the old allocation's credential with a timestamp in
    # whole seconds, and refuses a start in that same second ("job credential revoked").
    wait_for("the pending requeued job on an idle node",
             lambda: job_info(job, env).get("JobState") == "PENDING" and node_idle(env), 120, log)
    time.sleep(2)
    subprocess.run(["scontrol", "update", f"jobid={job}", "StartTime=now"], env=env, check=True)
    info = wait_for("the job to finish",
                    lambda: (i := job_info(job, env)).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED") and i,
                    900, log)
    text = log.read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", (info, text[-4000:])

    saved = int(re.search(r"signal received: saved step (\d+)", text).group(1))
    assert SIGNAL_AFTER <= saved < STEPS
    assert f"requeued SLURM job {job}" in text
    assert text.count("restart 1:") == 1  # the script ran again in the second allocation

    # Every step trained exactly once: the first allocation logged steps [0, saved), the second
    # resumed from the checkpoint of step `saved` and logged [saved, STEPS).
    versions = sorted((run_dir / "csv").glob("version_*"))
    assert len(versions) == 2
    first = step_losses_of(versions[0])
    second = step_losses_of(versions[1])
    assert sorted(first) == list(range(saved)) and sorted(second) == list(range(saved, STEPS))
    assert checkpoint_step(ckpts / "last.ckpt") == STEPS
    assert len(step_losses(run_dir)) == STEPS

    # The same wandb run in both allocations (offline runs named after its id).
    run_id = (run_dir / "wandb_run_id").read_text().strip()
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 2 and all(p.name.endswith(f"-{run_id}") for p in offline), offline
    assert torch.load(ckpts / "last.ckpt" / "meta.pt", weights_only=False)["global_step"] == STEPS


def step_losses_of(version: Path) -> dict[int, float]:
    import csv

    with open(version / "metrics.csv") as f:
        return {int(r["step"]): float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")}


@pytest.mark.slow
def test_sweep_array_runs_each_line_and_collects_one_table(cluster, tmp_path, random_ae):  # noqa: F811
    """slurm/sweep.sh: one array job per line, each in its own run directory; collect.py: one table."""
    prepare = tiny_overrides(tmp_path, random_ae)
    for step in compose_train(prepare).prepare.values():
        instantiate(step)
    # No output_dir: each run gets the directory Hydra names after its overrides.
    base = [o for o in prepare if not o.startswith("paths.output_dir")]
    base += ["trainer.max_steps=3", "trainer.accelerator=cpu", "stage.finish.benchmark.n_per_op=1",
             "stage.finish.benchmark.chains=0", "stage.finish.sampler.steps=2", "stage.finish.export=false"]
    lines = tmp_path / "lr.txt"
    lines.write_text("# learning rates\nstage.optimizer.lr=1e-3\n\nstage.optimizer.lr=3e-4\n")
    env = {**cluster, "KONTEXT_PYTHON": sys.executable, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([str(ROOT / "slurm/sweep.sh"), str(lines), "--ntasks-per-node=1", "--cpus-per-task=1",
                          f"--output={tmp_path}/sweep-%A_%a.out", "--", *base], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    job = re.search(r"Submitted batch job (\d+)", out.stdout).group(1)

    def done():
        states = subprocess.run(["squeue", "-h", "-j", job], env=env, capture_output=True, text=True).stdout
        return not states.strip()

    wait_for("the sweep", done, 900, tmp_path / f"sweep-{job}_0.out")
    rows = collect(tmp_path / "outputs")
    assert sorted(r["run"].split("stage.optimizer.lr=")[-1].split()[0] for r in rows) == ["1e-3", "3e-4"], rows
    assert all(r["steps"] == 3 and r["pass_rate"] is not None for r in rows)
    table = subprocess.run([sys.executable, str(ROOT / "slurm/collect.py"), str(tmp_path / "outputs")],
                           capture_output=True, text=True, check=True).stdout
    assert len(table.strip().splitlines()) == 4 and "stage.optimizer.lr=3e-4" in table and table.startswith("| run |")


# ------------------------------------------------------------------------- without a cluster

def test_collect_table_from_metrics_files(tmp_path):
    for name, loss, rate in (("a", 0.5, 0.25), ("b", 0.25, 0.5)):
        run = tmp_path / name
        (run / ".hydra").mkdir(parents=True)
        (run / ".hydra" / "overrides.yaml").write_text(f"- model=tiny\n- seed={name}\n")
        (run / "metrics.json").write_text(json.dumps({"steps": 10, "final_loss": loss, "timings_s": {"train": 12.0},
                                                      "benchmark": {"pass_rate": rate, "edit_acc": 1.0, "keep_acc": 0.5}}))
    (tmp_path / "unfinished").mkdir()
    rows = collect(tmp_path)
    assert [r["run"] for r in rows] == ["model=tiny seed=a", "model=tiny seed=b"]
    lines = markdown(rows).splitlines()
    assert len(lines) == 4 and lines[2] == "| `model=tiny seed=a` | 10 | 0.5000 | 0.250 | 1.000 | 0.500 | 12 |"


def test_array_job_id_and_plugins_outside_slurm(monkeypatch):
    for key in list(os.environ):
        if key.startswith("SLURM_"):
            monkeypatch.delenv(key)
    assert not slurm.in_slurm_job() and slurm.cluster_plugins() == []
    monkeypatch.setenv("SLURM_JOB_ID", "17")
    assert slurm.job_id() == "17"
    monkeypatch.setenv("SLURM_ARRAY_JOB_ID", "12")
    monkeypatch.setenv("SLURM_ARRAY_TASK_ID", "3")
    assert slurm.job_id() == "12_3"


def test_usr1_only_sets_a_flag():
    import signal as signals

    slurm.install()
    slurm.clear()
    os.kill(os.getpid(), signals.SIGUSR1)  # would end the process without the handler
    time.sleep(0.05)
    assert slurm.requested() == signals.SIGUSR1
    slurm.clear()
    assert slurm.requested() is None


def test_wandb_run_id_is_made_once_and_kept(tmp_path):
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(8) as pool:
        ids = set(pool.map(lambda _: persistent_run_id(tmp_path / "run"), range(8)))
    assert len(ids) == 1 and persistent_run_id(tmp_path / "run") in ids
    assert persistent_run_id(tmp_path / "other") not in ids
