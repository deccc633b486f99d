"""Bad input on the training side, as a table: shards and config values. Each case ends in its
one-line error or its exact skip count, within a time bound (checkpoints and run configs:
tests/test_bad_input_files.py)."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest
from test_data_loader import _good, _write_raw
from test_train import compose_train, random_ae, tiny_overrides  # noqa: F401  (random_ae is a fixture)

from kontext.config_check import check_config
from kontext.data.loader import KontextLoader
from kontext.data.stream import DataError, StreamConfig
from kontext.errors import KontextError
from kontext.run import CONFIG_DIR, run

TESTS = Path(__file__).resolve().parent


@contextlib.contextmanager
def bounded(seconds: float):
    """Fail instead of hanging: the body must end within `seconds`."""

    def expire(*_):
        raise TimeoutError(f"still running after {seconds} s")

    old = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


class Payload:
    """A pickle that, if loaded, creates a folder."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def __reduce__(self):
        return os.makedirs, (self.folder,)


# ------------------------------------------------------------------------------------- shards

def _bad(key: str) -> dict:
    return {**_good(key), "target.png": b"\x89PNG\r\n\x1a\nnot really"}


def _empty_tar(path: Path) -> None:
    with tarfile.open(path, "w"):
        pass


SHARDS = {  # name: (files, loader mode, expected error or expected (kept, skipped, reasons))
    "resampled, every shard unreadable": (
        {"a.tar": b"not a tar" * 50, "b.tar": b""}, "resampled",
        r"no readable data: the last 100 shards or samples read were all unreadable \(limit "
        r"data.max_consecutive_bad=100\); skipped \{'unreadable shard \(.*\)': \d+.*\} in 2 shard\(s\): .*a.tar \(\d+\)"),
    "resampled, empty tars": (
        {"a.tar": "empty", "b.tar": "empty"}, "resampled",
        r"the last 100 shards or samples read were all unreadable .*\{'empty shard': 100\} in 2 shard\(s\)"),
    "resampled, every sample corrupt": (
        {"a.tar": [_bad(f"b{i}") for i in range(6)]}, "resampled",
        r"(of 64 samples read so far are unreadable|the last 100 shards or samples read were all unreadable)"),
    "exact, empty tar": (
        {"a.tar": "empty"}, "exact",
        r"no readable data: an epoch over 1 shard\(s\) \(.*a.tar\) yielded no batch; 0 samples read, 1 skipped "
        r"\{'empty shard': 1\}"),
    "exact, every sample corrupt": (
        {"a.tar": [_bad(f"b{i}") for i in range(5)], "b.tar": [_bad(f"c{i}") for i in range(3)]}, "exact",
        r"an epoch over 2 shard\(s\) .* yielded no batch; 8 samples read, 8 skipped "
        r"\{'unreadable image header': 8\}"),
    "exact, unreadable files": (
        {"a.tar": b"not a tar" * 50, "b.tar": b""}, "exact",
        r"yielded no batch; 0 samples read, 2 skipped \{'unreadable shard \(.*\)': 1, 'unreadable shard \(.*\)': 1\}"),
    "exact, mixed": (
        {"a.tar": b"junk" * 100, "b.tar": "empty",
         "c.tar": [_good(f"g{i}") for i in range(6)] + [_bad(f"b{i}") for i in range(2)]}, "exact",
        (6, 4, {"unreadable image header": 2, "empty shard": 1})),
}


def _write_shards(folder: Path, files: dict) -> Path:
    folder.mkdir(parents=True)
    for name, content in files.items():
        if content == "empty":
            _empty_tar(folder / name)
        elif isinstance(content, bytes):
            (folder / name).write_bytes(content)
        else:
            _write_raw(folder / name, content)
    return folder


