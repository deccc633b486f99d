"""The streaming loader: `KontextLoader` (a plain, resumable iterable of batches) and
`KontextDataModule` (the LightningDataModule used by training).

Batch format (image payload): `target` (B, 3, H, W) in [-1, 1]; `references` a list of
(B, 3, h_i, w_i), empty for a text-to-image batch; `instruction`, `task`, `key` lists of str.
Feature payload (shards written by the feature cache): the cached tensors stacked under their
own names (`target_latent`, `txt`, `vec`, ...), `reference_latents` a list, plus the three lists.

Modes. `resampled`: every (rank, worker) draws shards with replacement, and an epoch is a fixed
number of batches per rank, the same on every rank (what multi-node DDP needs). `exact`: each
shard goes to exactly one (rank, worker), so every sample is seen once per epoch across all
ranks; ranks may then yield different numbers of batches, so use it for single-rank training,
evaluation and the feature cache, or give every rank the same number of samples.

Resume. `state_dict()` records the epoch and how many batches each worker has delivered; after
`load_state_dict()` the workers replay their deterministic streams, skipping those batches
without decoding them, and continue with data not yet delivered. Lightning saves and restores
this state with its checkpoints (the loader is `Stateful`). Lightning fetches one batch ahead,
so a resumed run skips at most that one batch; it never repeats one.
"""

from __future__ import annotations

import glob
import logging
import os
import warnings
from collections import Counter
from collections.abc import Iterator
from typing import Any

import lightning as L
import torch
import webdataset as wds
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kontext.config_check import plain
from kontext.data.format import MAX_PIXELS
from kontext.data.stream import DataError, StreamConfig, WorkerStream

log = logging.getLogger(__name__)


def expand_shards(spec: str | list[str]) -> list[str]:
    """Shard URLs from a spec: brace patterns (`shards-{000..099}.tar`), `::`-joined lists, local
    directories (every *.tar inside), local globs, and URLs (`https://`, `pipe:`, ...) as given."""
    specs = [spec] if isinstance(spec, str) else list(spec)
    urls: list[str] = []
    for s in specs:
        for url in wds.shardlists.expand_urls(str(s)):
            if "://" in url or url.startswith("pipe:"):
                urls.append(url)
            elif os.path.isdir(url):
                urls.extend(sorted(glob.glob(os.path.join(url, "*.tar"))))
            elif any(ch in url for ch in "*?["):
                urls.extend(sorted(glob.glob(url)))
            elif os.path.exists(url):
                urls.append(url)
            else:
                raise FileNotFoundError(f"shard {url!r} does not exist (from {s!r})")
    if not urls:
        raise FileNotFoundError(f"no shards found for {spec!r}")
    return urls


