"""The FLUX.1 rectified-flow transformer, its size presets and its weight files.

Follows the reference FLUX.1 `model.py` (FLUX.1 Kontext paper §2-3): 19 double-stream and 38
single-stream blocks at 12B. Kontext adds no parameters: context-image tokens are appended to
the target tokens in `img` (see `kontext.network.packing`), and `Flux.forward` returns a prediction for
every image token it was given, exactly like the reference; callers keep the target part with
`packing.target_slice`.

Weights are the reference (BFL) layout: official checkpoints load strictly, with or without
the `model.diffusion_model.` prefix of single-file checkpoints. A fresh model is initialised
for training from scratch with adaLN-Zero (DiT): every modulation and the output projection
start at zero, so each block starts as the identity and the first prediction is zero.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from kontext.formats.weights import (
    WeightsError,
    load_into,
    read_metadata,
    read_safetensors,
    save_safetensors,
    strip_prefix,
)
from kontext.network.layers import (
    DoubleStreamBlock,
    EmbedND,
    LastLayer,
    MLPEmbedder,
    RMSNorm,
    SingleStreamBlock,
    timestep_embedding,
)

CHECKPOINT_PREFIXES = ("model.diffusion_model.",)
PARAMS_METADATA_KEY = "kontext.flux_params"
TIME_EMBED_DIM = 256


@dataclass
class FluxParams:
    in_channels: int
    out_channels: int
    vec_in_dim: int
    context_in_dim: int
    hidden_size: int
    mlp_ratio: float
    num_heads: int
    depth: int
    depth_single_blocks: int
    axes_dim: list[int]
    theta: int
    qkv_bias: bool
    guidance_embed: bool

    def __post_init__(self):
        self.axes_dim = [int(a) for a in self.axes_dim]  # a Hydra ListConfig becomes a list

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads


def _preset(hidden_size, num_heads, depth, depth_single_blocks, axes_dim, guidance_embed,
            vec_in_dim=768, context_in_dim=4096, in_channels=64) -> FluxParams:
    return FluxParams(
        in_channels=in_channels, out_channels=64, vec_in_dim=vec_in_dim, context_in_dim=context_in_dim,
        hidden_size=hidden_size, mlp_ratio=4.0, num_heads=num_heads, depth=depth,
        depth_single_blocks=depth_single_blocks, axes_dim=axes_dim, theta=10_000, qkv_bias=True,
        guidance_embed=guidance_embed,
    )


FLUX_PRESETS: dict[str, FluxParams] = {
    # Unit tests: milliseconds per step. Text dims match the embedded (MiniLM) text encoder.
    "tiny": _preset(64, 4, 2, 2, [4, 6, 6], True, vec_in_dim=384, context_in_dim=384),
    # The embedded demo (MiniLM text features, 384-d), sized for the CPU main job.
    # 12 heads of 16 dims: 75.8% of the benchmark over training seeds 0-2 against 69.3% with 6
    # heads of 32, at the same step time (README, "What the main job measures today").
    "small": _preset(192, 12, 2, 4, [4, 6, 6], False, vec_in_dim=384, context_in_dim=384),
    "flux-dev": _preset(3072, 24, 19, 38, [16, 56, 56], True),
    "flux-schnell": _preset(3072, 24, 19, 38, [16, 56, 56], False),
    "flux-dev-kontext": _preset(3072, 24, 19, 38, [16, 56, 56], True),
}


def get_params(params_or_name: FluxParams | str) -> FluxParams:
    if isinstance(params_or_name, FluxParams):
        return params_or_name
    if params_or_name not in FLUX_PRESETS:
        raise KeyError(f"unknown FLUX preset {params_or_name!r}; known: {sorted(FLUX_PRESETS)}")
    return dataclasses.replace(FLUX_PRESETS[params_or_name])


class Flux(nn.Module):
    """Transformer over packed latent tokens, conditioned on text and time."""

    def __init__(self, params: FluxParams):
        super().__init__()
        self.params = params
        self.in_channels = params.in_channels
        self.out_channels = params.out_channels
        if params.hidden_size % params.num_heads != 0:
            raise ValueError(f"hidden_size {params.hidden_size} is not divisible by num_heads {params.num_heads}")
        pe_dim = params.hidden_size // params.num_heads
        if sum(params.axes_dim) != pe_dim:
            raise ValueError(f"axes_dim {params.axes_dim} must sum to the head dim {pe_dim}")
        self.hidden_size = params.hidden_size
        self.num_heads = params.num_heads
        self.pe_embedder = EmbedND(dim=pe_dim, theta=params.theta, axes_dim=params.axes_dim)
        self.img_in = nn.Linear(self.in_channels, self.hidden_size, bias=True)
        self.time_in = MLPEmbedder(in_dim=TIME_EMBED_DIM, hidden_dim=self.hidden_size)
        self.vector_in = MLPEmbedder(params.vec_in_dim, self.hidden_size)
        self.guidance_in = (
            MLPEmbedder(in_dim=TIME_EMBED_DIM, hidden_dim=self.hidden_size) if params.guidance_embed else nn.Identity()
        )
        self.txt_in = nn.Linear(params.context_in_dim, self.hidden_size)

        self.double_blocks = nn.ModuleList(
            DoubleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio, qkv_bias=params.qkv_bias)
            for _ in range(params.depth)
        )
        self.single_blocks = nn.ModuleList(
            SingleStreamBlock(self.hidden_size, self.num_heads, mlp_ratio=params.mlp_ratio)
            for _ in range(params.depth_single_blocks)
        )
        self.final_layer = LastLayer(self.hidden_size, 1, self.out_channels)
        self.init_weights()

    @torch.no_grad()
    def init_weights(self, each: Callable[[Tensor, Callable[[Tensor], object]], None] | None = None) -> None:
        """Initialisation for training from scratch (DiT / adaLN-Zero). `each(tensor, init)` applies
        one in-place initialiser to one tensor (default: `init(tensor)`; a model built on `meta` is
        left alone unless `each` is given, e.g. `kontext.formats.slices.init_rows` once it is sharded)."""
        if each is None:
            if any(p.is_meta for p in self.parameters()):
                return
            each = _apply
        for m in self.modules():
            if isinstance(m, nn.Linear):
                each(m.weight, nn.init.xavier_uniform_)
                if m.bias is not None:
                    each(m.bias, nn.init.zeros_)
            elif isinstance(m, RMSNorm):
                each(m.scale, nn.init.ones_)
        embedders = [self.time_in, self.vector_in] + ([self.guidance_in] if self.params.guidance_embed else [])
        for emb in embedders:
            each(emb.in_layer.weight, _normal_002)
            each(emb.out_layer.weight, _normal_002)
        zero = [blk.img_mod.lin for blk in self.double_blocks] + [blk.txt_mod.lin for blk in self.double_blocks]
        zero += [blk.modulation.lin for blk in self.single_blocks]
        zero += [self.final_layer.adaLN_modulation[1], self.final_layer.linear]
        for lin in zero:
            each(lin.weight, nn.init.zeros_)
            each(lin.bias, nn.init.zeros_)

    def forward(
        self,
        img: Tensor,       # (B, L_img, in_channels): target tokens, then any context tokens
        img_ids: Tensor,   # (B, L_img, 3)
        txt: Tensor,       # (B, L_txt, context_in_dim)
        txt_ids: Tensor,   # (B, L_txt, 3)
        t: Tensor,         # (B,) flow time in [0, 1]
        y: Tensor,         # (B, vec_in_dim) pooled text vector
        guidance: Tensor | None = None,  # (B,) guidance scale, for guidance-distilled models
        txt_multiplicity: Tensor | None = None,  # (B, L_txt): identical text rows each row stands for
        n_out: int | None = None,  # predict only the first n_out image tokens (the target); None: all
    ) -> Tensor:           # (B, n_out or L_img, out_channels): one prediction per image token asked for
        if img.ndim != 3 or txt.ndim != 3:
            raise ValueError("img and txt must have 3 dimensions (B, L, C)")
        if img_ids.shape[1] != img.shape[1] or txt_ids.shape[1] != txt.shape[1]:
            raise ValueError(
                f"ids do not match their tokens: img {tuple(img.shape)} vs img_ids {tuple(img_ids.shape)}, "
                f"txt {tuple(txt.shape)} vs txt_ids {tuple(txt_ids.shape)}"
            )

        img = self.img_in(img)
        # The sinusoids follow the network's dtype, whatever the dtype of the scalars t and guidance.
        vec = self.time_in(timestep_embedding(t, TIME_EMBED_DIM).to(img.dtype))
        if self.params.guidance_embed:
            if guidance is None:
                raise ValueError("this model is guidance-distilled (guidance_embed=True): pass a guidance value")
            vec = vec + self.guidance_in(timestep_embedding(guidance, TIME_EMBED_DIM).to(img.dtype))
        vec = vec + self.vector_in(y)
        txt = self.txt_in(txt)

        pe = self.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))  # (B, 1, L_txt + L_img, D_head/2) complex
        key_bias = None  # see packing.compact_text: the log of each text row's multiplicity
        if txt_multiplicity is not None:
            if txt_multiplicity.shape != txt.shape[:2]:
                raise ValueError(f"txt_multiplicity {tuple(txt_multiplicity.shape)} must be (B, L_txt) "
                                 f"= {tuple(txt.shape[:2])}")
            key_bias = torch.cat((txt_multiplicity.float().log(), img.new_zeros(img.shape[:2], dtype=torch.float32)), dim=1)
        for block in self.double_blocks:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe, key_bias=key_bias)

        n_txt = txt.shape[1]
        rows = slice(n_txt, n_txt + (img.shape[1] if n_out is None else n_out))  # the image tokens asked for
        x = torch.cat((txt, img), dim=1)  # (B, L_txt + L_img, D)
        for i, block in enumerate(self.single_blocks):
            # The last block computes only the rows asked for: text (and context) outputs go unread.
            x = block(x, vec=vec, pe=pe, key_bias=key_bias, rows=rows if i == len(self.single_blocks) - 1 else None)
        img = x if self.single_blocks else x[:, rows]

        return self.final_layer(img, vec)  # (B, n_out, out_channels)


def _apply(tensor: Tensor, init: Callable[[Tensor], object]) -> None:
    init(tensor)


def _normal_002(tensor: Tensor) -> None:
    nn.init.normal_(tensor, std=0.02)


@torch.no_grad()
def init_like_construction(model: Flux, each: Callable[[Tensor, Callable[[Tensor], object]], None] | None = None) -> None:
    """What `Flux(params)` does to the random generator and to the weights, on a model built
    elsewhere (on `meta`, then sharded and materialised): the draws of each `nn.Linear`'s own
    initialisation at construction, in construction order, then `init_weights(each)`. Without
    `each` nothing is written (the draws land in scratch tensors): the generator is only
    advanced as construction would have advanced it. The one-process values and generator
    state follow whatever the model is built on (a test checks it against `Flux(params)`)."""
    for m in model.modules():
        if isinstance(m, nn.Linear):  # kaiming-uniform weight, uniform bias: one draw per element
            torch.empty(m.weight.shape, dtype=m.weight.dtype, device="cpu").uniform_()
            if m.bias is not None:
                torch.empty(m.bias.shape, dtype=m.bias.dtype, device="cpu").uniform_()
    model.init_weights(each or _scratch)


def _scratch(tensor: Tensor, init: Callable[[Tensor], object]) -> None:
    init(torch.empty(tensor.shape, dtype=tensor.dtype, device="cpu"))


@contextlib.contextmanager
def _default_dtype(dtype: torch.dtype | None):
    old = torch.get_default_dtype()
    if dtype is not None:
        torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(old)


def build_flux(
    params_or_name: FluxParams | str,
    device: str | torch.device | None = None,
    dtype: torch.dtype | None = None,
) -> Flux:
    """A fresh Flux. On device 'meta' it allocates nothing (seconds even at 12B; load with assign)."""
    params = get_params(params_or_name)
    place = contextlib.nullcontext() if device is None else torch.device(device)
    with place, _default_dtype(dtype):
        return Flux(params)


def read_flux(
    path: str | os.PathLike,
    params: FluxParams | str | None = None,
    device: str | torch.device = "cpu",
) -> tuple[FluxParams, dict[str, Tensor]]:
    """A reference-format transformer file's params (`file_params`) and its weights, read to `device`."""
    return file_params(path, params), strip_prefix(read_safetensors(path, device=device), CHECKPOINT_PREFIXES)


