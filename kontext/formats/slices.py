"""Each rank's rows of a model's tensors: read from where they are stored, or initialised.

A model built on the `meta` device and sharded by FSDP2 holds, on each rank, a block of rows of
every parameter (dim 0 split as `torch.chunk` splits it). Once materialised (`to_empty`), `fill`
writes those rows, and only those, from a :class:`Rows` source:

- :class:`FileRows`: a safetensors file (reference-format weights, an export's transformer);
  slices are read from the mapped file;
- :class:`TensorRows`: tensors already at hand, e.g. a training checkpoint file's, which
  `torch.load(mmap=True)` maps: only the pages of the rows read are touched;
- :class:`FolderRows`: a sharded (FSDP) checkpoint folder, read one whole tensor at a time.

So no rank holds a whole copy of a sharded model, and a model of any size is read with one
tensor in flight at most. `init_rows` runs an initialiser on one whole tensor and keeps the
rank's rows: a model initialised shard by shard, in the order a single process initialises it,
gets that process's values (:func:`kontext.network.model.init_like_construction`).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path

import torch
from torch import Tensor, nn

from kontext.formats.weights import WeightsError, check_state_dict, file_key_prefix


class Rows:
    """Named tensors whose rows can be read without reading the rest: `shapes` (name -> shape,
    nothing read) and `read(name, start, stop)` (rows [start, stop) of one tensor, all by default)."""

    shapes: dict[str, torch.Size]

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor:
        raise NotImplementedError


class FileRows(Rows):
    """A safetensors file, its keys without the first of `prefixes` that all of them carry."""

    def __init__(self, path: str | os.PathLike, prefixes: tuple[str, ...] = ()):
        from safetensors import SafetensorError, safe_open

        self.path = Path(path)
        if not self.path.is_file():
            raise WeightsError(f"weight file not found: {self.path}")
        try:
            self._file = safe_open(str(self.path), framework="pt")
            keys = list(self._file.keys())
            self.prefix = file_key_prefix(keys, prefixes)
            self.shapes = {k[len(self.prefix):]: torch.Size(self._file.get_slice(k).get_shape()) for k in keys}
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"cannot read {self.path} as safetensors: {err}") from err

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor:
        from safetensors import SafetensorError

        try:
            piece = self._file.get_slice(self.prefix + name)
            return piece[:] if start is None and stop is None else piece[start:stop]
        except (SafetensorError, OSError) as err:
            raise WeightsError(f"cannot read {name} from {self.path}: {err}") from err


class TensorRows(Rows):
    """Tensors at hand (a state dict, a memory-mapped checkpoint's tensors)."""

    def __init__(self, tensors: Mapping[str, Tensor]):
        self.tensors = dict(tensors)
        self.shapes = {k: v.shape for k, v in self.tensors.items()}

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor:
        return self.tensors[name][start:stop]


class FolderRows(Rows):
    """The tensors under `prefix` of a sharded checkpoint folder (:class:`kontext.formats.consolidate.ShardedTensors`)."""

    def __init__(self, path: str | os.PathLike, prefix: str):
        from kontext.formats.consolidate import ShardedTensors

        self.sharded = ShardedTensors(Path(path), prefix)
        self.shapes = {k: v.shape for k, v in self.sharded.tensors.items()}

    def read(self, name: str, start: int | None = None, stop: int | None = None) -> Tensor:
        return self.sharded.load([name])[name][start:stop]


def check(module: nn.Module, rows: Rows, what: str = "weights", absent: Iterable[str] = ()) -> None:
    """`check_state_dict`'s errors for `rows` against `module` (no tensor read); names in `absent`
    may be missing from `rows` (e.g. a guidance embedder a student adds)."""
    absent = set(absent)
    shapes = {k: torch.empty(s, device="meta") for k, s in rows.shapes.items()}
    expected = module.state_dict()
    shapes.update({k: torch.empty(expected[k].shape, device="meta") for k in absent if k not in shapes})
    check_state_dict(module, shapes, what)


def local_rows(target: Tensor) -> tuple[Tensor, int]:
    """(this rank's block of `target`, its first row): the whole tensor unless it is an FSDP2
    DTensor, whose first dimension is split as `torch.chunk` splits it (ceil(n / ranks) rows
    each, the last ranks fewer or none)."""
    from torch.distributed.tensor import DTensor, Shard

    if not isinstance(target, DTensor):
        return target, 0
    if tuple(target.placements) != (Shard(0),):
        raise WeightsError(f"only shards along the first dimension are filled by rows, got {target.placements}")
    mesh = target.device_mesh
    return target.to_local(), mesh.get_local_rank() * -(-target.shape[0] // mesh.size())


@torch.no_grad()
def fill(module: nn.Module, rows: Rows, what: str = "weights", absent: Iterable[str] = ()) -> list[str]:
    """Write each parameter and buffer of `module` (materialised, sharded or not) from `rows`:
    only the rows this rank holds are read, cast to the module's dtypes. Names and shapes are
    checked first (`check`); the names in `absent` that `rows` lacks are left as they are and
    returned."""
    check(module, rows, what, absent)
    skipped = []
    for name, target in module.state_dict(keep_vars=True).items():
        if name not in rows.shapes:
            skipped.append(name)
            continue
        local, start = local_rows(target)
        if local is target:
            target.copy_(rows.read(name))
        elif local.shape[0]:
            local.copy_(rows.read(name, start, start + local.shape[0]))
    return skipped


@torch.no_grad()
def init_rows(target: Tensor, init: Callable[[Tensor], object]) -> None:
    """`init` (an in-place initialiser such as `nn.init.xavier_uniform_`) on the whole of `target`,
    keeping this rank's rows. It draws what it would draw on the whole tensor, so every rank
    advances the random generator alike and a sharded model gets one process's values."""
    local, start = local_rows(target)
    if local is target and target.device.type == "cpu":
        init(target)
        return
    whole = torch.empty(target.shape, dtype=target.dtype, device="cpu")  # the CPU generator's draws, on any device
    init(whole)
    local.copy_(whole if local is target else whole[start:start + local.shape[0]])
