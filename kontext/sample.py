"""What `sample.py` does with a composed config: one edit, a chain of edits, or a batch file.

Modes (see `configs/sample.yaml`):
- single: `image=` (none, one or a list) and `prompt=` -> `output=`;
- turns: `turns=[...]` chains edits, each turn's output the next turn's reference; turn k is
  saved as `<output stem>_turn<k><suffix>` (a `prompt=` given as well is the first turn);
- batch: `batch=cases.jsonl`, one JSON object per line, `{"image": path | [paths] | null,
  "prompt": str, "output": path, "seed": int (optional)}`, UTF-8 unless `batch_encoding=` says
  otherwise; relative paths are relative to the current directory. The model is loaded once; a
  bad line (unreadable JSON, missing key, missing, corrupt or too large image, unwritable or
  repeated output, seed out of range) is skipped and reported at the end; the others are written.

`lora=` merges LoRA adapters (one file or a list, reference or diffusers layout, see
`kontext.formats.lora_files`) into the loaded transformer, each scaled by `lora_scale=` (one number, or
one per file).

Every option, image, adapter file and output path is checked before the model loads, so a
mistake costs a second. Images over `max_pixels` pixels are refused from their header. Outputs are written
atomically (temp file + rename). The same seed gives the same image.
"""

from __future__ import annotations

import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from kontext.cli import check_int, check_writable, read_text
from kontext.errors import KontextError

BATCH_KEYS = {"image", "prompt", "output", "seed"}
SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what torch.Generator.manual_seed takes


@dataclass
class BatchCase:
    line: int
    image: None | str | list[str]
    prompt: str
    output: Path
    seed: int


def check_output(path: str | os.PathLike) -> Path:
    """An output path whose extension Pillow can write, in a place a file can be made."""
    path = Path(str(path)).expanduser()
    if path.suffix.lower() not in Image.registered_extensions():
        raise KontextError(f"output {path}: unknown image extension {path.suffix!r} (use .png, .jpg, .webp, ...)")
    return check_writable(path, "output")


def check_seed(value, what: str = "seed") -> int:
    """A whole number (or its digits as text) that fits the random generator's 64 bits."""
    try:
        seed = int(value)
        ok = not isinstance(value, bool) and (seed == value or isinstance(value, str))
    except (TypeError, ValueError, OverflowError):
        ok = False
    if not ok or not SEED_MIN <= seed <= SEED_MAX:
        raise KontextError(f"{what} must be a whole number from -2**63 to 2**64-1, got {value!r}")
    return seed


def image_paths(image) -> list[str]:
    """The reference paths of an `image=` value: null, one path or a list of paths."""
    if image is None:
        return []
    return [str(i) for i in image] if isinstance(image, (list, tuple)) else [str(image)]


