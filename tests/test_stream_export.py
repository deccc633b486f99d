"""Exports of a sharded (FSDP) checkpoint, streamed tensor by tensor: the reference and diffusers
files equal those of the whole-model path bit for bit (names, dtypes, values, the data section's
bytes), each checkpoint tensor is read alone, and (slow) the exporting process's peak memory stays
near the largest tensor while gathering takes the whole model."""

from __future__ import annotations

import json
import os
import shutil
import struct
import subprocess
import sys
import warnings
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from tiny_kontext import tiny_pipeline, write_run_dir

from kontext.artifact import EMA_PREFIX, export_transformer, main
from kontext.export import export
from kontext.formats.checkpoint import META
from kontext.formats.consolidate import ShardedTensors
from kontext.formats.safe_load import load_file
from kontext.network.model import FluxParams, build_flux

pytestmark = pytest.mark.usefixtures("one_thread")


def shard(checkpoint: Path, folder: Path, only: str = "") -> Path:
    """The checkpoint file as a folder of DCP shards, as the FSDP strategy saves it (one process
    here: one chunk per tensor), with Lightning's non-tensor state in `meta.pt`; `only`: keep only
    the `state_dict` keys with this prefix."""
    state = load_file(checkpoint)
    tensors = {k: v for k, v in state.pop("state_dict").items() if k.startswith(only)}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save({"state_dict": tensors}, checkpoint_id=str(folder), no_dist=True)
    torch.save(state, folder / META)
    return folder


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A run with a checkpoint file and the same run with that checkpoint as a sharded folder."""
    root = tmp_path_factory.mktemp("runs")
    pipe = tiny_pipeline(seed=4)
    single = write_run_dir(root / "single", pipe)
    sharded = root / "sharded"
    (sharded / "checkpoints").mkdir(parents=True)
    shutil.copy(single / "config.yaml", sharded / "config.yaml")
    shard(single / "checkpoints" / "last.ckpt", sharded / "checkpoints" / "last.ckpt")
    return single, sharded


def parts(path: Path) -> tuple[dict, dict, bytes]:
    """A safetensors file's tensors, metadata, and its data section."""
    with safe_open(str(path), framework="pt") as f:
        tensors, metadata = {k: f.get_tensor(k) for k in f.keys()}, f.metadata()
    raw = path.read_bytes()
    return tensors, metadata, raw[8 + struct.unpack("<Q", raw[:8])[0]:]


def assert_same_file(a: Path, b: Path) -> None:
    (ta, ma, da), (tb, mb, db) = parts(a), parts(b)
    assert ta.keys() == tb.keys() and ta and ma == mb
    assert all(ta[k].dtype == tb[k].dtype and torch.equal(ta[k], tb[k]) for k in ta)
    assert da == db


def test_the_streamed_reference_file_is_the_gathered_one(runs, tmp_path, monkeypatch):
    single, sharded = runs
    read: list[list[str]] = []
    load = ShardedTensors.load
    monkeypatch.setattr(ShardedTensors, "load", lambda self, keys: read.append(keys) or load(self, keys))
    for raw in (False, True):
        for dtype in (None, torch.bfloat16):
            name = f"{raw}-{dtype}.safetensors"
            streamed = export_transformer(sharded, tmp_path / "streamed" / name, ema=not raw, dtype=dtype)
            assert_same_file(streamed, export_transformer(single, tmp_path / "gathered" / name, ema=not raw,
                                                          dtype=dtype))
    n = len(build_flux("tiny", device="meta").state_dict())
    assert len(read) == 4 * n and {len(keys) for keys in read} == {1}  # one tensor at a time, each once
    assert not list((tmp_path / "streamed").glob("*.tmp"))

    main([str(sharded), str(tmp_path / "cli.safetensors"), "--dtype", "bf16"])
    assert_same_file(tmp_path / "cli.safetensors", tmp_path / "gathered" / "False-torch.bfloat16.safetensors")


