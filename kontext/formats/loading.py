"""The parts of a sampling pipeline, built from a trained artifact or the official files.

A run directory, a training checkpoint (a `.ckpt` file or a folder of FSDP shards) or an export
folder is read by :func:`kontext.artifact.read_artifact`, the one reader of trained weights;
here the rest is built from what the source records: for a checkpoint, the autoencoder, text
encoder and sampler defaults of its run's `config.yaml` (which builds only the project's own
classes); for an export, `ae.safetensors` and the text encoder and sampler of its `config.json`.
The official FLUX.1 Kontext files are a reference-format transformer, `ae.safetensors` and local
T5 / CLIP folders. `KontextPipeline.load` and `KontextPipeline.from_official` put the parts
together; this module does not know the pipeline class.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kontext.artifact import Artifact, read_artifact
from kontext.config_check import plain
from kontext.errors import KontextError, first_line
from kontext.formats.run_config import build_from_run_config

if TYPE_CHECKING:
    from kontext.latent.autoencoder import AutoEncoder
    from kontext.latent.text import TextEncoder
    from kontext.network.model import Flux


@dataclass
class PipelineParts:
    """What `KontextPipeline` is made of, and what its source records."""

    model: Flux
    autoencoder: AutoEncoder
    text: TextEncoder
    sampler: dict  # the sampler defaults the source records
    text_config: dict | None  # how to rebuild `text` (written by the export)
    source: str  # where the weights came from


def read_parts(source: str | os.PathLike, *, checkpoint: str | os.PathLike | None = None,
               config: str | os.PathLike | None = None, text=None, device: str | torch.device = "cpu",
               dtype: torch.dtype | None = None, weights: bool = True) -> PipelineParts:
    """A run directory, a training checkpoint or an export folder, told apart by what is there
    (`checkpoint`, `config`: see `read_artifact`); `text` replaces the recorded text encoder
    (e.g. T5/CLIP moved elsewhere). weights=False: the transformer on the meta device, a
    checkpoint's weights unread (for an export that streams them; not for a LoRA run)."""
    path = Path(source).expanduser()
    if not path.exists():
        raise KontextError(f"model source not found: {path} (give a run directory, a .ckpt file or an export folder)")
    if path.suffix == ".safetensors" and path.is_file():
        raise KontextError(f"{path} is a transformer file alone (no autoencoder, text encoder or sampler); "
                           "sample it with official.transformer=... official.ae=... official.t5=... official.clip=...")
    artifact = read_artifact(path, checkpoint=checkpoint, config=config, device=device, weights=weights)
    if artifact.export_config is not None:
        return _export_parts(artifact, text, device, dtype)
    cfg, where = artifact.run_config, artifact.config_path
    model = artifact.transformer(device=device if weights else "meta", dtype=dtype)
    autoencoder = build_autoencoder(run_autoencoder_section(cfg), where).to(device)
    text = text if text is not None else build_from_run_config(cfg.get("text"), "text", where)
    return PipelineParts(model, autoencoder, text.to(device), sampler_defaults_from_run(cfg),
                         dict(plain(cfg.get("text")) or {}), str(artifact.path))


# ----------------------------------------------------------------------------------- our runs
def run_autoencoder_section(cfg):
    """The section that built a run's autoencoder: the stage's (`load_autoencoder` of
    `paths.autoencoder`, the weights the run trained with), else the top-level one."""
    from omegaconf import DictConfig

    stage = cfg.get("stage")
    section = stage.get("autoencoder") if isinstance(stage, DictConfig) else None
    return section if isinstance(section, DictConfig) else cfg.get("autoencoder")


def build_autoencoder(section, where: Path):
    """The autoencoder a run config describes: a built `AutoEncoder`, or params of the embedded
    architecture (whose trained weights ship with the package)."""
    from kontext.latent.autoencoder import (
        AE_PRESETS,
        EMBEDDED_PATH,
        AutoEncoder,
        AutoEncoderParams,
        load_autoencoder,
    )

    obj = build_from_run_config(section, "autoencoder", where)
    if isinstance(obj, AutoEncoder):
        return obj.eval()
    if isinstance(obj, AutoEncoderParams):
        embedded = AE_PRESETS["embedded"]
        if all(getattr(obj, k) == getattr(embedded, k) for k in ("ch", "ch_mult", "num_res_blocks", "z_channels")):
            return load_autoencoder(EMBEDDED_PATH, obj)
        raise KontextError(f"the autoencoder section of {where} gives an architecture but no weights")
    raise KontextError(f"the autoencoder section of {where} builds a {type(obj).__name__}, not an autoencoder")


