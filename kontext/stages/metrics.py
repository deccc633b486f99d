"""What a training run reports besides its loss (to wandb, or any Lightning logger): throughput
in samples/s and tokens/s, model FLOPs and MFU, gradient norm, peak memory, and picture grids
of the EMA model on Shapes-Edit cases.

FLOPs follow the FLUX transformer (FLUX.1 Kontext paper §2; counted like torchtitan's FLUX MFU,
trainable transformer only, encoders excluded). With D the hidden size, r the MLP ratio, and
N = L_txt + L_img tokens (L_img: target and context tokens), a double or single block costs
(4 + 2r) D^2 multiply-adds x 2 per token in its linear layers (qkv 3D^2 + proj D^2 + MLP 2rD^2;
single: linear1 (3 + r) D^2 + linear2 (1 + r) D^2) plus 4 N^2 D for attention scores and values,
plus its modulation once per sample. The last single block computes keys and values for all N
tokens but queries, MLP and output only for the n_out predicted ones (`Flux.forward`), and the
final layer runs on those alone. A training step's forward with gradients counts 3 times
(backward = 2), recomputation under activation checkpointing excluded; the callback counts the
forwards the model actually ran (compacted text included). MFU divides by the accelerator's
dense bf16 peak (`peak_flops`, looked up for known GPUs; unknown devices report TFLOP/s only).
"""

from __future__ import annotations

import contextlib
import os
import secrets
import time
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from kontext.network.model import TIME_EMBED_DIM, FluxParams

PIXELS_PER_TOKEN = 16  # 8x autoencoder downsampling, then 2x2 latent patches
# Dense bf16 peak per device (vendor datasheets, SXM/OAM parts).
PEAK_BF16_FLOPS = {"H100": 989e12, "H200": 989e12, "GH200": 989e12, "B200": 2250e12, "GB200": 2500e12,
                   "A100": 312e12, "L40S": 362e12, "MI300X": 1307e12, "MI250X": 383e12}


def flux_flops(params: FluxParams, n_img: int, n_txt: int, n_out: int | None = None) -> float:
    """Forward FLOPs of the transformer for one sample of `n_img` image tokens (target + context)
    and `n_txt` text tokens, predicting the first `n_out` image tokens (default: all of them)."""
    d, r, n = params.hidden_size, params.mlp_ratio, n_img + n_txt
    n_out = n_img if n_out is None else n_out

    def block(n_q: int) -> float:  # every token gives q, k, v; the MLP and output run on n_q
        return 2 * 3 * d * d * n + 2 * (1 + 2 * r) * d * d * n_q

    double = params.depth * (block(n) + 2 * 2 * d * 6 * d)  # + img_mod and txt_mod
    singles = [block(n)] * (params.depth_single_blocks - 1) + [block(n_out)] * min(params.depth_single_blocks, 1)
    single = sum(singles) + params.depth_single_blocks * 2 * d * 3 * d  # + modulation
    embed = 2 * d * (params.in_channels * n_img + params.context_in_dim * n_txt)
    embed += 2 * (TIME_EMBED_DIM * d + d * d) + 2 * (params.vec_in_dim * d + d * d)
    if params.guidance_embed:
        embed += 2 * (TIME_EMBED_DIM * d + d * d)
    final = 2 * d * 2 * d + 2 * d * params.out_channels * n_out
    return float(double + single + embed + final) + attention_flops(params, n_img, n_txt, n_out)


def attention_flops(params: FluxParams, n_img: int, n_txt: int, n_out: int | None = None) -> float:
    """The part of `flux_flops` in the attention products (q k^T and the weighted sum of v):
    every query of a block against all `n_img + n_txt` keys; the last single block's queries are
    the first `n_out` image tokens only."""
    n = n_img + n_txt
    n_out = n_img if n_out is None else n_out
    last = min(params.depth_single_blocks, 1)
    queries = n * (params.depth + params.depth_single_blocks - last) + n_out * last
    return float(4 * queries * n * params.hidden_size)


