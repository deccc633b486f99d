"""Fine-tuning under FSDP builds the model and its EMA on `meta` and reads only each rank's slices
of `stage.init_from`: a 492M-parameter model through the real `train.py` on 1, 2 and 4 CPU
processes, with each rank's peak host memory measured and the loaded weights checked."""

from __future__ import annotations

import dataclasses
import json
import os
import resource
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import Callback
from test_resume import data_root  # noqa: F401  (a fixture)
from test_train import random_ae, tiny_overrides  # noqa: F401  (random_ae is a fixture)

from kontext.network.model import Flux, get_params, load_flux, save_flux
from kontext.run import CONFIG_DIR

# hidden 768, 4 double + 50 single blocks: 532M parameters, 2.13 GB in fp32. What does not shard
# stays small beside it: a process's own ~0.55 GB of libraries and frozen encoders, the
# activations of one sample, and the gathered block in flight (the largest is 3.8% of the model,
# as a block of the 12B model is 1-3% of it).
BIG = {"hidden_size": 768, "num_heads": 6, "axes_dim": [16, 56, 56], "depth": 4, "depth_single_blocks": 50}


class PeakMemory(Callback):
    """Writes this rank's peak resident memory (after building, loading, the EMA and the steps)."""

    def __init__(self, out: str):
        self.out = out

    def on_train_end(self, trainer, pl_module) -> None:
        peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
        Path(self.out, f"peak_rank{trainer.global_rank}.json").write_text(json.dumps({"peak_mib": peak_kib / 1024}))


def _random_file(path: Path, seed: int, **changes) -> Path:
    """A reference-format file of `tiny` with `changes`, every tensor distinct and non-zero (so a
    misplaced slice shows); tiny_overrides trains model=tiny."""
    torch.manual_seed(seed)
    model = Flux(dataclasses.replace(get_params("tiny"), **changes))
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.02)
    save_flux(model, path)
    return path


@pytest.fixture(scope="module")
def big_file(tmp_path_factory) -> Path:
    return _random_file(tmp_path_factory.mktemp("big") / "big.safetensors", 11, **BIG)


def _train(root: Path, random_ae: str, big_file: Path, run_dir: Path, processes: int) -> None:  # noqa: F811
    model = [f"model.{k}={v}".replace(" ", "") for k, v in BIG.items()]
    fsdp = ["trainer=fsdp", "trainer.accelerator=cpu", f"trainer.devices={processes}"] if processes > 1 else []
    # A checkpoint of this model with its EMA and AdamW state takes 8.5 GB: only the 4-process run's is read.
    if processes != 4:
        fsdp += ["~callbacks.checkpoint", "~callbacks.requeue", "+trainer.enable_checkpointing=false"]
    args = [*tiny_overrides(root, random_ae), *model, *fsdp, f"paths.output_dir={run_dir}",
            f"stage.init_from={big_file}", "trainer.max_steps=1", "data.batch_size=1", "stage.optimizer.lr=0",
            "stage.finish.benchmark.n_per_op=0", "stage.finish.export=false", "+callbacks.peak._target_=test_meta_build.PeakMemory", f"+callbacks.peak.out={run_dir}"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).parent), os.environ.get("PYTHONPATH", "")]),
           "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, str(CONFIG_DIR.parent / "train.py"), *args], cwd=root, env=env,
                         capture_output=True, text=True, timeout=1200)
    assert out.returncode == 0, out.stderr[-3000:]


