"""The frozen teacher of the distillation stages, and students made from it.

A teacher is given as whatever the rest of the project writes (:mod:`kontext.artifact`): a
training run directory, a flow-stage checkpoint (a file or an FSDP folder) or an export folder,
or a reference-format transformer file (``.safetensors``, e.g. the official FLUX.1 Kontext
weights); only its transformer is loaded. A student has the teacher's architecture, except that a
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
    """The transformer of ``source`` (read by :func:`kontext.artifact.read_artifact`), frozen (no
    parameter requires grad) and in eval mode.

    Only the transformer is read (a teacher's text encoder and autoencoder are the student's
    own, built by the stage's config). ``params`` is needed only for a bare reference-format
    file that records none; a run or an export records its own."""
    from kontext.artifact import read_artifact

    path = Path(source).expanduser()
    if not path.exists():
        raise KontextError(f"teacher not found: {source} (give a run directory, a training checkpoint, an export "
                           "folder or a reference-format .safetensors)")
    model = read_artifact(path, params=params, device=device).transformer(device=device)
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
