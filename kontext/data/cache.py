"""The feature cache: encode a triplet dataset once, train the flow stage on latents.

The autoencoder and the text encoders are frozen during flow training, so their outputs for a
fixed dataset never change. `build_cache` runs both once over image-mode batches (the loader's
batch format) and writes feature-only samples in the shard format of :mod:`kontext.data.format`:
`<key>.features.safetensors` holds

    target_latent   (16, H/8, W/8)
    ref<i>_latent   (16, h_i/8, w_i/8), one per reference
    txt             (L, D_txt)
    vec             (D_vec,)

beside `<key>.instruction.txt` and `<key>.meta.json`,

plus `empty.safetensors` (the empty prompt's txt and vec, swapped in at read time for
instruction dropout) and `manifest.json`, written last. The manifest holds the cache's
identity (:mod:`kontext.data.cache_identity`): the autoencoder's weights and latent scale/shift, the text encoder's `identity`,
the bucketing resolution, the source shards and the storage dtype. A cache whose identity
differs from the current run's is refused (`StaleCacheError`), never silently used. The cache
is written into a temporary folder that is renamed into place at the end, so a cache folder
that exists is complete.

The loader reads a cache like any shard set (`kontext.data.stream`, `payload="features"`,
with `empty_prompt=manifest.empty_prompt()`) and yields the cached-feature batch format.
On CPU this is what makes the embedded training fast: a step reads a few kilobytes per
sample instead of running the autoencoder and MiniLM.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import shutil
import socket
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kontext.data.cache_identity import (  # noqa: F401 - part of this module's interface
    STORE_DTYPES,
    CacheError,
    CacheIdentity,
    StaleCacheError,
    autoencoder_identity,
    cache_identity,
    module_digest,
    shards_digest,
    text_identity,
)
from kontext.data.format import Sample
from kontext.data.writers import ShardWriter
from kontext.formats.weights import read_safetensors, save_safetensors

FORMAT = "kontext.feature_cache"
VERSION = 1
MANIFEST = "manifest.json"
EMPTY = "empty.safetensors"
SHARD_PATTERN = "cache-%06d.tar"
@dataclass
class CacheManifest:
    path: Path
    identity: CacheIdentity
    shards: list[str]  # absolute paths, for the loader
    num_samples: int
    txt_shape: tuple[int, int]  # (L, D_txt)
    vec_dim: int
    tasks: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0  # time the build took
    reused: bool = False  # set by build_cache: an existing valid cache was returned

    def empty_prompt(self) -> dict[str, torch.Tensor]:
        """The empty prompt's features, {"txt": (L, D_txt), "vec": (D_vec,)} in the stored dtype:
        the loader's `empty_prompt` for samples whose instruction was dropped."""
        sd = read_safetensors(self.path / EMPTY)
        return {"txt": sd["txt"], "vec": sd["vec"]}


# -------------------------------------------------------------------------------- build helpers
def make_text_encoder(text_encoder, device: torch.device | str = "cpu"):
    """A TextEncoder as given, or built from its config onto `device`."""
    if isinstance(text_encoder, Mapping):
        from kontext.latent.text import build_text_encoder

        kwargs = {k: v for k, v in text_encoder.items() if not k.startswith("_")}
        return build_text_encoder(**kwargs).to(device)
    return text_encoder


# --------------------------------------------------------------------------------------- open
def open_cache(path: str | os.PathLike, identity: CacheIdentity | None = None) -> CacheManifest:
    """The manifest of the complete cache at `path`; with `identity`, refuse a stale cache."""
    path = Path(path)
    manifest_file = path / MANIFEST
    if not manifest_file.is_file():
        raise CacheError(f"{path} is not a feature cache (no {MANIFEST})")
    try:
        m = json.loads(manifest_file.read_text())
        if m.get("format") != FORMAT or m.get("version") != VERSION:
            raise CacheError(f"{path} holds {m.get('format')} v{m.get('version')}, not {FORMAT} v{VERSION}")
        manifest = CacheManifest(path, CacheIdentity(**m["identity"]), [str(path / s) for s in m["shards"]],
                                 int(m["num_samples"]), tuple(m["txt_shape"]), int(m["vec_dim"]),
                                 dict(m.get("tasks", {})), float(m.get("seconds", 0.0)))
        sizes = list(m["shard_bytes"])
    except (ValueError, KeyError, TypeError) as err:
        raise CacheError(f"feature cache {path} has an unreadable {MANIFEST}: {err}") from err
    for shard, size in zip(manifest.shards, sizes, strict=True):
        if not Path(shard).is_file() or Path(shard).stat().st_size != size:
            raise CacheError(f"feature cache {path} is damaged: {Path(shard).name} is missing or has changed")
    if not (path / EMPTY).is_file():
        raise CacheError(f"feature cache {path} is damaged: no {EMPTY}")
    if identity is not None:
        diff = identity.diff(manifest.identity)
        if diff:
            raise StaleCacheError(f"feature cache {path} was built with other inputs ({'; '.join(diff)}); "
                                  f"delete it or rebuild it with overwrite=true")
    return manifest


