"""Strict safetensors weight I/O shared by every network in the project.

Only safetensors is read or written (no pickle). Loading is strict: a missing, unexpected
or mis-shaped tensor is a :class:`WeightsError` that names the tensor, raised before any
parameter of the module is touched, so a failed load never leaves a half-loaded model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
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
    for prefix in prefixes:
        if sd and all(k.startswith(prefix) for k in sd):
            return {k[len(prefix):]: v for k, v in sd.items()}
    return dict(sd)


def check_state_dict(module: nn.Module, sd: Mapping[str, torch.Tensor], what: str = "weights") -> None:
    """Raise a WeightsError naming every missing, unexpected or mis-shaped tensor."""
    expected = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    missing = sorted(set(expected) - set(sd))
    unexpected = sorted(set(sd) - set(expected))
    misshaped = sorted(
        f"{k}: file {tuple(sd[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(sd)
        if tuple(sd[k].shape) != expected[k]
    )
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