def save_image(img: Image.Image, path: Path) -> Path:
    """Write `img` atomically, creating the folder."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        img.save(tmp, format=Image.registered_extensions()[path.suffix.lower()])
        os.replace(tmp, path)
    except OSError as err:
        tmp.unlink(missing_ok=True)
        raise KontextError(f"cannot write {path}: {err}") from err
    return path


def read_batch(path: str | os.PathLike, default_seed: int,
               encoding: str = "utf-8") -> tuple[list[BatchCase], list[tuple[int, str]]]:
    """(valid cases, [(line number, problem)]) of a JSON-lines batch file; blank lines are skipped."""
    path = Path(str(path)).expanduser()
    if not path.is_file():
        raise KontextError(f"batch file not found: {path}" if not path.is_dir() else f"batch file {path} is a folder")
    cases, bad, outputs = [], [], {}
    for number, text in enumerate(read_text(path, encoding, "batch file", "batch_encoding").splitlines(), start=1):
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
            if not isinstance(entry["output"], str):
                raise KontextError("output must be a path")
            output = check_output(entry["output"])
            seed = check_seed(entry.get("seed", default_seed))
            first = outputs.setdefault(output.resolve(), number)
            if first != number:
                raise KontextError(f"output {output} is also the output of line {first}")
            cases.append(BatchCase(number, image, entry["prompt"], output, seed))
        except (ValueError, TypeError, KontextError) as err:
            bad.append((number, str(err).splitlines()[0]))
    if not cases and not bad:
        raise KontextError(f"batch file {path} has no cases (one JSON object per line)")
    return cases, bad


def load_references(cases: list[BatchCase], bad: list[tuple[int, str]], max_pixels: int | None) -> list[BatchCase]:
    """The cases whose images all read; the others go to `bad`. Each image is decoded once to
    check it and dropped: `run_batch` reads it again, so a long batch never holds every
    original at full size."""
    from kontext.images import load_image

    ready = []
    for case in cases:
        try:
            for path in image_paths(case.image):
                load_image(path, max_pixels).close()
            ready.append(case)
        except KontextError as err:
            bad.append((case.line, str(err)))
    return ready


def run_batch(pipe, cases: list[BatchCase], bad: list[tuple[int, str]], sampling: dict, progress: bool,
              max_pixels: int | None) -> int:
    """Every case of a batch file, their images checked (`bad`: lines already rejected);
    returns the number of failed lines. A case that fails fails alone."""
    from tqdm.auto import tqdm

    from kontext.images import load_image

    bad = list(bad)
    total = len(cases) + len(bad)
    ready = []
    for case in cases:
        try:
            refs = pipe.prepare_references([load_image(p, max_pixels) for p in image_paths(case.image)])
            ready.append((pipe.output_size(refs, sampling["width"], sampling["height"]), refs, case))
        except KontextError as err:
            bad.append((case.line, str(err)))
    ready.sort(key=lambda item: (item[0], tuple(r.size for r in item[1])))  # same sizes together
    written = 0
    with tqdm(total=len(ready), desc="batch", unit="image", disable=not progress) as bar:
        for start in range(0, len(ready), pipe.batch_size):
            chunk = ready[start:start + pipe.batch_size]
            try:
                outputs = pipe.edit([refs for _, refs, _ in chunk], [c.prompt for _, _, c in chunk],
                                    [c.seed for _, _, c in chunk], **sampling)
            except KontextError as err:
                bad += [(case.line, str(err)) for _, _, case in chunk]
                outputs = []
            for img, (_, _, case) in zip(outputs, chunk, strict=False):
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


def _number(cfg, key: str) -> float | None:
    value = cfg[key]
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise KontextError(f"{key} must be a number or null, got {value!r}")
    return value


def check_device(name) -> str:
    """`auto` (a GPU when there is one), `cpu`, `cuda`, `cuda:N` or `mps`, if this machine has it."""
    import torch

    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(str(name))
    except (RuntimeError, TypeError, ValueError) as err:
        raise KontextError(f"device must be auto, cpu, cuda, cuda:N or mps, got {name!r}") from err
    if device.type == "cuda" and not torch.cuda.is_available():
        raise KontextError(f"device={name}, but torch finds no CUDA GPU here; use device=cpu or device=auto")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise KontextError(f"device={name}, but there are {torch.cuda.device_count()} CUDA GPUs")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise KontextError(f"device={name}, but MPS is not available here; use device=cpu or device=auto")
    return str(device)


def _options(cfg) -> dict:
    """The loading and sampling options, every one checked before anything loads."""
    import torch
    from omegaconf import OmegaConf

    from kontext.pipeline import check_timesteps

    dtypes = {None: None, "float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
    if cfg.dtype not in dtypes:
        raise KontextError(f"dtype must be float32, bfloat16 or float16, got {cfg.dtype!r}")
    timesteps = OmegaConf.to_container(cfg.timesteps) if OmegaConf.is_config(cfg.timesteps) else cfg.timesteps
    if timesteps is not None:
        if not isinstance(timesteps, list) or not all(
                isinstance(t, (int, float)) and not isinstance(t, bool) for t in timesteps):
            raise KontextError(f"timesteps must be a list of numbers such as [1.0,0.5,0.0], got {timesteps!r}")
        timesteps = check_timesteps(timesteps)
    negative = cfg.negative_prompt
    from kontext.formats.lora_files import read_adapters

    lora = OmegaConf.to_container(cfg.lora) if OmegaConf.is_config(cfg.lora) else cfg.lora
    scale = OmegaConf.to_container(cfg.lora_scale) if OmegaConf.is_config(cfg.lora_scale) else cfg.lora_scale
    return {
        "lora": read_adapters(lora, scale),
        "device": check_device(cfg.device), "dtype": dtypes[cfg.dtype],
        "batch_size": check_int("batch_size", cfg.batch_size, 1), "progress": bool(cfg.progress),
        "max_pixels": check_int("max_pixels", cfg.max_pixels, 1), "seed": check_seed(cfg.seed),
        "sampling": {"steps": check_int("steps", cfg.steps, 1), "guidance": _number(cfg, "guidance"),
                     "cfg": _number(cfg, "cfg"), "negative_prompt": None if negative is None else str(negative),
                     "width": check_int("width", cfg.width, 1), "height": check_int("height", cfg.height, 1),
                     "timesteps": timesteps},
    }


def _load(cfg, options: dict):
    from kontext.pipeline import KontextPipeline

    kwargs = {"device": options["device"], "batch_size": options["batch_size"],
              "progress": options["progress"] and not cfg.batch}
    dtype = options["dtype"]
    o = cfg.official
    if o.transformer is not None:
        import torch

        pipe = KontextPipeline.from_official(o.transformer, o.ae, o.t5, o.clip, preset=o.preset,
                                             t5_tokenizer_dir=o.t5_tokenizer, clip_tokenizer_dir=o.clip_tokenizer,
                                             dtype=dtype or torch.bfloat16, **kwargs)
    else:
        pipe = KontextPipeline.load(str(cfg.checkpoint), dtype=dtype, **kwargs)
    if options["lora"]:
        from kontext.formats.lora_files import apply_adapters

        apply_adapters(pipe.model, options["lora"])
    return pipe


def _check_source(cfg) -> None:
    o = cfg.official
    if o.transformer is not None:
        if cfg.checkpoint:
            raise KontextError("give either checkpoint= or official.*=, not both")
        missing = [f"official.{k}" for k in ("ae", "t5", "clip") if o[k] is None]
        if missing:
            raise KontextError(f"official weights also need {', '.join(m + '=...' for m in missing)}")
    elif not cfg.checkpoint:
        raise KontextError("give checkpoint=<run dir | .ckpt | export folder> (or official.*=... files)")


def _run(cfg) -> int:
    from omegaconf import OmegaConf

    from kontext.images import load_image

    turns = OmegaConf.to_container(cfg.turns) if OmegaConf.is_config(cfg.turns) else cfg.turns
    turns = [str(t) for t in ([turns] if isinstance(turns, (str, int, float)) else turns or [])]
    prompt = None if cfg.prompt is None else str(cfg.prompt)
    if cfg.batch and (turns or cfg.image is not None or prompt is not None):
        raise KontextError("batch= takes its images and prompts from the file; drop image=, prompt= and turns=")
    if not cfg.batch and prompt is None and not turns:
        raise KontextError("give prompt=... (and image=... to edit), turns=[...] or batch=cases.jsonl")
    options = _options(cfg)
    _check_source(cfg)
    sampling, max_pixels, seed = options["sampling"], options["max_pixels"], options["seed"]

    if cfg.batch:
        cases, bad = read_batch(cfg.batch, seed, str(cfg.batch_encoding))  # before loading the model: fail fast
        cases = load_references(cases, bad, max_pixels)
        if not cases:
            report_batch(0, len(bad), bad)
            return 1
        return 1 if run_batch(_load(cfg, options), cases, bad, sampling, options["progress"], max_pixels) else 0
    output = check_output(cfg.output)
    prompts = ([prompt] if prompt is not None else []) + turns
    if turns:
        for k in range(1, len(prompts) + 1):
            check_writable(turn_path(output, k), "output")
    image = OmegaConf.to_container(cfg.image) if OmegaConf.is_config(cfg.image) else cfg.image
    images = [load_image(p, max_pixels) for p in image_paths(image)]  # fails before the model loads
    pipe = _load(cfg, options)
    references = pipe.prepare_references(images)
    if not turns:
        img = pipe(references, prompt, seed=seed, **sampling)
        print(f"wrote {save_image(img, output)}")
        return 0
    for k, text in enumerate(prompts, start=1):
        references = [pipe(references, text, seed=seed, **sampling)]
        print(f"turn {k}: {text!r} -> {save_image(references[0], turn_path(output, k))}")
    return 0