# -------------------------------------------------------------------------------------- build
class _Memo:
    """Encodings per distinct input, least recently used dropped past `max_bytes`. Prompts and
    images repeat in edit data sets (a third of Shapes-Edit's images are another sample's
    reference or target), and each is encoded once."""

    def __init__(self, encode: Callable[[list], tuple[torch.Tensor, ...]], max_bytes: int):
        self.encode, self.max_bytes, self.bytes = encode, max_bytes, 0
        self.items: OrderedDict[Hashable, tuple[torch.Tensor, ...]] = OrderedDict()

    def __call__(self, keys: list[Hashable], inputs: Sequence) -> tuple[torch.Tensor, ...]:
        """The encodings of `inputs` (one key each, equal keys for equal inputs), stacked: a
        tuple of (B, ...) tensors in float32 on the CPU."""
        new = {}  # key -> index of its first input not yet encoded
        for i, key in enumerate(keys):
            if key not in self.items:
                new.setdefault(key, i)
        if new:
            outs = self.encode([inputs[i] for i in new.values()])
            for j, key in enumerate(new):
                self.items[key] = tuple(o[j].float().cpu().clone() for o in outs)
                self.bytes += sum(v.numel() * 4 for v in self.items[key])
        found = [self.items[key] for key in keys]
        for key in keys:
            self.items.move_to_end(key)
        while self.bytes > self.max_bytes and len(self.items) > len(set(keys)):
            _, values = self.items.popitem(last=False)
            self.bytes -= sum(v.numel() * 4 for v in values)
        return tuple(torch.stack([f[n] for f in found]) for n in range(len(found[0])))


def _partial_dir(path: Path) -> Path:
    return path.with_name(f".{path.name}.partial-{socket.gethostname()}-{os.getpid()}")


def _remove_dead_partials(path: Path) -> None:
    """Remove temporary folders left by killed builds on this host (live builds are kept)."""
    prefix = f".{path.name}.partial-{socket.gethostname()}-"
    for leftover in path.parent.glob(f"{glob.escape(prefix)}*"):
        pid = leftover.name[len(prefix):]
        try:
            os.kill(int(pid), 0)
        except ProcessLookupError:
            shutil.rmtree(leftover, ignore_errors=True)
        except (ValueError, PermissionError):
            pass


def _publish(tmp: Path, path: Path, identity: CacheIdentity) -> None:
    """Move the finished cache into place; a concurrent build of the same cache may have won."""
    try:
        open_cache(path, identity)
        shutil.rmtree(tmp, ignore_errors=True)
        return
    except CacheError:
        pass
    old = path.with_name(f".{path.name}.old-{os.getpid()}")
    if path.exists():
        os.replace(path, old)
    os.replace(tmp, path)
    shutil.rmtree(old, ignore_errors=True)


def build_cache(path: str | os.PathLike, batches: Iterable[Mapping[str, Any]] | Callable[[], Iterable],
                autoencoder: nn.Module, text_encoder, *, resolution, source: str, dtype: str = "float32",
                samples_per_shard: int = 1000, overwrite: bool = False,
                memo_bytes: int = 256 << 20) -> CacheManifest:
    """Encode image-mode `batches` (one pass, no instruction dropout) into a cache at `path`.

    `text_encoder` is a TextEncoder or its config; `batches` an iterable or a function making
    one. A valid cache already at `path` with the same identity is returned as is: nothing is
    loaded or encoded. A stale or damaged one is refused unless `overwrite`.
    """
    path = Path(path)
    identity = cache_identity(autoencoder, text_encoder, resolution, source, dtype)
    if path.exists():
        try:
            manifest = open_cache(path, identity)
            manifest.reused = True
            return manifest
        except CacheError:
            if not overwrite:
                raise
        if not (path / MANIFEST).is_file() and any(path.iterdir()):
            raise CacheError(f"{path} exists and is not a feature cache: not overwriting it")
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_dead_partials(path)
    tmp = _partial_dir(path)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        batches = batches() if callable(batches) else batches
        device = next(autoencoder.parameters()).device
        _write_cache(tmp, batches, autoencoder, make_text_encoder(text_encoder, device), identity,
                     samples_per_shard, memo_bytes)
        _publish(tmp, path, identity)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return open_cache(path, identity)


