"""Files from disk that must never run code or pass silently: damaged, truncated and malicious
checkpoints (resume takes the newest intact one or stops), and run configs that name foreign
classes, interpolations or Python tags. Each case is one line; the payloads would create a folder."""

from __future__ import annotations

import zipfile
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf
from test_bad_input_training import Payload

from kontext.artifact import export_transformer
from kontext.errors import KontextError
from kontext.formats.checkpoint import CheckpointError, find_resume_checkpoint

TESTS = Path(__file__).resolve().parent


# --------------------------------------------------------------------------------- checkpoints

def _checkpoint(path: Path, step: int) -> Path:
    torch.save({"global_step": step, "state_dict": {"w": torch.full((4,), float(step))}}, path)
    return path


def _garble(path: Path) -> None:
    """Overwrite bytes inside the pickled record (the zip directory stays intact)."""

    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as z:
        info = next(i for i in z.infolist() if i.filename.endswith("data.pkl"))
    start = info.header_offset + 30 + len(info.filename.encode()) + len(info.extra)
    data[start + 2: start + 30] = b"\xff" * 28
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


DAMAGE = {
    "garbled": (_garble, "its pickled record is garbled"),
    "truncated": (_truncate, "is truncated or not a PyTorch checkpoint (no zip directory)"),
    "text": (lambda p: p.write_text("hello"), "is truncated or not a PyTorch checkpoint (no zip directory)"),
    "malicious": (None, "it holds code or objects outside the allow-list (os.makedirs), not loaded"),
}


def _damage(path: Path, how: str, tmp_path: Path) -> None:
    if how == "malicious":
        torch.save({"global_step": 99, "state_dict": {}, "x": Payload(tmp_path / "PWNED")}, path)
    else:
        DAMAGE[how][0](path)


@pytest.mark.parametrize("how", list(DAMAGE))
def test_damaged_checkpoint_is_skipped_for_the_newest_intact(tmp_path, how, caplog):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    _checkpoint(ckpts / "step0000002.ckpt", 2)
    _checkpoint(ckpts / "step0000004.ckpt", 4)
    _damage(_checkpoint(ckpts / "last.ckpt", 6), how, tmp_path)
    with caplog.at_level("WARNING", logger="kontext.formats.checkpoint"):
        assert find_resume_checkpoint("auto", ckpts) == str(ckpts / "step0000004.ckpt")
    [record] = [r for r in caplog.records if r.name == "kontext.formats.checkpoint"]
    assert record.getMessage().startswith(f"skipped: checkpoint {ckpts / 'last.ckpt'} ")
    assert DAMAGE[how][1] in record.getMessage() and "\n" not in record.getMessage()
    assert not (tmp_path / "PWNED").exists()


@pytest.mark.parametrize("how", list(DAMAGE))
def test_no_intact_checkpoint_stops_the_run_and_an_explicit_one_is_checked(tmp_path, how):
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    _damage(_checkpoint(ckpts / "last.ckpt", 6), how, tmp_path)
    with pytest.raises(CheckpointError, match=r"^no intact checkpoint to resume from in .*checkpoints "
                                              r"\(damaged: last.ckpt\); resume=null starts afresh$"):
        find_resume_checkpoint("auto", ckpts)
    with pytest.raises(CheckpointError) as err:
        find_resume_checkpoint(str(ckpts / "last.ckpt"), ckpts)
    assert str(err.value).startswith(f"checkpoint {ckpts / 'last.ckpt'} ") and DAMAGE[how][1] in str(err.value)
    assert find_resume_checkpoint(None, ckpts) is None  # starting afresh is asked for explicitly
    assert not (tmp_path / "PWNED").exists()


def test_partial_write_alone_starts_afresh(tmp_path):
    """A crash during the very first save leaves only a `.partial`: there is nothing to lose."""
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    _truncate(_checkpoint(ckpts / "last.ckpt.partial", 3))
    assert find_resume_checkpoint("auto", ckpts) is None


# --------------------------------------------------------------------------- run configs on disk

@pytest.fixture()
def run_dir(tmp_path) -> Path:
    from tiny_kontext import tiny_pipeline, write_run_dir

    return write_run_dir(tmp_path / "run", tiny_pipeline())


def _edit_config(run_dir: Path, section: str, node) -> None:
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    config[section] = node
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))


CONFIG_PAYLOADS = {  # section, node, the error's tail
    "model _target_": ("model", {"_target_": "os.makedirs", "name": "{pwned}"},
                       "names 'os.makedirs', which is not built from a run's config (allowed: kontext.network.model.FluxParams)"),
    "nested _target_": ("autoencoder", {"_target_": "kontext.latent.autoencoder.load_autoencoder",
                                        "path": {"_target_": "os.makedirs", "name": "{pwned}"}},
                        "names 'os.makedirs', which is not built from a run's config"),
    "text _target_": ("text", {"_target_": "subprocess.run", "args": ["mkdir", "{pwned}"]},
                      "names 'subprocess.run', which is not built from a run's config"),
    "interpolation": ("model", {"_target_": "kontext.network.model.FluxParams", "depth": "${oc.env:HOME}"},
                      "holds an interpolation (depth: ${oc.env:HOME}); a run's config is stored resolved"),
    "not a mapping": ("model", "os.makedirs", "the model section of"),
}


