"""The frozen teacher of the distillation stages, and students made from it.

A teacher is given as whatever the rest of the project writes (:mod:`kontext.artifact`): a
training run directory, a flow-stage checkpoint (a file or an FSDP folder) or an export folder,
or a reference-format transformer file (``.safetensors``, e.g. the official FLUX.1 Kontext
weights); only its transformer is loaded. :class:`Teacher` is what both distillation stages
hold: it loads and freezes that transformer, keeps the empty prompt of its classifier-free
guidance, and answers what the stages ask of it (its guided velocity, its CFG samples, its
block features), always with its own guidance input.

A student has the teacher's architecture, except that a guidance-distilled student adds the
guidance embedding when the teacher has none; that embedder starts with a zero output (its
last layer zero, its first one random so that the last one receives gradient), so the
student starts as the teacher's conditional prediction for every guidance value (after
SANA-Sprint).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections.abc import Sequence

import torch
from torch import Tensor, nn

from kontext.artifact import load_model, source_rows
from kontext.diffusion import sampling
from kontext.errors import KontextError
from kontext.formats import slices
from kontext.network import packing
from kontext.network.discriminator import block_features
from kontext.network.model import Flux, FluxParams
from kontext.scale import parallel

log = logging.getLogger(__name__)


def load_teacher(source: str | os.PathLike, params: FluxParams | None = None,
                 device: str | torch.device = "cpu") -> Flux:
    """The transformer of ``source`` (:func:`kontext.artifact.load_model`), frozen (no parameter
    requires grad) and in eval mode.

    Only the transformer is read (a teacher's text encoder and autoencoder are the student's
    own, built by the stage's config). ``params`` is needed only for a bare reference-format
    file that records none; a run or an export records its own."""
    return load_model(source, params, "teacher", device).eval().requires_grad_(False)


def shard_teacher(model: Flux, mesh, dtype: torch.dtype, read: str = "read whole, then sharded") -> None:
    """A frozen teacher under FSDP: cast to the run's compute dtype (`parallel.param_dtype`, bf16
    in the paper's recipe) and sharded over `mesh` as the student is, one unit per block, so each
    rank keeps 1/N of it and gathers one block at a time. It has no gradients and no optimizer
    state (no weight requires grad); its forwards cast their inputs to `dtype`."""
    from torch.distributed.fsdp import MixedPrecisionPolicy

    model.to(dtype=dtype).eval().requires_grad_(False)
    parallel.shard(model, mesh, MixedPrecisionPolicy(param_dtype=dtype) if dtype != torch.float32 else None,
                   trained=False)
    held = sum(p.to_local().numel() * p.element_size() for p in model.parameters())
    whole = sum(p.numel() * p.element_size() for p in model.parameters())
    log.info("distillation teacher sharded over %d ranks in %s: %.2f MiB on rank %d of %.2f MiB (%s)",
             mesh.size(), str(dtype).removeprefix("torch."), held / 2**20, mesh.get_rank(), whole / 2**20, read)


def load_sharded_teacher(params: FluxParams, rows: slices.Rows, mesh, dtype: torch.dtype,
                         device: str | torch.device = "cpu", what: str = "the teacher's weights") -> Flux:
    """A teacher of `params` built on `meta`, sharded (`shard_teacher`), materialised on
    `device` and filled with this rank's rows of `rows` (:mod:`kontext.formats.slices`)."""
    with torch.device("meta"):
        model = Flux(params)
    shard_teacher(model, mesh, dtype, read="each rank reads its rows")
    model.to_empty(device=device)
    slices.fill(model, rows, what)
    return model


class Teacher:
    """The frozen teacher of a distillation stage.

    source: what :func:`load_teacher` reads (a run directory, a training checkpoint, an export
        folder or a reference-format file), or a `Flux` already in memory.
    guidance: the guidance-embedding input of a teacher that has one (ignored otherwise).

    A stage calls `load` and `start_student` in its `setup`, holds the model as it holds its
    frozen encoders (out of its module tree: never trained, never saved; moved to its device
    with them) and casts it to the student's dtype (`to`) when the fit starts. A stage whose
    student is built on `meta` (`parallel.meta_build`, under FSDP) reads only the teacher's
    architecture in `setup` (`read_params`) and its weights in `place`, sharded, by rows; it
    starts the student with `fill_student`.
    """

    def __init__(self, source: str | os.PathLike | Flux, guidance: float = 1.0):
        self.source = source
        self.guidance = float(guidance)
        self.model: Flux | None = None
        self.text = None  # the student's text encoder: the empty prompt of the teacher's CFG
        self._uncond: tuple[Tensor, Tensor] | None = None
        self._params: FluxParams | None = None
        self._rows: tuple[FluxParams, slices.Rows] | None = None

    def load(self, device: str | torch.device, text=None) -> Flux:
        """Read the model (or take the one in memory), frozen and in eval mode, on ``device``;
        ``text`` is the text encoder that will encode the empty prompt."""
        if isinstance(self.source, Flux):
            self.model = self.source.to(device).eval().requires_grad_(False)
        else:
            self.model = load_teacher(self.source, device=device)
        self.text = text
        return self.model

    def read_params(self, text=None) -> FluxParams:
        """The teacher's architecture, no weight read; ``text`` as for `load`."""
        self.text = text
        self._params, rows = source_rows(self.source, "teacher", read=False)
        if rows is not None:  # kept for `rows` (none for a LoRA run, merged only when needed)
            self._rows = (self._params, rows)
        return self._params

    def rows(self) -> tuple[FluxParams, slices.Rows]:
        """The teacher's architecture and a reader of its rows, kept until `place` (a LoRA run's
        merge is computed once, for the student and the teacher)."""
        if self._rows is None:
            self._rows = source_rows(self.source, "teacher")
        return self._rows

    def place(self, mesh, dtype: torch.dtype, device: str | torch.device, shard: bool) -> Flux:
        """The teacher as the run holds it: sharded over ``mesh`` in ``dtype`` when ``shard``
        (read by rows unless `load` read it whole or it is a model in memory, sharded in place),
        else whole on ``device``."""
        if self.model is None:
            if shard and mesh is not None and not isinstance(self.source, Flux):
                params, rows = self.rows()
                self.model = load_sharded_teacher(params, rows, mesh, dtype, device,
                                                  f"the teacher's weights ({self.source})")
                self._rows = None
                return self.model
            self.load(device, self.text)
        self._rows = None
        if shard and mesh is not None and not parallel.is_sharded(self.model):
            shard_teacher(self.model, mesh, dtype)
        return self.model

    @property
    def params(self) -> FluxParams:
        return self.model.params if self.model is not None else self._params

    def to(self, device: str | torch.device | None = None, dtype: torch.dtype | None = None) -> Teacher:
        """Move or cast an unsharded teacher; a sharded one was placed by `shard_teacher`."""
        if not parallel.is_sharded(self.model):
            self.model.to(device=device, dtype=dtype)
        return self

    def start_student(self, student: Flux, ema: Flux, source: Flux | None = None) -> None:
        """Check that ``student`` fits the teacher and start it and its ``ema`` from ``source``
        (default: the teacher), see :func:`init_student`."""
        check_student(student.params, self.params)
        init_student(student, self.model if source is None else source)
        ema.load_state_dict(student.state_dict())

    def fill_student(self, student: Flux, source: str | os.PathLike | Flux | None = None) -> None:
        """`init_student` for a student built on `meta` and materialised (sharded or not): its rows
        of ``source`` (default: the teacher's source), read by rows (:mod:`kontext.formats.slices`)."""
        params, rows = self.rows() if source is None else source_rows(source, "student source")
        check_student(student.params, self.params)
        check_student(student.params, params)
        added = [k for k in student.state_dict() if k.startswith("guidance_in.")] if not params.guidance_embed else []
        if slices.fill(student, rows, f"the student's starting weights ({source or self.source})", absent=added):
            zero_output_embedder(student.guidance_in, slices.init_rows)

    @property
    def guidance_input(self) -> float | None:
        return self.guidance if self.params.guidance_embed else None

    def uncond(self, like: Tensor) -> tuple[Tensor, Tensor]:
        """The empty prompt's (txt (1, L, D), vec (1, D)), encoded once: the negative branch of CFG."""
        if self._uncond is None:
            if self.text is None:
                raise KontextError("the teacher's classifier-free guidance needs a text encoder for the empty prompt")
            feats = self.text.encode([""])
            self._uncond = (feats.txt, feats.vec)
        return self._uncond[0].to(like), self._uncond[1].to(like)

    @torch.no_grad()
    def guided_velocity(self, tokens: packing.KontextTokens, img: Tensor, t: Tensor, txt: Tensor, vec: Tensor,
                        w: Tensor | float, compact: bool = True) -> Tensor:
        """``v_u + w (v_c - v_u)`` against the empty prompt (B, L_img, C), at the target tokens
        ``img`` (B, L_img, C), times t (B,) and guidance scale w (one, or one per sample (B,))."""
        return sampling.velocity(self.model, tokens, img, t, txt, vec, self.guidance_input, cfg_scale=w,
                                 uncond=self.uncond(txt), compact=compact)

    @torch.no_grad()
    def sample(self, tokens: packing.KontextTokens, noise: Tensor, txt: Tensor, vec: Tensor,
               timesteps: Sequence[float] | Tensor, cfg_scale: float) -> Tensor:
        """The teacher's samples (B, L_img, C) from ``noise`` (B, L_img, C) over ``timesteps``,
        with true CFG at ``cfg_scale`` (1: the conditional path only)."""
        uncond = self.uncond(txt) if cfg_scale != 1.0 else None
        return sampling.denoise(self.model, tokens, noise, txt, vec, timesteps, guidance=self.guidance_input,
                                cfg_scale=cfg_scale, uncond=uncond)

    def features(self, blocks: Sequence[int], tokens: packing.KontextTokens, img: Tensor, t: Tensor, txt: Tensor,
                 vec: Tensor, compact: bool = True) -> list[Tensor]:
        """The teacher's target-token features after ``blocks`` (see `block_features`); gradients
        flow to ``img``, never into the teacher's weights."""
        return block_features(self.model, blocks, tokens, img, t, txt, vec, self.guidance_input, compact)


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


def zero_output_embedder(embedder: nn.Module, each=None) -> None:
    """An `MLPEmbedder` whose output is zero but whose last layer still receives gradient;
    `each(tensor, init)` as in `Flux.init_weights` (a sharded student: `kontext.formats.slices.init_rows`)."""
    each = each or (lambda tensor, init: init(tensor))
    each(embedder.in_layer.weight, lambda t: nn.init.normal_(t, std=0.02))
    each(embedder.in_layer.bias, nn.init.zeros_)
    each(embedder.out_layer.weight, nn.init.zeros_)
    each(embedder.out_layer.bias, nn.init.zeros_)