def file_params(path: str | os.PathLike, params: FluxParams | str | None = None) -> FluxParams:
    """`params` (a preset name or FluxParams), by default the ones `save_flux` recorded in the
    metadata of the reference-format file `path` (its header alone is read)."""
    if params is None:
        meta = read_metadata(path)
        if PARAMS_METADATA_KEY not in meta:
            raise WeightsError(f"{path} records no FluxParams; pass params (e.g. 'flux-dev-kontext')")
        params = FluxParams(**json.loads(meta[PARAMS_METADATA_KEY]))
    return get_params(params)


def flux_from_weights(params: FluxParams, weights: dict[str, Tensor], what: str = "Flux weights",
                      device: str | torch.device = "cpu", dtype: torch.dtype | None = None) -> Flux:
    """A Flux holding `weights`, loaded strictly (built on meta: the tensors are used, not copied)."""
    model = build_flux(params, device="meta")
    load_into(model, weights, what=what, assign=True)
    return model.to(device=device, dtype=dtype)


def load_flux(
    path: str | os.PathLike,
    params: FluxParams | str | None = None,
    device: str | torch.device = "cpu",
    dtype: torch.dtype | None = None,
) -> Flux:
    """Load a reference-format transformer file strictly.

    `params` defaults to the ones recorded by `save_flux` in the file's metadata. Tensors keep
    the file's dtype unless `dtype` is given.
    """
    params, weights = read_flux(path, params, device=device)
    return flux_from_weights(params, weights, f"Flux weights in {path}", device=device, dtype=dtype)


def flux_metadata(params: FluxParams, metadata: dict | None = None) -> dict:
    """The metadata of a reference-format transformer file: the FluxParams, then `metadata`."""
    return {"format": "pt", PARAMS_METADATA_KEY: json.dumps(dataclasses.asdict(params)), **(metadata or {})}


def save_flux(model: Flux, path: str | os.PathLike, metadata: dict | None = None) -> os.PathLike:
    """Write the reference-format state dict, with the FluxParams in the metadata."""
    return save_safetensors(model.state_dict(), path, flux_metadata(model.params, metadata))
