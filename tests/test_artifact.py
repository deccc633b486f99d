"""`kontext.artifact.read_artifact`, the one reader of trained weights: every kind of source gives
the same transformer, a run is read from the checkpoint `resume=auto` would take, and a real
2-process FSDP run's sharded checkpoint reads, samples, teaches and exports exactly like the
single file it consolidates to, and exports, streamed from its shards, to the same files (slow)."""

from __future__ import annotations

import pytest
import torch
from test_train import random_ae  # noqa: F401  (a fixture)
from tiny_kontext import random_flux, tiny_pipeline, write_run_dir

from kontext.artifact import export_transformer, read_artifact
from kontext.errors import KontextError
from kontext.export import export
from kontext.formats.checkpoint import find_resume_checkpoint
from kontext.network.model import load_flux, save_flux
from kontext.stages.teacher import load_teacher


def assert_same_weights(a: dict, b: dict) -> None:
    assert a.keys() == b.keys() and a
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_every_kind_of_source_reads_the_same_transformer(tmp_path):
    pipe = tiny_pipeline(seed=3)
    expected = pipe.model.state_dict()
    run = write_run_dir(tmp_path / "run", pipe)  # EMA: pipe.model; raw: other weights
    folder = export(pipe, tmp_path / "export")
    file = save_flux(pipe.model, tmp_path / "transformer.safetensors")
    for source in (run, run / "checkpoints" / "last.ckpt", folder, file):
        artifact = read_artifact(source)
        assert artifact.params == pipe.model.params, source
        assert_same_weights(artifact.ema, expected)
        assert_same_weights(artifact.transformer().state_dict(), expected)
    stored = torch.load(run / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    raw = {k.removeprefix("model."): v for k, v in stored.items() if k.startswith("model.")}
    assert_same_weights(read_artifact(run, raw=True).raw, raw)
    assert any(not torch.equal(raw[k], expected[k]) for k in raw)
    assert read_artifact(folder, raw=True).raw is None
    with pytest.raises(KontextError, match=r"export holds no raw weights \(only a training checkpoint does\)$"):
        export_transformer(folder, tmp_path / "raw.safetensors", ema=False)
    assert_same_weights(load_flux(export_transformer(run, tmp_path / "out.safetensors")).state_dict(), expected)


def _save(path, step: int, model) -> None:
    torch.save({"global_step": step, "state_dict": {f"ema.model.{k}": v for k, v in model.state_dict().items()}},
               path)


def test_a_run_is_read_from_the_checkpoint_resume_takes(tmp_path, caplog):
    """Not `last.ckpt` by name: the intact checkpoint with the highest step, as `resume=auto`."""
    pipe = tiny_pipeline(seed=3)
    run = write_run_dir(tmp_path / "run", pipe)  # last.ckpt at step 1
    ckpts = run / "checkpoints"
    later = random_flux(seed=5)
    _save(ckpts / "step0000005.ckpt", 5, later)
    artifact = read_artifact(run)
    assert artifact.path == ckpts / "step0000005.ckpt" and str(artifact.path) == find_resume_checkpoint("auto", ckpts)
    assert_same_weights(artifact.ema, later.state_dict())

    (ckpts / "step0000005.ckpt").write_bytes(b"garbage")
    with caplog.at_level("WARNING", logger="kontext.formats.checkpoint"):
        artifact = read_artifact(run)
    assert artifact.path == ckpts / "last.ckpt" and str(artifact.path) == find_resume_checkpoint("auto", ckpts)
    assert_same_weights(artifact.ema, pipe.model.state_dict())
    skipped = [r.getMessage() for r in caplog.records if r.name == "kontext.formats.checkpoint"]
    assert skipped and all(m.startswith(f"skipped: checkpoint {ckpts / 'step0000005.ckpt'} is truncated") for m in skipped)


# ------------------------------------------------------------------------------ 2 processes

@pytest.mark.slow
def test_fsdp_run_reads_like_its_single_file_consolidation(tmp_path, random_ae):  # noqa: F811
    """A 2-process FSDP run (train.py, gloo) stopped before its export leaves a folder of shards;
    the same run directory with that folder consolidated by torch's own converter into one
    Lightning file is read by the same code: equal EMA and raw weights, the same image from
    `sample.py`, the same teacher and the same reference-format export."""
    from hydra import compose, initialize_config_dir
    from hydra.utils import instantiate
    from test_resume import _train_cli
    from test_train import compose_train, tiny_overrides
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    from kontext.formats.safe_load import load_file
    from kontext.run import CONFIG_DIR
    from kontext.sample import run_sample

    root, fsdp_run, single_run = tmp_path, tmp_path / "fsdp", tmp_path / "single"
    base = tiny_overrides(root, random_ae)
    for step in compose_train(base).prepare.values():  # shards and feature cache
        instantiate(step)
    _train_cli([*base, f"paths.output_dir={fsdp_run}", "trainer=fsdp", "trainer.accelerator=cpu",
                "trainer.devices=2", "trainer.max_steps=2", "callbacks.checkpoint.every_n_train_steps=2",
                "callbacks.metrics.grid_every_n_steps=0", "stage.ema_decay=0.5",
                "stage.finish.benchmark.n_per_op=0", "stage.finish.export=false"], root)
    shards = fsdp_run / "checkpoints" / "last.ckpt"
    assert shards.is_dir() and len(list(shards.glob("*.distcp"))) == 2 and not (fsdp_run / "export").exists()

    # The independent consolidation: torch's DCP converter for the shards, plus Lightning's meta.pt.
    (single_run / "checkpoints").mkdir(parents=True)
    (single_run / "config.yaml").write_bytes((fsdp_run / "config.yaml").read_bytes())
    single = single_run / "checkpoints" / "last.ckpt"
    dcp_to_torch_save(shards, single)
    state = load_file(single)
    state.update(load_file(shards / "meta.pt"))
    torch.save(state, single)
    assert single.is_file() and state["global_step"] == 2

    a, b = read_artifact(fsdp_run, raw=True), read_artifact(single_run, raw=True)
    assert a.path == shards and b.path == single and a.params == b.params
    assert_same_weights(a.ema, b.ema)
    assert_same_weights(a.raw, b.raw)
    assert any(not torch.equal(a.ema[k], a.raw[k]) for k in a.ema)  # two different sets of weights

    images = []
    for source in (fsdp_run, shards, single_run):
        out = tmp_path / f"{len(images)}.png"
        with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
            cfg = compose("sample", overrides=[f"checkpoint={source}", "prompt=a red circle", "steps=2",
                                               "progress=false", "device=cpu", f"output={out}"])
        assert run_sample(cfg) == 0
        images.append(out.read_bytes())
    assert images[0] == images[1] == images[2]

    assert_same_weights(load_teacher(fsdp_run).state_dict(), b.ema)
    exported = load_flux(export_transformer(fsdp_run, tmp_path / "fsdp.safetensors", ema=False)).state_dict()
    assert_same_weights(exported, b.raw)

    # Exported from the shards tensor by tensor (kontext.formats.stream_export): the files of the consolidation.
    from test_stream_export import assert_same_file

    streamed, gathered = (export(run, tmp_path / f"export_{run.name}", diffusers=True) for run in (fsdp_run, single_run))
    for name in ("transformer.safetensors", "transformer/diffusion_pytorch_model.safetensors"):
        assert_same_file(streamed / name, gathered / name)


def test_stage_init_from_takes_any_source(tmp_path):
    """`stage.init_from` (full training, built whole or on `meta`, and a LoRA base) reads a run
    directory, a checkpoint, an export folder or a reference file: the same starting weights."""
    from kontext.network.lora import unwrap
    from kontext.stages.flow import FlowStage

    pipe = tiny_pipeline(seed=3)
    expected = pipe.model.state_dict()
    run = write_run_dir(tmp_path / "run", pipe)
    sources = (run, run / "checkpoints" / "last.ckpt", export(pipe, tmp_path / "export"),
               save_flux(pipe.model, tmp_path / "transformer.safetensors"))
    params = pipe.model.params
    for source in sources:
        whole = FlowStage(params, init_from=str(source))
        assert_same_weights(whole.model.state_dict(), expected)
        meta = FlowStage(params, init_from=str(source), parallel={"meta_build": True})
        assert meta.model.img_in.weight.is_meta
        meta.model.to_empty(device="cpu")
        meta.initialise_shards()
        assert_same_weights(meta.model.state_dict(), expected)
        lora = FlowStage(params, init_from=str(source), lora={"rank": 2, "alpha": 2.0})
        assert_same_weights(unwrap(lora.model).state_dict(), expected)
    other = save_flux(random_flux(0, "small"), tmp_path / "small.safetensors")
    for kwargs in ({}, {"lora": {"rank": 2}}, {"parallel": {"meta_build": True}}):
        with pytest.raises(KontextError, match=rf"^(stage.init_from|Flux weights in) {other} do not match the model: "
                                               r"4 missing .* with the wrong shape"):
            FlowStage(params, init_from=str(other), **kwargs)
    with pytest.raises(KontextError, match=r"^stage.init_from not found: .*nowhere \(give a run directory"):
        FlowStage(params, init_from=str(tmp_path / "nowhere"))
    import dataclasses  # a LoRA base whose source is of other settings than model=... (not only shapes)

    with pytest.raises(KontextError, match=rf"^stage.init_from {run} is another architecture than model=\.\.\. "
                                           r"\(theta=10000\); give the model its settings$"):
        FlowStage(dataclasses.replace(params, theta=20000), init_from=str(run), lora={"rank": 2})


def test_runs_and_checkpoints_written_before_the_subpackages_still_read(tmp_path, monkeypatch):
    """Run configs name `kontext.model.FluxParams` (and the autoencoder's and text encoder's
    builders) as they were before the modules moved into subpackages; checkpoints pickle the
    parameter dataclasses under those names. Both still read."""
    import io
    import zipfile

    from kontext.formats import safe_load
    from kontext.formats.checkpoint import CheckpointError, read_state
    from kontext.formats.run_config import FORMER_TARGETS
    from kontext.formats.safe_load import load_file
    from kontext.latent.autoencoder import AE_PRESETS
    from kontext.pipeline import KontextPipeline

    pipe = tiny_pipeline(seed=3)
    run = write_run_dir(tmp_path / "run", pipe)
    config = (run / "config.yaml").read_text()
    for former, now in FORMER_TARGETS.items():
        config = config.replace(now, former)
    assert "kontext.model.FluxParams" in config and "kontext.network" not in config
    (run / "config.yaml").write_text(config)
    loaded = KontextPipeline.from_run_dir(run)
    assert_same_weights(loaded.model.state_dict(), pipe.model.state_dict())

    buf = io.BytesIO()
    torch.save({"model": pipe.model.params, "autoencoder": AE_PRESETS["embedded"]}, buf)
    old = io.BytesIO()
    with zipfile.ZipFile(io.BytesIO(buf.getvalue())) as zin, zipfile.ZipFile(old, "w") as zout:
        for item in zin.infolist():
            data = zin.read(item.filename)
            if item.filename.endswith("data.pkl"):
                data = data.replace(b"kontext.network.model\n", b"kontext.model\n")
                data = data.replace(b"kontext.latent.autoencoder\n", b"kontext.autoencoder\n")
                assert b"kontext.model\n" in data and b"kontext.autoencoder\n" in data
            zout.writestr(item, data)
    (tmp_path / "old.ckpt").write_bytes(old.getvalue())
    with monkeypatch.context() as m:  # torch < 2.6 reads no aliased names: one line saying so
        m.setattr(safe_load, "READS_FORMER_NAMES", False)
        with pytest.raises(CheckpointError, match=r"written by an older version of this package "
                                                  r"\(kontext\.(model|autoencoder)\.\w+\); reading it needs torch >= 2\.6$"):
            read_state(tmp_path / "old.ckpt")
    if not safe_load.READS_FORMER_NAMES:
        pytest.skip("torch < 2.6")
    state = load_file(tmp_path / "old.ckpt")
    assert state == {"model": pipe.model.params, "autoencoder": AE_PRESETS["embedded"]}


def test_a_missing_teacher_is_named_as_one(tmp_path):
    from kontext.stages.teacher import Teacher

    for read in (lambda t: t.read_params(), lambda t: t.load("cpu")):  # the meta path, and the whole one
        with pytest.raises(KontextError, match=rf"^teacher not found: {tmp_path}/gone \(give a run directory"):
            read(Teacher(str(tmp_path / "gone")))
