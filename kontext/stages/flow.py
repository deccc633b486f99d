"""The rectified-flow training stage (FLUX.1 Kontext paper §3): a LightningModule that wires
the network, the frozen encoders, the objective and the EMA together and owns no math.

One step: target latents x and context latents y_i -> packed tokens with their ids
(`kontext.network.packing`), t from the logit-normal with a mode set by the target token count,
z_t = (1 - t) x + t eps, v = model([z_t | y], ...) sliced to the target tokens, MSE to eps - x
(`kontext.diffusion.flow`). Text-to-image batches carry no context tokens. Batches come either as
images (encoded here by the frozen autoencoder and text encoder) or as cached features.

With `lora` the base (from `init_from`) is frozen and only peft's adapters train
(`kontext.network.lora`): the base is stored in the run's compute dtype, the EMA averages the adapters
alone, and checkpoints hold the adapters, their average and their optimizer state, not the base.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import time
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch import Tensor

from kontext.artifact import load_model, source_rows
from kontext.config_check import options
from kontext.diffusion import flow
from kontext.errors import KontextError
from kontext.formats import slices
from kontext.formats.checkpoint import check_resumable
from kontext.network import packing
from kontext.network.lora import (
    LoraOptions,
    adapted_layers,
    adapters,
    add_adapters,
    checkpoint_adapters_only,
    freeze_base,
    lora_options,
    precision_dtype,
    seeded_rng,
    swapped_in,
    unwrap,
)
from kontext.network.model import Flux, FluxParams, init_like_construction
from kontext.network.quantized import dequantize_base, quantize_base
from kontext.scale import parallel
from kontext.scale.parallel import ParallelConfig
from kontext.stages.ema import EMA, mirror
from kontext.stages.options import AdamWOptions, TimeSampling, Validation
from kontext.stages.schedule import adamw_with_schedule

# The stage's options and their defaults, written once (kontext.stages.options; configs/stage/flow.yaml
# mirrors them, tests/test_train.py checks it): the embedded default's recipe, a small model from scratch.
OPTIMIZER = AdamWOptions()
TIME_SAMPLING = TimeSampling()
VALIDATION = Validation()
EMA_DECAY = 0.995


class FlowStage(L.LightningModule):
    teacher = None  # the distillation stages' frozen teacher (kontext.stages.teacher.Teacher)

    def __init__(
        self,
        model: FluxParams,
        autoencoder: Any = None,
        text: Any = None,
        init_from: str | None = None,
        optimizer: AdamWOptions | dict | None = None,
        ema_decay: float = EMA_DECAY,
        time_sampling: TimeSampling | dict | None = None,
        train_guidance: float = 1.0,
        compact_text: bool = True,
        validation: Validation | dict | None = None,
        finish: dict | None = None,
        parallel: ParallelConfig | None = None,
        lora: LoraOptions | dict | None = None,
    ):
        super().__init__()
        self.params = model
        self.lora_cfg = lora_options(lora)
        self.init_from = init_from
        if self.lora_cfg is not None and not init_from:
            raise KontextError("adapter=lora adapts trained weights: give stage.init_from=<reference-format .safetensors, "
                               "run directory, checkpoint or export> (a fresh model starts as the identity, which "
                               "gives adapters no gradient)")
        self.parallel_cfg = parallel if isinstance(parallel, ParallelConfig) else ParallelConfig(**(parallel or {}))
        # Under FSDP (`parallel.meta_build`) the model and its EMA are built on `meta`; each rank
        # materialises its shards in configure_model and fills only them (`initialise_shards`).
        self.meta_built = self.lora_cfg is None and bool(self.parallel_cfg.meta_build)
        # `init_from`: a reference-format file, or a run directory, checkpoint or export of this
        # codebase (its EMA weights; a LoRA run's merged), read by rows (kontext.formats.slices).
        what = f"stage.init_from {init_from}"
        if self.lora_cfg is not None:  # the frozen base holds the source's tensors (a file's dtype: bf16 at 12B)
            self.model = load_model(init_from, model, "stage.init_from")
            if self.model.params != model:
                differ = [f"{f.name}={getattr(self.model.params, f.name)!r}" for f in dataclasses.fields(model)
                          if getattr(self.model.params, f.name) != getattr(model, f.name)]
                raise KontextError(f"{what} is another architecture than model=... ({', '.join(differ)}); "
                                   "give the model its settings")
            add_adapters(self.model, self.lora_cfg)
            checkpoint_adapters_only(self)  # the base is `init_from`, rebuilt on every start
        elif self.meta_built:
            with torch.device("meta"):
                self.model = Flux(model)
            if init_from:  # its rows are read in configure_model; its names and shapes checked now
                self._init_rows = source_rows(init_from, "stage.init_from", params=model)[1]
                slices.check(self.model, self._init_rows, what)
            else:  # drawn in configure_model, and the generator left as Flux(model) leaves it for what
                self._construction_rng = torch.get_rng_state()  # draws after (a distillation student's parts)
                init_like_construction(self.model)
        else:
            self.model = Flux(model)
            if init_from:
                slices.fill(self.model, source_rows(init_from, "stage.init_from", params=model)[1], what)
        self.ema = EMA(self.model, decay=ema_decay, trainable_only=self.lora_cfg is not None)
        # Frozen encoders are kept out of the module tree: no optimizer state, not in checkpoints.
        self._frozen = {"autoencoder": autoencoder, "text": text}
        self.optim_cfg = options(OPTIMIZER, optimizer, "optimizer")
        self.time_cfg = options(TIME_SAMPLING, time_sampling, "time_sampling")
        self.train_guidance = train_guidance
        self.compact_text = compact_text
        self.val_cfg = options(VALIDATION, validation, "validation")
        self.finish_cfg = finish or {}
        self.last_batch_size = 0
        self._last_ema_step = -1
        self.loss_history: list[tuple[int, float]] = []
        self._parallelized = False
        self._averaged = False
        self.base_dtype: torch.dtype | None = None  # of a LoRA base: the run's compute dtype (configure_model)
        self.noise_seed = torch.initial_seed()  # the run's seed (seed_everything)

    def build_model(self) -> Flux:
        """A fresh network of this stage that receives a state dict (its initial weights do not
        matter): the architecture, with its adapters and the base's dtype if any."""
        model = Flux(self.params)
        if self.lora_cfg is not None:
            add_adapters(model, self.lora_cfg)
            freeze_base(model, self.base_dtype)
        return model

    @property
    def autoencoder(self):
        return self._frozen["autoencoder"]

    @property
    def text(self):
        return self._frozen["text"]

    # -- parallelism and resume -------------------------------------------------------------
    def configure_model(self) -> None:
        """The `parallel` recipe: activation checkpointing and per-block compile; under FSDP (the
        strategy gives a device mesh) the model, its EMA, a distillation teacher and, if asked, the
        frozen encoders are sharded over the data-parallel ranks."""
        if self._parallelized:
            return
        self._parallelized = True
        mesh = self.sharding_mesh()
        device = self.trainer.strategy.root_device if self._trainer is not None else None
        if self.lora_cfg is None:
            parallel.parallelize(self.model, self.parallel_cfg, mesh, ema=self.ema.model, device=device)
            if self.meta_built:  # each rank materialises its shards and fills only their rows
                self.model.to_empty(device=device or "cpu")
                self.initialise_shards()
                self.ema.model.to_empty(device=device or "cpu")
                self.ema.copy_from(self.model)
        else:
            self.base_dtype = self.compute_dtype(mesh)
            freeze_base(self.model, self.base_dtype or torch.float32)
            if self.lora_cfg.quantize_base:
                if mesh is not None or getattr(self._trainer, "world_size", 1) > 1:
                    raise KontextError(f"adapter.quantize_base={self.lora_cfg.quantize_base} trains in one process; "
                                       "on several GPUs use trainer=fsdp, which shards the bf16 base instead "
                                       "(adapter.quantize_base=null)")
                quantize_base(self.model, self.lora_cfg.quantize_base)
            parallel.parallelize(self.model, self.parallel_cfg, mesh, device=device)
            self.ema.shard_like(self.model)
        if mesh is not None and self.parallel_cfg.shard_frozen:
            for enc in (self.autoencoder, self.text):
                if isinstance(enc, torch.nn.Module):
                    parallel.shard_frozen(enc, mesh)
        if self.teacher is not None:  # the distillation stages' (read here if their setup only planned it)
            self._frozen["teacher"] = self.teacher.place(mesh, self.compute_dtype(mesh) or torch.float32,
                                                         device or "cpu", shard=self.parallel_cfg.shard_teacher)

    def initialise_shards(self) -> None:
        """The starting weights of a model built on `meta`, now materialised (sharded or not):
        this rank's rows of `init_from`, else the values `Flux(params)` would have drawn in one
        process (from the generator's state at construction)."""
        if self.init_from:
            rows, self._init_rows = self._init_rows, None  # (a merged LoRA run's rows are a whole model)
            slices.fill(self.model, rows, f"stage.init_from {self.init_from}")
            return
        with torch.random.fork_rng(devices=[]):
            torch.set_rng_state(self._construction_rng)
            init_like_construction(self.model, slices.init_rows)

    def sharding_mesh(self):
        """The data-parallel mesh when FSDP shards over several ranks, else None."""
        mesh = self.device_mesh["data_parallel"] if self.device_mesh is not None else None
        return mesh if mesh is not None and mesh.size() > 1 else None

    def compute_dtype(self, mesh=None) -> torch.dtype | None:
        """The dtype the run computes in when it is not fp32 (FSDP's `param_dtype`, else a 16-bit
        trainer precision), else None: the dtype a frozen LoRA base is stored in."""
        if mesh is not None and mesh.size() > 1:
            dtype = getattr(torch, self.parallel_cfg.param_dtype)
            return None if dtype == torch.float32 else dtype
        return precision_dtype(getattr(self._trainer, "precision", "") if self._trainer is not None else "")

    def noise_generator(self, batch_idx: int, device: torch.device) -> torch.Generator:
        """The generator of one micro-batch's noise and times, seeded from (run seed, data-parallel
        rank, step, micro-batch): each rank draws its own noise, and a resumed run draws exactly
        what the interrupted one would have, with no generator state to carry."""
        rank = (getattr(self.trainer.strategy, "distributed_sampler_kwargs", None) or {}).get("rank", self.global_rank)
        micro = batch_idx % self.trainer.accumulate_grad_batches
        key = f"{self.noise_seed}/{rank}/{self.trainer.global_step}/{micro}".encode()
        seed = int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1
        return torch.Generator(device=device).manual_seed(seed)

    def dropout_rng(self, seed: int, device: torch.device):
        """The random state of a forward with adapter dropout: `seed` (one per micro-batch, like
        the noise), the global generator untouched (`kontext.network.lora.seeded_rng`); else nothing."""
        dropout = self.lora_cfg is not None and self.lora_cfg.dropout > 0
        return seeded_rng(seed, device) if dropout else contextlib.nullcontext()

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["loss_history"] = list(self.loss_history)

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_resumable(self, checkpoint)  # Lightning loads the weights after this hook
        self.loss_history = [tuple(x) for x in checkpoint.get("loss_history", [])]

    def on_fit_end(self) -> None:
        # The run's finish (benchmark, export) happens on rank 0 alone: give it unsharded weights.
        if parallel.is_sharded(self.model):
            model = parallel.gather_full(self.model, self.build_model)
            if self.lora_cfg is None:
                ema = parallel.gather_full(self.ema.model, lambda: Flux(self.params).eval().requires_grad_(False))
            else:
                shapes = {n: torch.empty(p.shape, dtype=p.dtype) for n, p in self.ema.model.named_parameters()}
                ema = parallel.gather_full(self.ema.model, lambda: mirror(shapes))
            if model is not None:
                self.model, self.ema.model = model, ema

    def on_fit_start(self) -> None:
        for enc in self._frozen.values():
            if enc is not None:
                enc.to(self.device)

    # -- inputs -------------------------------------------------------------------------
    @torch.no_grad()
    def encode_batch(self, batch: dict) -> tuple[Tensor, list[Tensor], Tensor, Tensor]:
        """(target latent (B,16,h,w), context latents, txt (B,L,D), vec (B,D)) from a batch
        of cached features or of images."""
        if "target_latent" in batch:
            x = batch["target_latent"]
            contexts = list(batch.get("reference_latents", []))
        else:
            if self.autoencoder is None:
                raise ValueError("image batches need an autoencoder; configure one or train on cached features")
            x = self.autoencoder.encode(batch["target"])
            contexts = [self.autoencoder.encode(r) for r in batch.get("references", [])]
        if "txt" in batch:
            txt, vec = batch["txt"], batch["vec"]
        else:
            feats = self.text.encode(list(batch["instruction"]))
            txt, vec = feats.txt, feats.vec
        return x, contexts, txt.to(x.dtype), vec.to(x.dtype)

    def mu(self, n_img: int) -> float:
        mu = self.time_cfg.mu
        return flow.mu_for_tokens(n_img) if mu == "auto" else float(mu)

    # -- training ------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        x, contexts, txt, vec = self.encode_batch(batch)
        tokens = packing.prepare(x, contexts)
        b, n_img = tokens.img.shape[0], tokens.n_img
        gen = self.noise_generator(batch_idx, x.device)
        noise = torch.randn(tokens.img.shape, generator=gen, device=x.device, dtype=tokens.img.dtype)
        t = flow.sample_t(b, self.mu(n_img), self.time_cfg.sigma, generator=gen, device=x.device)
        z_t = flow.interpolate(tokens.img, noise, t)
        guidance = self.train_guidance if self.params.guidance_embed else None
        with self.dropout_rng(gen.initial_seed() + 1, x.device):
            pred = packing.predict(self.model, tokens, z_t, t.to(x.dtype), txt, vec, guidance, self.compact_text)
        loss = flow.flow_loss(pred, flow.velocity_target(tokens.img, noise))
        self.last_batch_size = b
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        if batch_idx % 10 == 0:
            self.loss_history.append((self.trainer.global_step, loss.detach().item()))
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.trainer.global_step
        if step != self._last_ema_step:  # an optimizer step happened (accumulation-safe)
            self._last_ema_step = step
            every = self.val_cfg.every_n_steps
            if every and step % every == 0 and self.trainer.is_global_zero:
                self.quick_benchmark(step)

    def optimizer_step(self, *args, **kwargs) -> None:
        super().optimizer_step(*args, **kwargs)
        # Here, not in on_train_batch_end: callbacks (checkpoints) run before that hook, and a
        # checkpoint of this step must hold this step's average for a resume to be exact.
        self.ema.update(self.model)

    def configure_gradient_clipping(self, optimizer, gradient_clip_val=None, gradient_clip_algorithm=None) -> None:
        """Norm clipping in one fused pass over all gradients: what torch picks by itself on
        GPUs; on CPU its default is a loop of per-tensor norms, several times slower."""
        if gradient_clip_val and gradient_clip_algorithm in (None, "norm") and not parallel.is_sharded(self.model):
            params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            torch.nn.utils.clip_grad_norm_(params, gradient_clip_val, foreach=True)
            return
        super().configure_gradient_clipping(optimizer, gradient_clip_val, gradient_clip_algorithm)

    def param_groups(self) -> list[dict]:
        """The optimizer's parameter groups: weight decay on matrices only (not biases, norms)."""
        decay, no_decay = [], []
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                (no_decay if p.ndim < 2 or "norm" in name else decay).append(p)
        return [{"params": decay, "weight_decay": self.optim_cfg.weight_decay},
                {"params": no_decay, "weight_decay": 0.0}]

    def configure_optimizers(self):
        """AdamW over `param_groups()`, with one warm-up-then-decay schedule for every group."""
        return adamw_with_schedule(self.param_groups(), self.optim_cfg, self.trainer)

    # -- evaluation ------------------------------------------------------------------------
    def pipeline(self, use_ema: bool = True):
        """A pipeline over the EMA weights (or the trained ones). With adapters it samples the live
        model with the adapters it holds: their average inside `averaged()`, or merged after
        `merge_adapters()`."""
        from kontext.pipeline import KontextPipeline

        model = self.model if self.lora_cfg is not None or not use_ema else self.ema.model
        return KontextPipeline(model, self.autoencoder, self.text, **self.finish_cfg.get("sampler", {}))

    @contextlib.contextmanager
    def averaged(self):
        """The EMA weights for `pipeline()` within the block. A full model's EMA is a copy of its
        own, so nothing changes; adapters are swapped for their average in the live model and
        back afterwards (on every rank of a sharded model: each swaps its shards)."""
        if self.lora_cfg is None or self._averaged:
            yield
            return
        self._averaged = True
        try:
            with swapped_in(self.model, self.ema.model):
                yield
        finally:
            self._averaged = False

    def merge_adapters(self):
        """After training, on unsharded weights: the EMA adapters merged into the base in place, so
        that `self.model` is a plain `Flux` again (for the finish's benchmark and export). Returns
        them (a `kontext.formats.lora_files.Adapter`), or None for a run without adapters."""
        from kontext.formats.lora_files import merge

        if self.lora_cfg is None or not adapted_layers(self.model):
            return None
        adapter = adapters(self.model, weights=dict(self.ema.model.named_parameters()))
        dequantize_base(self.model)  # a quantised base merges as the weights it trained with
        merge(unwrap(self.model), adapter)
        self.model.eval()
        return adapter

    def quick_benchmark(self, step: int) -> None:
        from kontext.benchmark import run_benchmark

        start = time.perf_counter()
        with self.averaged():
            report = run_benchmark(self.pipeline(), n_per_op=self.val_cfg.cases_per_op,
                                   steps=self.val_cfg.steps, chains=0)
        metrics = {f"val/{k}": v for k, v in report.flat_metrics().items()}
        metrics["val/seconds"] = time.perf_counter() - start
        for logger in self.loggers:
            logger.log_metrics(metrics, step=step)
        per_op = ", ".join(f"{op} {r['pass_rate']:.2f}" for op, r in report.per_op.items())
        self.print(f"step {step}: benchmark pass rate {report.overall['pass_rate']:.3f} ({per_op})")

    def finish(self, run_dir: Path, datamodule=None, timings: dict | None = None) -> dict:
        from kontext.stages.flow_finish import finish_flow_run

        return finish_flow_run(self, Path(run_dir), timings or {}, **self.finish_cfg)

