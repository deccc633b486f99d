"""An endless, deterministic stream of rendered Shapes-Edit scenes, for autoencoder training.

Image i of a stream is a pure function of (split, seed, i): its scene is drawn from the
Shapes-Edit case RNG under its own stream name, so it never repeats a case's random stream, and
the "val" split is a namespace that the "train" split never draws from. Batches are generated
whole (batch k holds images k*B ... k*B + B - 1), so the stream is the same for any number of
loader workers and a resumed run continues at the batch where it stopped.
"""

from __future__ import annotations

import json

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kontext.data import shapes_edit as se

STREAM = "autoencoder"


def scene_at(split: str, seed: int, index: int) -> se.Scene:
    return se.random_scene(se.case_rng(split, seed, index, stream=STREAM))


def to_tensor(img) -> Tensor:
    """A PIL RGB image -> float (3, H, W) in [-1, 1] (the reference's x / 127.5 - 1)."""
    return torch.from_numpy(np.asarray(img, dtype=np.float32)).permute(2, 0, 1) / 127.5 - 1.0


def render_batch(split: str, seed: int, start: int, n: int, size: int = se.DEFAULT_SIZE) -> dict:
    """Images start ... start + n - 1 of a stream, as an image-mode batch without references:
    `target` (n, 3, S, S) in [-1, 1], `references` [], `key` (the scenes, as JSON)."""
    scenes = [scene_at(split, seed, i) for i in range(start, start + n)]
    target = torch.stack([to_tensor(se.render(s, size)) for s in scenes])
    return {"target": target, "references": [], "key": [json.dumps(s.to_dict(), sort_keys=True) for s in scenes]}


class RenderedScenes(IterableDataset):
    """Batches of rendered scenes, from `start_batch` on (endless unless `num_batches`)."""

    def __init__(self, split: str = "train", seed: int = 0, size: int = se.DEFAULT_SIZE, batch_size: int = 32,
                 start_batch: int = 0, num_batches: int | None = None):
        se.check_size(size)
        self.split, self.seed, self.size, self.batch_size = split, seed, size, batch_size
        self.start_batch, self.num_batches = start_batch, num_batches

    def __iter__(self):
        info = get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        k = self.start_batch + worker
        while self.num_batches is None or k < self.start_batch + self.num_batches:
            yield render_batch(self.split, self.seed, k * self.batch_size, self.batch_size, self.size)
            k += workers


class RenderedDataModule(L.LightningDataModule):
    """Training stream (split "train", `seed`) and a fixed held-out set (split "val", `val_seed`)."""

    def __init__(self, batch_size: int = 32, size: int = se.DEFAULT_SIZE, seed: int = 0, val_seed: int = 1,
                 val_samples: int = 256, num_workers: int = 0):
        super().__init__()
        self.batch_size, self.size, self.seed = batch_size, size, seed
        self.val_seed, self.val_samples, self.num_workers = val_seed, val_samples, num_workers

    def train_dataloader(self) -> DataLoader:
        # One batch per optimizer step: continuing at global_step resumes the exact stream.
        start = self.trainer.global_step if self.trainer is not None else 0
        data = RenderedScenes("train", self.seed, self.size, self.batch_size, start_batch=start)
        return DataLoader(data, batch_size=None, num_workers=self.num_workers,
                          persistent_workers=self.num_workers > 0)

    def val_dataloader(self) -> DataLoader:
        n = -(-self.val_samples // self.batch_size)
        data = RenderedScenes("val", self.val_seed, self.size, self.batch_size, num_batches=n)
        return DataLoader(data, batch_size=None)

    def batches(self, split: str, num_samples: int, seed: int | None = None):
        """Batches of the first `num_samples` images of a stream (the training seed by default)."""
        seed = self.seed if seed is None else seed
        for start in range(0, num_samples, self.batch_size):
            yield render_batch(split, seed, start, min(self.batch_size, num_samples - start), self.size)

    def train_keys(self, num_samples: int) -> set[str]:
        """The scenes of the first `num_samples` training images (to exclude them from evaluation)."""
        return {json.dumps(scene_at("train", self.seed, i).to_dict(), sort_keys=True) for i in range(num_samples)}
