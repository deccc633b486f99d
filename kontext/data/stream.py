"""One data-loading worker's deterministic stream: shards -> samples -> buckets -> batches.

Everything a worker yields is a pure function of (config, epoch, rank, worker), so a resumed
run can replay a worker's stream, skip the batches it already delivered without decoding them
(sizes come from image headers; pixels are decoded only after batching), and carry on with data
it has not seen. Reading uses webdataset's tar iterators and `gopen` (local paths, http(s),
`pipe:` commands); the shard split over ranks and workers is done here, by slot.
"""

from __future__ import annotations

import hashlib
import logging
import random
from collections import Counter
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
import webdataset as wds
from torch.utils.data import get_worker_info

from kontext.data.buckets import MULTIPLE, REFERENCE_SIZES, bucket_size, fit, preferred_size
from kontext.data.format import MAX_PIXELS, FormatError, Sample, decode_image, from_record, image_size
from kontext.errors import KontextError

log = logging.getLogger(__name__)


class DataError(KontextError, RuntimeError):
    """The data, not one sample, is broken: most samples, or a long run of shards and samples
    in a row, are unreadable."""


@dataclass
class StreamConfig:
    batch_size: int = 8
    mode: str = "resampled"  # "resampled": shards drawn with replacement; "exact": each sample once
    max_area: int = 64 * 64  # bucket area in pixels
    max_aspect: float = 4.0
    # "strict" (alias "bucket"): the target's bucket, fitted as the target is (the target's crop when
    # the aspect ratios agree) | "loose": own aspect ratio under `reference_area` | "preferred": the
    # Kontext resolution nearest its aspect ratio, scaled to `reference_area` (unused by strict)
    reference_size: str = "strict"
    reference_area: int | None = None  # pixels of a loose or preferred reference; None: max_area
    t2i_fraction: float = 0.0  # edit samples whose references are dropped
    instruction_dropout: float = 0.0  # samples whose instruction becomes ""
    shuffle_shards: bool = True
    shuffle_buffer: int = 1000  # samples; 0 keeps the shard order
    drop_last: bool = False  # exact mode: drop the partial batch left in each bucket at the end
    payload: str = "image"  # "image" or "features" (cached latents / text features, no decoding)
    seed: int = 0
    max_bad_fraction: float = 0.5
    min_checked: int = 64  # samples read before the bad-fraction check applies
    max_consecutive_bad: int = 100  # unreadable shards or samples in a row that stop the stream
    max_pixels: int | None = MAX_PIXELS  # larger images are skipped from their header ("image too large")

    def __post_init__(self):
        if self.reference_size == "bucket":  # its name before loose references existed
            self.reference_size = "strict"
        checks = {"mode": ("resampled", "exact"), "reference_size": REFERENCE_SIZES,
                  "payload": ("image", "features")}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.batch_size < 1 or not 0 <= self.t2i_fraction <= 1 or not 0 <= self.instruction_dropout <= 1:
            raise ValueError("batch_size >= 1 and fractions in [0, 1] are required")
        if self.reference_area is not None and self.reference_area < MULTIPLE * MULTIPLE:
            raise ValueError(f"reference_area must be at least {MULTIPLE * MULTIPLE} pixels, got {self.reference_area}")
        if self.max_consecutive_bad < 1:
            raise ValueError(f"max_consecutive_bad must be at least 1, got {self.max_consecutive_bad}")


def reference_bucket(size: tuple[int, int], cfg: StreamConfig) -> tuple[int, int]:
    """The (W, H) a loose or preferred reference of source `size` is fitted to: its own aspect
    ratio under its own pixel budget (loose) or the preferred Kontext resolution nearest its
    aspect ratio (preferred). A strict reference takes the target's bucket instead, scaled and
    centre-cropped as the target is, so one of the target's aspect ratio gets exactly its crop."""
    area = cfg.reference_area or cfg.max_area
    if cfg.reference_size == "loose":
        return bucket_size(*size, area, cfg.max_aspect)
    return preferred_size(*size, area)


def make_seed(*parts: Any) -> int:
    return int.from_bytes(hashlib.sha256(repr(parts).encode()).digest()[:8], "big")


@dataclass
class Stats:
    seen: int = 0
    corrupt: int = 0
    reasons: Counter = field(default_factory=Counter)
    examples: list[str] = field(default_factory=list)

    def bad(self, key: str, err: Exception) -> None:
        self.corrupt += 1
        msg = str(err).removeprefix(f"{key}: ")
        reason = msg.split(": ")[0].split(" @ ")[0][:80]  # the kind of fault, without per-sample detail
        self.reasons[reason] += 1
        if len(self.examples) < 5:
            self.examples.append(f"{key}: {err}")

    def minus(self, base: Stats) -> dict:
        return {"seen": self.seen - base.seen, "corrupt": self.corrupt - base.corrupt,
                "reasons": dict(self.reasons - base.reasons), "examples": list(self.examples)}