def test_the_streamed_export_folder_is_the_gathered_one(runs, tmp_path, monkeypatch):
    single, sharded = runs
    a = export(single, tmp_path / "gathered", diffusers=True)
    from kontext.formats import consolidate as module

    consolidate = module.consolidate
    monkeypatch.setattr(module, "consolidate", lambda path, prefix="state_dict.", read=True:
                        consolidate(path, prefix, read) if not read else pytest.fail("gathered the model"))
    b = export(sharded, tmp_path / "streamed", diffusers=True)
    for name in ("transformer.safetensors", "transformer/diffusion_pytorch_model.safetensors", "ae.safetensors"):
        assert_same_file(a / name, b / name)
    assert (a / "transformer" / "config.json").read_text() == (b / "transformer" / "config.json").read_text()
    config_a, config_b = (json.loads((x / "config.json").read_text()) for x in (a, b))
    assert config_a.pop("source") == str(single / "checkpoints" / "last.ckpt")
    assert config_b.pop("source") == str(sharded / "checkpoints" / "last.ckpt") and config_a == config_b


# ------------------------------------------------------------------------------- peak memory

# The peak resident memory of this process image (VmHWM; unlike ru_maxrss, not inherited from
# the forking test process), in KiB, before and after the export.
PEAK = """
import sys
from kontext.artifact import export_transformer, read_artifact, sharded_artifact
from kontext.network.model import save_flux
def peak():
    return next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmHWM:"))
source, out, how = sys.argv[1:]
sharded_artifact(source)  # imports and the checkpoint's metadata: the baseline
before = peak()
if how == "streamed":
    export_transformer(source, out)
elif how == "diffusers":
    from kontext.formats.stream_export import stream_transformer
    stream_transformer(sharded_artifact(source), out, diffusers=True)
else:  # what exporting a sharded checkpoint did before: gather the EMA, then write it
    save_flux(read_artifact(source).transformer(), out)
print(before, peak())
"""


def peak_mib(source: Path, out: Path, how: str) -> float:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", PEAK, str(source), str(out), how], env=env, check=True,
                            capture_output=True, text=True)
    before, after = map(int, result.stdout.split()[-2:])
    return (after - before) / 1024


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists("/proc/self/status"), reason="peak memory read from /proc")
def test_streaming_holds_about_the_largest_tensor_not_the_model(tmp_path):
    """A 138M-parameter transformer (554 MiB in fp32): the streamed exports' peak memory above
    their baseline is a small multiple of its largest tensor (a single block's linear1, 28 MiB:
    its bytes as read, the tensor, the one it is copied into), far below what gathering takes."""
    params = FluxParams(in_channels=64, out_channels=64, vec_in_dim=384, context_in_dim=384, hidden_size=1024,
                        mlp_ratio=4.0, num_heads=8, depth=2, depth_single_blocks=4, axes_dim=[32, 48, 48],
                        theta=10_000, qkv_bias=True, guidance_embed=True)
    run = tmp_path / "run"
    folder = run / "checkpoints" / "last.ckpt"
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(0)
    ema = {f"{EMA_PREFIX}{k}": torch.randn(v.shape, generator=g) for k, v in build_flux(params, "meta").state_dict().items()}
    model_mib = sum(v.nbytes for v in ema.values()) / 2**20
    largest_mib = max(v.nbytes for v in ema.values()) / 2**20
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*assuming the intent is to save in a single process")
        dcp.save({"state_dict": ema}, checkpoint_id=str(folder), no_dist=True)
    del ema
    torch.save({"global_step": 1}, folder / META)
    (run / "config.yaml").write_text(json.dumps({"model": {"_target_": "kontext.network.model.FluxParams", **asdict(params)}}))

    peaks = {how: peak_mib(run, tmp_path / f"{how}.safetensors", how) for how in ("streamed", "diffusers", "gathered")}
    print(f"model {model_mib:.0f} MiB, largest tensor {largest_mib:.0f} MiB; peak above baseline: "
          + ", ".join(f"{how} {mib:.0f} MiB" for how, mib in peaks.items()))
    size = (tmp_path / "streamed.safetensors").stat().st_size
    assert size == (tmp_path / "gathered.safetensors").stat().st_size and size > model_mib * 2**20
    assert max(peaks["streamed"], peaks["diffusers"]) < 6 * largest_mib < model_mib / 3 < peaks["gathered"] / 3