def sampler_defaults_from_run(cfg) -> dict:
    """Sampler defaults of a run: the flow stage's `finish.sampler`, the training guidance value
    when none is set, and the training size (`data.size`, else the square of `data.bucket_area`)
    as the text-to-image size when none is set."""
    from omegaconf import OmegaConf

    sampler = dict(plain(OmegaConf.select(cfg, "stage.finish.sampler", default=None)) or {})
    if "guidance" not in sampler and OmegaConf.select(cfg, "stage.train_guidance", default=None) is not None:
        sampler["guidance"] = float(OmegaConf.select(cfg, "stage.train_guidance"))
    if "t2i_size" not in sampler:
        size = OmegaConf.select(cfg, "data.size", default=None)
        area = OmegaConf.select(cfg, "data.bucket_area", default=None)
        if isinstance(size, int):
            sampler["t2i_size"] = size
        elif isinstance(area, int):  # the square bucket of the training area
            sampler["t2i_size"] = max(16, int(area**0.5) // 16 * 16)
    return sampler


# ------------------------------------------------------------------------------ export folders
def _export_parts(artifact: Artifact, text, device, dtype) -> PipelineParts:
    from kontext.latent.autoencoder import AutoEncoderParams, load_autoencoder

    cfg, folder = artifact.export_config, artifact.path
    try:
        ae_params = AutoEncoderParams(**cfg["autoencoder"])
    except (KeyError, TypeError, ValueError) as err:
        raise KontextError(f"{folder}/config.json has unusable autoencoder params: {first_line(err)}") from err
    model = artifact.transformer(device=device, dtype=dtype)
    autoencoder = load_autoencoder(folder / "ae.safetensors", ae_params, device=device)
    text = build_text_from_export(cfg, folder, text).to(device)
    return PipelineParts(model, autoencoder, text, dict(cfg.get("sampler", {})),
                         (cfg.get("text") or {}).get("config"), str(folder))


def build_text_from_export(cfg: dict, folder: Path, text=None):
    """The export's text encoder from its stored config; a differing identity is a warning
    (the model was trained on the features of the recorded encoder)."""
    from kontext.latent.text import build_text_encoder

    info = cfg.get("text") or {}
    if text is None:
        config = dict(info.get("config") or {"kind": info.get("kind")})
        config.pop("_target_", None)
        if not config.get("kind"):
            raise KontextError(f"{folder}/config.json names no text encoder; pass text=")
        text = build_text_encoder(**config)
    if info.get("identity") and text.identity != info["identity"]:
        warnings.warn(f"text encoder {text.identity} differs from the one the model was exported with "
                      f"({info['identity']})", stacklevel=3)
    return text


# ------------------------------------------------------------------------------- official files
def official_parts(transformer_path: str | os.PathLike, ae_path: str | os.PathLike, t5_dir: str | os.PathLike,
                   clip_dir: str | os.PathLike, *, preset=None,
                   t5_tokenizer_dir: str | os.PathLike | None = None,
                   clip_tokenizer_dir: str | os.PathLike | None = None, max_length: int | None = None,
                   device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                   **sampler) -> PipelineParts:
    """The released FLUX.1 Kontext [dev] from its reference-format files (`preset`: another
    `FLUX_PRESETS` name or a `FluxParams`; default `flux-dev-kontext`). The autoencoder is the
    `flux` preset unless the file records its own params.

    Sampler defaults follow the reference Kontext sampler (30 steps, guidance 2.5, shifted
    schedule) unless `sampler` says otherwise.
    """
    from kontext.latent.autoencoder import load_autoencoder
    from kontext.latent.text import build_text_encoder
    from kontext.network.model import load_flux

    preset = preset or "flux-dev-kontext"
    model = load_flux(transformer_path, preset, device=device, dtype=dtype)  # any file name: not told apart
    autoencoder = load_autoencoder(ae_path, device=device)
    text_config = {"kind": "t5_clip", "t5_path": str(t5_dir), "clip_path": str(clip_dir),
                   "t5_tokenizer_path": None if t5_tokenizer_dir is None else str(t5_tokenizer_dir),
                   "clip_tokenizer_path": None if clip_tokenizer_dir is None else str(clip_tokenizer_dir),
                   "max_length": max_length or (256 if preset == "flux-schnell" else 512), "dtype": str(dtype).removeprefix("torch.")}
    text = build_text_encoder(**text_config).to(device)
    defaults = {"steps": 4, "shift": False} if preset == "flux-schnell" else {"steps": 30, "guidance": 2.5}
    return PipelineParts(model, autoencoder, text, {**defaults, **sampler}, text_config, str(transformer_path))