def _write_cache(tmp: Path, batches: Iterable[Mapping[str, Any]], autoencoder: nn.Module, text_encoder,
                 identity: CacheIdentity, samples_per_shard: int, memo_bytes: int) -> None:
    start = time.perf_counter()
    store = STORE_DTYPES[identity.dtype]
    device = next(autoencoder.parameters()).device
    # Channels-last is oneDNN's own layout for convolutions: ~1.4x faster CPU encodes, same latents
    # to float rounding. The module changes layout in place (its values do not change).
    autoencoder = autoencoder.to(memory_format=torch.channels_last)

    def encode_text(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        feats = text_encoder.encode(prompts)
        return feats.txt, feats.vec

    text = _Memo(encode_text, memo_bytes)
    latents = _Memo(lambda images: (_encode(autoencoder, torch.stack(images), device),), memo_bytes)

    def encode_images(images: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, z, h, w)
        keys = [(tuple(img.shape), hashlib.sha1(np.ascontiguousarray(img.numpy())).digest()) for img in images]
        return latents(keys, images)[0]

    tasks: Counter[str] = Counter()
    with torch.no_grad(), ShardWriter(str(tmp / SHARD_PATTERN), maxcount=samples_per_shard, verify=False) as writer:
        for batch in batches:
            if "target" not in batch:  # the loader's end-of-stream and empty-batch markers
                continue
            target = encode_images(batch["target"])  # (B, 16, H/8, W/8)
            refs = [encode_images(r) for r in batch["references"]]
            txt, vec = text(list(batch["instruction"]), list(batch["instruction"]))  # (B, L, D_txt), (B, D_vec)
            for i, key in enumerate(batch["key"]):
                features = {"target_latent": target[i], **{f"ref{j}_latent": r[i] for j, r in enumerate(refs)},
                            "txt": txt[i], "vec": vec[i]}
                features = {k: v.to(dtype=store, copy=True) for k, v in features.items()}  # -> one safetensors blob
                meta = {"task": batch["task"][i], "latent_size": list(target.shape[-2:])}
                writer.write(Sample(key, batch["instruction"][i], None, [], meta, features))
                tasks[batch["task"][i]] += 1
        shards = writer.close()
    if not shards:
        raise CacheError("the feature cache got no samples to encode (empty dataset?)")
    empty = text_encoder.encode([""])
    save_safetensors({"txt": empty.txt[0].to("cpu", store), "vec": empty.vec[0].to("cpu", store)},
                     tmp / EMPTY, {"format": FORMAT})
    manifest = {
        "format": FORMAT, "version": VERSION, "identity": asdict(identity),
        "shards": [Path(s).name for s in shards], "shard_bytes": [Path(s).stat().st_size for s in shards],
        "num_samples": writer.count, "txt_shape": list(empty.txt.shape[1:]), "vec_dim": empty.vec.shape[1],
        "tasks": dict(sorted(tasks.items())), "seconds": round(time.perf_counter() - start, 3),
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))  # last: its presence marks a complete cache