def batch_tokens(batch: dict, default_txt: int = 0) -> tuple[int, int, int]:
    """(batch size, image tokens per sample (target + contexts), text tokens per sample)."""
    if "target_latent" in batch:
        target, refs = batch["target_latent"], list(batch.get("reference_latents", []))
        n_img = sum(x.shape[-2] * x.shape[-1] // 4 for x in [target, *refs])
    else:
        target, refs = batch["target"], list(batch.get("references", []))
        n_img = sum(x.shape[-2] * x.shape[-1] // PIXELS_PER_TOKEN**2 for x in [target, *refs])
    n_txt = batch["txt"].shape[1] if "txt" in batch else default_txt
    return target.shape[0], n_img, n_txt


def cpu_name() -> str:
    """The CPU's model name (Linux), or what `platform` knows."""
    import platform

    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor() or platform.machine() or "unknown"


def matmul_peak(dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu", n: int = 2048,
                seconds: float = 1.5) -> float:
    """The best GFLOP/s of an n x n matmul over repeated timings for `seconds`: what this machine
    computes at best, now (a shared host's load moves it, and every step time with it)."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    a @ b
    sync()
    best, deadline = float("inf"), time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        start = time.perf_counter()
        a @ b
        sync()
        best = min(best, time.perf_counter() - start)
    return 2 * n**3 / best / 1e9


def machine_info(device: torch.device | str | None = None, measure_peak: bool = False) -> dict:
    """What ran a job, for reports: CPU, the instruction set PyTorch uses on it, threads, GPU;
    with `measure_peak` on a CPU also its fp32 matmul peak in GFLOP/s, measured now (1 s)."""
    info = {"cpu": cpu_name(), "cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "threads": torch.get_num_threads(), "torch": torch.__version__}
    if device is not None and torch.device(device).type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    elif measure_peak and (device is None or torch.device(device).type == "cpu"):
        info["fp32_matmul_gflops"] = round(matmul_peak(seconds=1.0), 1)
    return info


class Throughput(Callback):
    """Training samples per second of a fit: from the first batch's start to the last one's end
    (compilation, if any, included), counting each stage's `last_batch_size`."""

    def __init__(self):
        self.samples, self.start, self.end = 0, None, None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start is None:
            self.start = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.samples += getattr(pl_module, "last_batch_size", 0)
        self.end = time.perf_counter()

    def summary(self) -> dict:
        seconds = (self.end - self.start) if self.start is not None and self.end is not None else 0.0
        return {"samples": self.samples, "seconds": round(seconds, 2),
                "samples_per_s": round(self.samples / seconds, 2) if seconds > 0 else None}


def peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in sorted(PEAK_BF16_FLOPS.items(), key=lambda kv: -len(kv[0])) if k in name), None)


