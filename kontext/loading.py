"""Building a `KontextPipeline` from what training and export leave on disk, or the official files.

Sources:
- an export folder (`kontext.export`): `config.json`, `transformer.safetensors`, `ae.safetensors`;
- a run directory: `config.yaml` (the resolved Hydra config, sections `model`, `autoencoder`,
  `text`, `stage`) and `checkpoints/*.ckpt` (the newest, `last.ckpt` first), or its `export/`;
- a Lightning checkpoint of the flow stage: its EMA weights (keys `ema.model.*`), with the
  `config.yaml` of its run directory; for a LoRA run the EMA adapters merged into the run's base
  (`stage.init_from`);
- the official FLUX.1 Kontext files: a reference-format transformer, `ae.safetensors` and
  local T5 / CLIP folders.

Every problem with the source (missing file, unreadable config, weights whose names or shapes
do not fit the config) is a one-line :class:`KontextError`. A config read from disk builds only
the project's own classes (`BUILDS`) and holds no interpolation, and a checkpoint is read
weights-only (:mod:`kontext.checkpoint`): loading someone else's run never runs their code.
"""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import torch

from kontext.errors import KontextError
from kontext.pipeline import KontextPipeline

EMA_PREFIX = "ema.model."
EXPORT_FORMAT = "kontext-export"
# What each section of a run's config may build (`_target_`, at any depth).
BUILDS = {
    "model": {"kontext.model.FluxParams"},
    "autoencoder": {"kontext.autoencoder.AutoEncoderParams", "kontext.autoencoder.load_autoencoder"},
    "text": {"kontext.text.build_text_encoder"},
}


def load_pipeline(source: str | os.PathLike, **kwargs) -> KontextPipeline:
    """An export folder, a run directory or a `.ckpt` file, told apart by what is there."""
    path = Path(source).expanduser()
    if path.is_file():
        return from_checkpoint(path, **kwargs)
    if (path / "config.json").is_file() and (path / "transformer.safetensors").is_file():
        return from_export(path, **kwargs)
    if path.is_dir():
        return from_run_dir(path, **kwargs)
    raise KontextError(f"model source not found: {path} (give a run directory, a .ckpt file or an export folder)")


# ----------------------------------------------------------------------------------- our runs
def _first_line(err: BaseException) -> str:
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def load_run_config(path: Path):
    """A run's `config.yaml`, refused if it holds an interpolation (a resolver could run code)."""
    from omegaconf import OmegaConf

    if not path.is_file():
        raise KontextError(f"run config not found: {path}")
    try:
        cfg = OmegaConf.load(path)
        text = OmegaConf.to_yaml(cfg)  # raw: nothing is resolved
    except Exception as err:  # yaml and omegaconf raise many types
        raise KontextError(f"cannot read run config {path}: {_first_line(err)}") from err
    if "${" in text:  # a run stores its config resolved; an interpolation could call a resolver
        line = next(line.strip() for line in text.splitlines() if "${" in line)
        raise KontextError(f"run config {path} holds an interpolation ({line[:80]}); a run's config is stored resolved")
    return cfg


def _targets(node) -> list[str]:
    if isinstance(node, dict):
        own = [str(node["_target_"])] if "_target_" in node else []
        return own + [t for v in node.values() for t in _targets(v)]
    if isinstance(node, list):
        return [t for v in node for t in _targets(v)]
    return []


def _instantiate(section, what: str, where: Path):
    from hydra.utils import instantiate
    from omegaconf import DictConfig, OmegaConf

    if section is None:
        raise KontextError(f"{where} has no '{what}' section")
    if not isinstance(section, DictConfig):
        raise KontextError(f"the {what} section of {where} is {section!r}, not a mapping")
    for target in _targets(OmegaConf.to_container(section)):
        if target not in BUILDS[what]:
            raise KontextError(f"the {what} section of {where} names {target!r}, which is not built from a run's "
                               f"config (allowed: {', '.join(sorted(BUILDS[what]))})")
    try:
        return instantiate(section, _convert_="all")
    except KontextError:
        raise
    except Exception as err:
        cause = err.__cause__ if isinstance(err.__cause__, KontextError) else None
        if cause is not None:
            raise cause from err
        raise KontextError(f"cannot build the {what} of {where} "
                           f"({OmegaConf.to_container(section).get('_target_', '?')}): {_first_line(err)}") from err


def _plain(section) -> dict:
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_container(section, resolve=True) if isinstance(section, DictConfig) else dict(section or {})


