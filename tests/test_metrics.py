"""Training metrics (kontext/stages/metrics.py): the FLOP formula, and its attention part, equal
PyTorch's own count of the transformer's forward, and a run through the real composition logs throughput, FLOPs, gradient
norm, learning rate and peak memory consistent with its batches, and saves a sample grid."""

from __future__ import annotations

import csv

import pytest
import torch
from hydra.utils import instantiate
from test_train import compose_train, random_ae, tiny_overrides  # noqa: F401  (random_ae is a fixture)
from torch.utils.flop_counter import FlopCounterMode

from kontext.network import packing
from kontext.network.model import FLUX_PRESETS, build_flux
from kontext.run import run
from kontext.stages.metrics import attention_flops, batch_tokens, flux_flops


@pytest.mark.parametrize(("preset", "n_img", "n_txt", "n_out"),
                         [("tiny", 32, 7, None), ("small", 48, 32, None), ("tiny", 4, 0, None), ("small", 32, 11, 16),
                          ("tiny", 32, 7, 4)])
def test_flop_formula_matches_pytorch_count(preset, n_img, n_txt, n_out):
    params = FLUX_PRESETS[preset]
    with torch.device("meta"):
        model = build_flux(params)
        b = 2
        args = (torch.zeros(b, n_img, params.in_channels), torch.zeros(b, n_img, 3),
                torch.zeros(b, n_txt, params.context_in_dim), packing.txt_ids(b, n_txt, device="meta"),
                torch.zeros(b), torch.zeros(b, params.vec_in_dim),
                torch.ones(b) if params.guidance_embed else None)
        with FlopCounterMode(display=False) as counter:
            out = model(*args, n_out=n_out)
    assert out.shape[1] == (n_img if n_out is None else n_out)
    assert counter.get_total_flops() == b * flux_flops(params, n_img, n_txt, n_out)
    # On meta, attention runs as batched matmuls (q k^T, then the weights times v): their count alone.
    by_op = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    assert by_op["aten.bmm"] == b * attention_flops(params, n_img, n_txt, n_out)


def test_tokens_of_feature_and_image_batches():
    features = {"target_latent": torch.zeros(3, 16, 8, 6), "reference_latents": [torch.zeros(3, 16, 4, 4)],
                "txt": torch.zeros(3, 11, 384)}
    assert batch_tokens(features) == (3, 4 * 3 + 2 * 2, 11)
    images = {"target": torch.zeros(2, 3, 64, 32), "references": []}
    assert batch_tokens(images, default_txt=32) == (2, 4 * 2, 32)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_run_logs_throughput_flops_memory_and_a_grid(tmp_path, random_ae):  # noqa: F811
    overrides = [*tiny_overrides(tmp_path, random_ae), "trainer.max_steps=4", "trainer.log_every_n_steps=2",
                 "callbacks.metrics.grid_every_n_steps=4", "callbacks.metrics.grid_steps=2",
                 "stage.finish.benchmark.n_per_op=0", "stage.finish.export=false",
                 "data.t2i_fraction=0",  # every batch has one reference: a fixed token count
                 "stage.compact_text=false"]  # and the full text length
    cfg = compose_train(overrides)
    for step in cfg.prepare.values():
        instantiate(step)
    run(cfg)
    run_dir = tmp_path / "run"
    rows = [r for version in sorted((run_dir / "csv").glob("version_*"))
            for r in csv.DictReader(open(version / "metrics.csv")) if r.get("perf/samples_per_s")]
    assert [int(r["step"]) for r in rows] == [2, 4]  # every log_every_n_steps optimizer steps
    tokens = 16 + 16 + 32  # 64x64 target and reference (4x4 tokens each) + text
    params = instantiate(cfg.model)
    for r in rows:
        samples_per_s, tokens_per_s = float(r["perf/samples_per_s"]), float(r["perf/tokens_per_s"])
        assert samples_per_s > 0 and tokens_per_s / samples_per_s == pytest.approx(tokens)
        tflops = float(r["perf/tflops_per_device"]) * 1e12
        # The forwards as run: 32 image and 32 text tokens in, the 16 target tokens predicted.
        assert tflops / samples_per_s == pytest.approx(3 * flux_flops(params, 32, 32, 16))
        assert 0 < float(r["train/grad_norm"]) < float("inf")
        assert float(r["train/lr"]) > 0
        assert 0.01 < float(r["memory/peak_gib"]) < 64
    assert (run_dir / "grids" / "step0000004.png").is_file()