@pytest.mark.parametrize("workers", [0, 2])
@pytest.mark.parametrize("case", list(SHARDS))
def test_shards_that_yield_nothing_end_with_one_line(tmp_path, case, workers):
    files, mode, expected = SHARDS[case]
    folder = _write_shards(tmp_path / "shards", files)
    loader = KontextLoader(str(folder), StreamConfig(batch_size=2, mode=mode, max_area=32 * 32, shuffle_buffer=4),
                           num_workers=workers, epoch_samples=8)
    with bounded(60):
        if isinstance(expected, str):
            with pytest.raises(DataError, match=expected) as err:
                list(loader)
            assert "\n" not in str(err.value)
            return
        keys = [k for batch in loader for k in batch["key"]]
    kept, skipped, reasons = expected
    assert len(keys) == kept and loader.stats["corrupt"] == skipped
    assert {r: n for r, n in loader.stats["reasons"].items() if not r.startswith("unreadable shard")} == reasons


def test_a_rank_dealt_no_shards_has_no_batches_and_no_error(tmp_path):
    """Exact mode with fewer shards than ranks: the rank without a shard reads nothing, which
    is not broken data (the rank with the shard trains on it)."""
    shards = _write_shards(tmp_path / "shards", {"a.tar": [_good(f"g{i}") for i in range(4)]})
    cfg = StreamConfig(batch_size=2, mode="exact", max_area=32 * 32, shuffle_buffer=0)
    assert [b["key"] for b in KontextLoader(str(shards), cfg, rank=1, world_size=2)] == []
    assert sum(len(b["key"]) for b in KontextLoader(str(shards), cfg, rank=0, world_size=2)) == 4


def test_consecutive_bad_limit_is_exact(tmp_path):
    """Four corrupt samples in a row pass with a limit of 5; five stop the stream."""
    for run_length, fails in ((4, False), (5, True)):
        records = [_good("g0"), *[_bad(f"b{i}") for i in range(run_length)], _good("g1")]
        folder = _write_shards(tmp_path / str(run_length), {"a.tar": records})
        cfg = StreamConfig(batch_size=2, mode="exact", max_area=32 * 32, shuffle_buffer=0, max_consecutive_bad=5)
        loader = KontextLoader(str(folder), cfg)
        if fails:
            with pytest.raises(DataError, match="the last 5 shards or samples read were all unreadable"):
                list(loader)
        else:
            assert [k for b in loader for k in b["key"]] == ["g0", "g1"] and loader.stats["corrupt"] == 4


