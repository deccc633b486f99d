"""LoRA adapters as files other tools load, and merging them into a model's weights.

An `Adapter` maps reference layer names (`double_blocks.0.img_attn.qkv`) to `LoraWeights`:
down (lora_A, (r, in)), up (lora_B, (out, r)) and alpha; merged with scale s, the layer's weight
becomes `W + s * (alpha / r) * up @ down` (Hu et al. 2021; peft's and ComfyUI's convention).

Two layouts, both safetensors with the rank and alpha in the metadata:
- reference (`save_reference`): `diffusion_model.<layer>.lora_A.weight`, `.lora_B.weight` and a
  0-d `.alpha` per layer, the keys ComfyUI's LoRA loader reads for FLUX models; the metadata
  also has kohya's `ss_network_dim` / `ss_network_alpha`.
- diffusers / PEFT (`save_diffusers`): `transformer.<diffusers layer>.lora_A.weight`, what
  `FluxTransformer2DModel.load_lora_adapter` and the pipelines' `load_lora_weights` read. A fused
  projection (qkv, `linear1`) becomes its diffusers parts (`to_q`, `to_k`, `to_v`, `proj_mlp`),
  each with the same A and its rows of B: the same update at the same rank. The scale alpha / r
  is folded into B and alpha set to r, because not every loader reads the alpha (diffusers'
  `load_lora_adapter(path)` drops the file's metadata unless given `use_safetensors=True`; with
  no alpha, diffusers and ComfyUI take scale 1). diffusers' `lora_adapter_metadata` (a
  `LoraConfig` record, keys `transformer.*`) says so; the trained rank and alpha are in the
  `kontext.network.lora` record.

`read_adapter` reads either layout (reference keys with or without a prefix). A diffusers file
whose q, k and v parts have their own A (another trainer's) is fused back exactly, as one
adapter of rank r_q + r_k + r_v whose B is block-diagonal.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import Tensor, nn

from kontext.errors import KontextError
from kontext.formats.weights import read_metadata, read_safetensors, save_safetensors

REFERENCE_PREFIX = "diffusion_model."
DIFFUSERS_PREFIX = "transformer."
PREFIXES = ("model.diffusion_model.", REFERENCE_PREFIX, "")
METADATA_KEY = "kontext.network.lora"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
REFERENCE_FILE = "adapter.safetensors"
DIFFUSERS_FILE = "diffusers/pytorch_lora_weights.safetensors"  # the name load_lora_weights(folder) looks for


@dataclass
class LoraWeights:
    down: Tensor  # lora_A: (rank, in_features)
    up: Tensor    # lora_B: (out_features, rank)
    alpha: float

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self) -> Tensor:
        """The update of the layer's weight, (out, in), in fp32."""
        return (self.alpha / self.rank) * (self.up.float() @ self.down.float())


@dataclass
class Adapter:
    layers: dict[str, LoraWeights] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        """The most common rank (every layer's, for an adapter this codebase trained)."""
        return Counter(w.rank for w in self.layers.values()).most_common(1)[0][0]

    @property
    def alpha(self) -> float:
        return Counter(w.alpha for w in self.layers.values()).most_common(1)[0][0]

    def numel(self) -> int:
        return sum(w.down.numel() + w.up.numel() for w in self.layers.values())


# ------------------------------------------------------------------------------------ writing
def _metadata(adapter: Adapter, layout: str, info: dict | None) -> dict:
    return {"format": "pt", METADATA_KEY: json.dumps({"layout": layout, "rank": adapter.rank, "alpha": adapter.alpha,
                                                       "layers": len(adapter.layers), **(info or {})})}


def save_reference(adapter: Adapter, path: str | os.PathLike, info: dict | None = None) -> Path:
    """The reference (ComfyUI) layout, see the module docstring; `info` joins the metadata."""
    sd = {}
    for name, w in adapter.layers.items():
        sd[f"{REFERENCE_PREFIX}{name}.lora_A.weight"] = w.down
        sd[f"{REFERENCE_PREFIX}{name}.lora_B.weight"] = w.up
        sd[f"{REFERENCE_PREFIX}{name}.alpha"] = torch.tensor(float(w.alpha))
    meta = {**_metadata(adapter, "reference", info), "ss_network_dim": str(adapter.rank),
            "ss_network_alpha": f"{adapter.alpha:g}"}
    return save_safetensors(sd, path, meta)


