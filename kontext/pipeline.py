"""Image editing and generation with a trained model: references + instruction -> image.

`KontextPipeline` holds the flow transformer, the autoencoder, the text encoder and the
sampler defaults. A call encodes zero or more reference images to context latents, encodes
the instruction, runs the Euler sampler of :mod:`kontext.diffusion.sampling` (the same packing as
training; the schedule's shift follows the target token count only) and decodes the target
latent (reference FLUX.1 Kontext sampler, fact sheet §3-4). `edit` does many cases at once,
batching those whose reference and output sizes agree; every case draws its own noise from
its own seed, so an output depends on its seed and inputs only, not on what it was batched
with. Size policy and image conversion: :mod:`kontext.images`. Loading from a run, a
checkpoint, an export folder or the official files: :mod:`kontext.formats.loading` builds the parts (the
trained weights come through :mod:`kontext.artifact`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from itertools import islice
from numbers import Integral

import torch
from PIL import Image
from torch import Tensor

from kontext.diffusion.flow import schedule
from kontext.diffusion.sampling import denoise, get_noise
from kontext.errors import KontextError
from kontext.formats.loading import PipelineParts, official_parts, read_parts
from kontext.images import MAX_AREA, ImageInput, check_output_size, prepare_reference, to_pil, to_tensor
from kontext.network import packing


@dataclass
class SamplerSettings:
    """Sampler defaults of a pipeline; every one can be overridden per call (except shift)."""

    steps: int = 30  # Euler steps over the shifted schedule
    guidance: float = 2.5  # guidance-embedding input (ignored by models without one)
    cfg: float = 1.0  # true classifier-free guidance scale; 1 = off (one forward per step)
    shift: bool = True  # shift the schedule towards noise by the target token count
    timesteps: list[float] | None = None  # explicit times (distilled students), used instead of steps
    negative_prompt: str = ""  # the unconditional prompt of true CFG
    t2i_size: int | list[int] = 1024  # output (width, height), or one side, when there is no reference
    max_area: int = MAX_AREA  # references above this many pixels go to the preferred resolutions

    def __post_init__(self):
        if self.timesteps is not None:
            self.timesteps = check_timesteps(self.timesteps)
        if int(self.steps) < 1:
            raise KontextError(f"steps must be at least 1, got {self.steps}")

    @classmethod
    def from_dict(cls, values: dict | None) -> SamplerSettings:
        values = dict(values or {})
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise KontextError(f"unknown sampler setting(s) {unknown}; known: {sorted(known)}")
        if isinstance(values.get("t2i_size"), Sequence):
            values["t2i_size"] = [int(v) for v in values["t2i_size"]]
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def t2i_width_height(self) -> tuple[int, int]:
        size = self.t2i_size
        return (int(size), int(size)) if isinstance(size, int) else (int(size[0]), int(size[1]))


def check_timesteps(timesteps: Sequence[float] | Tensor) -> list[float]:
    """An explicit time list: at least two, strictly decreasing, within [0, 1]."""
    ts = [float(t) for t in timesteps]
    if len(ts) < 2 or any(b >= a for a, b in zip(ts, ts[1:], strict=False)) or ts[0] > 1 or ts[-1] < 0:
        raise KontextError(f"timesteps must be at least two strictly decreasing times in [0, 1], got {ts}")
    return ts


class KontextPipeline:
    """model: a `Flux`; autoencoder: an `AutoEncoder`; text: a `TextEncoder`.

    Sampler defaults are keyword arguments (see :class:`SamplerSettings`). ``batch_size`` caps
    how many cases `edit` runs in one forward; ``progress`` shows a bar over sampling steps.
    """

    def __init__(self, model, autoencoder, text, *, batch_size: int = 16, progress: bool = False, **sampler):
        self.model = model.eval()
        self.autoencoder = autoencoder.eval()
        self.text = text
        self.sampler = SamplerSettings.from_dict(sampler)
        self.batch_size = int(batch_size)
        self.progress = progress
        self.text_config: dict | None = None  # how to rebuild `text` (set by the loaders, used by export)
        self.source: str | None = None  # where the weights came from (set by the loaders)

    # -- placement ---------------------------------------------------------------------------
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def to(self, device=None, dtype: torch.dtype | None = None) -> KontextPipeline:
        """Move the transformer (and cast it); the autoencoder and text encoder only move."""
        self.model.to(device=device, dtype=dtype)
        self.autoencoder.to(device=device)
        self.text.to(device=device)
        return self

    @property
    def guidance_embed(self) -> bool:
        return bool(getattr(getattr(self.model, "params", None), "guidance_embed", False))

    # -- public API ----------------------------------------------------------------------------
    def __call__(
        self,
        images: None | ImageInput | Sequence[ImageInput] = None,
        prompt: str = "",
        seed: int = 0,
        steps: int | None = None,
        guidance: float | None = None,
        cfg: float | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> Image.Image:
        """Edit the reference image(s) by `prompt`, or generate from it when `images` is None."""
        return self.edit([images], [prompt], [seed], steps=steps, guidance=guidance, cfg=cfg,
                         negative_prompt=negative_prompt, width=width, height=height, timesteps=timesteps)[0]

    def edit(
        self,
        references: Sequence[None | ImageInput | Sequence[ImageInput]],
        prompts: Sequence[str],
        seeds: int | Sequence[int] = 0,
        *,
        steps: int | None = None,
        guidance: float | None = None,
        cfg: float | None = None,
        negative_prompt: str | None = None,
        width: int | None = None,
        height: int | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> list[Image.Image]:
        """One output per case. references[i]: None, one image or a list of images (paths or PIL);
        seeds: one per case, or one int used by every case. width/height apply to every case."""
        if isinstance(prompts, str):
            raise TypeError("edit takes a list of prompts; use the pipeline call for a single case")
        n = len(prompts)
        seeds = [int(seeds)] * n if isinstance(seeds, Integral) else [int(s) for s in seeds]
        if len(references) != n or len(seeds) != n:
            raise KontextError(f"edit got {len(references)} reference lists, {n} prompts and {len(seeds)} seeds")
        plan = self._plan(steps, guidance, cfg, negative_prompt, timesteps)
        refs = [self.prepare_references(r) for r in references]
        sizes = [self.output_size(r, width, height) for r in refs]

        groups: dict[tuple, list[int]] = {}
        for i, (r, size) in enumerate(zip(refs, sizes, strict=True)):
            groups.setdefault((tuple(img.size for img in r), size), []).append(i)
        outputs: list[Image.Image | None] = [None] * n
        for (_, size), members in groups.items():
            it = iter(members)
            while chunk := list(islice(it, self.batch_size)):
                images = self._generate([refs[i] for i in chunk], [prompts[i] for i in chunk],
                                        [seeds[i] for i in chunk], size, plan)
                for i, img in zip(chunk, images, strict=True):
                    outputs[i] = img
        return outputs

    # -- pieces ------------------------------------------------------------------------------
    def prepare_references(self, images: None | ImageInput | Sequence[ImageInput]) -> list[Image.Image]:
        """Loaded, converted and resized references of one case (see :mod:`kontext.images`)."""
        if images is None:
            return []
        if isinstance(images, (str, Image.Image)) or hasattr(images, "__fspath__"):
            images = [images]
        return [prepare_reference(img, self.sampler.max_area) for img in images]

    def output_size(self, references: Sequence[Image.Image], width: int | None, height: int | None) -> tuple[int, int]:
        """(width, height): as asked, else the first reference's (snapped) size, else the t2i default;
        with only one side asked, the other keeps the reference's aspect ratio."""
        base_w, base_h = references[0].size if references else self.sampler.t2i_width_height
        if width is None and height is None:
            width, height = base_w, base_h
        elif width is None:
            width = round(int(height) * base_w / base_h)
        elif height is None:
            height = round(int(width) * base_h / base_w)
        return check_output_size(width, height)

    def _plan(self, steps, guidance, cfg, negative_prompt, timesteps) -> dict:
        s = self.sampler
        if timesteps is not None:
            times = check_timesteps(timesteps)
        elif steps is None and s.timesteps is not None:
            times = s.timesteps
        else:
            steps = s.steps if steps is None else int(steps)
            if steps < 1:
                raise KontextError(f"steps must be at least 1, got {steps}")
            times = None
        return {
            "steps": s.steps if steps is None else int(steps),
            "timesteps": times,
            "guidance": float(s.guidance if guidance is None else guidance) if self.guidance_embed else None,
            "cfg": float(s.cfg if cfg is None else cfg),
            "negative_prompt": s.negative_prompt if negative_prompt is None else negative_prompt,
        }

    def _text(self, prompts: list[str]) -> tuple[Tensor, Tensor]:
        feats = self.text.encode(prompts)
        return feats.txt.to(self.device, self.dtype), feats.vec.to(self.device, self.dtype)

    @torch.no_grad()
    def encode_images(self, images: Sequence[Image.Image]) -> Tensor:
        """Same-size images -> latents (B, 16, H/8, W/8) in the transformer's dtype."""
        p = next(self.autoencoder.parameters())
        return self.autoencoder.encode(to_tensor(images).to(p.device, p.dtype)).to(self.device, self.dtype)

    @torch.no_grad()
    def decode_latents(self, latents: Tensor) -> list[Image.Image]:
        p = next(self.autoencoder.parameters())
        return to_pil(self.autoencoder.decode(latents.to(p.device, p.dtype)))

    @torch.no_grad()
    def _generate(self, refs: list[list[Image.Image]], prompts: list[str], seeds: list[int],
                  size: tuple[int, int], plan: dict) -> list[Image.Image]:
        """One batch of cases that share reference and output sizes."""
        width, height = size
        factor = self.autoencoder.params.downsample
        contexts = [self.encode_images([case[i] for case in refs]) for i in range(len(refs[0]))]
        txt, vec = self._text(prompts)
        noise = torch.cat([get_noise(1, height // factor, width // factor, s, self.device, self.dtype) for s in seeds])
        tokens = packing.prepare(noise, contexts)
        times = plan["timesteps"] or schedule(plan["steps"], tokens.n_img, shift=self.sampler.shift)
        uncond = self._text([plan["negative_prompt"]]) if plan["cfg"] != 1.0 else None
        img = denoise(self.model, tokens, tokens.img, txt, vec, times, guidance=plan["guidance"],
                      cfg_scale=plan["cfg"], uncond=uncond, progress=self.progress)  # (B, L_img, 64)
        return self.decode_latents(tokens.unpack(img))

    # -- loading (the parts: kontext.formats.loading; the weights: kontext.artifact) -------------------
    @classmethod
    def from_parts(cls, parts: PipelineParts, **kwargs) -> KontextPipeline:
        """`kwargs` (sampler settings, batch_size, progress) override what the source records."""
        pipe = cls(parts.model, parts.autoencoder, parts.text, **{**parts.sampler, **kwargs})
        pipe.text_config, pipe.source = parts.text_config, parts.source
        return pipe

    @classmethod
    def load(cls, source, *, checkpoint=None, config=None, text=None, device="cpu", dtype=None,
             **kwargs) -> KontextPipeline:
        """From whatever `source` is: a run directory, a training checkpoint (a `.ckpt` file or an
        FSDP folder) or an export folder (see `kontext.formats.loading.read_parts`)."""
        return cls.from_parts(read_parts(source, checkpoint=checkpoint, config=config, text=text, device=device,
                                         dtype=dtype), **kwargs)

    @classmethod
    def from_run_dir(cls, run_dir, checkpoint=None, **kwargs) -> KontextPipeline:
        return cls.load(run_dir, checkpoint=checkpoint, **kwargs)

    @classmethod
    def from_checkpoint(cls, path, config=None, **kwargs) -> KontextPipeline:
        return cls.load(path, config=config, **kwargs)

    @classmethod
    def from_export(cls, folder, **kwargs) -> KontextPipeline:
        return cls.load(folder, **kwargs)

    @classmethod
    def from_official(cls, transformer_path, ae_path, t5_dir, clip_dir, **kwargs) -> KontextPipeline:
        """The official files (see `kontext.formats.loading.official_parts`; `batch_size` and `progress`
        go to the pipeline)."""
        own = {k: kwargs.pop(k) for k in ("batch_size", "progress") if k in kwargs}
        return cls.from_parts(official_parts(transformer_path, ae_path, t5_dir, clip_dir, **kwargs), **own)
