"""The autoencoder training stage: wires :mod:`kontext.latent.autoencoder` to :mod:`kontext.latent.autoencoder_loss`.

Loss (options under `loss` and `discriminator`):
     reconstruction (L1 or L2, plus l2_weight * L2; pixels optionally weighted toward the
       foreground and the edges between palette classes)
   + kl_weight * KL(posterior || N(0, I)) per image element
   + palette_weight * palette cross-entropy (images drawn from a fixed palette only)
   + discriminator.weight * hinge generator loss once step >= discriminator.start (the
     discriminator trains on its own hinge loss in the same step; see `training_step`).
The decoder sees posterior samples during training; validation and export use the mean.
`finish` measures the latents' mean and std to choose shift_factor = mean, scale_factor = 1/std
(as the reference's constants were chosen), evaluates on held-out images and writes the file.
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import numpy as np
import torch
from PIL import Image
from torch import Tensor

from kontext.config_check import options, plain
from kontext.errors import KontextError
from kontext.latent import autoencoder_loss as losses
from kontext.latent.autoencoder import AutoEncoder, AutoEncoderParams, save_autoencoder


def resolve_palette(palette) -> list[list[int]] | None:
    """None, "shapes_edit" (the Shapes-Edit palette) or explicit sRGB triples."""
    if palette is None:
        return None
    if isinstance(palette, str):
        if palette != "shapes_edit":
            raise ValueError(f"unknown palette {palette!r}: use 'shapes_edit' or a list of RGB triples")
        from kontext.data import shapes_edit as se

        return [list(se.PALETTE[name]) for name in se.PALETTE_NAMES]
    return [[int(c) for c in rgb] for rgb in palette]


@dataclass
class Optimizer:
    """AdamW with a linear warm-up, then a cosine to `min_lr_ratio` of `lr`."""

    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    min_lr_ratio: float = 0.05

    def __post_init__(self):
        self.betas = tuple(self.betas)


@dataclass
class Loss:
    """Reconstruction (`rec`: l1 | l2, plus `l2_weight` of l2), KL, and with a `palette` a palette
    term and foreground / edge weighting of the pixels."""

    rec: str = "l1"
    l2_weight: float = 0.0
    kl_weight: float = 1e-6
    palette: str | list | None = None
    palette_weight: float = 0.0
    palette_tau: float = 0.1
    fg_weight: float = 0.0
    edge_weight: float = 0.0

    def __post_init__(self):
        if (self.palette_weight or self.fg_weight or self.edge_weight) and self.palette is None:
            raise KontextError("loss.palette_weight, fg_weight and edge_weight need loss.palette")


@dataclass
class PatchGAN:
    """A patch discriminator from step `start` (None: none), its term weighted by `weight`."""

    start: int | None = None
    weight: float = 0.1
    lr: float | None = None  # None: the autoencoder's
    channels: int = 64
    layers: int = 2


@dataclass
class Finish:
    """After training: the latent scale from `scale_samples` images, the held-out evaluation on
    `eval_samples` (seed `eval_seed`), and a copy of the weights at `export_path`."""

    scale_samples: int = 2048
    eval_samples: int = 4096
    eval_seed: int = 2
    export_path: str | None = None


# Defaults written once (configs/stage/autoencoder.yaml mirrors them).
OPTIMIZER = Optimizer()
LOSS = Loss()
DISCRIMINATOR = PatchGAN()
FINISH = Finish()


class AutoEncoderStage(L.LightningModule):
    def __init__(
        self,
        autoencoder: AutoEncoderParams,
        optimizer: Optimizer | dict | None = None,
        loss: Loss | dict | None = None,
        discriminator: PatchGAN | dict | None = None,
        finish: Finish | dict | None = None,
    ):
        super().__init__()
        # Plain dicts: a checkpoint's hyperparameters must load weights-only (kontext.formats.checkpoint).
        optimizer, loss, discriminator, finish = (plain(c) for c in (optimizer, loss, discriminator, finish))
        self.save_hyperparameters()
        self.ae = AutoEncoder(autoencoder)
        self.optim_cfg = options(OPTIMIZER, optimizer, "optimizer")
        self.loss_cfg = options(LOSS, loss, "loss")
        self.disc_cfg = options(DISCRIMINATOR, discriminator, "discriminator")
        self.finish_cfg = options(FINISH, finish, "finish")
        self.palette = resolve_palette(self.loss_cfg.palette)
        d = self.disc_cfg
        self.disc = losses.PatchDiscriminator(autoencoder.out_ch, d.channels, d.layers) if d.start is not None else None
        self.register_buffer("train_images", torch.zeros((), dtype=torch.long))  # in checkpoints
        self.last_batch_size = 0
        self._val: dict[str, list] = {}

    # ------------------------------------------------------------------------------ training
    @staticmethod
    def images(batch: dict) -> Tensor:
        """Every image of an image-mode batch: the targets, then the references (if any)."""
        return torch.cat([batch["target"], *batch.get("references", [])])

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        h, d = self.loss_cfg, self.disc_cfg
        x = self.images(batch)  # (B, 3, H, W) in [-1, 1]
        self.last_batch_size = x.shape[0]
        self.train_images += x.shape[0]
        post = self.ae.posterior(x)
        x_rec = self.ae.decoder(post.sample()).float()  # losses in fp32 under autocast too

        weight = classes = None
        if self.palette is not None:
            palette = losses.palette_tensor(self.palette, x)
            classes = losses.class_map(x, palette)
            if h.fg_weight or h.edge_weight:
                weight = losses.foreground_weight(classes, h.fg_weight, h.edge_weight)
        # KL per image element: kl_weight means what it means with per-image summed losses (LDM's 1e-6).
        logs = {"rec": losses.reconstruction_loss(x_rec, x, h.rec, weight), "kl": post.kl().mean() / x[0].numel()}
        loss = logs["rec"] + h.kl_weight * logs["kl"]
        if h.l2_weight:
            logs["l2"] = losses.reconstruction_loss(x_rec, x, "l2", weight)
            loss = loss + h.l2_weight * logs["l2"]
        if h.palette_weight:
            logs["palette"] = losses.palette_loss(x_rec, classes, palette, h.palette_tau, weight)
            loss = loss + h.palette_weight * logs["palette"]
        if self.disc is not None and self.global_step >= d.start:
            # Generator term: gradients reach the autoencoder only (discriminator frozen while
            # recorded); discriminator term: on a detached reconstruction. One backward serves both.
            self.disc.requires_grad_(False)
            logs["g"] = losses.patch_g_loss(self.disc(x_rec))
            self.disc.requires_grad_(True)
            logs["d"] = losses.patch_d_loss(self.disc(x), self.disc(x_rec.detach()))
            loss = loss + d.weight * logs["g"] + logs["d"]
        with torch.no_grad():
            logs["psnr"] = losses.psnr(x_rec, x).mean()
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, prog_bar=False)
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self):
        h = self.optim_cfg
        groups = [{"params": list(self.ae.parameters()), "lr": h.lr}]
        if self.disc is not None:
            groups.append({"params": list(self.disc.parameters()), "lr": self.disc_cfg.lr or h.lr})
        opt = torch.optim.AdamW(groups, betas=tuple(h.betas), weight_decay=h.weight_decay)
        total = max(int(self.trainer.max_steps), 1) if self.trainer.max_steps > 0 else None

        def factor(step: int) -> float:  # linear warm-up, then cosine to min_lr_ratio
            warmup, floor = h.warmup_steps, h.min_lr_ratio
            if step < warmup:
                return (step + 1) / warmup
            if total is None:
                return 1.0
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # ---------------------------------------------------------------------------- evaluation
    @torch.no_grad()
    def reconstruct(self, x: Tensor) -> Tensor:
        return self.ae.decode(self.ae.encode(x))

    @torch.no_grad()
    def measure(self, x: Tensor, x_rec: Tensor) -> dict[str, Tensor]:
        """Per-image PSNR and, with a palette, per-image counts of agreeing class-map pixels."""
        out = {"psnr": losses.psnr(x_rec, x)}
        if self.palette is not None:
            palette = losses.palette_tensor(self.palette, x)
            same = losses.class_map(x_rec, palette) == losses.class_map(x, palette)
            out["agree"] = same.flatten(1).sum(dim=1)
            out["pixels"] = torch.full_like(out["agree"], same[0].numel())
        return out

    def on_validation_epoch_start(self) -> None:
        self._val = {}

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        x = self.images(batch)
        x_rec = self.reconstruct(x)
        for k, v in self.measure(x, x_rec).items():
            self._val.setdefault(k, []).append(v)
        if batch_idx == 0:
            self._log_images(x[:8], x_rec[:8])

    def on_validation_epoch_end(self) -> None:
        m = {k: torch.cat(v) for k, v in self._val.items()}
        if not m:
            return
        self.log("val/psnr", m["psnr"].mean())
        if "agree" in m:
            self.log("val/class_agreement", m["agree"].sum() / m["pixels"].sum(), prog_bar=True)

    def _log_images(self, x: Tensor, x_rec: Tensor) -> None:
        for logger in self.loggers:
            if hasattr(logger, "log_image"):
                logger.log_image("val/reconstructions", [image_grid(x, x_rec)], step=self.global_step)

    # ------------------------------------------------------------------------------- export
    @torch.no_grad()
    def latent_stats(self, batches) -> tuple[float, float]:
        """Mean and std over all elements of the posterior means of `batches` (raw latents)."""
        n, s, s2 = 0, 0.0, 0.0
        for batch in batches:
            mean = self.ae.posterior(self.images(batch).to(self.device)).mean.double()
            n, s, s2 = n + mean.numel(), s + mean.sum().item(), s2 + (mean**2).sum().item()
        mu = s / n
        return mu, math.sqrt(max(s2 / n - mu * mu, 1e-12))

    @torch.no_grad()
    def evaluate(self, batches, exclude: set[str] | None = None) -> dict:
        """PSNR and class agreement over `batches`; with `exclude`, also over the images whose
        key is not in it (scenes the training stream never showed)."""
        per: dict[str, list] = {}
        for batch in batches:
            x = self.images(batch).to(self.device)
            m = self.measure(x, self.reconstruct(x))
            keys = batch.get("key", [])
            if exclude is not None and len(keys) == x.shape[0]:
                m["unseen"] = torch.tensor([k not in exclude for k in keys])
            else:  # no key per image: count every image as unseen
                m["unseen"] = torch.ones(x.shape[0], dtype=torch.bool)
            for k, v in m.items():
                per.setdefault(k, []).append(v.cpu())
        m = {k: torch.cat(v) for k, v in per.items()}
        out = {"images": int(m["psnr"].numel()), "psnr": float(m["psnr"].mean())}
        if "agree" in m:
            frac = m["agree"].double() / m["pixels"].double()
            unseen = m["unseen"]
            out |= {
                "class_agreement": float(m["agree"].sum() / m["pixels"].sum()),
                "class_agreement_min_image": float(frac.min()),
                "images_exact": float((frac == 1).double().mean()),
                "unseen_images": int(unseen.sum()),
                "class_agreement_unseen": float(m["agree"][unseen].sum() / m["pixels"][unseen].sum())
                if unseen.any() else None,
            }
        return out

    def _first(self, loader, num_images: int):
        """The first batches of `loader` that hold `num_images` images."""
        seen = 0
        for batch in loader:
            yield batch
            seen += self.images(batch).shape[0]
            if seen >= num_images:
                return

    def finish(self, run_dir, datamodule=None, timings: dict | None = None) -> dict:
        """Choose scale/shift from data latents, evaluate on held-out images, write the file.

        With the rendered Shapes-Edit stream, statistics come from the training stream and the
        evaluation from the "val" split at `eval_seed`; with another datamodule, from its train
        and val loaders (its train loader when it has no val data: `eval_split` says which)."""
        h, run_dir = self.finish_cfg, Path(run_dir)
        self.ae.eval()
        start = time.perf_counter()
        rendered = hasattr(datamodule, "batches")
        stats = (datamodule.batches("train", h.scale_samples) if rendered
                 else self._first(datamodule.train_dataloader(), h.scale_samples))
        mu, std = self.latent_stats(stats)
        self.ae.scale_factor, self.ae.shift_factor = 1.0 / std, mu
        seen, split = None, "val"
        if rendered:
            seen = datamodule.train_keys(self.global_step * datamodule.batch_size)
        else:
            loader = datamodule.val_dataloader()
            if loader is None or (isinstance(loader, list | tuple) and not loader):
                loader, split = datamodule.train_dataloader(), "train"

        def held_out(n: int):
            return datamodule.batches("val", n, seed=h.eval_seed) if rendered else self._first(loader, n)

        metrics = self.evaluate(held_out(h.eval_samples), exclude=seen)
        metrics |= {"eval_split": split, "scale_factor": self.ae.scale_factor, "shift_factor": self.ae.shift_factor,
                    "steps": int(self.global_step), "train_images": int(self.train_images),
                    "train_time_s": round((timings or {}).get("train", float("nan")), 1),
                    "eval_time_s": round(time.perf_counter() - start, 1), "torch_threads": torch.get_num_threads()}
        x = self.images(next(iter(held_out(8))))[:16].to(self.device)
        image_grid(x, self.reconstruct(x)).save(run_dir / "reconstructions.png")
        meta = {"metrics": metrics, "command": launch_command(), "torch": torch.__version__}
        paths = [save_autoencoder(self.ae, run_dir / "autoencoder.safetensors", meta)]
        if h.export_path:
            paths.append(save_autoencoder(self.ae, h.export_path, meta))
        (run_dir / "autoencoder_metrics.json").write_text(json.dumps(metrics, indent=2))
        print("autoencoder:", json.dumps(metrics), "->", ", ".join(map(str, paths)))
        return metrics


def launch_command() -> str:
    """The `train.py` command line of this run (its Hydra overrides when launched by Hydra)."""
    from hydra.core.hydra_config import HydraConfig

    args = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else sys.argv[1:]
    return " ".join(["python train.py", *args])


def image_grid(x: Tensor, x_rec: Tensor) -> Image.Image:
    """Inputs on the top row, reconstructions below, as one 8-bit RGB image."""
    rows = [torch.cat(list(t), dim=2) for t in (x, x_rec)]  # (3, H, N*W) each
    grid = losses.quantize(torch.cat(rows, dim=1)).byte().permute(1, 2, 0).cpu().numpy()
    return Image.fromarray(np.ascontiguousarray(grid))