def peak_memory_bytes(device: torch.device) -> int:
    """Peak allocated accelerator memory, or on CPU the process's peak resident set (VmHWM)."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    try:
        with open("/proc/self/status") as f:
            line = next(x for x in f if x.startswith("VmHWM"))
        return int(line.split()[1]) * 1024
    except (OSError, StopIteration):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def persistent_run_id(run_dir: str | os.PathLike) -> str:
    """The wandb run id of a run directory: made once and kept in `RUN_DIR/wandb_run_id`, so a
    restarted or requeued job continues the same wandb run. Safe when every rank asks at once."""
    path = Path(run_dir) / "wandb_run_id"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
        tmp.write_text(secrets.token_hex(4) + "\n")
        try:
            os.link(tmp, path)  # atomic; fails if another process made it first
        except FileExistsError:
            pass
        finally:
            tmp.unlink()
    return path.read_text().strip()


class TrainMetrics(Callback):
    """Throughput, FLOPs/MFU, gradient norm and peak memory every `log_every_n_steps` of the
    trainer, and a grid of EMA samples every `grid_every_n_steps` (0: never)."""

    def __init__(self, peak_flops: float | None = None, grid_every_n_steps: int = 0,
                 grid_cases_per_op: int = 1, grid_steps: int | None = None):
        self.peak = peak_flops
        self.grid_every = grid_every_n_steps
        self.grid_cases = grid_cases_per_op
        self.grid_steps = grid_steps
        self._window_start: float | None = None
        self._window = {"samples": 0, "tokens": 0, "flops": 0.0}
        self._grad_norm: float | None = None
        self._last_step = -1
        self._hook = None

    def _count_forward(self, params: FluxParams):
        """A forward pre-hook adding the FLOPs of each call of the transformer as it ran: its
        text length after compaction, its predicted rows, x3 when gradients flow."""
        def hook(module, args, kwargs):
            img, txt = args[0] if args else kwargs["img"], args[2] if len(args) > 2 else kwargs["txt"]
            flops = img.shape[0] * flux_flops(params, img.shape[1], txt.shape[1], kwargs.get("n_out"))
            self._window["flops"] += 3 * flops if torch.is_grad_enabled() else flops
        return hook

    def _logging_step(self, trainer, step: int) -> bool:
        return step % max(1, trainer.log_every_n_steps) == 0

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # act after optimizer steps only (and not at a resumed step)
        if isinstance(getattr(pl_module, "params", None), FluxParams) and self._hook is None:
            self._hook = pl_module.model.register_forward_pre_hook(self._count_forward(pl_module.params),
                                                                   with_kwargs=True)

    def on_train_end(self, trainer, pl_module) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self._window_start is None:
            self._window_start = time.perf_counter()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if not self._logging_step(trainer, trainer.global_step + 1):
            return
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            self._grad_norm = float(norm.full_tensor() if hasattr(norm, "full_tensor") else norm)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        world = trainer.world_size
        if isinstance(getattr(pl_module, "params", None), FluxParams):  # a stage training the transformer
            text = getattr(pl_module, "text", None)
            b, n_img, n_txt = batch_tokens(batch, getattr(text, "max_length", 0))
            self._window["tokens"] += b * (n_img + n_txt) * world
        else:  # other stages (the autoencoder's): samples only
            b = next(len(v) for v in batch.values() if isinstance(v, torch.Tensor | list))
        self._window["samples"] += b * world
        step = trainer.global_step
        if step == self._last_step:  # no optimizer step yet: within an accumulation window
            return
        self._last_step = step
        if self._logging_step(trainer, step):
            self._log(trainer, pl_module)
        if self.grid_every and step % self.grid_every == 0 and hasattr(pl_module, "pipeline"):
            self._grid(trainer, pl_module, step)

    def _log(self, trainer, pl_module) -> None:
        elapsed = time.perf_counter() - self._window_start
        metrics = {"perf/samples_per_s": self._window["samples"] / elapsed}
        if self._window["tokens"]:
            metrics["perf/tokens_per_s"] = self._window["tokens"] / elapsed
        if self._window["flops"]:
            per_device = self._window["flops"] / elapsed
            metrics["perf/tflops_per_device"] = per_device / 1e12
            peak = self.peak or peak_flops(pl_module.device)
            if peak:
                metrics["perf/mfu"] = per_device / peak
        memory = torch.tensor([float(peak_memory_bytes(pl_module.device))], device=pl_module.device)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(memory, op=torch.distributed.ReduceOp.MAX)
        metrics["memory/peak_gib"] = memory.item() / 2**30
        if self._grad_norm is not None:
            metrics["train/grad_norm"] = self._grad_norm
        if trainer.optimizers:
            metrics["train/lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        if trainer.is_global_zero:
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)
        self._window_start = time.perf_counter()
        self._window = {"samples": 0, "tokens": 0, "flops": 0.0}
        self._grad_norm = None

    def _grid(self, trainer, pl_module, step: int) -> None:
        """EMA samples of a few Shapes-Edit cases. Every rank samples (a sharded EMA needs all
        of them for each forward); rank 0 saves the grid and hands it to the loggers."""
        from kontext.benchmark import run_benchmark

        with getattr(pl_module, "averaged", contextlib.nullcontext)():  # a LoRA stage swaps its EMA adapters in
            report = run_benchmark(pl_module.pipeline(), n_per_op=self.grid_cases, chains=0, steps=self.grid_steps,
                                   grid_per_op=self.grid_cases)
        if not trainer.is_global_zero:
            return
        path = report.save_grid(Path(trainer.default_root_dir) / "grids" / f"step{step:07d}.png")
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image(key="samples/grid", images=[str(path)], step=step,
                                 caption=[f"step {step}: reference | instruction | EMA output | target"])
            logger.log_metrics({"samples/pass_rate": report.overall["pass_rate"]}, step=step)
