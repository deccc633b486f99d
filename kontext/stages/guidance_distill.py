"""Guidance distillation (Meng et al. 2023; the FLUX.1 [dev] recipe, FLUX.1 Kontext paper §3):
one network evaluation per sampling step instead of the two of classifier-free guidance.

A frozen teacher (:class:`kontext.stages.teacher.Teacher`) is evaluated with true CFG,
``v_u + w (v_c - v_u)`` against the empty prompt, at a guidance scale ``w ~ U[guidance_range]``
drawn per sample; the student, the teacher's architecture with a guidance embedding (added
with a zero output when the teacher has none), gets ``w`` as its guidance input and regresses
its velocity onto the teacher's (MSE over target tokens). The result is a ``guidance_embed=True``
model that the sampler drives with ``guidance=w`` and ``cfg=1``.

Where the noisy inputs come from (``points``):
- ``data``: the flow stage's, data latents noised at logit-normal times, with the batch's
  context tokens;
- ``teacher``: points on the teacher's own guided sampling paths, where the student will be
  asked to follow it. Each path is a batch taken from noise through the sampler's schedule
  (``trajectory_steps`` Euler steps of the teacher's guided velocity at the path's ``w``),
  and each training step moves one path by one step, regressing the student at that point
  onto the velocity that moves it. ``trajectory_steps`` paths are in flight at once, started
  one step apart (the first of each at its step, from the data noised to that time), so
  consecutive updates see different times. The guided velocity is needed for the target
  anyway: following it costs no extra teacher evaluation. A loader batch is used only when a
  path starts (one batch in ``trajectory_steps``; the rest are skipped), so a run sees that
  many fewer distinct samples. Paths are not checkpointed: a resumed run starts new ones,
  staggered again, and so does not repeat the interrupted run bit for bit.

Everything else (EMA, optimizer, benchmark, export) is the flow stage's.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from kontext.config_check import options
from kontext.diffusion import distill, flow
from kontext.errors import KontextError
from kontext.network import packing
from kontext.network.model import FluxParams
from kontext.stages import flow as flow_stage
from kontext.stages.flow import FlowStage
from kontext.stages.options import AdamWOptions, Validation
from kontext.stages.teacher import Teacher, check_student


@dataclass
class _Path:
    """One batch on its way along the teacher's guided sampling path."""
    tokens: packing.KontextTokens  # the batch's target (replaced by `x`) and context tokens
    txt: Tensor                    # (B, L_txt, D_txt)
    vec: Tensor                    # (B, D_vec)
    w: Tensor                      # (B,) guidance scale of this path
    x: Tensor                      # (B, L_img, C) the current point, at times[step]
    times: list[float]             # steps + 1 times, from 1 to 0
    step: int

    @property
    def done(self) -> bool:
        return self.step >= len(self.times) - 1


# Defaults written once (configs/stage/guidance_distill.yaml mirrors them): a student that
# starts from its teacher moves slowly; its new guidance embedder learns at `guidance_lr`.
OPTIMIZER = dataclasses.replace(flow_stage.OPTIMIZER, lr=3e-5, warmup_steps=50)
VALIDATION = dataclasses.replace(flow_stage.VALIDATION, steps=20)