def to_diffusers(adapter: Adapter) -> tuple[dict[str, Tensor], dict]:
    """(state dict, LoraConfig record) of the diffusers / PEFT layout, without the prefix."""
    from kontext.formats.diffusers_format import FINAL_ADALN, diffusers_linears, split_rows

    sd, ranks = {}, {}
    for name, w in adapter.layers.items():
        try:
            parts = diffusers_linears(name)
        except KeyError as err:
            raise KontextError(f"cannot write the adapter in the diffusers layout: {err.args[0]}") from err
        up = w.up * (w.alpha / w.rank) if w.alpha != w.rank else w.up  # scale 1 (alpha = r) for any loader
        up = torch.cat(up.chunk(2)[::-1]) if name == FINAL_ADALN[0] else up  # (shift, scale) -> (scale, shift)
        for part, rows in zip(parts, up.split(split_rows(name, up.shape[0], w.down.shape[1])), strict=True):
            sd[f"{part}.lora_A.weight"] = w.down.clone()  # each part its own copy (safetensors shares nothing)
            sd[f"{part}.lora_B.weight"] = rows.contiguous()
            ranks[part] = w.rank
    r = adapter.rank
    # peft matches pattern keys as regular expressions: anchored full names
    others = {f"^{k}$": v for k, v in ranks.items() if v != r}
    config = {"r": r, "lora_alpha": r, "target_modules": sorted(ranks), "rank_pattern": others, "alpha_pattern": others}
    return sd, config


def save_diffusers(adapter: Adapter, path: str | os.PathLike, info: dict | None = None) -> Path:
    """The diffusers / PEFT layout, see the module docstring; `info` joins the metadata."""
    sd, config = to_diffusers(adapter)
    meta = _metadata(adapter, "diffusers", info)
    meta[DIFFUSERS_METADATA_KEY] = json.dumps({f"{DIFFUSERS_PREFIX}{k}": v for k, v in config.items()}, sort_keys=True)
    return save_safetensors({f"{DIFFUSERS_PREFIX}{k}": v for k, v in sd.items()}, path, meta)


def save_adapter_files(adapter: Adapter, folder: str | os.PathLike, info: dict | None = None) -> dict[str, Path]:
    """Both layouts into `folder`: `adapter.safetensors` (reference) and
    `diffusers/pytorch_lora_weights.safetensors`; the diffusers one only if the adapted layers
    exist in diffusers' model (they all do for the FLUX layout)."""
    folder = Path(folder)
    return {"reference": save_reference(adapter, folder / REFERENCE_FILE, info),
            "diffusers": save_diffusers(adapter, folder / DIFFUSERS_FILE, info)}


# ------------------------------------------------------------------------------------ reading
def read_adapter(path: str | os.PathLike) -> Adapter:
    """An adapter file in either layout; anything else is a one-line `KontextError`."""
    path = Path(path).expanduser()
    if path.is_dir():
        candidates = [path / REFERENCE_FILE, path / DIFFUSERS_FILE, path / "pytorch_lora_weights.safetensors"]
        path = next((c for c in candidates if c.is_file()), path / REFERENCE_FILE)
    if not path.is_file():
        raise KontextError(f"LoRA file not found: {path}")
    sd = read_safetensors(path)
    meta = read_metadata(path)
    if not sd:
        raise KontextError(f"{path} holds no tensors: not a LoRA file")
    try:
        if all(k.startswith(DIFFUSERS_PREFIX) for k in sd):
            return _from_diffusers({k[len(DIFFUSERS_PREFIX):]: v for k, v in sd.items()}, meta)
        return _from_reference(sd, meta)
    except KontextError as err:
        raise KontextError(f"{path}: {err}") from err


_DOWN = (".lora_A.weight", ".lora_down.weight")
_UP = (".lora_B.weight", ".lora_up.weight")


