"""What `sample.py` does with a composed config: one edit, a chain of edits, or a batch file.

Modes (see `configs/sample.yaml`):
- single: `image=` (none, one or a list) and `prompt=` -> `output=`;
- turns: `turns=[...]` chains edits, each turn's output the next turn's reference; turn k is
  saved as `<output stem>_turn<k><suffix>` (a `prompt=` given as well is the first turn);
- batch: `batch=cases.jsonl`, one JSON object per line, `{"image": path | [paths] | null,
  "prompt": str, "output": path, "seed": int (optional)}`; relative paths are relative to the
  current directory. The model is loaded once; a bad line (unreadable JSON, missing key,
  missing or corrupt image, unwritable output) is skipped and reported at the end.

Outputs are written atomically (temp file + rename). The same seed gives the same image.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from kontext.errors import KontextError

BATCH_KEYS = {"image", "prompt", "output", "seed"}


@dataclass
class BatchCase:
    line: int
    image: None | str | list[str]
    prompt: str
    output: Path
    seed: int


def check_output(path: str | os.PathLike) -> Path:
    """An output path whose extension Pillow can write."""
    path = Path(str(path)).expanduser()
    if path.suffix.lower() not in Image.registered_extensions():
        raise KontextError(f"output {path}: unknown image extension {path.suffix!r} (use .png, .jpg, .webp, ...)")
    return path


def save_image(img: Image.Image, path: Path) -> Path:
    """Write `img` atomically, creating the folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        img.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise KontextError(f"cannot write {path}: {err}") from err
    return path


