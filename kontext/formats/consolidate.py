"""Full tensors out of a training checkpoint in one process, without a process group: a file's,
or a sharded (FSDP) folder's shard by shard (`consolidate`), or tensor by tensor
(`ShardedTensors`, for exports and per-rank reads that never hold the whole model)."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import torch

from kontext.formats.checkpoint import check_complete, read_state


def consolidate(path: str | os.PathLike, prefix: str = "state_dict.", read: bool = True) -> dict[str, torch.Tensor]:
    """The full tensors of a checkpoint whose key starts with `prefix` (stripped), in one
    process. Sharded folders are read shard by shard, without a process group; for them the
    keys are flattened with dots (`state_dict.model.img_in.weight`). With `read=False`, the
    tensors on the meta device: their shapes and dtypes, from the checkpoint's metadata alone."""
    path = Path(path)
    if not (path / ".metadata").is_file():  # a folder of shards without `meta.pt` is complete here
        check_complete(path)
    state = read_state(path)
    if path.is_file():
        flat = _flatten(state)
        return {k[len(prefix):]: v if read else torch.empty_like(v, device="meta")
                for k, v in flat.items() if k.startswith(prefix) and torch.is_tensor(v)}
    shards = ShardedTensors(path, prefix)
    return shards.load(list(shards.tensors)) if read else dict(shards.tensors)


class ShardedTensors:
    """The tensors under `prefix` (stripped) of a sharded checkpoint folder that `read_state` has
    checked: `tensors` (on the meta device) from its metadata, read once; `load` reads the full
    tensors of some keys, in one process and holding only those, so a caller can go through a
    checkpoint larger than memory one tensor at a time."""

    def __init__(self, path: Path, prefix: str):
        from torch.distributed.checkpoint import FileSystemReader
        from torch.distributed.checkpoint.metadata import TensorStorageMetadata

        self.path, self.prefix = Path(path), prefix
        self.reader = FileSystemReader(str(path))
        metadata = self.reader.read_metadata()
        self.reader.read_metadata = lambda *args, **kwargs: metadata  # not unpickled again for every load
        self.tensors = {key[len(prefix):]: torch.empty(meta.size, dtype=meta.properties.dtype, device="meta")
                        for key, meta in metadata.state_dict_metadata.items()
                        if key.startswith(prefix) and isinstance(meta, TensorStorageMetadata)}

    def load(self, keys: list[str]) -> dict[str, torch.Tensor]:
        import torch.distributed.checkpoint as dcp

        wanted = {self.prefix + key: torch.empty_like(self.tensors[key], device="cpu") for key in keys}
        if wanted:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*assuming the intent is to load in a single process")
                dcp.load(wanted, storage_reader=self.reader, no_dist=True)
        return {key[len(self.prefix):]: value for key, value in wanted.items()}


def _flatten(tree, prefix: str = "") -> dict:
    if isinstance(tree, dict):
        out = {}
        for key, value in tree.items():
            out.update(_flatten(value, f"{prefix}{key}."))
        return out
    return {prefix[:-1]: tree}