def _pairs(sd: dict[str, Tensor]) -> dict[str, dict[str, Tensor]]:
    """{layer: {"down", "up", "alpha"}} from `<layer>.lora_A.weight` (or kohya's lora_down) keys."""
    layers: dict[str, dict[str, Tensor]] = {}
    for key, value in sd.items():
        for kind, suffixes in (("down", _DOWN), ("up", _UP), ("alpha", (".alpha",))):
            suffix = next((s for s in suffixes if key.endswith(s)), None)
            if suffix:
                layers.setdefault(key[: -len(suffix)], {})[kind] = value
                break
        else:
            raise KontextError(f"{key!r} is not a LoRA weight (expected <layer>.lora_A.weight, .lora_B.weight, .alpha)")
    broken = sorted(name for name, parts in layers.items() if not {"down", "up"} <= set(parts))
    if broken:
        raise KontextError(f"{len(broken)} layers lack their lora_A or lora_B (e.g. {broken[0]})")
    for name, parts in layers.items():
        down, up = parts["down"], parts["up"]
        if down.ndim != 2 or up.ndim != 2 or up.shape[1] != down.shape[0]:
            raise KontextError(f"{name}: lora_A {tuple(down.shape)} and lora_B {tuple(up.shape)} do not form a "
                               "low-rank pair")
    return layers


def _default_alpha(meta: dict) -> float | None:
    try:
        return float(json.loads(meta[METADATA_KEY])["alpha"]) if METADATA_KEY in meta else None
    except (ValueError, KeyError, TypeError):
        return None


def _from_reference(sd: dict[str, Tensor], meta: dict) -> Adapter:
    prefix = next(p for p in PREFIXES if all(k.startswith(p) for k in sd))
    layers = _pairs({k[len(prefix):]: v for k, v in sd.items()})
    alpha = _default_alpha(meta)
    return Adapter({name: LoraWeights(p["down"], p["up"], float(p["alpha"]) if "alpha" in p
                                      else alpha if alpha is not None else float(p["down"].shape[0]))
                    for name, p in layers.items()})


def _diffusers_alpha(meta: dict) -> tuple[float | None, dict]:
    """(lora_alpha, alpha_pattern) of diffusers' LoraConfig record in the file, if any."""
    try:
        config = json.loads(meta.get(DIFFUSERS_METADATA_KEY) or "{}")
    except ValueError:
        return None, {}
    config = {k[len(DIFFUSERS_PREFIX):]: v for k, v in config.items() if k.startswith(DIFFUSERS_PREFIX)}
    return config.get("lora_alpha"), config.get("alpha_pattern") or {}


def _from_diffusers(sd: dict[str, Tensor], meta: dict) -> Adapter:
    import re

    from kontext.formats.diffusers_format import FINAL_ADALN, diffusers_linears, reference_linear, split_rows

    alpha, pattern = _diffusers_alpha(meta)
    parts: dict[str, dict[int, LoraWeights]] = {}
    for hf, p in _pairs(sd).items():
        try:
            name, index = reference_linear(hf)
        except KeyError as err:
            raise KontextError(err.args[0]) from err
        part_alpha = next((float(v) for k, v in pattern.items() if re.fullmatch(k.lstrip("^").rstrip("$"), hf)),
                          float(p["alpha"]) if "alpha" in p else float(alpha) if alpha is not None
                          else float(p["down"].shape[0]))  # no alpha anywhere: diffusers' scale 1
        parts.setdefault(name, {})[index] = LoraWeights(p["down"], p["up"], part_alpha)

    layers = {}
    for name, got in parts.items():
        n_parts = len(diffusers_linears(name))
        if n_parts == 1:
            w = got[0]
        else:
            hidden = next(iter(got.values())).down.shape[1]
            mlp = got[3].up.shape[0] if 3 in got else 4 * hidden  # diffusers' FLUX has mlp_ratio 4
            sizes = split_rows(name, 3 * hidden + (mlp if n_parts == 4 else 0), hidden)
            bad = [i for i, p in got.items() if p.up.shape[0] != sizes[i] or p.down.shape[1] != hidden]
            if bad:
                raise KontextError(f"the parts of {name} do not fit together (part {bad[0]}: lora_B "
                                   f"{tuple(got[bad[0]].up.shape)}, expected {sizes[bad[0]]} rows)")
            w = _fuse([got.get(i) for i in range(n_parts)], sizes)
        if name == FINAL_ADALN[0]:  # diffusers' (scale, shift) -> the reference's (shift, scale)
            w = LoraWeights(w.down, torch.cat(w.up.chunk(2)[::-1]), w.alpha)
        layers[name] = w
    return Adapter(layers)


