"""Strict safetensors weight I/O shared by every network in the project.

Only safetensors is read or written (no pickle). Loading is strict: a missing, unexpected
or mis-shaped tensor is a :class:`WeightsError` that names the tensor, raised before any
parameter of the module is touched, so a failed load never leaves a half-loaded model.
`save_safetensors_streamed` writes a file whose tensors arrive one at a time (the header is
computed from their shapes first), in the layout safetensors' own writer gives the same tensors.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from kontext.errors import KontextError


class WeightsError(KontextError, ValueError):
    """A weight file that does not fit the module it is loaded into."""


def read_safetensors(path: str | os.PathLike, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file into a dict, with a clear error for a missing or corrupt file."""
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weight file not found: {path}")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise WeightsError(f"cannot read {path} as safetensors: {err}") from err


def read_metadata(path: str | os.PathLike) -> dict[str, str]:
    """The string metadata stored in a safetensors header (empty dict if none)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            return dict(f.metadata() or {})
    except (SafetensorError, OSError) as err:
        raise WeightsError(f"cannot read {path} as safetensors: {err}") from err


def strip_prefix(sd: Mapping[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Drop the first of `prefixes` that every key starts with (e.g. `model.diffusion_model.`)."""
    prefix = file_key_prefix(list(sd), prefixes)
    return {k[len(prefix):]: v for k, v in sd.items()}


def shape_mismatches(expected: Mapping[str, torch.Tensor], sd: Mapping[str, object]) -> list[tuple[str, tuple, tuple]]:
    """(name, shape in `sd`, shape in `expected`) of each tensor both hold in different shapes, in `sd`'s order."""
    return [(k, tuple(v.shape), tuple(expected[k].shape)) for k, v in sd.items()
            if isinstance(v, torch.Tensor) and k in expected and tuple(v.shape) != tuple(expected[k].shape)]


def check_state_dict(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str = "weights") -> None:
    """Raise a WeightsError naming every missing, unexpected or mis-shaped tensor."""
    expected = module.state_dict()
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(f"{k}: file {theirs} vs model {ours}" for k, theirs, ours in shape_mismatches(expected, sd))
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:5])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:5])})")
    if misshaped:
        problems.append(f"{len(misshaped)} with the wrong shape ({'; '.join(misshaped[:5])})")
    if problems:
        raise WeightsError(f"{what} do not match the model: " + "; ".join(problems))


def load_into(
    module: nn.Module,
    sd: Mapping[str, torch.Tensor],
    what: str = "weights",
    assign: bool = False,
) -> nn.Module:
    """Strictly load `sd` into `module` after checking names and shapes (dtype follows the module
    unless `assign`, which keeps the file's tensors, as needed for modules built on `meta`)."""
    check_state_dict(module, sd, what)
    module.load_state_dict(sd, strict=True, assign=assign)
    return module


def save_safetensors(
    sd: Mapping[str, torch.Tensor],
    path: str | os.PathLike,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write tensors atomically (temp file + rename); non-string metadata is stored as JSON."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    meta = {k: v if isinstance(v, str) else json.dumps(v) for k, v in (metadata or {}).items()}
    tensors = {k: v.detach().contiguous().cpu() for k, v in sd.items()}
    tmp = path.with_name(path.name + ".tmp")
    save_file(tensors, str(tmp), metadata=meta)
    os.replace(tmp, path)
    return path


# safetensors' dtype names, in its order: a file lays its tensors out by dtype (this order,
# reversed: the widest alignment first), then by name.
_DTYPES = {torch.bool: "BOOL", torch.uint8: "U8", torch.int8: "I8", torch.float8_e5m2: "F8_E5M2",
           torch.float8_e4m3fn: "F8_E4M3", torch.int16: "I16", torch.uint16: "U16", torch.float16: "F16",
           torch.bfloat16: "BF16", torch.int32: "I32", torch.uint32: "U32", torch.float32: "F32",
           torch.float64: "F64", torch.int64: "I64", torch.uint64: "U64"}
_RANK = {dtype: i for i, dtype in enumerate(_DTYPES)}


def save_safetensors_streamed(
    layout: Mapping[str, tuple[Sequence[int], torch.dtype]],
    tensors: Iterable[tuple[str, torch.Tensor]],
    path: str | os.PathLike,
    metadata: Mapping[str, object] | None = None,
) -> Path:
    """Write the safetensors file of `layout` (name -> (shape, dtype)) with the (name, tensor)
    pairs of `tensors`, in any order, each written at its offset as it comes: only the tensor at
    hand is held. Every tensor of `layout` must come once, with its shape and dtype. The header
    and data are those `save_safetensors` writes for the same tensors (safetensors orders the
    metadata entries its own way); the write is atomic."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    unknown = sorted({str(dtype) for _, dtype in layout.values()} - {str(d) for d in _DTYPES})
    if unknown:
        raise WeightsError(f"safetensors has no dtype {', '.join(unknown)}")
    header: dict = {} if metadata is None else {
        "__metadata__": {k: v if isinstance(v, str) else json.dumps(v) for k, v in metadata.items()}}
    offsets, end = {}, 0
    for name in sorted(layout, key=lambda k: (-_RANK[layout[k][1]], k)):
        shape, dtype = layout[name]
        size = dtype.itemsize
        for n in shape:
            size *= int(n)
        offsets[name] = (end, end + size)
        header[name] = {"dtype": _DTYPES[dtype], "shape": [int(n) for n in shape], "data_offsets": [end, end + size]}
        end += size
    text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
    text += b" " * (-len(text) % 8)
    start = 8 + len(text)
    tmp = path.with_name(path.name + ".tmp")
    written: set[str] = set()
    try:
        with open(tmp, "wb") as f:
            f.write(len(text).to_bytes(8, "little") + text)
            f.truncate(start + end)
            for name, tensor in tensors:
                if name not in layout or name in written:
                    raise WeightsError(f"{name} is {'written twice' if name in written else 'not in the layout'}")
                shape, dtype = layout[name]
                if tuple(tensor.shape) != tuple(shape) or tensor.dtype != dtype:
                    raise WeightsError(f"{name} is {tuple(tensor.shape)} {tensor.dtype}, the layout says "
                                       f"{tuple(shape)} {dtype}")
                f.seek(start + offsets[name][0])
                f.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().data)
                written.add(name)
                del tensor  # before the next one is made: it may be a view of a whole checkpoint tensor
            missing = sorted(set(layout) - written)
            if missing:
                raise WeightsError(f"{len(missing)} tensors of the layout never came (e.g. {', '.join(missing[:5])})")
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return path


def file_key_prefix(keys: list[str], prefixes: tuple[str, ...]) -> str:
    """The first of `prefixes` that every key starts with ('' if none): what `strip_prefix` drops."""
    return next((p for p in prefixes if keys and all(k.startswith(p) for k in keys)), "")