def _train_cli(*args: str, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(TESTS.parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(CONFIG_DIR.parent / "train.py"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


def _one_error_line(out: subprocess.CompletedProcess) -> str:
    assert out.returncode == 2, out.stderr[-3000:]
    assert "Traceback" not in out.stderr, out.stderr[-3000:]
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, out.stderr[-3000:]
    return errors[0]


def _image_data(tmp_path: Path, random_ae: str, shards: Path) -> list[str]:  # noqa: F811
    return [f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", f"paths.autoencoder={random_ae}",
            "model=tiny", "logger=csv", "prepare=none", "data=shapes_edit", f"data.shards={shards}",
            "data.batch_size=2", "data.num_workers=0", "data.epoch_samples=8", "data.bucket_area=1024",
            "trainer.max_steps=2", "stage.finish.benchmark.n_per_op=0"]


def test_train_on_unreadable_resampled_shards_ends_with_one_line(tmp_path, random_ae):  # noqa: F811
    """The reported hang: every shard unreadable in the default (resampled) mode."""
    shards = _write_shards(tmp_path / "shards", {"a.tar": b"not a tar" * 50, "b.tar": b""})
    start = time.perf_counter()
    out = _train_cli(*_image_data(tmp_path, random_ae, shards), "data.num_workers=2", cwd=tmp_path)
    line = _one_error_line(out)
    assert line.startswith("error: no readable data: the last 100 shards or samples read were all unreadable"), line
    assert str(shards / "a.tar") in line and time.perf_counter() - start < 300
    assert not (tmp_path / "run" / "export").exists()


@pytest.mark.parametrize("case", ["exact, empty tar", "exact, every sample corrupt"])
def test_training_on_nothing_exits_non_zero_and_exports_nothing(tmp_path, random_ae, capsys, case):  # noqa: F811
    """Silent success on nothing: exact mode used to train 0 steps, benchmark, export and exit 0."""
    shards = _write_shards(tmp_path / "shards", SHARDS[case][0])
    cfg = compose_train([*_image_data(tmp_path, random_ae, shards), "data.mode=exact",
                         "stage.finish.benchmark.n_per_op=1"])
    with bounded(120), pytest.raises(SystemExit) as exit_:
        run(cfg)
    assert exit_.value.code == 2
    err = capsys.readouterr()
    lines = [line for line in err.err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "yielded no batch" in lines[0], err.err
    assert "Edit an image" not in err.out
    for name in ("export", "benchmark.json", "metrics.json"):
        assert not (tmp_path / "run" / name).exists(), name


def test_zero_trained_steps_is_an_error(tmp_path, random_ae, capsys):  # noqa: F811
    """Whatever the reason (here a zero epoch budget), a run that trained no step does not finish."""
    shards = _write_shards(tmp_path / "shards", {"a.tar": [_good(f"g{i}") for i in range(4)]})
    cfg = compose_train([*_image_data(tmp_path, random_ae, shards), "trainer.max_epochs=0"])
    with pytest.raises(SystemExit) as exit_:
        run(cfg)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.startswith("error: trained 0 steps, so nothing is benchmarked or exported")
    assert not (tmp_path / "run" / "export").exists()


# ------------------------------------------------------------------------------------- configs

CONFIGS = {  # override: the line after "error: "
    "trainer.max_steps=abc": "trainer.max_steps='abc': expected an integer >= -1",
    "trainer.max_steps=-5": "trainer.max_steps=-5: expected an integer >= -1",
    "data.batch_size=abc": "data.batch_size='abc': expected an integer >= 1",
    "data.batch_size=0": "data.batch_size=0: expected an integer >= 1",
    "data.batch_size=2.5": "data.batch_size=2.5: expected an integer >= 1",
    "stage.optimizer.lr=abc": "stage.optimizer.lr='abc': expected a number >= 0",
    "stage.optimizer.lr=-1e-3": "stage.optimizer.lr=-0.001: expected a number >= 0",
    "stage.optimizer.betas=[0.9]": "stage.optimizer.betas=[0.9]: expected [two numbers], each in [0, 1)",
    "stage.optimizer.decay=fast": "stage.optimizer.decay='fast': expected one of cosine, linear, none",
    "stage.ema_decay=1.5": "stage.ema_decay=1.5: expected a number in [0, 1]",
    "data.t2i_fraction=-0.1": "data.t2i_fraction=-0.1: expected a number in [0, 1]",
    "data.mode=fast": "data.mode='fast': expected one of resampled, exact",
    "data.max_consecutive_bad=0": "data.max_consecutive_bad=0: expected an integer >= 1",
    "seed=abc": "seed='abc': expected an integer in [0, 4294967295]",
    "threads=0": "threads=0: expected an integer >= 1 or null",
    "trainer.max_time=5": 'trainer.max_time=5: expected "DD:HH:MM:SS", {days, hours, minutes, seconds} or null',
    "+trainer.max_time={hours:x}": "trainer.max_time={'hours': 'x'}: expected \"DD:HH:MM:SS\", {days, hours, minutes, seconds} or null",
    "prepare.shapes_edit.n=-5": "prepare.shapes_edit.n=-5: expected an integer >= 1",
    "stage.finish.export=abc": "stage.finish.export='abc': expected true or false",
    "model.depth=abc": "model.depth='abc': expected an integer",  # from FluxParams' annotations
    "stage.compact_text=maybe": "stage.compact_text='maybe': expected true or false",  # FlowStage's
    "trainer.deterministic=3": "trainer.deterministic=3: expected true or false or null or 'warn'",  # Lightning's
    "trainer.devices=abc": "trainer.devices='abc': expected a count >= 1, -1 (all), \"auto\" or a list of device indices",
    "trainer.devices=0": "trainer.devices=0: expected a count >= 1, -1 (all), \"auto\" or a list of device indices",
    "data.max_pixels=0": "data.max_pixels=0: expected an integer >= 1 or null",
    # from the fields of a stage's option groups (dataclasses)
    "stage.time_sampling.sigma=abc": "stage.time_sampling.sigma='abc': expected a number",
    "stage.validation.cases_per_op=1.5": "stage.validation.cases_per_op=1.5: expected an integer",
}


@pytest.mark.parametrize("override", list(CONFIGS))
def test_wrong_config_values_are_one_line(tmp_path, override):
    cfg = compose_train([f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", override])
    with pytest.raises(KontextError) as err:
        check_config(cfg)
    assert str(err.value) == CONFIGS[override]


@pytest.mark.parametrize(("experiment", "override", "message"), [
    ("embedded_ladd", "stage.reals.steps=abc", "stage.reals.steps='abc': expected an integer"),
    ("embedded_ladd", "stage.renoise.shared=3", "stage.renoise.shared=3: expected true or false"),
    ("embedded_autoencoder", "stage.loss.rec=3", "stage.loss.rec=3: expected a string"),
])
def test_option_groups_of_other_stages_are_typed_by_their_fields(tmp_path, experiment, override, message):
    cfg = compose_train([f"experiment={experiment}", f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run",
                         override])
    with pytest.raises(KontextError) as err:
        check_config(cfg)
    assert str(err.value) == message


@pytest.mark.parametrize("experiment", sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml")))
def test_every_shipped_experiment_passes_the_check(tmp_path, experiment):
    check_config(compose_train([f"experiment={experiment}", f"paths.root_dir={tmp_path}",
                                f"paths.output_dir={tmp_path}/run"]))


@pytest.mark.parametrize("override", ["trainer.devices=auto", "trainer.devices=2", "trainer.devices=-1",
                                      "trainer.devices=[0,1]", "trainer.devices='0,1'", "trainer.devices='-1'",
                                      "trainer.max_time={hours:4}", "trainer.max_time=00:04:00:00",
                                      "callbacks.checkpoint.every_n_train_steps=null"])
def test_values_lightning_takes_pass_the_check(tmp_path, override):
    check_config(compose_train([f"paths.root_dir={tmp_path}", f"paths.output_dir={tmp_path}/run", override]))


def test_wrong_type_on_the_command_line_is_one_line_before_anything_is_built(tmp_path):
    out = _train_cli("trainer.max_steps=abc", f"paths.root_dir={tmp_path}", cwd=tmp_path)
    assert _one_error_line(out) == "error: trainer.max_steps='abc': expected an integer >= -1"
    assert not (tmp_path / "data").exists()  # no shards written, no cache built


@pytest.mark.slow
def test_ten_percent_corrupt_samples_train_to_the_end_with_the_exact_count(tmp_path, random_ae):  # noqa: F811
    """36 readable and 4 corrupt samples (10%), one exact epoch of batches of 4: 9 steps, and the
    skipped samples by reason in metrics.json and the logger."""
    import csv
    import json

    records = [_good(f"g{i:02d}") for i in range(36)]
    for i in range(4):
        records.insert(10 * i + 5, _bad(f"b{i}"))
    shards = _write_shards(tmp_path / "shards", {"a.tar": records[:20], "b.tar": records[20:]})
    cfg = compose_train([*_image_data(tmp_path, random_ae, shards), "data.mode=exact", "data.batch_size=4",
                         "data.t2i_fraction=0",  # one bucket signature: 9 full batches
                         "trainer.max_steps=-1", "trainer.max_epochs=1", "stage.finish.export=false",
                         "trainer.log_every_n_steps=1"])
    metrics = run(cfg)
    expected = {"seen": 40, "corrupt": 4, "reasons": {"unreadable image header": 4}}
    assert metrics["steps"] == 9 and metrics["data"] == expected
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["data"] == expected
    with open(next((tmp_path / "run" / "csv").glob("version_*")) / "metrics.csv") as f:
        logged = [row for row in csv.DictReader(f) if row.get("data/skipped")]
    assert [(float(r["data/seen"]), float(r["data/skipped"]), float(r["data/skipped/unreadable image header"]))
            for r in logged] == [(40, 4, 4)]