def _encode(autoencoder: nn.Module, images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Latents (B, z, h, w), float32 on the CPU in the usual layout, of images (B, 3, H, W)."""
    latents = autoencoder.encode(images.to(device).contiguous(memory_format=torch.channels_last))
    return latents.float().cpu().contiguous()


# ------------------------------------------------------------------------------ the prepare step
def find_shards(spec: str | os.PathLike | Sequence[str | os.PathLike]) -> list[str]:
    """Shard paths from the loader's shard spec (a folder, brace pattern, glob, URL or a list)."""
    from kontext.data.loader import expand_shards

    try:
        return expand_shards([str(s) for s in spec] if isinstance(spec, Sequence) and not isinstance(spec, str)
                             else str(spec))
    except FileNotFoundError as err:
        raise CacheError(f"image shards for the feature cache: {err}") from err


def bucket_resolution(max_area: int, max_aspect: float = 4.0, reference_size: str = "strict",
                      reference_area: int | None = None) -> str:
    """The `resolution` part of a cache identity for the loader's bucketing settings. Strict
    references keep the name they had before loose ones existed ("bucket"), so caches built then
    stay valid; a reference area other than the bucket's is named."""
    out = f"max_area={int(max_area)},max_aspect={float(max_aspect)},"
    if reference_size == "strict":
        return out + "reference_size=bucket"
    out += f"reference_size={reference_size}"
    if reference_area is not None and int(reference_area) != int(max_area):
        out += f",reference_area={int(reference_area)}"
    return out


def prepare_cache(path: str | os.PathLike, shards, autoencoder, text, *, batch_size: int = 64,
                  max_area: int = 64 * 64, max_aspect: float = 4.0, reference_size: str = "strict",
                  reference_area: int | None = None, dtype: str = "float32", samples_per_shard: int = 1000, overwrite: bool = False,
                  device: str = "cpu") -> CacheManifest:
    """The idempotent prepare step (`cfg.prepare`): make sure a valid cache of `shards` exists.

    `autoencoder`: an AutoEncoder or the path of its safetensors file; `text`: a TextEncoder or
    its config. Images are bucketed exactly as the image loader does (`max_area`,
    `max_aspect`, `reference_size`, `reference_area`), in one deterministic pass without dropout. Run it in one
    process (e.g. before launching a multi-GPU job): concurrent builds are safe but wasteful.
    """
    from kontext.data.stream import StreamConfig, WorkerStream

    urls = find_shards(shards)
    if isinstance(autoencoder, str | os.PathLike):
        from kontext.latent.autoencoder import load_autoencoder

        autoencoder = load_autoencoder(autoencoder)
    autoencoder = autoencoder.to(device)
    if not isinstance(text, Mapping):
        text = text.to(device)
    stream = StreamConfig(batch_size=batch_size, mode="exact", max_area=max_area, max_aspect=max_aspect,
                          reference_size=reference_size, reference_area=reference_area, shuffle_shards=False,
                          shuffle_buffer=0, payload="image")
    resolution = bucket_resolution(max_area, max_aspect, stream.reference_size, reference_area)  # "bucket" read as strict
    return build_cache(path, lambda: WorkerStream(urls, stream, epoch=0, slot=0, slots=1), autoencoder, text,
                       resolution=resolution, source=shards_digest(urls), dtype=dtype,
                       samples_per_shard=samples_per_shard, overwrite=overwrite)


# --------------------------------------------------------------------------------- the command
USAGE = """usage: python data/cache_features.py out=DIR shards=SPEC [autoencoder=PATH] [text=embedded|t5_clip]
    [max_length=null] [t5_path=DIR] [clip_path=DIR] [t5_tokenizer_path=DIR] [clip_tokenizer_path=DIR]
    [text_dtype=null] [batch_size=64] [bucket_area=4096] [max_aspect=4.0] [reference_size=strict] [reference_area=null]
    [dtype=float32|float16|bfloat16] [shard_size=1000] [overwrite=false] [device=cpu]
Encodes the image shards SPEC once (autoencoder latents of target and references, text features)
into DIR; reuses DIR when it was built from the same inputs and refuses it when not."""


def cache_main(argv: list[str]) -> CacheManifest:
    from omegaconf import OmegaConf

    from kontext.cli import parse_args
    from kontext.formats.weights import WeightsError

    a = parse_args(argv, {"out": "???", "shards": "???", "autoencoder": None, "text": "embedded",
                          "max_length": None, "t5_path": None, "clip_path": None, "t5_tokenizer_path": None,
                          "clip_tokenizer_path": None, "text_dtype": None, "batch_size": 64, "bucket_area": 64 * 64,
                          "max_aspect": 4.0, "reference_size": "strict", "reference_area": None, "dtype": "float32", "shard_size": 1000,
                          "overwrite": False, "device": "cpu"}, USAGE)
    shards = find_shards(a["shards"])
    config = Path(__file__).resolve().parents[2] / "configs" / "text" / f"{a['text']}.yaml"
    if not config.is_file():
        raise CacheError(f"unknown text encoder {a['text']!r} (no {config})")
    text = OmegaConf.to_container(OmegaConf.load(config), resolve=True)
    for key, name in (("max_length", "max_length"), ("t5_path", "t5_path"), ("clip_path", "clip_path"),
                      ("t5_tokenizer_path", "t5_tokenizer_path"), ("clip_tokenizer_path", "clip_tokenizer_path"),
                      ("text_dtype", "dtype")):
        if a[key] is not None:
            text[name] = a[key]
    from kontext.latent.autoencoder import EMBEDDED_PATH, load_autoencoder

    ae_path = a["autoencoder"] or EMBEDDED_PATH
    try:
        autoencoder = load_autoencoder(ae_path)
    except WeightsError as err:
        raise CacheError(f"autoencoder: {err}") from err
    manifest = prepare_cache(a["out"], shards, autoencoder, text, batch_size=a["batch_size"],
                             max_area=a["bucket_area"], max_aspect=a["max_aspect"],
                             reference_size=a["reference_size"], reference_area=a["reference_area"], dtype=a["dtype"], samples_per_shard=a["shard_size"],
                             overwrite=a["overwrite"], device=a["device"])
    size = sum(os.path.getsize(s) for s in manifest.shards)
    print(f"{'reused' if manifest.reused else 'wrote'} feature cache {manifest.path}: {manifest.num_samples} samples in "
          f"{len(manifest.shards)} shards, {size / 2**20:.1f} MiB, built in {manifest.seconds:.1f} s")
    print(f"train on it with: data.payload=features data.shards={manifest.path} "
          f"data.empty_prompt={manifest.path / EMPTY}")
    return manifest