def build_autoencoder(section, where: Path):
    """The autoencoder a run config describes: a built `AutoEncoder`, or params of the embedded
    architecture (whose trained weights ship with the package)."""
    from kontext.autoencoder import (
        AE_PRESETS,
        EMBEDDED_PATH,
        AutoEncoder,
        AutoEncoderParams,
        load_autoencoder,
    )

    obj = _instantiate(section, "autoencoder", where)
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

    sampler = _plain(OmegaConf.select(cfg, "stage.finish.sampler", default=None))
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


def model_params(config: Path):
    """The `FluxParams` of a run's `config.yaml`."""
    return _instantiate(load_run_config(config).get("model"), "model", config)


def _read_checkpoint(path: Path) -> dict:
    import zipfile

    from kontext.checkpoint import _why, load_file

    if not zipfile.is_zipfile(path):
        raise KontextError(f"cannot read checkpoint {path}: not a PyTorch checkpoint file")
    try:
        # mmap: only the tensors used (the EMA weights) are read, not the optimizer states.
        ckpt = load_file(path, mmap=True)
    except Exception as err:
        raise KontextError(f"cannot read checkpoint {path}: {_why(err)}") from err
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise KontextError(f"{path} is not a Lightning checkpoint (no state_dict)")
    return ckpt["state_dict"]


