"""Validation edits while training: the user's own (reference image(s), instruction) pairs,
edited every `every_n_steps` with the EMA weights (a LoRA run: its averaged adapters), so that
progress on the user's own task can be watched (the Shapes-Edit grids of `kontext.stages.metrics`
only show the embedded benchmark's).

Each time, `<run>/validation/step<N>/<i>.png` holds case i's output at full size and
`<run>/validation/step<N>.png` a grid with one row per case (references | output | expected, if
the case gives one | instruction), which also goes to wandb as `validation/edits`. A case may
give the exact answer (`expected: path`): the mean absolute difference of the output from it (in
8-bit levels, the answer resized to the output's size) is logged as `validation/error` (the mean
over such cases) and written with each case's to `step<N>/errors.json`, beside the difference of
the first reference from the answer (what leaving the image as it is would score). The cases and
their images are checked when the callback is built, before training starts: a missing or
unreadable image is one line.
"""

from __future__ import annotations

import contextlib
import json
import textwrap
from pathlib import Path
from typing import NamedTuple

import numpy as np
from lightning.pytorch.callbacks import Callback
from PIL import Image, ImageDraw

from kontext.config_check import plain
from kontext.errors import KontextError
from kontext.images import load_image


class Case(NamedTuple):
    references: list[Image.Image]
    prompt: str
    expected: Image.Image | None = None  # the exact answer, if known


def read_cases(cases) -> list[Case]:
    """The Cases of `cases`: a list of {"image": path | [paths] | null, "prompt": text,
    "expected": path (optional)}, every image read."""
    out = []
    for i, case in enumerate(plain(cases) or []):
        if (not isinstance(case, dict) or set(case) - {"image", "prompt", "expected"}
                or not isinstance(case.get("prompt"), str)):
            raise KontextError(f"validation case {i} must be {{image: path, [paths] or null, prompt: text, "
                               f"expected: path (optional)}}, got {case!r}")
        image, expected = case.get("image"), case.get("expected")
        paths = [] if image is None else [image] if isinstance(image, str) else image
        if not isinstance(paths, list) or not all(isinstance(p, str) for p in paths):
            raise KontextError(f"validation case {i}: image must be a path, a list of paths or null, got {image!r}")
        if expected is not None and not isinstance(expected, str):
            raise KontextError(f"validation case {i}: expected must be the path of the exact answer, got {expected!r}")
        try:
            answer = None if expected is None else load_image(expected)
        except KontextError as err:
            raise KontextError(f"validation case {i}: its expected answer: {err}") from err
        out.append(Case([load_image(p) for p in paths], case["prompt"], answer))
    return out


def mean_error(image: Image.Image, answer: Image.Image) -> float:
    """Mean absolute difference of two RGB images in 8-bit levels, `answer` resized (Lanczos) to
    `image`'s size if it differs."""
    if answer.size != image.size:
        answer = answer.convert("RGB").resize(image.size, Image.Resampling.LANCZOS)
    a, b = (np.asarray(x.convert("RGB"), dtype=np.int16) for x in (image, answer))
    return float(np.abs(a - b).mean())


def edit_grid(cases: list[Case], outputs: list[Image.Image], height: int = 192) -> Image.Image:
    """One row per case: its references, its output, its expected answer if any, then its
    instruction (wrapped)."""
    def fit(img: Image.Image) -> Image.Image:
        return img.convert("RGB").resize((max(1, round(img.width * height / img.height)), height))

    rows = [[*map(fit, case.references), fit(out), *([fit(case.expected)] if case.expected is not None else [])]
            for case, out in zip(cases, outputs, strict=True)]
    text_w = 2 * height
    width = max(sum(img.width + 4 for img in row) for row in rows) + text_w
    grid = Image.new("RGB", (width, len(rows) * (height + 4)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for r, (row, (_, prompt, _)) in enumerate(zip(rows, cases, strict=True)):
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
        # what leaving each case's first reference as it is would score, next to its outputs' errors
        self.reference_errors = [mean_error(c.references[0], c.expected) if c.references and c.expected is not None
                                 else None for c in self.cases]
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
            outputs = pipe.edit([case.references or None for case in self.cases],
                                [case.prompt for case in self.cases], self.seed, steps=self.steps)
        if not trainer.is_global_zero:
            return None
        folder = Path(trainer.default_root_dir) / "validation"
        (folder / f"step{step:07d}").mkdir(parents=True, exist_ok=True)
        for i, img in enumerate(outputs):
            img.save(folder / f"step{step:07d}" / f"{i}.png")
        path = folder / f"step{step:07d}.png"
        edit_grid(self.cases, outputs).save(path)
        errors = {i: {"error": mean_error(out, case.expected), "reference_error": self.reference_errors[i]}
                  for i, (case, out) in enumerate(zip(self.cases, outputs, strict=True)) if case.expected is not None}
        if errors:
            (folder / f"step{step:07d}" / "errors.json").write_text(json.dumps(errors, indent=1))
        for logger in trainer.loggers:
            if errors:
                logger.log_metrics({"validation/error": float(np.mean([e["error"] for e in errors.values()]))}, step=step)
            if hasattr(logger, "log_image"):  # wandb
                logger.log_image(key="validation/edits", images=[str(path)], step=step,
                                 caption=[f"step {step}: references | EMA output{' | expected' if errors else ''}"
                                          " | instruction"])
        return path
