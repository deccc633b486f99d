"""The frozen teacher of the distillation stages, and students made from it.

A teacher is given as whatever the rest of the project writes (:mod:`kontext.loading`): a
training run directory, a flow-stage checkpoint or an export folder, or a reference-format
transformer file (``.safetensors``, e.g. the official FLUX.1 Kontext weights); only its
transformer is loaded. A student has the teacher's architecture, except that a
guidance-distilled student adds the guidance embedding when the teacher has none; that
embedder starts with a zero output (its last layer zero, its first one random so that the
last one receives gradient), so the student starts as the teacher's conditional prediction
for every guidance value (after SANA-Sprint).
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

import torch
from torch import nn

from kontext.errors import KontextError
from kontext.model import Flux, FluxParams


def load_teacher(source: str | os.PathLike, params: FluxParams | None = None,
                 device: str | torch.device = "cpu") -> Flux:
    """The transformer of ``source``, frozen (no parameter requires grad) and in eval mode.

    Only the transformer is read (a teacher's text encoder and autoencoder are the student's
    own, built by the stage's config). ``params`` is needed only for a bare reference-format
    file that records none; a run or an export records its own."""
    from kontext.loading import EMA_PREFIX, find_checkpoint, read_export_config
    from kontext.model import build_flux, load_flux
    from kontext.weights import load_into

    path = Path(source).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():  # a run directory
        ckpt = find_checkpoint(path)
        path = ckpt if ckpt is not None else path / "export"
    if path.suffix == ".safetensors" and path.is_file():
        model = load_flux(path, params, device=device)
    elif (path / "config.json").is_file() and (path / "transformer.safetensors").is_file():
        cfg = read_export_config(path)
        model = load_flux(path / "transformer.safetensors", FluxParams(**cfg["model"]), device=device)
    elif path.suffix == ".ckpt" and path.is_file():
        from kontext.loading import _read_checkpoint, model_params

        config = next((c for c in (path.parent.parent / "config.yaml", path.parent / "config.yaml") if c.is_file()),
                      path.parent.parent / "config.yaml")
        params = model_params(config)
        ema = {k[len(EMA_PREFIX):]: v for k, v in _read_checkpoint(path).items() if k.startswith(EMA_PREFIX)}
        model = build_flux(params, device="meta")
        load_into(model, ema, what=f"teacher EMA weights in {path}", assign=True)
        model = model.to(device)
    else:
        raise KontextError(f"teacher not found: {source} (give a run directory, a .ckpt file, an export folder "
                           "or a reference-format .safetensors)")
    return model.eval().requires_grad_(False)


def check_student(student: FluxParams, teacher: FluxParams, what: str = "student") -> None:
    """The student must be the teacher's architecture, guidance embedding aside (it may add one)."""
    if dataclasses.replace(student, guidance_embed=teacher.guidance_embed) != teacher:
        raise KontextError(f"the {what} architecture (model=...) differs from the teacher's: "
                           f"{dataclasses.asdict(student)} vs {dataclasses.asdict(teacher)}")
    if teacher.guidance_embed and not student.guidance_embed:
        raise KontextError(f"the teacher has a guidance embedding; the {what} needs model.guidance_embed=true")


@torch.no_grad()
def init_student(student: Flux, source: Flux) -> list[str]:
    """Copy ``source``'s weights into ``student``; a guidance embedder the source lacks is added
    with a zero output. Returns the names of the added parameters."""
    check_student(student.params, source.params)
    result = student.load_state_dict(source.state_dict(), strict=False)
    added = list(result.missing_keys)
    if result.unexpected_keys or any(not k.startswith("guidance_in.") for k in added):
        raise KontextError(f"cannot initialise the student from the teacher: missing {added}, "
                           f"unexpected {result.unexpected_keys}")
    if added:
        zero_output_embedder(student.guidance_in)
    return added


def zero_output_embedder(embedder: nn.Module) -> None:
    """An `MLPEmbedder` whose output is zero but whose last layer still receives gradient."""
    nn.init.normal_(embedder.in_layer.weight, std=0.02)
    nn.init.zeros_(embedder.in_layer.bias)
    nn.init.zeros_(embedder.out_layer.weight)
    nn.init.zeros_(embedder.out_layer.bias)