@pytest.mark.slow
def test_fine_tuning_under_fsdp_holds_a_shard_per_rank(data_root, random_ae, big_file, tmp_path):  # noqa: F811
    peaks = {}
    for n in (1, 2, 4):
        run_dir = tmp_path / f"n{n}"
        _train(data_root, random_ae, big_file, run_dir, n)
        ranks = [json.loads((run_dir / f"peak_rank{r}.json").read_text())["peak_mib"] for r in range(n)]
        peaks[n] = max(ranks)
        config = (run_dir / "config.yaml").read_text()
        assert f"meta_build: {'true' if n > 1 else 'false'}" in config
    print(f"\npeak host memory per rank (MiB): 1 process {peaks[1]:.0f}, 2 processes {peaks[2]:.0f} "
          f"({peaks[2] / peaks[1]:.3f} of it), 4 processes {peaks[4]:.0f} ({peaks[4] / peaks[1]:.3f})")
    assert peaks[2] <= (1 / 2 + 0.10) * peaks[1], peaks
    assert peaks[4] <= (1 / 4 + 0.10) * peaks[1], peaks

    # With lr 0 the weights stay as loaded: the 4-process run's sharded checkpoint is the file.
    from kontext.formats.consolidate import consolidate

    want = load_flux(big_file).state_dict()
    for prefix in ("state_dict.model.", "state_dict.ema.model."):
        got = consolidate(tmp_path / "n4" / "checkpoints" / "last.ckpt", prefix)
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want), prefix


def test_meta_build_in_one_process_loads_the_file(tmp_path):
    """parallel.meta_build=true without FSDP: built on meta, then the whole file by slices."""
    from kontext.scale.parallel import ParallelConfig
    from kontext.stages.flow import FlowStage

    path = _random_file(tmp_path / "init.safetensors", 5)
    stage = FlowStage(get_params("tiny"), init_from=str(path), parallel=ParallelConfig(meta_build=True))
    assert stage.meta_built and all(p.is_meta for p in stage.model.parameters())
    stage.configure_model()
    want = load_flux(path).state_dict()
    for got in (stage.model.state_dict(), stage.ema.model.state_dict()):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def test_meta_build_refuses_a_file_of_another_shape_before_building(tmp_path):
    from kontext.errors import KontextError
    from kontext.scale.parallel import ParallelConfig
    from kontext.stages.flow import FlowStage

    path = _random_file(tmp_path / "init.safetensors", 5, hidden_size=96, axes_dim=[8, 8, 8])
    with pytest.raises(KontextError, match=r"83 with the wrong shape \(double_blocks.0.img_attn"):
        FlowStage(get_params("tiny"), init_from=str(path), parallel=ParallelConfig(meta_build=True))


def _rows(kind: str, path: str):
    from kontext.formats import slices
    from kontext.formats.consolidate import consolidate

    if kind == "file":
        return slices.FileRows(path)
    if kind == "ckpt":  # a training checkpoint's tensors, memory-mapped
        return slices.TensorRows(consolidate(path, "state_dict.ema.model."))
    return slices.FolderRows(path, "state_dict.ema.model.")


def _slices_worker(rank: int, world: int, port: int, kind: str, path: str, out: str) -> None:
    import torch.distributed as dist
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    from kontext.formats import slices
    from kontext.scale.parallel import cpu_mesh
    from kontext.stages.ema import EMA

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        with torch.device("meta"):  # first dims 7, 2 and 1 over 3 ranks: rows 3/3/1, 1/1/0, 1/0/0
            model = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 2), nn.Linear(2, 1))
        ema = EMA(model)
        for m in (model, ema.model):
            for layer in m:
                fully_shard(layer, mesh=cpu_mesh())
            fully_shard(m, mesh=cpu_mesh())
            m.to_empty(device="cpu")
        slices.fill(model, _rows(kind, path))
        ema.copy_from(model)
        gathered = [{k: v.full_tensor() for k, v in m.state_dict().items()} for m in (model, ema.model)]
        if rank == 0:
            torch.save(gathered, out)
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("kind", ["file", "ckpt", "folder"])
def test_slices_fill_uneven_and_empty_shards(tmp_path, kind):
    """Three ranks and first dimensions that do not divide by three (one rank holds no row of some
    tensors): every rank reads its rows, from a safetensors file, a training checkpoint file or a
    sharded checkpoint folder, and the gathered model and EMA are the stored weights."""
    import torch.distributed.checkpoint as dcp
    import torch.multiprocessing as mp
    from test_parallel import _free_port
    from torch import nn

    from kontext.formats.weights import save_safetensors

    torch.manual_seed(2)
    want = nn.Sequential(nn.Linear(5, 7), nn.Linear(7, 2), nn.Linear(2, 1)).state_dict()
    path = tmp_path / {"file": "w.safetensors", "ckpt": "w.ckpt", "folder": "w"}[kind]
    if kind == "file":
        save_safetensors(want, path)
    elif kind == "ckpt":
        torch.save({"state_dict": {f"ema.model.{k}": v for k, v in want.items()}, "global_step": 1}, path)
    else:
        dcp.save({f"state_dict.ema.model.{k}": v for k, v in want.items()}, checkpoint_id=str(path), no_dist=True)
    mp.start_processes(_slices_worker, args=(3, _free_port(), kind, str(path), str(tmp_path / "out.pt")),
                       nprocs=3, start_method="fork")
    for got in torch.load(tmp_path / "out.pt"):
        assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