class GuidanceDistillStage(FlowStage):
    def __init__(
        self,
        model: FluxParams,
        teacher: Teacher | str,
        autoencoder: Any = None,
        text: Any = None,
        guidance_range: tuple[float, float] = (1.0, 5.0),
        guidance_lr: float | None = 1e-3,
        points: str = "data",
        trajectory_steps: int = 20,
        optimizer: AdamWOptions | dict | None = None,
        ema_decay: float = 0.999,
        time_sampling: dict | None = None,
        validation: Validation | dict | None = None,
        finish: dict | None = None,
        parallel: Any = None,
    ):
        low, high = (float(g) for g in guidance_range)
        super().__init__(model=model, autoencoder=autoencoder, text=text,
                         optimizer=options(OPTIMIZER, optimizer, "optimizer"), ema_decay=ema_decay,
                         time_sampling=time_sampling, train_guidance=(low + high) / 2,
                         validation=options(VALIDATION, validation, "validation"),
                         finish=finish, parallel=parallel)
        self.guidance_range = (low, high)
        self.teacher = teacher if isinstance(teacher, Teacher) else Teacher(teacher)
        self.guidance_lr = None if guidance_lr is None else float(guidance_lr)
        if points not in ("data", "teacher"):
            raise KontextError(f"stage.points must be 'data' or 'teacher', got {points!r}")
        if trajectory_steps < 1:
            raise KontextError(f"stage.trajectory_steps must be at least 1, got {trajectory_steps}")
        self.points, self.trajectory_steps = points, int(trajectory_steps)
        self._paths: dict[int, _Path] = {}  # in-flight teacher paths by slot
        self._path_calls = 0

    def setup(self, stage: str) -> None:
        """Load the frozen teacher and start the student from it (a student built on `meta`: read
        the teacher's architecture only; both are filled in configure_model). A resumed run's
        checkpoint is restored after this and replaces the student's weights."""
        if self.teacher.model is None:
            if not self.params.guidance_embed:
                raise KontextError("a guidance-distilled student takes the guidance as input: "
                                   "set model.guidance_embed=true")
            if self.meta_built:  # the student is filled in configure_model, the teacher read there by rows
                check_student(self.params, self.teacher.read_params(self.text))
                return
            # A frozen part, as the encoders are: moved to the device (and sharded) with them.
            self._frozen["teacher"] = self.teacher.load(self.device, self.text)
            self.teacher.start_student(self.model, self.ema.model)

    def initialise_shards(self) -> None:
        """The student built on `meta`: its rows of the teacher (`Teacher.fill_student`)."""
        self.teacher.fill_student(self.model)

    def on_fit_start(self) -> None:
        super().on_fit_start()
        self.teacher.to(dtype=next(self.model.parameters()).dtype)
        self._paths, self._path_calls = {}, 0

    def on_train_end(self) -> None:
        self._paths.clear()  # free the in-flight batches before the benchmark and export

    def param_groups(self) -> list[dict]:
        """The flow stage's groups; with `guidance_lr`, the guidance embedder (new, starting at a
        zero output) forms its own group at that rate while the rest, already trained, moves slowly."""
        groups = super().param_groups()
        if self.guidance_lr is None:
            return groups
        embedder = list(self.model.guidance_in.parameters())
        ids = {id(p) for p in embedder}
        for group in groups:
            group["params"] = [p for p in group["params"] if id(p) not in ids]
        return [*groups, {"params": embedder, "lr": self.guidance_lr, "weight_decay": 0.0}]

    def distill_loss(self, x: Tensor, contexts: list[Tensor], txt: Tensor, vec: Tensor, w: Tensor | None = None,
                     generator: torch.Generator | None = None) -> Tensor:
        """MSE between the student's velocity at guidance w and the teacher's CFG velocity at w,
        on data latents x noised at logit-normal times; w ~ U[guidance_range] unless given (B,).
        Noise, times and w come from ``generator`` (default: the global generator)."""
        tokens = packing.prepare(x, contexts)
        b, n_img = tokens.img.shape[0], tokens.n_img
        noise = torch.randn(tokens.img.shape, generator=generator, device=x.device, dtype=x.dtype)
        t = flow.sample_t(b, self.mu(n_img), self.time_cfg.sigma, generator=generator, device=x.device).to(x.dtype)
        z_t = flow.interpolate(tokens.img, noise, t)
        if w is None:
            w = distill.sample_guidance(b, *self.guidance_range, generator=generator, device=x.device)
        w = w.to(x)
        target = self.teacher.guided_velocity(tokens, z_t, t, txt, vec, w, self.compact_text)
        return self._student_loss(tokens, z_t, txt, t, vec, w, target)

    def _student_loss(self, tokens: packing.KontextTokens, z_t: Tensor, txt: Tensor, t: Tensor, vec: Tensor,
                      w: Tensor, target: Tensor) -> Tensor:
        """MSE of the student's velocity at guidance ``w`` on the target tokens against ``target``."""
        pred = packing.predict(self.model, tokens, z_t, t, txt, vec, guidance=w, compact=self.compact_text)
        return flow.flow_loss(pred, target)

    def _new_path(self, batch: dict, start: int, generator: torch.Generator) -> _Path:
        """A path for ``batch`` at step ``start`` of the schedule: from noise when ``start`` is 0,
        else from the data latents noised to that step's time."""
        x, contexts, txt, vec = self.encode_batch(batch)
        tokens = packing.prepare(x, contexts)
        noise = torch.randn(tokens.img.shape, generator=generator, device=x.device, dtype=x.dtype)
        times = flow.schedule(self.trajectory_steps, tokens.n_img).tolist()
        w = distill.sample_guidance(x.shape[0], *self.guidance_range, generator=generator, device=x.device).to(x)
        return _Path(tokens, txt, vec, w, flow.interpolate(tokens.img, noise, times[start]), times, start)

    def path_loss(self, batch: dict, generator: torch.Generator) -> tuple[Tensor, int]:
        """(the student's loss at the next point of one in-flight teacher path, its batch size).
        The path then moves one Euler step along the teacher's guided velocity."""
        slot = self._path_calls % self.trajectory_steps
        self._path_calls += 1
        path = self._paths.get(slot)
        if path is None or path.done:
            first = path is None
            path = self._paths[slot] = self._new_path(batch, slot if first else 0, generator)
        t_now, t_next = path.times[path.step], path.times[path.step + 1]
        t = torch.full((path.x.shape[0],), t_now, device=path.x.device, dtype=path.x.dtype)
        target = self.teacher.guided_velocity(path.tokens, path.x, t, path.txt, path.vec, path.w, self.compact_text)
        loss = self._student_loss(path.tokens, path.x, path.txt, t, path.vec, path.w, target)
        path.x = flow.euler_step(path.x, target, t_now, t_next)  # the teacher's guided Euler step
        path.step += 1
        return loss, path.x.shape[0]

    def training_step(self, batch: dict, batch_idx: int) -> Tensor:
        generator = self.noise_generator(batch_idx, self.device)
        if self.points == "teacher":
            loss, b = self.path_loss(batch, generator)
        else:
            x, contexts, txt, vec = self.encode_batch(batch)
            loss, b = self.distill_loss(x, contexts, txt, vec, generator=generator), x.shape[0]
        self.last_batch_size = b
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        if batch_idx % 10 == 0:
            self.loss_history.append((self.trainer.global_step, loss.detach().item()))
        return loss

    def pipeline(self, use_ema: bool = True):
        """The student's pipeline: one evaluation per step (cfg 1), guidance as an input."""
        pipe = super().pipeline(use_ema)
        pipe.sampler.cfg = 1.0
        return pipe
