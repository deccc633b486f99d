"""Export of the transformer to the diffusers `FluxTransformer2DModel` layout.

Follows the key mapping of diffusers' `convert_flux_transformer_checkpoint_to_diffusers`:
fused qkv / linear1 weights are split into separate q, k, v (and mlp) projections, and the
final adaLN output is reordered from (shift, scale) to diffusers' (scale, shift). The
per-block modulation order (shift, scale, gate) is the same in both layouts.
diffusers hard-codes mlp_ratio 4, biased qkv and RoPE theta 10000, so only such models export.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from kontext.formats.weights import strip_prefix
from kontext.network.model import CHECKPOINT_PREFIXES, FluxParams

# Linear layers renamed one to one (both .weight and .bias).
_TOP = {
    "time_in.in_layer": "time_text_embed.timestep_embedder.linear_1",
    "time_in.out_layer": "time_text_embed.timestep_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "guidance_in.in_layer": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.out_layer": "time_text_embed.guidance_embedder.linear_2",
    "txt_in": "context_embedder",
    "img_in": "x_embedder",
    "final_layer.linear": "proj_out",
}
_DOUBLE = {
    "img_mod.lin": "norm1.linear",
    "txt_mod.lin": "norm1_context.linear",
    "img_attn.proj": "attn.to_out.0",
    "txt_attn.proj": "attn.to_add_out",
    "img_mlp.0": "ff.net.0.proj",
    "img_mlp.2": "ff.net.2",
    "txt_mlp.0": "ff_context.net.0.proj",
    "txt_mlp.2": "ff_context.net.2",
}
_DOUBLE_NORMS = {
    "img_attn.norm.query_norm.scale": "attn.norm_q.weight",
    "img_attn.norm.key_norm.scale": "attn.norm_k.weight",
    "txt_attn.norm.query_norm.scale": "attn.norm_added_q.weight",
    "txt_attn.norm.key_norm.scale": "attn.norm_added_k.weight",
}
_SINGLE = {"modulation.lin": "norm.linear", "linear2": "proj_out"}
_SINGLE_NORMS = {"norm.query_norm.scale": "attn.norm_q.weight", "norm.key_norm.scale": "attn.norm_k.weight"}
# Fused projections whose output rows diffusers keeps as separate layers, in row order.
_DOUBLE_SPLIT = {"img_attn.qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
                 "txt_attn.qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj")}
_SINGLE_SPLIT = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp")}
FINAL_ADALN = ("final_layer.adaLN_modulation.1", "norm_out.linear")  # rows (shift, scale) -> (scale, shift)


def check_exportable(params: FluxParams) -> None:
    fixed = {"mlp_ratio": (params.mlp_ratio, 4.0), "qkv_bias": (params.qkv_bias, True), "theta": (params.theta, 10000)}
    bad = [f"{k}={have} (diffusers needs {need})" for k, (have, need) in fixed.items() if have != need]
    if bad:
        raise ValueError("not representable as a diffusers FluxTransformer2DModel: " + ", ".join(bad))


def diffusers_config(params: FluxParams) -> dict:
    """The `config.json` of the equivalent diffusers `FluxTransformer2DModel`."""
    check_exportable(params)
    return {
        "_class_name": "FluxTransformer2DModel",
        "patch_size": 1,
        "in_channels": params.in_channels,
        "out_channels": params.out_channels,
        "num_layers": params.depth,
        "num_single_layers": params.depth_single_blocks,
        "attention_head_dim": params.head_dim,
        "num_attention_heads": params.num_heads,
        "joint_attention_dim": params.context_in_dim,
        "pooled_projection_dim": params.vec_in_dim,
        "guidance_embeds": params.guidance_embed,
        "axes_dims_rope": list(params.axes_dim),
    }


@dataclass(frozen=True)
class Part:
    """One tensor of the diffusers layout: rows of one reference tensor (`source`), in order."""

    name: str
    source: str
    rows: tuple[tuple[int, int], ...] | None = None  # (start, stop) ranges, concatenated; None: all

    def shape(self, source_shape: Sequence[int]) -> tuple[int, ...]:
        if self.rows is None:
            return tuple(source_shape)
        return (sum(stop - start for start, stop in self.rows), *source_shape[1:])

    def take(self, tensor: Tensor) -> Tensor:
        if self.rows is None:
            return tensor
        pieces = [tensor[start:stop] for start, stop in self.rows]
        return pieces[0] if len(pieces) == 1 else torch.cat(pieces, dim=0)


def _row_ranges(sizes: Sequence[int]) -> list[tuple[int, int]]:
    ends = [sum(sizes[:i + 1]) for i in range(len(sizes))]
    return [(end - size, end) for size, end in zip(sizes, ends, strict=True)]


def _chunks(n: int, parts: int) -> list[int]:
    """Row counts of `Tensor.chunk(parts)` over n rows."""
    size = -(-n // parts)
    return [min(size, n - i * size) for i in range(parts) if n - i * size > 0]


def diffusers_plan(shapes: Mapping[str, Sequence[int]], params: FluxParams) -> list[Part]:
    """The diffusers tensors of a reference-layout state dict, given only its tensor shapes (keys
    may carry a `CHECKPOINT_PREFIXES` prefix, which `Part.source` drops); every tensor must be used.
    `bfl_to_diffusers` applies it to tensors, `kontext.sharded_export` to a checkpoint, tensor by tensor."""
    check_exportable(params)
    src = strip_prefix(shapes, CHECKPOINT_PREFIXES)
    plan: list[Part] = []
    used: set[str] = set()

    def take(key: str) -> Sequence[int]:
        used.add(key)
        return src[key]

    def linear(bfl: str, hf: str) -> None:
        for kind in ("weight", "bias"):
            if f"{bfl}.{kind}" in src:
                take(f"{bfl}.{kind}")
                plan.append(Part(f"{hf}.{kind}", f"{bfl}.{kind}"))

    def split(bfl: str, hf_names: Sequence[str], sizes: Sequence[int] | None) -> None:
        rows = take(bfl)[0]
        sizes = _chunks(rows, len(hf_names)) if sizes is None else sizes
        if sum(sizes) != rows or len(sizes) != len(hf_names):
            raise ValueError(f"{bfl} has {rows} rows, not the {' + '.join(map(str, sizes))} of {', '.join(hf_names)}")
        for name, rng in zip(hf_names, _row_ranges(sizes), strict=True):
            plan.append(Part(name, bfl, (rng,)))

    h, mlp = params.hidden_size, int(params.hidden_size * params.mlp_ratio)
    for bfl, hf in _TOP.items():
        linear(bfl, hf)
    for kind in ("weight", "bias"):  # rows (shift, scale) -> (scale, shift), as Tensor.chunk(2) halves them
        bfl = f"{FINAL_ADALN[0]}.{kind}"
        shift, scale = _row_ranges(_chunks(take(bfl)[0], 2))
        plan.append(Part(f"{FINAL_ADALN[1]}.{kind}", bfl, (scale, shift)))

    for i in range(params.depth):
        b, d = f"double_blocks.{i}.", f"transformer_blocks.{i}."
        for bfl, hf in _DOUBLE.items():
            linear(b + bfl, d + hf)
        for bfl, hf in _DOUBLE_NORMS.items():
            take(b + bfl)
            plan.append(Part(d + hf, b + bfl))
        for bfl, names in _DOUBLE_SPLIT.items():
            for kind in ("weight", "bias"):
                split(f"{b}{bfl}.{kind}", [f"{d}{name}.{kind}" for name in names], None)

    for i in range(params.depth_single_blocks):
        b, d = f"single_blocks.{i}.", f"single_transformer_blocks.{i}."
        for bfl, hf in _SINGLE.items():
            linear(b + bfl, d + hf)
        for bfl, hf in _SINGLE_NORMS.items():
            take(b + bfl)
            plan.append(Part(d + hf, b + bfl))
        for bfl, names in _SINGLE_SPLIT.items():
            for kind in ("weight", "bias"):
                split(f"{b}{bfl}.{kind}", [f"{d}{name}.{kind}" for name in names], [h, h, h, mlp])

    left = sorted(set(src) - used)
    if left:
        raise KeyError(f"{len(left)} tensors have no diffusers name (e.g. {', '.join(left[:5])})")
    return plan


def bfl_to_diffusers(sd: Mapping[str, Tensor], params: FluxParams) -> dict[str, Tensor]:
    """Convert a reference-layout state dict to diffusers names; every tensor must be used."""
    src = strip_prefix(sd, CHECKPOINT_PREFIXES)
    plan = diffusers_plan({k: tuple(v.shape) for k, v in src.items()}, params)
    return {part.name: part.take(src[part.source]).contiguous() for part in plan}


def diffusers_linears(name: str) -> tuple[str, ...]:
    """The diffusers layer(s) of the reference linear layer `name`: one, or for a fused projection
    (`img_attn.qkv`, `txt_attn.qkv`, `linear1`) the layers its output rows split into, in row
    order (`split_rows` gives their sizes). The final adaLN layer also swaps its two halves."""
    if name == FINAL_ADALN[0]:
        return (FINAL_ADALN[1],)
    if name in _TOP:
        return (_TOP[name],)
    for block, hf_block, renamed, split in (("double_blocks", "transformer_blocks", _DOUBLE, _DOUBLE_SPLIT),
                                            ("single_blocks", "single_transformer_blocks", _SINGLE, _SINGLE_SPLIT)):
        prefix, dot, rest = name.partition(".")
        index, _, sub = rest.partition(".")
        if prefix == block and dot and index.isdigit():
            if sub in renamed:
                return (f"{hf_block}.{index}.{renamed[sub]}",)
            if sub in split:
                return tuple(f"{hf_block}.{index}.{part}" for part in split[sub])
    raise KeyError(f"{name} is not a linear layer of the reference layout")


def reference_linear(hf_name: str) -> tuple[str, int]:
    """The inverse of `diffusers_linears`: (reference layer, index of this part of its rows)."""
    top = {hf: bfl for bfl, hf in _TOP.items()} | {FINAL_ADALN[1]: FINAL_ADALN[0]}
    if hf_name in top:
        return top[hf_name], 0
    for block, hf_block, renamed, split in (("double_blocks", "transformer_blocks", _DOUBLE, _DOUBLE_SPLIT),
                                            ("single_blocks", "single_transformer_blocks", _SINGLE, _SINGLE_SPLIT)):
        prefix, dot, rest = hf_name.partition(".")
        index, _, sub = rest.partition(".")
        if prefix == hf_block and dot and index.isdigit():
            for bfl, hf in renamed.items():
                if sub == hf:
                    return f"{block}.{index}.{bfl}", 0
            for bfl, parts in split.items():
                if sub in parts:
                    return f"{block}.{index}.{bfl}", parts.index(sub)
    raise KeyError(f"{hf_name} is not a linear layer of diffusers' FluxTransformer2DModel")


def split_rows(name: str, out_features: int, in_features: int) -> list[int]:
    """Row counts of the diffusers parts of the reference linear layer `name` (see
    `diffusers_linears`): q, k, v of `in_features` (the hidden size) rows each, then the MLP's."""
    parts = len(diffusers_linears(name))
    if parts == 1:
        return [out_features]
    return [in_features] * 3 + ([out_features - 3 * in_features] if parts == 4 else [])