def _init_worker(rank: int, world: int, port: int, out: str) -> None:
    import torch.distributed as dist

    from kontext.formats import slices
    from kontext.network.model import init_like_construction
    from kontext.scale import parallel

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        torch.manual_seed(4)
        with torch.device("meta"):
            model = Flux(get_params("tiny"))
        built = torch.get_rng_state()
        init_like_construction(model)  # the generator as Flux(params) leaves it
        after = torch.get_rng_state()
        parallel.shard(model, parallel.cpu_mesh())
        model.to_empty(device="cpu")
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(built)
            init_like_construction(model, slices.init_rows)
        gathered = {k: v.full_tensor() for k, v in model.state_dict().items()}
        if rank == 0:
            torch.save((gathered, after), out)
    finally:
        dist.destroy_process_group()


def test_a_model_initialised_shard_by_shard_is_the_one_process_model(tmp_path):
    """From scratch under FSDP: built on `meta`, sharded over 3 ranks, each rank initialising only
    its rows; gathered, the weights and the random generator's state are those `Flux(params)`
    leaves in one process with the same seed."""
    import torch.multiprocessing as mp
    from test_parallel import _free_port

    mp.start_processes(_init_worker, args=(3, _free_port(), str(tmp_path / "out.pt")), nprocs=3, start_method="fork")
    got, after = torch.load(tmp_path / "out.pt")
    torch.manual_seed(4)
    want = Flux(get_params("tiny")).state_dict()
    assert torch.equal(after, torch.get_rng_state())
    assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)


@pytest.mark.slow
def test_training_from_scratch_under_fsdp_built_on_meta_matches_a_whole_build(data_root, random_ae, tmp_path):  # noqa: F811
    """`train.py` from scratch on 2 processes: built on `meta` with each rank drawing its rows
    (the default under FSDP), the run's losses and its sharded checkpoint are those of the
    whole build on each rank (`parallel.meta_build=false`), bit for bit."""
    import csv

    from kontext.formats.consolidate import consolidate

    def run(name: str, *extra: str) -> list[float]:
        args = [*tiny_overrides(data_root, random_ae), f"paths.output_dir={tmp_path / name}", "trainer=fsdp",
                "trainer.accelerator=cpu", "trainer.devices=2", "trainer.max_steps=3", "trainer.log_every_n_steps=1",
                "data.batch_size=2", "stage.finish.benchmark.n_per_op=0", "stage.finish.export=false", *extra]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        out = subprocess.run([sys.executable, str(CONFIG_DIR.parent / "train.py"), *args], cwd=data_root, env=env,
                             capture_output=True, text=True, timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
        (metrics,) = (tmp_path / name / "csv").glob("version_*/metrics.csv")
        with open(metrics) as f:
            return [float(r["train/loss"]) for r in csv.DictReader(f) if r.get("train/loss")]

    meta, whole = run("meta"), run("whole", "parallel.meta_build=false")
    assert "meta_build: true" in (tmp_path / "meta" / "config.yaml").read_text()
    assert len(meta) == 3 and meta == whole, (meta, whole)
    a, b = (consolidate(tmp_path / name / "checkpoints" / "last.ckpt", "state_dict.model.") for name in ("meta", "whole"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