def _fuse(parts: list[LoraWeights | None], rows: list[int]) -> LoraWeights:
    """One adapter for a fused projection from the adapters of its row blocks (None: not
    adapted). Parts sharing one A and one scale (what `to_diffusers` writes) give that A and the
    stacked Bs; otherwise A stacks the parts' As and B is block-diagonal with each part's scale
    folded in (alpha = the total rank, scale 1). Exact either way."""
    present = [p for p in parts if p is not None]
    first = present[0]
    shared = len(present) == len(parts) and all(
        torch.equal(p.down, first.down) and p.alpha / p.rank == first.alpha / first.rank for p in present)
    if shared:
        return LoraWeights(first.down, torch.cat([p.up for p in parts]), first.alpha)
    down = torch.cat([p.down for p in present])
    up = torch.zeros(sum(rows), down.shape[0], dtype=first.up.dtype)
    row = col = 0
    for p, n in zip(parts, rows, strict=True):
        if p is not None:
            up[row:row + n, col:col + p.rank] = p.up * (p.alpha / p.rank)
            col += p.rank
        row += n
    return LoraWeights(down, up, float(down.shape[0]))


# ------------------------------------------------------------------------------------ merging
def check_fits(model: nn.Module, adapter: Adapter, what: str = "the adapter") -> dict[str, nn.Linear]:
    """The model's linear layers the adapter adapts; a layer the model lacks or whose shape
    differs is a one-line `KontextError` naming them."""
    linears = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    missing = [name for name in adapter.layers if name not in linears]
    misshaped = [f"{name}: adapter {w.up.shape[0]}x{w.down.shape[1]} vs layer {tuple(linears[name].weight.shape)}"
                 for name, w in adapter.layers.items()
                 if name in linears and (w.up.shape[0], w.down.shape[1]) != tuple(linears[name].weight.shape)]
    problems = []
    if missing:
        problems.append(f"{len(missing)} layers not in the model (e.g. {', '.join(missing[:3])})")
    if misshaped:
        problems.append(f"{len(misshaped)} of another shape ({'; '.join(misshaped[:3])})")
    if problems:
        raise KontextError(f"{what} does not fit the model: {'; '.join(problems)}")
    return {name: linears[name] for name in adapter.layers}


@torch.no_grad()
def merge(model: nn.Module, adapter: Adapter, scale: float = 1.0, what: str = "the adapter") -> nn.Module:
    """Add `scale` times the adapter's update to the model's weights, in place (computed in fp32,
    stored in the weights' dtype). Nothing changes unless every layer fits (`check_fits`)."""
    for name, layer in check_fits(model, adapter, what).items():
        w = layer.weight
        w.copy_((w.float() + scale * adapter.layers[name].delta().to(w.device)).to(w.dtype))
    return model


def read_adapters(lora, scale=1.0) -> list[tuple[Path, Adapter, float]]:
    """The adapters of a `lora=` option (None, a path or a list of paths) with their strengths
    (`lora_scale=`: one number for all, or one per file), read and checked."""
    paths = [] if lora is None else [str(p) for p in lora] if isinstance(lora, list | tuple) else [str(lora)]
    scales = list(scale) if isinstance(scale, list | tuple) else [scale] * len(paths)
    if not all(isinstance(s, int | float) and not isinstance(s, bool) for s in scales):
        raise KontextError(f"lora_scale must be a number or a list of numbers, got {scale!r}")
    if len(scales) != len(paths):
        raise KontextError(f"lora_scale has {len(scales)} values for {len(paths)} LoRA file(s)")
    return [(Path(p), read_adapter(p), float(s)) for p, s in zip(paths, scales, strict=True)]


def apply_adapters(model: nn.Module, loras: list[tuple[Path, Adapter, float]]) -> nn.Module:
    """Merge each adapter of `read_adapters` into `model`, after checking that all of them fit."""
    for path, adapter, _ in loras:
        check_fits(model, adapter, f"LoRA {path}")
    for path, adapter, scale in loras:
        merge(model, adapter, scale, f"LoRA {path}")
    return model
