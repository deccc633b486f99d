"""Latent adversarial diffusion distillation (LADD; Sauer et al. 2024, arXiv 2403.12015; the
FLUX.1 Kontext [pro] recipe, paper §3): a student that samples in a few steps.

One training batch is one update, of the student (G) or of the discriminator heads (D), in a
repeating cycle of ``updates.generator`` G updates then ``updates.discriminator`` D updates
(manual optimization, separate optimizers and learning rates).

- Clean samples x0 ("reals"): the frozen teacher's own samples for the batch's prompts and
  contexts, with true CFG (``reals.source: teacher``, the paper's synthetic data), or the
  dataset's target latents (``reals.source: data``).
- Student: at a student time t from a small set (t = 1 is pure noise), with the context
  tokens, ``x0_hat = x_t - t v``. Its input x_t is x0 noised to t, ``(1 - t) x0 + t eps``
  (``student_inputs: data``), or the point its own sampler over all the student times (the
  4-step one by default) reaches at t from eps (``student_inputs: simulate``: Euler steps
  without gradients; DMD2's "backward simulation"), so that training sees what sampling feeds
  it. Samplers on a subset of the times (1 or 2 steps) reach their points by other paths.
- Discriminator (:mod:`kontext.network.discriminator`): fakes ``x0_hat`` and reals x0 are re-noised to
  ``t_hat`` from a logit-normal; the frozen teacher runs on [re-noised target | context] with
  the batch's text, and heads on the target tokens of several blocks, conditioned on t_hat and
  the pooled text vector, give one logit each. Hinge (or non-saturating) losses, optional R1
  on the heads' inputs.
- G update: the generator loss backpropagates through the frozen teacher into the student;
  the teacher's weights never change (none of them requires grad). Optionally
  (``distill_weight`` > 0) a regression of x0_hat onto x0 anchors the student, as ADD's
  distillation term does (LADD on synthetic data uses none); ``adversarial_weight`` scales the
  adversarial term (0 is a regression-only ablation, which still computes it and still runs
  the discriminator's updates).

The frozen teacher is a :class:`kontext.stages.teacher.Teacher` (its source and its guidance
input). The student starts from it, or from another model of the same architecture (e.g. the
guidance-distilled one, whose guidance input is then held at ``student_guidance``). It is
sampled with an explicit time list of trained student times (``finish.sampler.timesteps``,
default all of them, then 0), which the run's pipeline carries into the export.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from torch import Tensor
from torch.distributed.fsdp import fully_shard

from kontext.config_check import options
from kontext.diffusion import distill, flow
from kontext.errors import KontextError
from kontext.network import packing
from kontext.network.discriminator import Discriminator, resolve_blocks
from kontext.network.model import FluxParams
from kontext.scale import parallel
from kontext.stages import flow as flow_stage
from kontext.stages.flow import FlowStage
from kontext.stages.options import (
    AdamWOptions,
    DiscriminatorHeads,
    DiscriminatorOptimizer,
    Reals,
    Renoise,
    Updates,
    Validation,
)
from kontext.stages.teacher import Teacher, check_student, load_teacher

# Defaults written once (configs/stage/ladd.yaml mirrors them).
OPTIMIZER = dataclasses.replace(flow_stage.OPTIMIZER, lr=1e-5, warmup_steps=20, decay="none", min_lr_ratio=1.0)
DISCRIMINATOR_OPTIMIZER = DiscriminatorOptimizer()
VALIDATION = dataclasses.replace(flow_stage.VALIDATION, steps=None)  # None: the student's own time list
REALS = Reals()
RENOISE = Renoise()
DISCRIMINATOR = DiscriminatorHeads()
UPDATES = Updates()


class LADDStage(FlowStage):
    def __init__(
        self,
        model: FluxParams,
        teacher: Teacher | str,
        autoencoder: Any = None,
        text: Any = None,
        student_init: str | None = None,
        student_guidance: float = 1.0,
        student_timesteps: list[float] = (1.0, 0.75, 0.5, 0.25),
        student_timestep_probs: list[float] | None = None,
        student_inputs: str = "data",
        reals: Reals | dict | None = None,
        renoise: Renoise | dict | None = None,
        discriminator: DiscriminatorHeads | dict | None = None,
        loss: str = "hinge",
        r1_weight: float = 0.0,
        distill_weight: float = 0.0,
        adversarial_weight: float = 1.0,
        updates: Updates | dict | None = None,
        optimizer: AdamWOptions | dict | None = None,
        discriminator_optimizer: DiscriminatorOptimizer | dict | None = None,
        grad_clip: float | None = 1.0,
        ema_decay: float = 0.99,
        validation: Validation | dict | None = None,
        finish: dict | None = None,
        parallel: Any = None,
    ):
        super().__init__(model=model, autoencoder=autoencoder, text=text,
                         optimizer=options(OPTIMIZER, optimizer, "optimizer"), ema_decay=ema_decay,
                         train_guidance=student_guidance, validation=options(VALIDATION, validation, "validation"),
                         finish=finish, parallel=parallel)
        self.automatic_optimization = False
        self.teacher = teacher if isinstance(teacher, Teacher) else Teacher(teacher)
        self.student_source, self.student_guidance = student_init, float(student_guidance)
        self.student_timesteps = [float(t) for t in student_timesteps]
        self.student_probs = None if student_timestep_probs is None else [float(p) for p in student_timestep_probs]
        if student_inputs not in ("data", "simulate"):
            raise KontextError(f"stage.student_inputs must be 'data' or 'simulate', got {student_inputs!r}")
        self.student_inputs = student_inputs
        self.sample_times = self._sample_times((finish or {}).get("sampler", {}).get("timesteps"))
        self.reals_cfg = options(REALS, reals, "reals")
        self.renoise_cfg = options(RENOISE, renoise, "renoise")
        self.d_loss_fn, self.g_loss_fn = distill.gan_losses(loss)
        self.r1_weight = float(r1_weight)
        self.distill_weight = float(distill_weight)
        self.adversarial_weight = float(adversarial_weight)
        self.cycle = options(UPDATES, updates, "updates")
        self.d_optim_cfg = options(DISCRIMINATOR_OPTIMIZER, discriminator_optimizer, "discriminator_optimizer")
        self.grad_clip = grad_clip
        d_cfg = options(DISCRIMINATOR, discriminator, "discriminator")
        self.feature_blocks = resolve_blocks(self.model, d_cfg.blocks)
        self.discriminator = Discriminator(model.hidden_size, model.vec_in_dim, len(self.feature_blocks),
                                           int(d_cfg.channels))
        self._gen: torch.Generator | None = None  # this update's noise (see FlowStage.noise_generator)

    def _sample_times(self, times: list[float] | None) -> list[float]:
        """The exported sampler's time list: every step at a trained student time, ending at 0."""
        if times is None:
            return distill.few_step_timesteps(self.student_timesteps, len(self.student_timesteps))
        times = [float(t) for t in times]
        if times[-1] != 0.0 or any(t not in self.student_timesteps for t in times[:-1]):
            raise KontextError(f"finish.sampler.timesteps {times} must be student timesteps "
                               f"{self.student_timesteps} followed by 0")
        return times

    # -- setup ---------------------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Load the frozen teacher and the student's starting point (the teacher unless
        `student_init`); a student built on `meta` reads the teacher's architecture only, and
        both are filled in configure_model. A resumed run's checkpoint is restored after this."""
        if self.teacher.model is None:
            if self.meta_built:  # the student is filled in configure_model, the teacher read there by rows
                check_student(self.params, self.teacher.read_params(self.text))
                return
            # A frozen part, as the encoders are: moved to the device (and sharded) with them.
            self._frozen["teacher"] = self.teacher.load(self.device, self.text)
            source = None if self.student_source is None else load_teacher(self.student_source, device=self.device)
            self.teacher.start_student(self.model, self.ema.model, source)

    def initialise_shards(self) -> None:
        """The student built on `meta`: its rows of `student_init`, else of the teacher."""
        self.teacher.fill_student(self.model, self.student_source)

    def configure_model(self) -> None:
        """The flow stage's recipe for the student (and the teacher); under FSDP the discriminator
        heads are one more unit, so that their gradients are averaged over the ranks too."""
        super().configure_model()
        mesh = self.sharding_mesh()
        if mesh is not None and not parallel.is_sharded(self.discriminator):
            fully_shard(self.discriminator, mesh=mesh)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.to(dtype=next(self.model.parameters()).dtype)

    def configure_callbacks(self):
        # Called before Lightning validates the trainer: turn its refusal into a one-line fix.
        if self.trainer.gradient_clip_val:
            raise KontextError("the LADD stage clips its own gradients (stage.grad_clip): run it with "
                               "trainer.gradient_clip_val=null")
        return []

    def configure_optimizers(self):
        student = super().configure_optimizers()
        d = self.d_optim_cfg
        opt_d = torch.optim.AdamW(self.discriminator.parameters(), lr=d.lr, betas=d.betas,
                                  weight_decay=d.weight_decay)
        return [student["optimizer"], opt_d], [student["lr_scheduler"]["scheduler"]]

    # -- pieces ----------------------------------------------------------------------------------
    def _full(self, b: int, value: float, like: Tensor) -> Tensor:
        return torch.full((b,), value, device=like.device, dtype=like.dtype)

    def _randn(self, like: Tensor) -> Tensor:
        return torch.randn(like.shape, generator=self._gen, device=like.device, dtype=like.dtype)

    @torch.no_grad()
    def clean_samples(self, x: Tensor, tokens: packing.KontextTokens, txt: Tensor, vec: Tensor
                      ) -> tuple[Tensor, Tensor]:
        """(x0, noise), both (B, L_img, C): the teacher's CFG samples and the noise each one was
        sampled from, or the data's latents and fresh noise. The student's inputs are built from
        this pair, so with teacher reals they lie on the line from the teacher's noise to its
        sample (the rectified-flow "reflow" coupling) with ``student_inputs: data``, which makes
        ``distill_weight``'s regression target well defined."""
        noise = self._randn(tokens.img)
        if self.reals_cfg.source == "data":
            return tokens.img, noise
        r = self.reals_cfg
        times = flow.schedule(int(r.steps), tokens.n_img)
        return self.teacher.sample(tokens, noise, txt, vec, times, float(r.cfg)), noise

    def _student_v(self, x_t: Tensor, t: Tensor, tokens: packing.KontextTokens, txt: Tensor, vec: Tensor) -> Tensor:
        """The student's velocity on the target tokens (B, L_img, C) at x_t (B, L_img, C), times t (B,)."""
        guidance = self.student_guidance if self.params.guidance_embed else None
        return packing.predict(self.model, tokens, x_t, t, txt, vec, guidance, self.compact_text)

    @torch.no_grad()
    def simulate(self, noise: Tensor, t: Tensor, tokens: packing.KontextTokens, txt: Tensor, vec: Tensor) -> Tensor:
        """x_t (B, L_img, C) where the student's sampler over all its times (the 4-step one by
        default), started from ``noise`` at the first, is at each sample's time t (B,): Euler
        steps through the student times. Every batch takes all the steps, so that data-parallel
        ranks run the same forwards whatever their times."""
        times = sorted(set(self.student_timesteps), reverse=True)
        x, x_t = noise, noise.clone()
        for now, after in zip(times, times[1:], strict=False):
            x = flow.euler_step(x, self._student_v(x, self._full(x.shape[0], now, x), tokens, txt, vec), now, after)
            x_t = torch.where((t == after).view(-1, 1, 1), x, x_t)
        return x_t

    def student_x0(self, x0: Tensor, noise: Tensor, tokens: packing.KontextTokens, txt: Tensor,
                   vec: Tensor) -> Tensor:
        """The student's one-step prediction x0_hat (B, L_img, C) at a student time, from x0
        noised to it or from its own sampler's point there (``student_inputs``)."""
        b = x0.shape[0]
        t = distill.sample_student_t(b, self.student_timesteps, self.student_probs, generator=self._gen,
                                     device=x0.device).to(x0.dtype)
        if self.student_inputs == "simulate":
            x_t = self.simulate(noise, t, tokens, txt, vec)
        else:
            x_t = flow.interpolate(x0, noise, t)
        return distill.predict_x0(x_t, self._student_v(x_t, t, tokens, txt, vec), t)

    def features(self, x0: Tensor, t_hat: Tensor, noise: Tensor, tokens: packing.KontextTokens,
                 txt: Tensor, vec: Tensor) -> list[Tensor]:
        """Teacher features of x0 re-noised to t_hat, with the batch's context tokens and text."""
        return self.teacher.features(self.feature_blocks, tokens, distill.renoise(x0, noise, t_hat), t_hat, txt, vec,
                                     self.compact_text)

    def _t_hat(self, b: int, like: Tensor) -> Tensor:
        r = self.renoise_cfg
        return distill.sample_renoise_t(b, r.m, r.s, generator=self._gen, device=like.device).to(like.dtype)

    # -- training ---------------------------------------------------------------------------------
    def is_generator_update(self, update: int) -> bool:
        return update % (self.cycle.generator + self.cycle.discriminator) < self.cycle.generator

    def training_step(self, batch: dict, batch_idx: int) -> None:
        x, contexts, txt, vec = self.encode_batch(batch)
        self._gen = self.noise_generator(batch_idx, x.device)
        tokens = packing.prepare(x, contexts)
        x0, noise = self.clean_samples(x, tokens, txt, vec)
        generator = self.is_generator_update(self.trainer.global_step)
        losses = self.generator_update(x0, noise, tokens, txt, vec) if generator else \
            self.discriminator_update(x0, noise, tokens, txt, vec)
        self.last_batch_size = x.shape[0]
        for name, value in losses.items():
            self.log(f"train/{name}", value, prog_bar=name in ("g_loss", "d_loss"), batch_size=x.shape[0])
        if generator:
            self.loss_history.append((self.trainer.global_step, float(losses["g_loss"])))

    def generator_update(self, x0: Tensor, noise: Tensor, tokens, txt: Tensor, vec: Tensor) -> dict[str, Tensor]:
        opt_g, _ = self.optimizers()
        self.toggle_optimizer(opt_g)
        x0_hat = self.student_x0(x0, noise, tokens, txt, vec)
        t_hat = self._t_hat(x0.shape[0], x0)
        fake = self.discriminator(self.features(x0_hat, t_hat, self._randn(x0), tokens, txt, vec), t_hat, vec)
        adversarial = self.g_loss_fn(fake)
        out = {"g_adv": adversarial.detach(), "d_fake_g": fake.detach().mean()}
        loss = self.adversarial_weight * adversarial
        if self.distill_weight > 0:
            regression = flow.flow_loss(x0_hat, x0)
            loss = loss + self.distill_weight * regression
            out["g_distill"] = regression.detach()
        opt_g.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(opt_g, gradient_clip_val=self.grad_clip)
        opt_g.step()
        self.lr_schedulers().step()
        self.untoggle_optimizer(opt_g)
        self.ema.update(self.model)
        return {"g_loss": loss.detach(), **out}

    def discriminator_update(self, x0: Tensor, noise: Tensor, tokens, txt: Tensor, vec: Tensor) -> dict[str, Tensor]:
        _, opt_d = self.optimizers()
        self.toggle_optimizer(opt_d)
        b = x0.shape[0]
        with torch.no_grad():
            x0_hat = self.student_x0(x0, noise, tokens, txt, vec)
            t_fake, noise_fake = self._t_hat(b, x0), self._randn(x0)
            shared = self.renoise_cfg.shared
            t_real = t_fake if shared else self._t_hat(b, x0)
            noise_real = noise_fake if shared else self._randn(x0)
            feats_fake = self.features(x0_hat, t_fake, noise_fake, tokens, txt, vec)
            feats_real = self.features(x0, t_real, noise_real, tokens, txt, vec)
        if self.r1_weight > 0:
            feats_real = [f.detach().requires_grad_(True) for f in feats_real]
        real = self.discriminator(feats_real, t_real, vec)
        fake = self.discriminator(feats_fake, t_fake, vec)
        loss = self.d_loss_fn(real, fake)
        out = {"d_loss": loss.detach(), "d_real": real.detach().mean(), "d_fake": fake.detach().mean()}
        if self.r1_weight > 0:
            r1 = distill.r1_penalty(real, feats_real)
            loss = loss + self.r1_weight * r1
            out["r1"] = r1.detach()
        opt_d.zero_grad(set_to_none=True)
        self.manual_backward(loss)
        self.clip_gradients(opt_d, gradient_clip_val=self.grad_clip)
        opt_d.step()
        self.untoggle_optimizer(opt_d)
        return out

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        step = self.trainer.global_step
        every = self.val_cfg.every_n_steps
        if every and step % every == 0 and self.trainer.is_global_zero:
            self.quick_benchmark(step)

    # -- evaluation ---------------------------------------------------------------------------------
    def pipeline(self, use_ema: bool = True):
        """The student's pipeline: the explicit few-step time list, one evaluation per step."""
        pipe = super().pipeline(use_ema)
        s = pipe.sampler
        s.timesteps, s.steps, s.cfg, s.guidance = list(self.sample_times), len(self.sample_times) - 1, 1.0, \
            self.student_guidance
        return pipe
