"""Transformer files (reference or diffusers layout) written from a sharded (FSDP) training
checkpoint tensor by tensor, so that exporting never holds the whole model.

The header of the safetensors file (names, dtypes, shapes, byte offsets) is computed first, from
the checkpoint's `.metadata` alone, which records every tensor's global shape and dtype. Then each
checkpoint tensor is read by itself (:class:`kontext.formats.consolidate.ShardedTensors`: its chunks from
every rank's shard, in one process, no process group), cast, and written at its offset; for the
diffusers layout it is split first into the tensors it maps to (a fused qkv into to_q, to_k, to_v:
:func:`kontext.formats.diffusers_format.diffusers_plan`, the mapping `bfl_to_diffusers` applies to a whole
state dict). What is held at once is one checkpoint tensor (with the bytes it is read from) and
its cast parts: the largest tensor a few times over, not the model.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from kontext.formats.consolidate import ShardedTensors
from kontext.formats.diffusers_format import Part, diffusers_plan
from kontext.formats.weights import save_safetensors_streamed

if TYPE_CHECKING:
    from kontext.artifact import Artifact


def stream_transformer(artifact: Artifact, out: str | os.PathLike, *, raw: bool = False, diffusers: bool = False,
                       dtype: torch.dtype | None = None, metadata: dict | None = None) -> Path:
    """Write the EMA (or `raw`) transformer of `artifact`, a sharded checkpoint read without its
    weights (`kontext.artifact.sharded_artifact`), to the safetensors file `out`: in the reference
    layout, or in diffusers' with `diffusers`; cast to `dtype` (default: as stored)."""
    artifact.transformer(raw=raw, device="meta")  # strict: every name and shape as `params` says
    shards = ShardedTensors(artifact.path, artifact.state_prefix(raw))
    shapes = {key: tuple(t.shape) for key, t in shards.tensors.items()}
    plan = diffusers_plan(shapes, artifact.params) if diffusers else [Part(key, key) for key in shapes]
    layout = {part.name: (part.shape(shapes[part.source]), dtype or shards.tensors[part.source].dtype)
              for part in plan}
    by_source: dict[str, list[Part]] = {}
    for part in plan:
        by_source.setdefault(part.source, []).append(part)

    def tensors():
        for source, parts in by_source.items():
            tensor = shards.load([source])[source]
            for part in parts:
                yield part.name, part.take(tensor).to(layout[part.name][1])
            del tensor

    return save_safetensors_streamed(layout, tensors(), out, metadata)