def assign_shards(urls: list[str], cfg: StreamConfig, epoch: int, slot: int, slots: int) -> Iterator[str]:
    """The shards of one (rank, worker) slot. Exact: a permutation shared by all ranks, dealt
    round-robin, so every shard goes to exactly one slot. Resampled: endless draws."""
    if cfg.mode == "exact":
        order = list(urls)
        if cfg.shuffle_shards:
            random.Random(make_seed(cfg.seed, epoch, "shards")).shuffle(order)
        yield from order[slot::slots]
    else:
        rng = random.Random(make_seed(cfg.seed, epoch, slot, "resample"))
        while True:
            yield rng.choice(urls)


@dataclass
class Item:
    sample: Sample
    signature: tuple  # equal signatures stack into one batch
    sizes: tuple = ()  # image mode: ((W, H) of the target, (W, H) of each reference)
    url: str = ""  # its shard


class WorkerStream:
    """Batches for one slot; `skip` batches are replayed without decoding, `budget` caps the rest."""

    def __init__(self, urls: list[str], cfg: StreamConfig, epoch: int, slot: int, slots: int,
                 skip: int = 0, budget: int | None = None, empty_prompt: dict | None = None):
        self.urls, self.cfg, self.epoch, self.slot, self.slots = urls, cfg, epoch, slot, slots
        self.skip, self.budget, self.empty_prompt = skip, budget, empty_prompt
        self.stats = Stats()
        self._rng = random.Random(make_seed(cfg.seed, epoch, slot, "samples"))
        self._in_a_row = 0  # unreadable shards and samples since the last readable sample
        self._bad_shards: Counter = Counter()  # shard -> its unreadable samples (or 1: the shard itself)
        self._url = ""

    def _read_error(self, exn: Exception) -> bool:
        what = exn.strerror if isinstance(exn, OSError) and exn.strerror else (exn.args[0] if exn.args else exn)
        log.warning("shard read error (skipped): %s: %s", self._url, what)
        self._bad("<shard>", FormatError(f"unreadable shard ({what})"))
        return True

    def records(self) -> Iterator[dict]:
        """The records of this slot's shards; a shard that cannot be read or holds no record counts
        as one unreadable item (so a stream of them ends, see `_bad`)."""
        for url in assign_shards(self.urls, self.cfg, self.epoch, self.slot, self.slots):
            self._url, bad_before, n = url, self.stats.corrupt, 0
            for rec in wds.tariterators.tarfile_samples([{"url": url}], handler=self._read_error):
                n += 1
                yield rec
            if n == 0 and self.stats.corrupt == bad_before:
                self._bad("<shard>", FormatError("empty shard"))

    def _bad(self, key: str, err: Exception, url: str | None = None) -> None:
        self.stats.bad(key, err)
        self._bad_shards[url or self._url] += 1
        self._in_a_row += 1
        self._check_health()

    def _check_health(self) -> None:
        s, c = self.stats, self.cfg
        if s.seen >= c.min_checked and s.corrupt > c.max_bad_fraction * s.seen:
            raise DataError(
                f"{s.corrupt} of {s.seen} samples read so far are unreadable (limit {c.max_bad_fraction:.0%}); "
                f"reasons {dict(s.reasons)}; e.g. {s.examples[:3]}. Check the shard paths and format.")
        if self._in_a_row >= c.max_consecutive_bad:
            shards = [f"{url} ({n})" for url, n in self._bad_shards.most_common()]
            more = f" and {len(shards) - 5} more" if len(shards) > 5 else ""
            raise DataError(
                f"no readable data: the last {self._in_a_row} shards or samples read were all unreadable "
                f"(limit data.max_consecutive_bad={c.max_consecutive_bad}); skipped {dict(s.reasons)} in "
                f"{len(shards)} shard(s): {', '.join(shards[:5])}{more}")

    def items(self, records: Iterable[dict]) -> Iterator[Item]:
        c = self.cfg
        for rec in records:
            self.stats.seen += 1
            key = rec.get("__key__", "?")
            try:
                sample = from_record(rec, features=c.payload == "features")
                if c.payload == "image" and sample.target is None:
                    raise FormatError(f"{key}: no target image")
            except FormatError as e:
                self._bad(key, e)
                continue
            has_refs = bool(sample.references) or _n_ref_latents(sample.features) > 0
            if has_refs and self._rng.random() < c.t2i_fraction:
                sample.references = []
                sample.features = {k: v for k, v in sample.features.items() if not k.startswith("ref")}
            if self._rng.random() < c.instruction_dropout:
                sample.instruction = ""
            try:
                item = self._signed(sample)
            except (FormatError, KeyError, ValueError) as e:
                self._bad(key, e)
                continue
            self._in_a_row, item.url = 0, self._url
            yield item

    def _signed(self, s: Sample) -> Item:
        c = self.cfg
        if c.payload == "features":
            refs = tuple(tuple(s.features[f"ref{i}_latent"].shape) for i in range(_n_ref_latents(s.features)))
            shapes = tuple((k, tuple(v.shape), str(v.dtype)) for k, v in sorted(s.features.items())
                           if not k.startswith("ref"))
            return Item(s, (shapes, refs))
        bucket = bucket_size(*image_size(s.target, c.max_pixels), c.max_area, c.max_aspect)
        if c.reference_size == "strict":
            ref_sizes = tuple(bucket for _ in s.references)
        else:
            ref_sizes = tuple(reference_bucket(image_size(r, c.max_pixels), c) for r in s.references)
        return Item(s, (bucket, ref_sizes), (bucket, ref_sizes))

    def shuffled(self, items: Iterable[Item]) -> Iterator[Item]:
        n = self.cfg.shuffle_buffer
        if n <= 1:
            yield from items
            return
        buf: list[Item] = []
        for item in items:
            if len(buf) < n:
                buf.append(item)
                continue
            j = self._rng.randrange(n)
            buf[j], item = item, buf[j]
            yield item
        self._rng.shuffle(buf)
        yield from buf

    def bucketed(self, items: Iterable[Item]) -> Iterator[list[Item]]:
        pending: dict[tuple, list[Item]] = {}
        for item in items:
            group = pending.setdefault(item.signature, [])
            group.append(item)
            if len(group) == self.cfg.batch_size:
                yield pending.pop(item.signature)
        if not self.cfg.drop_last:
            yield from pending.values()

    def __iter__(self) -> Iterator[dict]:
        base, error = Stats(), None
        try:
            for b, group in enumerate(self.bucketed(self.shuffled(self.items(self.records())))):
                if self.budget is not None and b >= self.skip + self.budget:
                    break
                if b < self.skip:
                    if b == self.skip - 1:  # the counts the original run had reported with this batch
                        base = Stats(self.stats.seen, self.stats.corrupt, Counter(self.stats.reasons))
                    continue
                batch = self.collate(group)
                batch.update(_batch=b, _stats=self.stats.minus(base))
                yield batch
        except DataError as err:  # handed over as a message: a worker's exception would arrive as a traceback
            error = str(err)
        # A final marker carries the counts of samples dropped after the last batch (and the error).
        yield {"_batch": None, "_stats": self.stats.minus(base), "_error": error}

    # -------------------------------------------------------------------------------- collation
    def collate(self, group: list[Item]) -> dict:
        image = self.cfg.payload == "image"
        if image:  # one bucket and reference signature per group, so the sizes are known up front
            bucket, ref_sizes = group[0].sizes
            buffers = [_image_buffer(len(group), size) for size in (bucket, *ref_sizes)]
        kept: list[Item] = []
        for item in group:
            try:
                if image:
                    s = item.sample
                    for buf, data, size in zip(buffers, [s.target, *s.references], [bucket, *ref_sizes], strict=True):
                        _put(buf, len(kept), fit(decode_image(data, self.cfg.max_pixels), size))  # converted while still in cache
                kept.append(item)
            except FormatError as e:  # its slot is reused by the next sample
                self._bad(item.sample.key, e, item.url)
        if not kept:
            return {"_empty": True}
        batch: dict[str, Any] = {
            "instruction": [i.sample.instruction for i in kept],
            "task": [i.sample.task for i in kept],
            "key": [i.sample.key for i in kept],
        }
        if image:
            batch["target"] = buffers[0][: len(kept)]
            batch["references"] = [buf[: len(kept)] for buf in buffers[1:]]
        else:
            batch.update(self._features(kept))
        return batch

    def _features(self, kept: list[Item]) -> dict:
        feats = [dict(i.sample.features) for i in kept]
        if self.empty_prompt is not None:
            for f, i in zip(feats, kept, strict=True):
                if i.sample.instruction == "":
                    f.update(self.empty_prompt)
        n_refs = _n_ref_latents(feats[0])
        out: dict[str, Any] = {
            "reference_latents": [_stack([f[f"ref{r}_latent"] for f in feats]) for r in range(n_refs)]}
        for name in feats[0]:
            if not name.startswith("ref"):
                out[name] = _stack([f[name] for f in feats])
        return out


def _n_ref_latents(features: dict) -> int:
    n = 0
    while f"ref{n}_latent" in features:
        n += 1
    return n


def _image_buffer(n: int, size: tuple[int, int]) -> torch.Tensor:
    """An empty (n, 3, H, W) float32 batch; in a worker it is born in shared memory, so handing
    it to the main process costs no copy."""
    out = torch.empty((n, 3, size[1], size[0]), dtype=torch.float32)
    return out.share_memory_() if get_worker_info() is not None else out


def _put(buf: torch.Tensor, i: int, img) -> None:
    """Slot i of a batch from an RGB image: (H, W, 3) uint8 -> (3, H, W) in [-1, 1]. NumPy does
    the arithmetic: torch's intra-op threads only add overhead on a shared CPU."""
    x = buf.numpy()[i]
    np.subtract(np.asarray(img).transpose(2, 0, 1), np.float32(127.5), out=x, dtype=np.float32)
    x *= np.float32(1 / 127.5)


def _stack(values: list[Any]) -> torch.Tensor:
    return torch.stack([torch.as_tensor(v) for v in values])