class KontextDataset(IterableDataset):
    """One epoch of one rank's batches, split over the DataLoader workers by slot."""

    def __init__(self, urls: list[str], cfg: StreamConfig, rank: int, world_size: int, epoch: int,
                 skip: dict[int, int], batches_per_rank: int | None, empty_prompt: dict | None = None):
        super().__init__()
        self.urls, self.cfg, self.rank, self.world_size, self.epoch = urls, cfg, rank, world_size, epoch
        self.skip, self.batches_per_rank, self.empty_prompt = skip, batches_per_rank, empty_prompt

    def __iter__(self) -> Iterator[dict]:
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info is not None else (0, 1)
        # The DataLoader takes batches from its workers round-robin starting at worker 0; rotate
        # so that a resumed run takes them in the order the interrupted one would have.
        worker = (worker + sum(self.skip.values())) % workers
        skip = self.skip.get(worker, 0)
        budget = None
        if self.batches_per_rank is not None:
            n = self.batches_per_rank
            budget = max(0, n // workers + (worker < n % workers) - skip)
        stream = WorkerStream(self.urls, self.cfg, self.epoch, self.rank * workers + worker,
                              self.world_size * workers, skip, budget, self.empty_prompt)
        for batch in stream:
            batch["_worker"] = worker
            yield batch


def _passthrough(batch: Any) -> Any:
    return batch


class KontextLoader:
    """A resumable iterable of batches for one rank; iterate it once per epoch.

    rank and world_size default to the torch.distributed / RANK, WORLD_SIZE environment values.
    `epoch_samples` (resampled mode) is the epoch length in samples over all ranks."""

    def __init__(self, shards: str | list[str], cfg: StreamConfig, *, num_workers: int = 0,
                 rank: int | None = None, world_size: int | None = None, epoch_samples: int = 10_000,
                 empty_prompt: dict | None = None, pin_memory: bool = False, prefetch_factor: int = 2):
        self.urls = expand_shards(shards)
        self.cfg, self.num_workers, self.epoch_samples = cfg, num_workers, epoch_samples
        self._rank, self._world = rank, world_size
        self.empty_prompt, self.pin_memory, self.prefetch_factor = empty_prompt, pin_memory, prefetch_factor
        self.epoch, self.done, self.finished = 0, {}, False
        self._totals = {"seen": 0, "corrupt": 0, "reasons": Counter()}
        self._live: dict[int, dict] = {}
        self._warned_at = 0
        if cfg.payload == "features" and cfg.instruction_dropout > 0 and empty_prompt is None:
            raise ValueError("instruction dropout on cached features needs the empty prompt's features")

    @property
    def rank_world(self) -> tuple[int, int]:
        rank, world, _, _ = wds.utils.pytorch_worker_info()
        return (rank if self._rank is None else self._rank), (world if self._world is None else self._world)

    @property
    def batches_per_rank(self) -> int | None:
        if self.cfg.mode != "resampled":
            return None
        return max(1, self.epoch_samples // (self.cfg.batch_size * self.rank_world[1]))

    def __len__(self) -> int:
        if self.batches_per_rank is None:
            raise TypeError("an exact-mode loader has no length known in advance")
        return self.batches_per_rank

    def __iter__(self) -> Iterator[dict]:
        while True:
            if self.finished:
                self._fold_stats()
                self.epoch, self.done, self.finished = self.epoch + 1, {}, False
            resumed, n = bool(self.done), 0
            for batch in self._epoch():
                n += 1
                yield batch
            self.finished = True
            self._report(final=True)
            s = self.stats
            # Nothing usable among what was read is an error; a rank dealt no shards at all (fewer
            # shards than ranks x workers in exact mode) reads nothing and just has no batches.
            if not n and not resumed and s["seen"] + s["corrupt"] > 0:
                raise DataError(f"no readable data: an epoch over {len(self.urls)} shard(s) ({self._shard_names()}) "
                                f"yielded no batch; {s['seen']} samples read, {s['corrupt']} skipped {s['reasons']}")
            if n or not resumed:  # a resumed epoch that was already complete: go on to the next
                return

    def _shard_names(self) -> str:
        return ", ".join(self.urls[:5]) + (f" and {len(self.urls) - 5} more" if len(self.urls) > 5 else "")

    def _epoch(self) -> Iterator[dict]:
        rank, world = self.rank_world
        ds = KontextDataset(self.urls, self.cfg, rank, world, self.epoch, dict(self.done),
                            self.batches_per_rank, self.empty_prompt)
        workers = self.num_workers
        dl = DataLoader(ds, batch_size=None, num_workers=workers, collate_fn=_passthrough,
                        pin_memory=self.pin_memory, prefetch_factor=self.prefetch_factor if workers else None)
        for batch in dl:
            worker, index = batch.pop("_worker"), batch.pop("_batch")
            self._live[worker] = batch.pop("_stats")
            if index is None:
                if batch.get("_error"):
                    raise DataError(batch["_error"])
                continue
            self.done[worker] = index + 1
            self._report()
            if not batch.pop("_empty", False):
                yield batch

    # ------------------------------------------------------------------------------ statistics
    def _fold_stats(self) -> None:
        for s in self._live.values():
            self._totals["seen"] += s["seen"]
            self._totals["corrupt"] += s["corrupt"]
            self._totals["reasons"].update(s["reasons"])
        self._live = {}

    @property
    def stats(self) -> dict:
        """Samples read and corrupt samples skipped (with reasons) on this rank, over all epochs."""
        reasons = Counter(self._totals["reasons"])
        for s in self._live.values():
            reasons.update(s["reasons"])
        return {"seen": self._totals["seen"] + sum(s["seen"] for s in self._live.values()),
                "corrupt": self._totals["corrupt"] + sum(s["corrupt"] for s in self._live.values()),
                "reasons": dict(reasons)}

    def _report(self, final: bool = False) -> None:
        s = self.stats
        if s["corrupt"] and (final or s["corrupt"] >= 2 * self._warned_at):
            self._warned_at = max(s["corrupt"], 1)
            log.warning("skipped %d corrupt samples of %d read (epoch %d): %s",
                        s["corrupt"], s["seen"], self.epoch, s["reasons"])

    # ----------------------------------------------------------------------------------- state
    def state_dict(self) -> dict:
        rank, world = self.rank_world
        s = self.stats
        return {"epoch": self.epoch, "done": dict(self.done), "finished": self.finished,
                "num_workers": self.num_workers, "world_size": world, "rank": rank,
                "seen": s["seen"], "corrupt": s["corrupt"], "reasons": s["reasons"]}

    def load_state_dict(self, state: dict) -> None:
        self._totals = {"seen": state["seen"], "corrupt": state["corrupt"], "reasons": Counter(state["reasons"])}
        self._live = {}
        self.epoch, self.finished = state["epoch"], state["finished"]
        self.done = {int(k): v for k, v in state["done"].items()}
        same = (state["num_workers"], state["rank"], state["world_size"]) == (self.num_workers, *self.rank_world)
        if not same and self.done:
            warnings.warn("data loader resumed with other workers/ranks than it was saved with: "
                          "starting the next epoch instead of continuing this one", stacklevel=2)
            self.done, self.finished = {}, True


class KontextDataModule(L.LightningDataModule):
    """Training data from Kontext shards (see `kontext.data.format`); fields mirror the config."""

    def __init__(self, shards: str | list[str], val_shards: str | list[str] | None = None,
                 batch_size: int = 8, num_workers: int = 2, mode: str = "resampled",
                 epoch_samples: int = 10_000, bucket_area: int = 64 * 64, max_aspect: float = 4.0,
                 reference_size: str = "strict", reference_area: int | None = None, t2i_fraction: float = 0.0,
                 instruction_dropout: float = 0.0, shuffle_buffer: int = 1000, seed: int = 0,
                 payload: str = "image", empty_prompt: str | None = None,
                 max_bad_fraction: float = 0.5, max_consecutive_bad: int = 100, max_pixels: int | None = MAX_PIXELS,
                 pin_memory: bool = False,
                 rank: int | None = None, world_size: int | None = None):
        super().__init__()
        # Plain lists, not Hydra's ListConfig: the hyperparameters go into every checkpoint,
        # which is read weights-only.
        shards, val_shards = plain(shards), plain(val_shards)
        self.save_hyperparameters()
        self.train_cfg = StreamConfig(
            batch_size=batch_size, mode=mode, max_area=bucket_area, max_aspect=max_aspect,
            reference_size=reference_size, reference_area=reference_area, t2i_fraction=t2i_fraction,
            instruction_dropout=instruction_dropout,
            shuffle_buffer=shuffle_buffer, payload=payload, seed=seed, max_bad_fraction=max_bad_fraction,
            max_consecutive_bad=max_consecutive_bad, max_pixels=max_pixels)
        self.val_cfg = StreamConfig(
            batch_size=batch_size, mode="exact", max_area=bucket_area, max_aspect=max_aspect,
            reference_size=reference_size, reference_area=reference_area, shuffle_shards=False, shuffle_buffer=0,
            payload=payload,
            seed=seed, max_bad_fraction=max_bad_fraction, max_consecutive_bad=max_consecutive_bad,
            max_pixels=max_pixels)
        self.train_loader: KontextLoader | None = None

    def _rank_world(self) -> tuple[int | None, int | None]:
        hp = self.hparams
        if hp.rank is not None or hp.world_size is not None or self.trainer is None:
            return hp.rank, hp.world_size
        # The data-parallel rank (tensor-parallel peers must see the same data).
        kw = getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}
        return kw.get("rank", self.trainer.global_rank), kw.get("num_replicas", self.trainer.world_size)

    def _empty_prompt(self) -> dict | None:
        path = self.hparams.empty_prompt
        if path is None:
            return None
        from safetensors.torch import load_file

        return load_file(path)

    def _loader(self, shards, cfg: StreamConfig) -> KontextLoader:
        rank, world = self._rank_world()
        hp = self.hparams
        return KontextLoader(shards, cfg, num_workers=hp.num_workers, rank=rank, world_size=world,
                             epoch_samples=hp.epoch_samples, empty_prompt=self._empty_prompt(),
                             pin_memory=hp.pin_memory)

    def train_dataloader(self) -> KontextLoader:
        self.train_loader = self._loader(self.hparams.shards, self.train_cfg)
        return self.train_loader

    def val_dataloader(self) -> KontextLoader | list:
        return [] if self.hparams.val_shards is None else self._loader(self.hparams.val_shards, self.val_cfg)

    def stats(self) -> dict:
        """Corrupt-sample counts of the training loader on this rank (for logging)."""
        return self.train_loader.stats if self.train_loader is not None else {"seen": 0, "corrupt": 0, "reasons": {}}


def batch_shapes(batch: dict) -> dict[str, Any]:
    """Shapes of a batch's tensors (for logs and tests)."""
    return {k: (tuple(v.shape) if isinstance(v, torch.Tensor) else [tuple(t.shape) for t in v])
            for k, v in batch.items() if isinstance(v, torch.Tensor) or (isinstance(v, list) and v
                                                                     and isinstance(v[0], torch.Tensor))}
