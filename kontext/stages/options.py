"""What the flow stages can be told: their option groups, each a dataclass whose defaults are
written once (the embedded default's recipe; a distillation stage's module states its own
changes with `dataclasses.replace`). A stage takes each group as a mapping (its YAML section)
or an instance, through `kontext.config_check.options`: a key the group does not have is an
error, and each class checks its values here, when the stage is built; the config check types
every field from these annotations before anything is built.
"""

from __future__ import annotations

from dataclasses import dataclass

from kontext.errors import KontextError

DECAYS = ("cosine", "linear", "none")
DECAY_BY = ("steps", "max_time")


@dataclass
class AdamWOptions:
    """A flow stage's `optimizer` options; the defaults are the embedded default's recipe (a small
    model from scratch; configs/stage/flow.yaml mirrors them, tests/test_train.py checks it)."""

    lr: float = 4e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.0
    warmup_steps: int = 100
    decay: str = "cosine"          # cosine | linear | none, after the warm-up
    min_lr_ratio: float = 0.1      # the decay's floor, as a share of lr
    decay_by: str = "steps"        # steps | max_time (the trainer's time budget)

    def __post_init__(self):
        self.betas = tuple(self.betas)
        if self.decay not in DECAYS:
            raise KontextError(f"optimizer.decay must be one of {DECAYS}, got {self.decay!r}")
        if self.decay_by not in DECAY_BY:
            raise KontextError(f"optimizer.decay_by must be steps or max_time, got {self.decay_by!r}")


@dataclass
class TimeSampling:
    """Logit-normal training times: N(mu, sigma) through a sigmoid; mu `auto` follows the target
    token count (the resolution-dependent shift, `kontext.diffusion.flow.mu_for_tokens`)."""

    sigma: float = 1.0
    mu: float | str = "auto"

    def __post_init__(self):
        if self.mu != "auto" and not isinstance(self.mu, int | float):
            raise KontextError(f"time_sampling.mu must be a number or auto, got {self.mu!r}")


@dataclass
class Validation:
    """The benchmark on the EMA weights every `every_n_steps` (0: never), `cases_per_op` cases
    per operation sampled with `steps` steps (None: the sampler's own)."""

    every_n_steps: int = 0
    cases_per_op: int = 8
    steps: int | None = 8


# -- LADD's own groups ----------------------------------------------------------------------
@dataclass
class DiscriminatorOptimizer:
    """AdamW of the discriminator heads (no schedule)."""

    lr: float = 1e-4
    betas: tuple[float, float] = (0.0, 0.99)
    weight_decay: float = 0.0

    def __post_init__(self):
        self.betas = tuple(self.betas)


@dataclass
class Reals:
    """The clean samples the discriminator sees as real: the teacher's own CFG samples
    (`steps` steps at guidance `cfg`), or the dataset's target latents (`data`)."""

    source: str = "teacher"
    steps: int = 20
    cfg: float = 4.0

    def __post_init__(self):
        if self.source not in ("teacher", "data"):
            raise KontextError(f"reals.source must be teacher or data, got {self.source!r}")


@dataclass
class Renoise:
    """The discriminator's re-noising times: logit-normal (m, s), one per sample or `shared`."""

    m: float = 1.0
    s: float = 1.0
    shared: bool = False


@dataclass
class DiscriminatorHeads:
    """The heads on the teacher's features: after `blocks` (None: a spread of blocks), `channels` wide."""

    blocks: list[int] | None = None
    channels: int = 64


@dataclass
class Updates:
    """The update cycle: `generator` student updates, then `discriminator` head updates."""

    generator: int = 1
    discriminator: int = 1

    def __post_init__(self):
        if min(self.generator, self.discriminator) < 0 or self.generator + self.discriminator < 1:
            raise KontextError(f"updates must be non-negative counts with a positive sum, got {self}")