def read_batch(path: str | os.PathLike, default_seed: int) -> tuple[list[BatchCase], list[tuple[int, str]]]:
    """(valid cases, [(line number, problem)]) of a JSON-lines batch file; blank lines are skipped."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise KontextError(f"batch file not found: {path}")
    cases, bad = [], []
    lines = path.read_text().splitlines()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            entry = json.loads(text)
            if not isinstance(entry, dict):
                raise KontextError("not a JSON object")
            unknown = sorted(set(entry) - BATCH_KEYS)
            missing = sorted({"prompt", "output"} - set(entry))
            if unknown or missing:
                raise KontextError(f"missing keys {missing}" if missing else f"unknown keys {unknown}")
            image = entry.get("image")
            if not (image is None or isinstance(image, str)
                    or (isinstance(image, list) and all(isinstance(i, str) for i in image))):
                raise KontextError("image must be a path, a list of paths or null")
            if not isinstance(entry["prompt"], str):
                raise KontextError("prompt must be a string")
            cases.append(BatchCase(number, image, entry["prompt"], check_output(entry["output"]),
                                   int(entry.get("seed", default_seed))))
        except (ValueError, TypeError, KontextError) as err:
            bad.append((number, str(err).splitlines()[0]))
    if not cases and not bad:
        raise KontextError(f"batch file {path} has no cases (one JSON object per line)")
    return cases, bad


def run_batch(pipe, cases: list[BatchCase], bad: list[tuple[int, str]], sampling: dict, progress: bool) -> int:
    """Every case of a batch file (`bad`: lines already rejected); returns the number of failed lines."""
    from tqdm.auto import tqdm

    bad = list(bad)
    total = len(cases) + len(bad)
    ready = []
    for case in cases:  # load every reference first, so a bad one fails its line only
        try:
            refs = pipe.prepare_references(case.image)
            ready.append((pipe.output_size(refs, sampling["width"], sampling["height"]), refs, case))
        except KontextError as err:
            bad.append((case.line, str(err)))
    ready.sort(key=lambda item: (item[0], tuple(r.size for r in item[1])))  # same sizes together
    written = 0
    with tqdm(total=len(ready), desc="batch", unit="image", disable=not progress) as bar:
        for start in range(0, len(ready), pipe.batch_size):
            chunk = ready[start:start + pipe.batch_size]
            outputs = pipe.edit([refs for _, refs, _ in chunk], [c.prompt for _, _, c in chunk],
                                [c.seed for _, _, c in chunk], **sampling)
            for img, (_, _, case) in zip(outputs, chunk, strict=True):
                try:
                    save_image(img, case.output)
                    written += 1
                except KontextError as err:
                    bad.append((case.line, str(err)))
            bar.update(len(chunk))
    report_batch(written, total, bad)
    return len(bad)


def report_batch(written: int, total: int, bad: list[tuple[int, str]]) -> None:
    print(f"wrote {written} of {total} cases" + (f"; {len(bad)} failed:" if bad else ""))
    for number, problem in sorted(bad):
        print(f"  line {number}: {problem}", file=sys.stderr)


def turn_path(output: Path, k: int) -> Path:
    return output.with_name(f"{output.stem}_turn{k}{output.suffix}")


def run_sample(cfg) -> int:
    """Run the configured mode; a KontextError becomes one line on stderr and status 2."""
    try:
        return _run(cfg)
    except KontextError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2


def _load(cfg):
    import torch

    from kontext.loading import from_official, load_pipeline

    device = cfg.device
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}.get(cfg.dtype)
    if cfg.dtype is not None and dtype is None:
        raise KontextError(f"dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}")
    kwargs = {"device": device, "batch_size": int(cfg.batch_size), "progress": bool(cfg.progress) and not cfg.batch}
    o = cfg.official
    if o.transformer is not None:
        if cfg.checkpoint:
            raise KontextError("give either checkpoint= or official.*=, not both")
        missing = [f"official.{k}" for k in ("ae", "t5", "clip") if o[k] is None]
        if missing:
            raise KontextError(f"official weights also need {', '.join(m + '=...' for m in missing)}")
        return from_official(o.transformer, o.ae, o.t5, o.clip, preset=o.preset, t5_tokenizer_dir=o.t5_tokenizer,
                             clip_tokenizer_dir=o.clip_tokenizer, dtype=dtype or torch.bfloat16, **kwargs)
    if not cfg.checkpoint:
        raise KontextError("give checkpoint=<run dir | .ckpt | export folder> (or official.*=... files)")
    return load_pipeline(str(cfg.checkpoint), dtype=dtype, **kwargs)


def _run(cfg) -> int:
    from omegaconf import OmegaConf

    turns = list(cfg.turns or [])
    if cfg.batch and (turns or cfg.image is not None or cfg.prompt is not None):
        raise KontextError("batch= takes its images and prompts from the file; drop image=, prompt= and turns=")
    if not cfg.batch and cfg.prompt is None and not turns:
        raise KontextError("give prompt=... (and image=... to edit), turns=[...] or batch=cases.jsonl")
    output = None if cfg.batch else check_output(cfg.output)
    sampling = {"steps": cfg.steps, "guidance": cfg.guidance, "cfg": cfg.cfg, "negative_prompt": cfg.negative_prompt,
                "width": cfg.width, "height": cfg.height,
                "timesteps": None if cfg.timesteps is None else OmegaConf.to_container(cfg.timesteps)}
    image = OmegaConf.to_container(cfg.image) if OmegaConf.is_config(cfg.image) else cfg.image

    if cfg.batch:
        cases, bad = read_batch(cfg.batch, int(cfg.seed))  # before loading the model: fail fast
        if not cases:
            report_batch(0, len(bad), bad)
            return 1
        return 1 if run_batch(_load(cfg), cases, bad, sampling, bool(cfg.progress)) else 0
    pipe = _load(cfg)
    references = pipe.prepare_references(image)  # fails before any sampling on a bad image
    if not turns:
        img = pipe(references, cfg.prompt, seed=int(cfg.seed), **sampling)
        print(f"wrote {save_image(img, output)}")
        return 0
    prompts = ([cfg.prompt] if cfg.prompt is not None else []) + [str(t) for t in turns]
    for k, prompt in enumerate(prompts, start=1):
        references = [pipe(references, prompt, seed=int(cfg.seed), **sampling)]
        print(f"turn {k}: {prompt!r} -> {save_image(references[0], turn_path(output, k))}")
    return 0
