"""What the distillation tests share: one data directory (Shapes-Edit shards and their feature
cache, built once per session), a random embedded-size autoencoder, a tiny teacher run without
a guidance embedding, and the real `train.py` composition of a distillation experiment."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from tiny_kontext import random_autoencoder, random_flux, text_encoder, write_run_dir

from kontext.latent.autoencoder import AE_PRESETS, AutoEncoder, save_autoencoder
from kontext.network.model import get_params
from kontext.pipeline import KontextPipeline
from kontext.run import CONFIG_DIR, register_resolvers

register_resolvers()
TINY_NO_GUIDANCE = dataclasses.replace(get_params("tiny"), guidance_embed=False)


_SETTING: dict = {}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models on a shared CPU: one thread avoids oversubscription stalls."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def shared_setting(tmp_path_factory) -> dict:
    """Built on first use in a session (shared by the distillation test modules)."""
    if _SETTING:
        return _SETTING
    root = tmp_path_factory.mktemp("distill")
    torch.manual_seed(0)
    save_autoencoder(AutoEncoder(AE_PRESETS["embedded"]), root / "ae.safetensors")
    pipe = KontextPipeline(random_flux(0, TINY_NO_GUIDANCE), random_autoencoder(0), text_encoder(), steps=2)
    write_run_dir(root / "teacher", pipe)
    _SETTING.update(root=root, ae=root / "ae.safetensors", teacher=root / "teacher")
    return _SETTING


def compose_distill(setting: dict, experiment: str, out: Path, extra: list[str]):
    from hydra import compose, initialize_config_dir

    overrides = [f"experiment={experiment}", f"paths.root_dir={setting['root']}", f"paths.output_dir={out}",
                 f"paths.autoencoder={setting['ae']}", f"stage.teacher.source={setting['teacher']}", "model=tiny",
                 "logger=csv", "prepare.shapes_edit.n=32", "prepare.shapes_edit.shard_size=32",
                 "data.batch_size=4", "data.epoch_samples=32", *extra]
    if experiment == "embedded_ladd":  # the student starts from the teacher, not from a distilled run
        overrides.insert(5, "stage.student_init=null")
    with initialize_config_dir(str(CONFIG_DIR), version_base="1.3"):
        return compose("train", overrides=overrides)
