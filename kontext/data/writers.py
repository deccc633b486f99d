"""Writing Kontext shards: an all-or-nothing shard writer and the Shapes-Edit writer.

`ShardWriter` wraps webdataset's `TarWriter`. A sample is fully encoded and checked before its
first byte is written, and each shard is written under a temporary name and renamed when it is
complete, so readers never see a half sample or a half shard.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path

import webdataset as wds

from kontext.data import shapes_edit
from kontext.data.format import Sample, encode_image, to_record

log = logging.getLogger(__name__)


class ShardWriter:
    """Writes Samples to `pattern % shard_index` tars, at most `maxcount` samples or about
    `maxsize` bytes each. Use as a context manager; `shards` lists the finished files."""

    def __init__(self, pattern: str, maxcount: int = 1000, maxsize: float = 1e9, start_shard: int = 0,
                 verify: bool = True):
        if "%" not in pattern:
            raise ValueError(f"shard pattern needs a %-format for the shard index, e.g. 'out-%06d.tar': {pattern!r}")
        self.pattern, self.maxcount, self.maxsize, self.verify = pattern, maxcount, maxsize, verify
        self.index = start_shard
        self.shards: list[str] = []
        self.count = 0  # samples written, over all shards
        self._tar: wds.TarWriter | None = None
        self._tmp = self._path = ""
        self._n = self._size = 0
        self._keys: set[str] = set()

    def _open(self) -> None:
        self._path = self.pattern % self.index
        self.index += 1
        Path(self._path).parent.mkdir(parents=True, exist_ok=True)
        self._tmp = self._path + ".tmp"
        # A fixed mtime gives reproducible bytes; an integer one keeps members plain ustar (a float
        # adds a PAX header to each, which makes reading 1.8x slower).
        self._tar = wds.TarWriter(self._tmp, mtime=0)
        self._n = self._size = 0

    def _finish(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        self._tar = None
        os.replace(self._tmp, self._path)
        self.shards.append(self._path)
        log.info("wrote %s (%d samples)", self._path, self._n)

    def write(self, sample: Sample) -> None:
        if sample.key in self._keys:
            raise ValueError(f"duplicate key {sample.key!r}")
        record = to_record(sample, verify=self.verify)  # raises before anything is written
        if self._tar is None or self._n >= self.maxcount or self._size >= self.maxsize:
            self._finish()
            self._open()
        try:
            self._size += self._tar.write(record)
        except BaseException:
            # The shard may now end in half a sample: drop it rather than publish it.
            self._tar.close()
            self._tar = None
            os.remove(self._tmp)
            raise
        self._keys.add(sample.key)
        self._n += 1
        self.count += 1

    def close(self) -> list[str]:
        self._finish()
        return self.shards

    def __enter__(self) -> ShardWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def shapes_edit_sample(case: shapes_edit.Case) -> Sample:
    meta = {"task": case.op, "source": "shapes_edit", "size": [case.size, case.size], "split": case.split,
            "seed": case.seed, "index": case.index, "target_scene": case.target_scene.to_dict()}
    refs = []
    if case.reference is not None:
        refs = [encode_image(case.reference)]
        meta["reference_scene"] = case.reference_scene.to_dict()
    return Sample(case.key, case.instruction, encode_image(case.target), refs, meta)


def write_shapes_edit(out_dir: str | os.PathLike, n: int, *, seed: int = 0, split: str = "train",
                      size: int = shapes_edit.DEFAULT_SIZE, mix: str | Mapping[str, float] | None = None,
                      shard_size: int = 1000, start: int = 0, paraphrase: bool = False,
                      prefix: str = "shapes") -> list[str]:
    """Write cases `start .. start+n-1` of (split, seed) as PNG shards; returns the shard paths."""
    pattern = str(Path(out_dir) / f"{prefix}-{split}-{seed}-%06d.tar")
    # PNG encoding of our own renders cannot fail, so the decode check is skipped.
    with ShardWriter(pattern, maxcount=shard_size, verify=False) as writer:
        for case in shapes_edit.generate(n, split=split, seed=seed, start=start, size=size, mix=mix,
                                         paraphrase=paraphrase):
            writer.write(shapes_edit_sample(case))
    return writer.shards


def ensure_shapes_edit(out_dir: str | os.PathLike, n: int, *, seed: int = 0, split: str = "train",
                       size: int = shapes_edit.DEFAULT_SIZE, mix: str | Mapping[str, float] | None = None,
                       shard_size: int = 1000, paraphrase: bool = False) -> list[str]:
    """Idempotent `write_shapes_edit` (a `prepare` step): does nothing when `out_dir` already holds
    exactly these shards, marked complete by `_complete.json`; otherwise (re)writes them."""
    out = Path(out_dir)
    params = {"n": n, "seed": seed, "split": split, "size": size, "mix": shapes_edit.parse_mix(mix),
              "shard_size": shard_size, "paraphrase": paraphrase, "spec": "shapes_edit v1"}
    marker = out / "_complete.json"
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("params") == params and all(Path(p).is_file() for p in done["shards"]):
            return done["shards"]
    for old in out.glob(f"shapes-{split}-*.tar"):
        old.unlink()
    marker.unlink(missing_ok=True)
    shards = write_shapes_edit(out, n, seed=seed, split=split, size=size, mix=mix, shard_size=shard_size,
                               paraphrase=paraphrase)
    marker.write_text(json.dumps({"params": params, "shards": shards}, indent=1))
    return shards
