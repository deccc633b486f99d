"""What a feature cache depends on: its identity (the autoencoder's weights and latent
scale/shift, the text encoder, the bucketing resolution, the source shards, the storage dtype)
and the errors of a cache that is incomplete or was built from other inputs. Two caches with
equal identities are interchangeable; :mod:`kontext.data.cache` refuses any other."""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, is_dataclass

import torch
from torch import nn

from kontext.errors import KontextError

STORE_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class CacheError(KontextError):
    """A feature-cache folder that is not a complete cache."""


class StaleCacheError(CacheError):
    """A complete cache built with other encoders, resolution or data than the current run."""


@dataclass(frozen=True)
class CacheIdentity:
    """Everything the cached features depend on; two caches are interchangeable iff equal."""

    autoencoder: str
    text: str
    resolution: str
    source: str
    dtype: str = "float32"

    def diff(self, cached: CacheIdentity) -> list[str]:
        return [f"{k}: cache {getattr(cached, k)!r} vs now {getattr(self, k)!r}"
                for k in asdict(self) if getattr(self, k) != getattr(cached, k)]


def module_digest(module: nn.Module) -> str:
    """A short hash of a module's tensors (names, dtypes, shapes, values)."""
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        t = t.detach().to("cpu").contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def autoencoder_identity(autoencoder: nn.Module) -> str:
    """The autoencoder's weights plus its params, which hold the latent scale/shift."""
    params = autoencoder.current_params() if hasattr(autoencoder, "current_params") else getattr(
        autoencoder, "params", None)
    params = asdict(params) if is_dataclass(params) else params
    text = json.dumps(params, sort_keys=True, default=str)
    return f"{module_digest(autoencoder)}:{hashlib.sha256(text.encode()).hexdigest()[:8]}"


def shards_digest(shards: Sequence[str | os.PathLike]) -> str:
    """A cheap identity of a shard set: local files by name and size (the shard writers are
    deterministic), URLs by name."""
    h = hashlib.sha256()
    for s in sorted(str(s) for s in shards):
        size = os.path.getsize(s) if os.path.isfile(s) else "url"
        h.update(f"{os.path.basename(s)}:{size};".encode())
    return f"{len(shards)} shards:{h.hexdigest()[:16]}"


def text_identity(text_encoder) -> str:
    """The identity of a built TextEncoder, or of a text config (computed without loading it)."""
    if isinstance(text_encoder, Mapping):
        from kontext.latent.text import text_encoder_identity

        return text_encoder_identity(**{k: v for k, v in text_encoder.items() if not k.startswith("_")})
    return text_encoder.identity


def cache_identity(autoencoder: nn.Module, text_encoder, resolution, source: str,
                   dtype: str = "float32") -> CacheIdentity:
    """`text_encoder`: a TextEncoder or its config (kind + arguments)."""
    if dtype not in STORE_DTYPES:
        raise CacheError(f"cache dtype {dtype!r} not in {sorted(STORE_DTYPES)}")
    return CacheIdentity(autoencoder_identity(autoencoder), text_identity(text_encoder), str(resolution),
                         str(source), dtype)
