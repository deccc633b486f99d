"""Tiny random models for the sampling, export and benchmark tests, and the files training leaves.

The transformer is the `tiny` preset with every weight perturbed (a fresh model is adaLN-Zero,
whose prediction is exactly zero, which would hide most mistakes); the autoencoder is a small
random instance of the reference layout; the text encoder is the real embedded MiniLM, loaded
once per session.
"""

from __future__ import annotations

import functools
from dataclasses import asdict
from pathlib import Path

import torch
import yaml

from kontext.latent.autoencoder import AutoEncoder, AutoEncoderParams, save_autoencoder
from kontext.network.model import Flux, FluxParams, build_flux
from kontext.pipeline import KontextPipeline

TINY_AE = AutoEncoderParams(resolution=64, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 1, 1, 1],
                            num_res_blocks=1, z_channels=16, scale_factor=1.0, shift_factor=0.0)
TEXT_CONFIG = {"_target_": "kontext.latent.text.build_text_encoder", "kind": "embedded", "max_length": 32,
               "dtype": "float32", "txt_dim": 384, "vec_dim": 384}


@functools.lru_cache(maxsize=1)
def text_encoder():
    from kontext.latent.text import build_text_encoder

    return build_text_encoder(**{k: v for k, v in TEXT_CONFIG.items() if k != "_target_"})


def random_flux(seed: int = 0, params: FluxParams | str = "tiny") -> Flux:
    model = build_flux(params)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))
    return model.eval()


def random_autoencoder(seed: int = 0) -> AutoEncoder:
    torch.manual_seed(seed)
    return AutoEncoder(TINY_AE).eval()


def tiny_pipeline(seed: int = 0, **sampler) -> KontextPipeline:
    settings = {"steps": 2, "guidance": 1.0, "t2i_size": 64, **sampler}
    return KontextPipeline(random_flux(seed), random_autoencoder(seed), text_encoder(), **settings)


def write_run_dir(run_dir: Path, pipe: KontextPipeline, sampler: dict | None = None,
                  model_params: FluxParams | None = None) -> Path:
    """What a flow-stage run leaves: `config.yaml` and `checkpoints/last.ckpt`, whose EMA weights
    are `pipe.model` and whose raw (non-EMA) weights are different."""
    from kontext.stages.flow import FlowStage

    run_dir.mkdir(parents=True, exist_ok=True)
    params = model_params or pipe.model.params
    save_autoencoder(pipe.autoencoder, run_dir / "ae.safetensors")
    config = {
        "model": {"_target_": "kontext.network.model.FluxParams", **asdict(params)},
        "autoencoder": {"_target_": "kontext.latent.autoencoder.load_autoencoder", "path": str(run_dir / "ae.safetensors")},
        "text": TEXT_CONFIG,
        "data": {"bucket_area": 64 * 64},
        "stage": {"_target_": "kontext.stages.flow.FlowStage", "train_guidance": 1.0,
                  "finish": {"sampler": sampler if sampler is not None else {"steps": 2, "t2i_size": 64}}},
    }
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    stage = FlowStage(model=pipe.model.params)
    stage.model.load_state_dict(random_flux(seed=99, params=pipe.model.params).state_dict())
    stage.ema.model.load_state_dict(pipe.model.state_dict())
    (run_dir / "checkpoints").mkdir(exist_ok=True)
    torch.save({"state_dict": stage.state_dict(), "global_step": 1, "pytorch-lightning_version": "2.6"},
               run_dir / "checkpoints" / "last.ckpt")
    return run_dir