def from_checkpoint(path: str | os.PathLike, config: str | os.PathLike | None = None, *,
                    device: str | torch.device = "cpu", dtype: torch.dtype | None = None,
                    **pipeline_kwargs) -> KontextPipeline:
    """A flow-stage Lightning checkpoint: its EMA weights, built per its run's `config.yaml`
    (found next to the checkpoint's folder unless `config` is given)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise KontextError(f"checkpoint not found: {path}")
    if config is None:
        candidates = [path.parent.parent / "config.yaml", path.parent / "config.yaml"]
        config = next((c for c in candidates if c.is_file()), candidates[0])
    config = Path(config)
    cfg = load_run_config(config)
    params = _instantiate(cfg.get("model"), "model", config)
    state = _read_checkpoint(path)
    ema = {k[len(EMA_PREFIX):]: v for k, v in state.items() if k.startswith(EMA_PREFIX)}
    if not ema:
        raise KontextError(f"{path} holds no EMA weights (keys {EMA_PREFIX}*); is it a flow-stage checkpoint?")
    model = ema_transformer(ema, cfg, params, f"{path} (config {config})")
    model.to(device=device, dtype=dtype)
    autoencoder = build_autoencoder(cfg.get("autoencoder"), config).to(device)
    text = _instantiate(cfg.get("text"), "text", config).to(device)
    kwargs = {**sampler_defaults_from_run(cfg), **pipeline_kwargs}
    pipe = KontextPipeline(model, autoencoder, text, **kwargs)
    pipe.text_config = _plain(cfg.get("text"))
    pipe.source = str(path)
    return pipe


def ema_transformer(ema: dict, cfg, params, where: str):
    """The transformer of a checkpoint's EMA tensors (keys without `ema.model.`): the weights
    themselves, or for a LoRA run (`stage.lora` in its config) its base `stage.init_from` with
    the EMA adapters merged in."""
    from omegaconf import OmegaConf

    from kontext.model import build_flux, load_flux
    from kontext.weights import load_into

    lora = OmegaConf.select(cfg, "stage.lora", default=None)
    if lora is None:
        model = build_flux(params, device="meta")
        return load_into(model, ema, what=f"EMA weights in {where}", assign=True)
    from kontext.lora import adapters_from_state
    from kontext.lora_files import merge

    base = OmegaConf.select(cfg, "stage.init_from", default=None)
    if not base or not Path(str(base)).is_file():
        raise KontextError(f"{where} is a LoRA run whose base stage.init_from={base} is not there")
    return merge(load_flux(str(base), params), adapters_from_state(ema, float(lora["alpha"])),
                 what=f"the EMA adapters in {where}")


def find_checkpoint(run_dir: Path) -> Path | None:
    """`checkpoints/last.ckpt` if present, else the newest `.ckpt` file there."""
    ckpt_dir = run_dir / "checkpoints"
    if (ckpt_dir / "last.ckpt").is_file():
        return ckpt_dir / "last.ckpt"
    found = sorted(ckpt_dir.glob("*.ckpt"), key=lambda p: p.stat().st_mtime) if ckpt_dir.is_dir() else []
    return found[-1] if found else None


def from_run_dir(run_dir: str | os.PathLike, checkpoint: str | os.PathLike | None = None,
                 **kwargs) -> KontextPipeline:
    """The run's checkpoint (`checkpoint`: a path, or a file name under `checkpoints/`; default
    the newest), or, for a run without checkpoints, its `export/` folder."""
    run_dir = Path(run_dir).expanduser()
    if not run_dir.is_dir():
        raise KontextError(f"run directory not found: {run_dir}")
    if checkpoint is not None:
        ckpt = Path(checkpoint)
        ckpt = ckpt if ckpt.is_file() else run_dir / "checkpoints" / ckpt
    else:
        ckpt = find_checkpoint(run_dir)
        if ckpt is None and (run_dir / "export" / "config.json").is_file():
            return from_export(run_dir / "export", **kwargs)
        if ckpt is None:
            raise KontextError(f"{run_dir} has no checkpoints/*.ckpt and no export/ folder")
    return from_checkpoint(ckpt, run_dir / "config.yaml", **kwargs)


# ------------------------------------------------------------------------------ export folders
def read_export_config(folder: Path) -> dict:
    path = folder / "config.json"
    if not path.is_file():
        raise KontextError(f"export folder {folder} has no config.json")
    try:
        cfg = json.loads(path.read_text())
    except (OSError, ValueError) as err:
        raise KontextError(f"cannot read {path}: {_first_line(err)}") from err
    if cfg.get("format") != EXPORT_FORMAT:
        raise KontextError(f"{path} is not a Kontext export (format {cfg.get('format')!r})")
    return cfg


def build_text_from_export(cfg: dict, folder: Path, text=None):
    """The export's text encoder from its stored config; a differing identity is a warning
    (the model was trained on the features of the recorded encoder)."""
    from kontext.text import build_text_encoder

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


def from_export(folder: str | os.PathLike, *, text=None, device: str | torch.device = "cpu",
                dtype: torch.dtype | None = None, **pipeline_kwargs) -> KontextPipeline:
    """An export folder; `text` replaces the recorded text encoder (e.g. T5/CLIP moved elsewhere)."""
    from kontext.autoencoder import AutoEncoderParams, load_autoencoder
    from kontext.model import FluxParams, load_flux

    folder = Path(folder).expanduser()
    cfg = read_export_config(folder)
    try:
        params = FluxParams(**cfg["model"])
        ae_params = AutoEncoderParams(**cfg["autoencoder"])
    except (KeyError, TypeError, ValueError) as err:
        raise KontextError(f"{folder}/config.json has unusable model or autoencoder params: {_first_line(err)}") from err
    model = load_flux(folder / "transformer.safetensors", params, device=device, dtype=dtype)
    autoencoder = load_autoencoder(folder / "ae.safetensors", ae_params, device=device)
    text = build_text_from_export(cfg, folder, text).to(device)
    pipe = KontextPipeline(model, autoencoder, text, **{**cfg.get("sampler", {}), **pipeline_kwargs})
    pipe.text_config = (cfg.get("text") or {}).get("config")
    pipe.source = str(folder)
    return pipe


# ------------------------------------------------------------------------------- official files
def from_official(transformer_path: str | os.PathLike, ae_path: str | os.PathLike, t5_dir: str | os.PathLike,
                  clip_dir: str | os.PathLike, *, preset=None,
                  t5_tokenizer_dir: str | os.PathLike | None = None,
                  clip_tokenizer_dir: str | os.PathLike | None = None, max_length: int | None = None,
                  device: str | torch.device = "cpu", dtype: torch.dtype = torch.bfloat16,
                  **pipeline_kwargs) -> KontextPipeline:
    """The released FLUX.1 Kontext [dev] from its reference-format files (`preset`: another
    `FLUX_PRESETS` name or a `FluxParams`; default `flux-dev-kontext`). The autoencoder is the
    `flux` preset unless the file records its own params.

    Defaults follow the reference Kontext sampler: 30 steps, guidance 2.5, shifted schedule.
    """
    from kontext.autoencoder import load_autoencoder
    from kontext.model import load_flux
    from kontext.text import build_text_encoder

    preset = preset or "flux-dev-kontext"
    model = load_flux(transformer_path, preset, device=device, dtype=dtype)
    autoencoder = load_autoencoder(ae_path, device=device)
    text_config = {"kind": "t5_clip", "t5_path": str(t5_dir), "clip_path": str(clip_dir),
                   "t5_tokenizer_path": None if t5_tokenizer_dir is None else str(t5_tokenizer_dir),
                   "clip_tokenizer_path": None if clip_tokenizer_dir is None else str(clip_tokenizer_dir),
                   "max_length": max_length or (256 if preset == "flux-schnell" else 512), "dtype": str(dtype).removeprefix("torch.")}
    text = build_text_encoder(**text_config).to(device)
    defaults = {"steps": 4, "shift": False} if preset == "flux-schnell" else {"steps": 30, "guidance": 2.5}
    pipe = KontextPipeline(model, autoencoder, text, **{**defaults, **pipeline_kwargs})
    pipe.text_config = text_config
    pipe.source = str(transformer_path)
    return pipe
