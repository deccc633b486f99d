"""Step time of the flow model with the text padding compacted (`kontext.network.packing.compact_text`)
against the full padded length, on real Shapes-Edit instructions encoded by the embedded text
encoder, in one process, steps interleaved.

    python benchmarks/text_compaction.py                    # small preset, batch 16, 40 steps
    python benchmarks/text_compaction.py --model tiny --steps 10

Per batch kind (edits: target + reference tokens; text-to-image: target tokens only) it prints
the text rows kept, the median time of a training step (forward, backward, fused AdamW) with
full and with compacted text, their ratio, and the largest difference between the two
outputs (the compaction is exact: float rounding only). The machine may be shared: times are
interleaved medians after two warm-up steps, yet they stay noisy.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def batches(batch: int, text, seed: int = 0) -> dict[str, dict]:
    """One edit batch and one text-to-image batch of real instructions and random latents."""
    import torch

    from kontext.data.shapes_edit import OPS, make_case
    from kontext.diffusion import flow
    from kontext.network import packing

    g = torch.Generator().manual_seed(seed)
    edits = [make_case(OPS[i % 5], split="train", seed=seed, index=i) for i in range(batch)]  # recolor..background
    t2i = [make_case("t2i", split="train", seed=seed, index=batch + i) for i in range(batch)]
    out = {}
    for kind, cases, n_ctx in (("edit", edits, 1), ("t2i", t2i, 0)):
        feats = text.encode([c.instruction for c in cases])
        x = torch.randn(batch, 16, 8, 8, generator=g)
        tokens = packing.prepare(x, [torch.randn(batch, 16, 8, 8, generator=g) for _ in range(n_ctx)])
        out[kind] = {"tokens": tokens, "noise": torch.randn(tokens.img.shape, generator=g),
                     "t": flow.sample_t(batch, 0.5, 1.0, generator=g), "txt": feats.txt, "vec": feats.vec}
    return out


def step(model, opt, b: dict, compact: bool):

    from kontext.diffusion import flow
    from kontext.network import packing

    tokens = b["tokens"]
    guidance = 1.0 if model.params.guidance_embed else None
    pred = packing.predict(model, tokens, flow.interpolate(tokens.img, b["noise"], b["t"]), b["t"], b["txt"],
                           b["vec"], guidance, compact)
    loss = flow.flow_loss(pred, flow.velocity_target(tokens.img, b["noise"]))
    loss.backward()
    opt.step()
    opt.zero_grad(set_to_none=True)
    return pred.detach(), packing.model_text(b["txt"], compact)[0].shape[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="small")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()

    import torch

    from kontext.latent.text import build_text_encoder
    from kontext.network.model import build_flux

    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    model = build_flux(args.model)
    for p in model.parameters():  # leave adaLN-Zero so that every block shapes the output
        p.data.normal_(0, 0.02)
    opt = torch.optim.AdamW(model.parameters(), lr=0.0, fused=True)  # lr 0: the weights stay put
    data = batches(args.batch, build_text_encoder("embedded", max_length=32))

    results = {}
    for kind, b in data.items():
        times = {False: [], True: []}
        for i in range(args.steps + 2):
            for compact in (False, True):
                start = time.perf_counter()
                pred, rows = step(model, opt, b, compact)
                if i >= 2:
                    times[compact].append(time.perf_counter() - start)
        full, short_rows = step(model, opt, b, False)[0], step(model, opt, b, True)[1]
        diff = (full - step(model, opt, b, True)[0]).abs().max().item()
        t_full, t_short = statistics.median(times[False]) * 1e3, statistics.median(times[True]) * 1e3
        results[kind] = {"text_rows": [b["txt"].shape[1], short_rows], "ms_full": round(t_full, 2),
                         "ms_compact": round(t_short, 2), "speedup": round(t_full / t_short, 3),
                         "max_abs_diff": diff}
        print(f"{kind:5s} text rows {b['txt'].shape[1]} -> {short_rows}: step {t_full:.1f} ms full, "
              f"{t_short:.1f} ms compacted ({t_full / t_short:.2f}x); outputs differ by at most {diff:.1e}")
    print(json.dumps({"model": args.model, "batch": args.batch, "steps": args.steps, **results}))


if __name__ == "__main__":
    main()
