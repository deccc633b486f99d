"""Autoencoder training: the rendered-scene stream, the loss pieces, and the stage run through the
real Hydra config and `kontext.run` (tiny sizes, a few steps)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir

from kontext.data import shapes_edit as se
from kontext.data.rendered import RenderedDataModule, RenderedScenes, render_batch
from kontext.formats.weights import read_metadata
from kontext.latent import autoencoder_loss as losses
from kontext.latent.autoencoder import AutoEncoderParams, load_autoencoder
from kontext.stages.autoencoder import AutoEncoderStage, resolve_palette

ROOT = Path(__file__).resolve().parents[1]
PALETTE = resolve_palette("shapes_edit")


def tiny_params() -> AutoEncoderParams:
    return AutoEncoderParams(resolution=32, in_channels=3, ch=32, out_ch=3, ch_mult=[1, 1], num_res_blocks=1,
                             z_channels=4, scale_factor=1.0, shift_factor=0.0)


def test_stream_is_deterministic_resumable_and_split():
    a = list(RenderedScenes("train", seed=0, size=32, batch_size=4, num_batches=3))
    b = list(RenderedScenes("train", seed=0, size=32, batch_size=4, start_batch=2, num_batches=1))
    assert torch.equal(a[2]["target"], b[0]["target"]) and a[2]["key"] == b[0]["key"]
    assert a[0]["target"].shape == (4, 3, 32, 32) and a[0]["target"].min() >= -1 and a[0]["target"].max() <= 1
    one = render_batch("train", 0, 5, 1, 32)
    assert torch.equal(one["target"][0], a[1]["target"][1])
    val = render_batch("val", 0, 0, 12, 32)
    assert val["key"] != [k for batch in a for k in batch["key"]]
    # The image is exactly the spec's rendering of the scene named by the key.
    scene = se.Scene.from_dict(json.loads(one["key"][0]))
    pixels = np.asarray(se.render(scene, 32), dtype=np.float32) / 127.5 - 1
    assert torch.equal(one["target"][0], torch.from_numpy(pixels).permute(2, 0, 1))


def test_class_map_matches_the_spec_scorer():
    g = torch.Generator().manual_seed(0)
    x = render_batch("val", 3, 0, 4, 32)["target"]
    noisy = (x + 0.4 * torch.randn(x.shape, generator=g)).clamp(-1, 1)
    ours = losses.class_map(noisy, losses.palette_tensor(PALETTE, noisy))
    levels = losses.quantize(noisy).byte().permute(0, 2, 3, 1).numpy()
    spec = np.stack([se.class_map(img, 32) for img in levels])
    assert np.array_equal(ours.numpy(), spec)


def test_palette_loss_and_weights():
    x = render_batch("val", 3, 0, 2, 32)["target"]
    palette = losses.palette_tensor(PALETTE, x)
    classes = losses.class_map(x, palette)
    assert losses.palette_loss(x, classes, palette, tau=0.05) < 1e-3
    assert losses.palette_loss(x.flip(-1), classes, palette, tau=0.05) > 1.0
    w = losses.foreground_weight(classes, fg_weight=4.0)
    background = (classes == classes[:, :1, :1]).unsqueeze(1)  # the corner is never covered by a shape
    assert torch.all(w[background] == 1) and torch.all(w[~background] == 5)
    assert w.shape == (2, 1, 32, 32)


def test_generator_term_does_not_train_the_discriminator():
    stage = AutoEncoderStage(tiny_params(), discriminator={"start": 0, "channels": 32, "layers": 1},
                             loss={"palette": "shapes_edit", "palette_weight": 1.0})
    batch = render_batch("train", 0, 0, 4, 32)
    torch.manual_seed(7)
    stage.training_step(batch, 0).backward()
    joint = {k: p.grad.clone() for k, p in stage.disc.named_parameters()}
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stage.ae.parameters())
    stage.zero_grad()
    torch.manual_seed(7)
    x = batch["target"]
    x_rec = stage.ae.decoder(stage.ae.posterior(x).sample())
    losses.patch_d_loss(stage.disc(x), stage.disc(x_rec.detach())).backward()
    for k, p in stage.disc.named_parameters():
        torch.testing.assert_close(joint[k], p.grad, msg=k)


def test_stage_trains_and_writes_the_file_with_scale_and_shift(tmp_path):
    from kontext.run import register_resolvers, run

    register_resolvers()
    export = tmp_path / "exported.safetensors"
    overrides = [
        "experiment=embedded_autoencoder", f"paths.output_dir={tmp_path}", "logger=csv", "resume=null",
        "trainer.max_steps=2", "trainer.precision=32-true", "data.batch_size=4", "data.size=32", "data.val_samples=4",
        "stage.finish.scale_samples=8", "stage.finish.eval_samples=8", f"stage.finish.export_path={export}",
        "trainer.val_check_interval=2",
    ]
    with initialize_config_dir(str(ROOT / "configs"), version_base="1.3"):
        cfg = compose("train", overrides=overrides)
    metrics = run(cfg)
    ae = load_autoencoder(export)
    assert ae.current_params().ch_mult == list(cfg.autoencoder.ch_mult)
    meta = read_metadata(export)
    stored = json.loads(meta["metrics"])
    assert stored == metrics and 0 <= stored["class_agreement"] <= 1
    assert stored["steps"] == 2 and stored["train_images"] == 8 and stored["eval_split"] == "val"
    assert meta["command"].startswith("python train.py")
    assert (tmp_path / "autoencoder.safetensors").is_file() and (tmp_path / "reconstructions.png").is_file()
    # shift = mean and scale = 1 / std of the latents of the scale samples: those latents standardise.
    dm = RenderedDataModule(batch_size=4, size=32, seed=cfg.seed)
    z = torch.cat([ae.encode(b["target"]) for b in dm.batches("train", 8)])
    assert abs(float(z.mean())) < 1e-4 and abs(float(z.std(correction=0)) - 1) < 1e-4


class TripletData:
    """A stand-in for an image-mode triplet datamodule without val data (no `batches`)."""

    batch_size = 2

    def train_dataloader(self):
        while True:
            b = render_batch("train", 5, 0, 2, 32)
            yield {"target": b["target"], "references": [b["target"].flip(-1)], "instruction": ["", ""]}

    def val_dataloader(self):
        return []


def test_finish_with_another_datamodule_uses_its_loaders(tmp_path):
    stage = AutoEncoderStage(tiny_params(), loss={"palette": "shapes_edit"},
                             finish={"scale_samples": 8, "eval_samples": 6, "export_path": str(tmp_path / "ae.safetensors")})
    metrics = stage.finish(tmp_path, datamodule=TripletData(), timings={"train": 1.0})
    assert metrics["eval_split"] == "train" and metrics["images"] == 8  # two batches of 2 targets + 2 references
    assert metrics["unseen_images"] == 8 and metrics["train_images"] == 0
    ae = load_autoencoder(tmp_path / "ae.safetensors")
    z = ae.encode(next(TripletData().train_dataloader())["target"])
    assert z.shape == (2, 4, 16, 16)
    assert ae.shift_factor == metrics["shift_factor"] and ae.scale_factor == metrics["scale_factor"]
