"""Validation edits while training: the user's own (reference image(s), instruction) pairs,
edited every `every_n_steps` with the EMA weights (a LoRA run: its averaged adapters), so that
progress on the user's own task can be watched (the Shapes-Edit grids of `kontext.metrics`
only show the embedded benchmark's).

Each time, `<run>/validation/step<N>/<i>.png` holds case i's output at full size and
`<run>/validation/step<N>.png` a grid with one row per case (references | output | instruction),
which also goes to wandb as `validation/edits`. The cases and their images are checked when the
callback is built, before training starts: a missing or unreadable image is one line.
"""

from __future__ import annotations

import contextlib
import textwrap
from pathlib import Path

from lightning.pytorch.callbacks import Callback
from PIL import Image, ImageDraw

from kontext.config_check import plain
from kontext.errors import KontextError
from kontext.images import load_image


def read_cases(cases) -> list[tuple[list[Image.Image], str]]:
    """[(references, instruction)] of `cases`: a list of {"image": path | [paths] | null,
    "prompt": text}, every image read."""
    out = []
    for i, case in enumerate(plain(cases) or []):
        if not isinstance(case, dict) or set(case) - {"image", "prompt"} or not isinstance(case.get("prompt"), str):
            raise KontextError(f"validation case {i}: expected {{image: path, [paths] or null, prompt: text}}, got {case!r}")
        image = case.get("image")
        paths = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise KontextError(f"validation case {i}: image must be a path, a list of paths or null, got {image!r}")
        out.append(([load_image(p) for p in paths], case["prompt"]))
    return out


def edit_grid(cases: list[tuple[list[Image.Image], str]], outputs: list[Image.Image], height: int = 192) -> Image.Image:
    """One row per case: its references, its output, then its instruction (wrapped)."""
    def fit(img: Image.Image) -> Image.Image:
        return img.convert("RGB").resize((max(1, round(img.width * height / img.height)), height))

    rows = [[*map(fit, refs), fit(out)] for (refs, _), out in zip(cases, outputs, strict=True)]
    text_w = 2 * height
    width = max(sum(img.width + 4 for img in row) for row in rows) + text_w
    grid = Image.new("RGB", (width, len(rows) * (height + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (row, (_, prompt)) in enumerate(zip(rows, cases, strict=True)):
        x, y = 0, r * (height + 4)
        for img in row:
            grid.paste(img, (x, y))
            x += img.width + 4
        lines = textwrap.wrap(prompt or "(empty instruction)", text_w // 6)[: height // 12]
        draw.multiline_text((width - text_w + 4, y + 4), "\n".join(lines), fill=(0, 0, 0))
    return grid


class ValidationEdits(Callback):
    """Edits `cases` every `every_n_steps` optimizer steps (0 or no cases: never) with the
    stage's EMA pipeline, sampling `steps` steps (None: the run's sampler default) from `seed`.
    Every rank samples (a sharded model needs all of them); rank 0 writes the images."""

    def __init__(self, cases: list | None = None, every_n_steps: int = 500, seed: int = 0, steps: int | None = None):
        self.cases = read_cases(cases)
        self.every = every_n_steps
        self.seed = seed
        self.steps = steps
        self._last_step = -1

    def on_train_start(self, trainer, pl_module) -> None:
        self._last_step = trainer.global_step  # not at a resumed step, which its run has edited

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if not self.cases or not self.every or step == self._last_step or not hasattr(pl_module, "pipeline"):
            return
        self._last_step = step  # an optimizer step happened (accumulation-safe)
        if step % self.every == 0:
            self.edit(trainer, pl_module, step)

    def edit(self, trainer, pl_module, step: int) -> Path | None:
        """Sample the cases now; returns the grid's path on rank 0."""
        with getattr(pl_module, "averaged", contextlib.nullcontext)():
            pipe = pl_module.pipeline()
            outputs = pipe.edit([refs or None for refs, _ in self.cases], [p for _, p in self.cases], self.seed,
                                steps=self.steps)
        if not trainer.is_global_zero:
            return None
        folder = Path(trainer.default_root_dir) / "validation"
        (folder / f"step{step:07d}").mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(outputs):
            img.save(folder / f"step{step:07d}" / f"{i}.png")
        path = folder / f"step{step:07d}.png"
        edit_grid(self.cases, outputs).save(path)
        for logger in trainer.loggers:
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image(key="validation/edits", images=[str(path)], step=step,
                                 caption=[f"step {step}: references | EMA output | instruction"])
        return path
