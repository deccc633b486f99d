"""Resident memory of a LoRA run's model with its frozen base in bf16 and quantised (int8 / fp8
weight-only, `adapter.quantize_base`), each in a fresh process, against the memory plan.

    python benchmarks/quantized_base_memory.py                  # a 1.1B model (hidden 2048, 4 + 8 blocks)
    python benchmarks/quantized_base_memory.py --hidden 512     # a small one, in seconds

It writes a random reference-format base file (fp32; 4.5 GB at the default size) into `--dir`,
builds the flow stage on it as `train.py adapter=lora` does (LoRA rank 16 on every block linear,
bf16 compute as under `trainer.precision=bf16-mixed`), and prints per variant the process's
peak anonymous memory while building (sampled; pages of the file read through mmap are not
counted, the kernel can drop them) and its resident memory after building, the bytes of the model's and the EMA's tensors, and what
`kontext.memory_plan` counts for them. Needs torchao (`pip install -e ".[quant]"`).
"""

from __future__ import annotations

import argparse
import gc
import subprocess
import sys
import threading
from pathlib import Path
from types import SimpleNamespace

GIB = 2**30


def params(hidden: int):
    from kontext.network.model import FluxParams

    return FluxParams(in_channels=64, out_channels=64, vec_in_dim=384, context_in_dim=384, hidden_size=hidden,
                      mlp_ratio=4.0, num_heads=hidden // 128, depth=4, depth_single_blocks=8,
                      axes_dim=[16, 56, 56], theta=10000, qkv_bias=True, guidance_embed=False)


def resident(field: str = "VmRSS") -> int:
    """The process's resident memory now (VmRSS), or its anonymous part (RssAnon: not the
    pages of files read through mmap, which the kernel can drop), in bytes."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field))


class PeakAnon(threading.Thread):
    """The largest RssAnon seen, sampled every 5 ms until stopped (the kernel keeps no peak of it)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak, self.done = 0, threading.Event()
        self.start()

    def run(self) -> None:
        while not self.done.wait(0.005):
            self.peak = max(self.peak, resident("RssAnon"))

    def stop(self) -> int:
        self.done.set()
        self.join()
        return self.peak


def nbytes(t) -> int:
    """Stored bytes of a tensor; of torchao's weight tensors, their parts (data, scales)."""
    if hasattr(t, "qdata"):
        return sum(nbytes(getattr(t, name)) for name in t.__tensor_flatten__()[0])
    return t.numel() * t.element_size()


def measure(base: str, hidden: int, kind: str) -> None:
    import torch

    from kontext.memory_plan import frozen_base_bytes, lora_parameters
    from kontext.network.model import build_flux
    from kontext.stages.flow import FlowStage

    p = params(hidden)
    lora = {"rank": 16, "targets": ["double_blocks.*", "single_blocks.*"], "quantize_base": None if kind == "bf16" else kind}
    sampler = PeakAnon()
    stage = FlowStage(p, init_from=base, lora=lora)
    stage._trainer = SimpleNamespace(precision="bf16-mixed", strategy=SimpleNamespace(root_device=torch.device("cpu")))
    stage.configure_model()
    gc.collect()
    peak = sampler.stop()
    held = sum(nbytes(t) for t in (*stage.model.parameters(), *stage.ema.model.parameters()))
    meta = build_flux(p, device="meta")
    planned = frozen_base_bytes(meta, 2, lora["quantize_base"]) + 2 * 4 * lora_parameters(meta, 16)  # + EMA
    n = sum(t.numel() for t in meta.parameters())
    print(f"| {kind} | {n / 1e9:.3f}B | {peak / GIB:.2f} | {resident() / GIB:.2f} | {held / GIB:.3f} | "
          f"{planned / GIB:.3f} |", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--dir", default="outputs/bench/quantized_base")
    parser.add_argument("--kinds", default="bf16,int8,fp8")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    a = parser.parse_args()
    base = Path(a.dir) / f"base_h{a.hidden}.safetensors"
    if a.measure:
        measure(str(base), a.hidden, a.measure)
        return
    import torch

    from kontext.network.model import build_flux, save_flux

    if not base.is_file():
        base.parent.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(0)
        save_flux(build_flux(params(a.hidden)), base)
    print(f"torch {torch.__version__}; LoRA rank 16 on every block linear; bf16 compute; resident memory "
          "after building the stage (libraries included)\n")
    print("| base | parameters | peak anonymous GiB (building) | resident GiB (built) | model + EMA tensors GiB | "
          "memory plan GiB |")
    print("|---|---:|---:|---:|---:|---:|", flush=True)
    for kind in a.kinds.split(","):
        subprocess.run([sys.executable, __file__, "--hidden", str(a.hidden), "--dir", a.dir, "--measure", kind],
                       check=True)


if __name__ == "__main__":
    main()
