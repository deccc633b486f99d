"""Exact resume through the real composition (tiny preset, fp32, CPU): a run stopped by a
preemption signal halfway and resumed with `resume=auto`, or killed in the middle of writing a
checkpoint and resumed from the newest complete one, has the same loss at every step and ends
with the same weights, EMA, optimizer, LR schedule and data position as a run that was never
interrupted (bit for bit). Also with FSDP over 2 processes (slow)."""

from __future__ import annotations

import csv
import multiprocessing
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import Callback
from test_train import compose_train, random_ae, tiny_overrides  # noqa: F401  (random_ae is a fixture)

from kontext.formats.checkpoint import complete_checkpoints, find_resume_checkpoint, is_complete
from kontext.formats.consolidate import consolidate
from kontext.run import CONFIG_DIR, run

STEPS = 12      # with 8 batches per epoch: the resumed half crosses an epoch boundary
SAVE_EVERY = 3
TESTS = Path(__file__).resolve().parent


pytestmark = pytest.mark.usefixtures("one_thread")


class SignalAt(Callback):
    """Sends this process SIGUSR1 after optimizer step `step`, as SLURM would (`--signal=USR1@90`)."""

    def __init__(self, step: int, rank: int = 0):
        self.step, self.rank = step, rank

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step and trainer.global_rank == self.rank:
            os.kill(os.getpid(), signal.SIGUSR1)


@pytest.fixture(scope="module")
def data_root(tmp_path_factory, random_ae) -> Path:  # noqa: F811
    """Shards and feature cache, prepared once; every run below reuses them."""
    root = tmp_path_factory.mktemp("resume")
    cfg = compose_train(tiny_overrides(root, random_ae))
    for step in cfg.prepare.values():
        instantiate(step)
    return root


def overrides(root: Path, random_ae: str, run_dir: Path) -> list[str]:  # noqa: F811
    return [*tiny_overrides(root, random_ae), f"paths.output_dir={run_dir}", f"trainer.max_steps={STEPS}",
            "trainer.log_every_n_steps=1", f"callbacks.checkpoint.every_n_train_steps={SAVE_EVERY}",
            "callbacks.checkpoint.save_top_k=-1", "stage.finish.benchmark.n_per_op=0", "stage.finish.export=false",
            "stage.optimizer.warmup_steps=4", "stage.ema_decay=0.9", "data.shuffle_buffer=16",
            # Exactness needs a schedule that does not read the clock (decay_by=max_time does).
            "stage.optimizer.decay_by=steps"]


def step_losses(run_dir: Path) -> dict[int, float]:
    """The logged loss of every step; a step logged again by a resumed run takes the later value."""
    losses: dict[int, float] = {}
    versions = sorted((run_dir / "csv").glob("version_*"), key=lambda p: int(p.name.split("_")[1]))
    for version in versions:
        with open(version / "metrics.csv") as f:
            for row in csv.DictReader(f):
                if row.get("train/loss"):
                    losses[int(row["step"])] = float(row["train/loss"])
    return losses


def final_state(run_dir: Path) -> dict:
    ckpt = torch.load(run_dir / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=False)
    fit = ckpt["loops"]["fit_loop"]
    return {"step": ckpt["global_step"], "weights": ckpt["state_dict"], "optimizer": ckpt["optimizer_states"][0],
            "schedulers": ckpt["lr_schedulers"], "data": fit["state_dict"].get("combined_loader"),
            "loss_history": ckpt["loss_history"]}


def assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_tensors(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


@pytest.fixture(scope="module")
def straight(data_root, random_ae) -> Path:  # noqa: F811
    run_dir = data_root / "straight"
    run(compose_train(overrides(data_root, random_ae, run_dir)))
    return run_dir


def assert_same_run(run_dir: Path, straight: Path, logged_from: int = 0) -> None:
    """Same loss at every logged step (all steps from `logged_from` on must be logged), same end state."""
    expected, got = step_losses(straight), step_losses(run_dir)
    assert len(expected) == STEPS and set(range(logged_from, STEPS)) <= set(got) <= set(expected)
    expected = {s: expected[s] for s in got}
    assert got == expected, {s: (expected[s], got[s]) for s in expected if got[s] != expected[s]}
    a, b = final_state(straight), final_state(run_dir)
    assert a["step"] == b["step"] == STEPS
    assert_same_tensors(b["weights"], a["weights"], "weights")  # model and EMA
    assert_same_tensors(b["optimizer"], a["optimizer"], "optimizer")
    assert_same_tensors(b["schedulers"], a["schedulers"], "schedulers")
    position = ("epoch", "done", "finished", "num_workers", "world_size", "rank")
    assert [{k: d[k] for k in position} for d in b["data"]] == [{k: d[k] for k in position} for d in a["data"]]
    assert b["loss_history"] == a["loss_history"]


def test_resume_after_preemption_is_exact(data_root, random_ae, straight):  # noqa: F811
    run_dir = data_root / "preempted"
    cfg = compose_train([*overrides(data_root, random_ae, run_dir), "+callbacks.preempt._target_=test_resume.SignalAt",
                         f"+callbacks.preempt.step={STEPS // 2 - 1}"])
    first = run(cfg)
    # The flag is honoured at the next step boundary: one more step, then a save and a stop.
    assert not first["requeued"] and first["steps"] == STEPS // 2  # stopped; requeued only inside a SLURM job
    assert Path(first["checkpoint"]).name == "last.ckpt"
    assert find_resume_checkpoint("auto", run_dir / "checkpoints") == str(run_dir / "checkpoints" / "last.ckpt")
    assert max(step_losses(run_dir)) == STEPS // 2 - 1  # losses are logged at the step index (from 0)
    second = run(compose_train(overrides(data_root, random_ae, run_dir)))
    assert second["steps"] == STEPS
    assert_same_run(run_dir, straight)


def _train_and_die_mid_save(cfg, step: int, write: int) -> None:
    """Train; during the `write`-th checkpoint write of step `step`, write half the file, then SIGKILL."""
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO

    torch.set_num_threads(1)
    save = TorchCheckpointIO.save_checkpoint
    writes = []

    def half_then_kill(self, checkpoint, path, storage_options=None):
        save(self, checkpoint, path, storage_options)
        if checkpoint["global_step"] == step:
            writes.append(path)
            if len(writes) == write:
                size = os.path.getsize(path)
                with open(path, "r+b") as f:
                    f.truncate(size // 2)
                os.kill(os.getpid(), signal.SIGKILL)

    TorchCheckpointIO.save_checkpoint = half_then_kill
    run(cfg)


@pytest.mark.parametrize(("write", "resumes_from"), [(1, 3), (2, 6)])
def test_kill_during_save_resumes_from_newest_complete(data_root, random_ae, straight, write, resumes_from):  # noqa: F811
    """Killed while writing step 6's periodic checkpoint (write 1) or `last` (write 2)."""
    run_dir = data_root / f"killed{write}"
    cfg = compose_train(overrides(data_root, random_ae, run_dir))
    child = multiprocessing.get_context("fork").Process(target=_train_and_die_mid_save, args=(cfg, 6, write))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    ckpts = run_dir / "checkpoints"
    partial = [p for p in ckpts.iterdir() if p.name.endswith(".partial")]
    assert len(partial) == 1 and not is_complete(partial[0])  # the torn write is there, and refused
    newest = Path(find_resume_checkpoint("auto", ckpts))
    assert final_state_step(newest) == resumes_from
    assert all(is_complete(p) for p in complete_checkpoints(ckpts))
    run(cfg)
    assert not any(p.name.endswith(".partial") for p in ckpts.iterdir())
    # The killed process never flushed its last metrics rows; every step from the resume point is logged.
    assert_same_run(run_dir, straight, logged_from=resumes_from)


def final_state_step(path: Path) -> int:
    return torch.load(path, map_location="cpu", weights_only=False)["global_step"]


# ------------------------------------------------------------------------------ 2 processes

def _train_cli(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(CONFIG_DIR.parent / "train.py"), *args], cwd=cwd, env=env,
                         capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_fsdp_two_processes_resume_is_exact(data_root, random_ae):  # noqa: F811
    """FSDP2 on 2 CPU processes (gloo) through train.py, 2 micro-batches per step: sharded
    checkpoints (folders of shards); rank 0 alone is signalled, both ranks stop at the same step,
    and the resumed run matches an uninterrupted one at every step, bit for bit."""
    fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2",
            "trainer.accumulate_grad_batches=2",  # 2 micro-batches per step: resume at a step boundary
            "callbacks.metrics.grid_every_n_steps=6", "callbacks.metrics.grid_steps=2"]  # sharded EMA samples

    def args(run_dir: Path) -> list[str]:
        return [*overrides(data_root, random_ae, run_dir), *fsdp]

    straight_dir, resumed_dir = data_root / "fsdp_straight", data_root / "fsdp_resumed"
    _train_cli(args(straight_dir), data_root)
    first = _train_cli([*args(resumed_dir), "+callbacks.preempt._target_=test_resume.SignalAt",
                        f"+callbacks.preempt.step={STEPS // 2 - 1}"], data_root)
    assert f"stopped at step {STEPS // 2} for a requeue" in first.stdout
    last = resumed_dir / "checkpoints" / "last.ckpt"
    assert last.is_dir() and is_complete(last) and len(list(last.glob("*.distcp"))) == 2  # one shard per rank
    _train_cli(args(resumed_dir), data_root)

    expected, got = step_losses(straight_dir), step_losses(resumed_dir)
    assert len(expected) == STEPS and got == expected
    assert sorted(p.name for p in (resumed_dir / "grids").iterdir()) == ["step0000006.png", "step0000012.png"]
    for prefix in ("state_dict.model.", "state_dict.ema.model.", "optimizer_0.state."):
        a = consolidate(straight_dir / "checkpoints" / "last.ckpt", prefix)
        b = consolidate(last, prefix)
        assert a.keys() == b.keys() and a
        assert all(torch.equal(a[k], b[k]) for k in a), prefix

    # A sharded checkpoint exports to the reference layout in one process.
    from kontext.artifact import export_transformer
    from kontext.network.model import load_flux

    exported = load_flux(export_transformer(last, data_root / "fsdp.safetensors")).state_dict()
    ema = consolidate(last, "state_dict.ema.model.")
    assert exported.keys() == ema.keys() and all(torch.equal(exported[k], ema[k]) for k in ema)


def test_checkpoint_exports_reference_weights(straight, tmp_path):
    """`python -m kontext.artifact`: a training checkpoint's EMA (or raw) transformer as a
    reference-format file that load_flux reads strictly."""
    from kontext.artifact import main
    from kontext.network.model import load_flux

    ckpt = straight / "checkpoints" / "last.ckpt"
    weights = torch.load(ckpt, map_location="cpu", weights_only=False)["state_dict"]
    for flag, prefix in (([], "ema.model."), (["--raw"], "model.")):
        out = tmp_path / f"transformer{len(flag)}.safetensors"
        main([str(ckpt), str(out), *flag])
        loaded = load_flux(out).state_dict()
        expected = {k[len(prefix):]: v for k, v in weights.items() if k.startswith(prefix)}
        assert loaded.keys() == expected.keys() and all(torch.equal(loaded[k], expected[k]) for k in loaded)


def _train_and_die_at_publish(cfg, nth: int, after: bool) -> None:
    """Train; SIGKILL just before (or just after) the `nth` checkpoint is renamed into place."""
    import kontext.formats.checkpoint

    torch.set_num_threads(1)
    publish, calls = kontext.formats.checkpoint.publish, []

    def publish_then_kill(partial, final):
        calls.append(final)
        if len(calls) == nth and not after:
            os.kill(os.getpid(), signal.SIGKILL)
        publish(partial, final)
        if len(calls) == nth:
            os.kill(os.getpid(), signal.SIGKILL)

    kontext.formats.checkpoint.publish = publish_then_kill
    run(cfg)


@pytest.mark.slow
@pytest.mark.parametrize(("nth", "after", "resumes_from"), [(3, False, 3), (3, True, 6), (4, False, 6), (4, True, 6)])
def test_kill_around_publish_resumes_from_newest_complete(data_root, random_ae, straight, nth, after, resumes_from):  # noqa: F811
    """Killed with step 6's periodic checkpoint (publish 3) or `last` (publish 4) fully written,
    before or after its rename: resume=auto takes the newest complete checkpoint, and no step is
    lost or repeated."""
    run_dir = data_root / f"published{nth}{after}"
    cfg = compose_train(overrides(data_root, random_ae, run_dir))
    child = multiprocessing.get_context("fork").Process(target=_train_and_die_at_publish, args=(cfg, nth, after))
    child.start()
    child.join()
    assert child.exitcode == -signal.SIGKILL
    ckpts = run_dir / "checkpoints"
    assert final_state_step(Path(find_resume_checkpoint("auto", ckpts))) == resumes_from
    run(cfg)
    assert not any(p.name.endswith(".partial") for p in ckpts.iterdir())
    assert_same_run(run_dir, straight, logged_from=resumes_from)


def test_resume_skips_damaged_and_untrusted_checkpoints(data_root, random_ae, straight, tmp_path):  # noqa: F811
    """A garbled `last.ckpt` and a newer-named checkpoint whose pickle holds a callable: resume=auto
    skips both (the callable never runs) and continues exactly from the newest intact one."""
    import shutil

    from test_bad_input_files import _garble
    from test_bad_input_training import Payload

    run_dir = data_root / "damaged"
    ckpts = run_dir / "checkpoints"
    ckpts.mkdir(parents=True)
    for name in ("step0000003.ckpt", "step0000006.ckpt", "last.ckpt"):
        shutil.copy(straight / "checkpoints" / name, ckpts / name)
    shutil.copy(straight / "checkpoints" / "step0000006.ckpt", ckpts / "last.ckpt")
    _garble(ckpts / "last.ckpt")
    torch.save({"global_step": 11, "x": Payload(tmp_path / "PWNED")}, ckpts / "step0000011.ckpt")
    assert find_resume_checkpoint("auto", ckpts) == str(ckpts / "step0000006.ckpt")
    run(compose_train(overrides(data_root, random_ae, run_dir)))
    assert not (tmp_path / "PWNED").exists()
    a, b = (torch.load(d / "checkpoints" / f"step{STEPS:07d}.ckpt", weights_only=True) for d in (straight, run_dir))
    assert b["global_step"] == STEPS
    assert_same_tensors(b["state_dict"], a["state_dict"], "weights")
    assert_same_tensors(b["optimizer_states"], a["optimizer_states"], "optimizer")


def test_resuming_with_another_model_shape_is_one_line(straight, data_root, random_ae, tmp_path, capsys):  # noqa: F811
    """A run directory trained with another model config (e.g. before a preset changed) is
    refused in one line that says how to start afresh, not with Lightning's size errors."""
    import shutil

    run_dir = Path(shutil.copytree(straight, tmp_path / "old"))
    cfg = compose_train([*overrides(data_root, random_ae, run_dir), f"trainer.max_steps={STEPS + 2}",
                         "model.num_heads=2", "model.axes_dim=[8,12,12]"])
    with pytest.raises(SystemExit) as exit_info:
        run(cfg)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: the checkpoint to resume was trained with another model shape (")
    assert "query_norm.scale: [16] there, [32] in this config); resume=null or a new paths.output_dir" in err