@pytest.mark.parametrize("case", list(CONFIG_PAYLOADS))
def test_run_config_builds_only_the_projects_classes(run_dir, tmp_path, case):
    """`sample.py checkpoint=<run>`, a distillation teacher and the checkpoint export read a
    run's config.yaml; none of them may build what it names."""
    from kontext.pipeline import KontextPipeline
    from kontext.stages.teacher import load_teacher

    section, node, tail = CONFIG_PAYLOADS[case]
    pwned = tmp_path / "PWNED"
    node = yaml.safe_load(yaml.safe_dump(node).replace("{pwned}", str(pwned)))
    _edit_config(run_dir, section, node)
    loads = [lambda: KontextPipeline.load(run_dir), lambda: KontextPipeline.load(run_dir / "checkpoints" / "last.ckpt")]
    if section == "model":
        loads += [lambda: load_teacher(run_dir), lambda: export_transformer(run_dir / "checkpoints" / "last.ckpt",
                                                                             tmp_path / "out.safetensors")]
    for load in loads:
        with pytest.raises(KontextError) as err:
            load()
        assert tail in str(err.value) and "\n" not in str(err.value)
    assert not pwned.exists()


def test_malicious_checkpoint_of_a_run_is_not_loaded(run_dir, tmp_path):
    from kontext.pipeline import KontextPipeline

    torch.save({"state_dict": {}, "x": Payload(tmp_path / "PWNED")}, run_dir / "checkpoints" / "last.ckpt")
    with pytest.raises(KontextError, match="os.makedirs"):
        KontextPipeline.load(run_dir)
    assert not (tmp_path / "PWNED").exists()


def test_a_list_of_shards_keeps_checkpoints_loadable(tmp_path):
    """`data.shards=[a,b]` reaches the data module as Hydra's ListConfig; its hyperparameters go
    into every checkpoint, which must stay readable weights-only."""
    from hydra.utils import instantiate

    from kontext.formats.safe_load import load_file

    module = instantiate(OmegaConf.create({"_target_": "kontext.data.loader.KontextDataModule",
                                           "shards": [str(tmp_path / "a"), str(tmp_path / "b")],
                                           "val_shards": [str(tmp_path / "c")]}))
    torch.save({"global_step": 1, "datamodule_hyper_parameters": dict(module.hparams)}, tmp_path / "x.ckpt")
    state = load_file(tmp_path / "x.ckpt")
    assert state["datamodule_hyper_parameters"]["shards"] == [str(tmp_path / "a"), str(tmp_path / "b")]


@pytest.mark.parametrize("module, name", [("torch.distributed.checkpoint.metadata", "os.makedirs"),
                                          ("torch", "os.makedirs"), ("os", "makedirs")])
def test_sharded_checkpoint_metadata_runs_no_code(tmp_path, module, name):
    """A sharded folder's `.metadata` is unpickled by an allow-list; a dotted name would reach
    whatever the allowed module imports (pickle protocol 4 resolves `os.makedirs` in it)."""
    import pickle

    from kontext.formats.checkpoint import CheckpointError, read_state

    folder = tmp_path / "last.ckpt"
    folder.mkdir()
    target = str(tmp_path / "PWNED")
    payload = (b"\x80\x04" + pickle.SHORT_BINUNICODE + bytes([len(module)]) + module.encode()
               + pickle.SHORT_BINUNICODE + bytes([len(name)]) + name.encode() + pickle.STACK_GLOBAL
               + pickle.SHORT_BINUNICODE + bytes([len(target)]) + target.encode() + pickle.TUPLE1
               + pickle.REDUCE + pickle.STOP)
    (folder / ".metadata").write_bytes(payload)
    with pytest.raises(CheckpointError, match="outside the allow-list"):
        read_state(folder)
    assert not (tmp_path / "PWNED").exists()


def test_run_config_with_a_python_yaml_tag_is_one_line(run_dir, tmp_path):
    from kontext.pipeline import KontextPipeline

    text = (run_dir / "config.yaml").read_text()
    (run_dir / "config.yaml").write_text(f"evil: !!python/object/apply:os.makedirs ['{tmp_path / 'PWNED'}']\n{text}")
    with pytest.raises(KontextError, match=r"^cannot read run config .*config.yaml: could not determine a constructor"):
        KontextPipeline.load(run_dir)
    assert not (tmp_path / "PWNED").exists()
