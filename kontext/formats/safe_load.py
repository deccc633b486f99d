"""Reading pickled checkpoint records without trusting them. `torch.load(weights_only=True)` with
an allow-list of the project's parameter dataclasses (`safe_globals`, under their current and
their former module paths), also on Lightning's resume path (`weights_only_loads`); a sharded
folder's `.metadata` through an unpickler that builds the classes of torch's distributed
checkpoint metadata and nothing else. `why` says in a few words what was wrong with a record."""

from __future__ import annotations

import contextlib
import os
import pickle
import re

import torch

# The names the parameter dataclasses had before the package was split into subpackages, which
# older checkpoints pickle: allowed as (class, name) pairs, which torch reads from version 2.6.
FORMER_NAMES = ("kontext.autoencoder.AutoEncoderParams", "kontext.model.FluxParams")
READS_FORMER_NAMES = tuple(int(v) for v in torch.__version__.split("+")[0].split(".")[:2]) >= (2, 6)


def safe_globals() -> contextlib.AbstractContextManager:
    """What `torch.load(weights_only=True)` may build besides tensors and plain containers: the
    parameter dataclasses a stage keeps among its hyperparameters."""
    from kontext.latent.autoencoder import AutoEncoderParams
    from kontext.network.model import FluxParams

    allowed: list = [AutoEncoderParams, FluxParams]
    if READS_FORMER_NAMES:
        allowed += [(AutoEncoderParams, FORMER_NAMES[0]), (FluxParams, FORMER_NAMES[1])]
    return torch.serialization.safe_globals(allowed)


@contextlib.contextmanager
def weights_only_loads():
    """Every `torch.load` inside (Lightning's resume and torch's distributed checkpoint reader
    included, which ask for full unpickling in places) is weights-only with `safe_globals`."""
    before = os.environ.get("TORCH_FORCE_WEIGHTS_ONLY_LOAD")
    os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = "1"
    try:
        with safe_globals():
            yield
    finally:
        if before is None:
            os.environ.pop("TORCH_FORCE_WEIGHTS_ONLY_LOAD", None)
        else:
            os.environ["TORCH_FORCE_WEIGHTS_ONLY_LOAD"] = before


def load_file(path: str | os.PathLike, mmap: bool = False) -> dict:
    """A `torch.save` file, restricted to tensors, plain containers and `safe_globals`."""
    with safe_globals():
        return torch.load(path, map_location="cpu", mmap=mmap, weights_only=True)


class MetadataUnpickler(pickle.Unpickler):
    """The unpickler of a sharded folder's `.metadata`: the classes of torch's distributed
    checkpoint metadata, dtypes, layouts, sizes and paths, and nothing else."""

    METADATA = {"Metadata", "MetadataIndex", "StorageMeta", "TensorStorageMetadata", "BytesStorageMetadata",
                "ChunkStorageMetadata", "TensorProperties", "_MEM_FORMAT_ENCODING"}
    FUNCTIONS = {("collections", "OrderedDict"), ("torch.serialization", "_get_layout"),
                 ("torch.distributed.checkpoint.filesystem", "_StorageInfo"), ("pathlib", "PosixPath"),
                 *(("torch.distributed.checkpoint.metadata", n) for n in METADATA)}

    def find_class(self, module: str, name: str):
        # A dotted name would reach whatever the module imports (`os.system` through any module
        # that imports os): only plain names of the listed classes, dtypes, layouts and sizes.
        value = getattr(torch, name, None) if module == "torch" and "." not in name else None
        if "." not in name and ((module, name) in self.FUNCTIONS or name == "Size" and module == "torch"
                                or isinstance(value, torch.dtype | torch.layout | torch.memory_format)):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"unsupported GLOBAL {module}.{name}")


def why(err: Exception) -> str:
    """A checkpoint read error in a few words."""
    text = str(err)
    if m := re.search(r"unsupported GLOBAL (\S+)|Unsupported global: GLOBAL (\S+)", text):
        name = (m[1] or m[2]).rstrip(".,:")
        if name in FORMER_NAMES:
            return f"it was written by an older version of this package ({name}); reading it needs torch >= 2.6"
        return f"it holds code or objects outside the allow-list ({name}), not loaded"
    if isinstance(err, pickle.UnpicklingError | EOFError):
        return "its pickled record is garbled"
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0][:160] if lines else type(err).__name__
