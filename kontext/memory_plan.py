"""How much memory a training configuration needs, per GPU and per host, before it runs.

    python -m kontext.memory_plan --model flux-dev-kontext --gpus 8 --parallel paper
    python -m kontext.memory_plan --model flux-dev-kontext --gpus 1 --resolution 512 --ac full
    python -m kontext.memory_plan --model small --gpus 1 --parallel default --resolution 64 --batch 24

Where each number comes from (N ranks, P parameters, T of them trained):
- sharded state (FSDP2, one unit per block): fp32 master weights 4P/N, fp32 gradients 4T/N,
  AdamW's two moments 8T/N, the EMA 4T/N. A LoRA run's frozen base is held in `param_dtype`,
  or with `quantize_base` its block linears at one byte per weight plus per-row scales
  (torchao's int8 / fp8 weight-only tensors);
- gathered weights (N > 1): FSDP2 all-gathers one unit at a time in `param_dtype` and prefetches
  the next, so two of the largest unit are whole at once; in backward that unit's gradient is
  also whole, in `param_dtype` and then in `reduce_dtype`, before its reduce-scatter;
- activations: the tensors the forward keeps for backward, counted by running the model's own
  forward on the `meta` device (no memory, no compute) at the planned shapes, with the chosen
  activation checkpointing applied to the real blocks and attention as a fused kernel (flash /
  SDPA's efficient kernels keep q, k, v, the output and one fp32 log-sum-exp per query). With
  checkpointing, backward recomputes one block at a time: its full activations are added once;
- a distillation teacher: under FSDP (N > 1) sharded like the student in `param_dtype`, pb P/N
  (its gathers take turns with the student's); on one GPU a whole fp32 copy;
- frozen encoders on the GPU (T5-XXL encoder and CLIP-L in bf16, the autoencoder in fp32)
  unless the features are cached (`data=shapes_edit_cached`-style training reads no encoder);
- per host, while building: under FSDP (N > 1, no LoRA) the model, its EMA and a teacher are
  built on `meta`, sharded on the device and filled with each rank's rows (of an `init_from`
  file, of a teacher's source, or of one process's initialisation drawn one tensor at a time):
  nothing of the model stays on the host (counted: the largest tensor in fp32, a bound on one
  read or one initialiser's draw). In one process the code builds the whole fp32 model, fills
  it from an `init_from` source one tensor at a time and deep-copies the EMA: a peak of 8P bytes
  (4P + the largest tensor without an EMA), plus a whole fp32 teacher (4P). A LoRA base is the
  `init_from` file's tensors themselves (bf16 at 12B; a checkpoint's EMA is fp32), cast only
  when the run computes in another dtype: the file's bytes, plus pb P then. Times the ranks on
  the host.
Not counted: the CUDA context and the allocator's reserve (plan 1-3 GB per GPU for them), the
data loader, and compile's workspaces. `tests/test_memory_plan.py` checks the counts against
tensors measured on models this machine can run.
"""

from __future__ import annotations

import argparse
import contextlib
from dataclasses import dataclass, field
from unittest import mock

import torch
from torch import Tensor, nn

from kontext.network import attention as attention_module
from kontext.network.model import build_flux, get_params
from kontext.scale import parallel

GIB = 1024**3
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
RECIPES = {  # configs/parallel/*.yaml
    "default": dict(param_dtype="float32", reduce_dtype="float32", ac="none"),
    "paper": dict(param_dtype="bfloat16", reduce_dtype="float32", ac="selective"),
}
# Frozen encoders of the real setup (configs/text/t5_clip.yaml holds them in bf16): T5-v1.1-XXL
# encoder and CLIP ViT-L/14's text model, counted from their configurations on `meta`.
T5_XXL = dict(d_model=4096, d_ff=10240, num_layers=24, num_heads=64, d_kv=64, vocab_size=32128,
              feed_forward_proj="gated-gelu")
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
              max_position_embeddings=77, vocab_size=49408, projection_dim=768)


@dataclass
class PlanConfig:
    model: str = "flux-dev-kontext"
    gpus: int = 8                      # data-parallel ranks (FSDP2 world size)
    gpus_per_host: int = 8
    param_dtype: str = "bfloat16"      # all-gather and compute dtype
    reduce_dtype: str = "float32"      # gradient reduce-scatter dtype
    ac: str = "selective"              # activation checkpointing: none | full | selective
    resolution: int = 1024             # target side in pixels (square); 16 pixels per token side
    contexts: int = 1                  # context images, each the target's size
    batch: int = 1                     # samples per GPU
    txt_tokens: int = 512              # T5 sequence length
    lora_rank: int = 0                 # 0: full fine-tuning; r: LoRA of rank r on every block linear
    quantize_base: str | None = None   # with LoRA: int8 | fp8 weight-only storage of the block linears
    ema: bool = True
    teacher: bool = False              # a distillation stage's teacher (sharded in param_dtype under FSDP)
    encoders_on_gpu: bool = True       # False when training reads cached features
    init_from: bool = True             # the host builds with an init_from file (bf16)
    gpu_gib: float | None = None       # a GPU's memory, to say whether the plan fits


@dataclass
class Plan:
    gpu: dict[str, float] = field(default_factory=dict)   # bytes per GPU, by part
    host_per_rank: float = 0.0
    host: float = 0.0
    params: int = 0
    trained: int = 0
    largest_unit: int = 0
    largest_tensor: int = 0
    tokens: int = 0


def lora_parameters(model: nn.Module, rank: int) -> int:
    """Parameters of rank-`rank` adapters on every linear layer of the double and single blocks."""
    return sum(rank * (m.in_features + m.out_features)
               for block in parallel.blocks(model) for m in block.modules() if isinstance(m, nn.Linear))


# Bytes per stored value and per output row (scale, zero point) of torchao's weight-only tensors
# (`adapter.quantize_base`, kontext.network.quantized.quantize_base).
QUANTIZED_BYTES = {"int8": (1, 4 + 1), "fp8": (1, 4)}


def frozen_base_bytes(model: nn.Module, dtype_bytes: int, quantize: str | None = None) -> int:
    """Bytes of a LoRA run's frozen base: every parameter in the compute dtype, or with
    `quantize` the block linears' weights at one byte each plus their per-row scales."""
    total = dtype_bytes * sum(p.numel() for p in model.parameters())
    if quantize:
        value, row = QUANTIZED_BYTES[quantize]
        for block in parallel.blocks(model):
            for m in block.modules():
                if isinstance(m, nn.Linear):
                    total += (value - dtype_bytes) * m.weight.numel() + row * m.out_features
    return total


def encoder_bytes(with_text: bool = True) -> int:
    """Bytes of the frozen encoders on a GPU: T5-XXL encoder and CLIP-L text in bf16, the FLUX
    autoencoder in fp32."""
    from kontext.latent.autoencoder import AE_PRESETS, AutoEncoder

    with torch.device("meta"):
        total = 4 * sum(p.numel() for p in AutoEncoder(AE_PRESETS["flux"]).parameters())
        if with_text:
            from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

            for model in (T5EncoderModel(T5Config(**T5_XXL)), CLIPTextModel(CLIPTextConfig(**CLIP_L))):
                total += 2 * sum(p.numel() for p in model.parameters())
    return total


def _fused_sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None = None) -> Tensor:
    """Attention as a fused kernel computes it, on any device (`meta` included): PyTorch's
    flash kernel keeps q, k, v, the output and one fp32 log-sum-exp per query and head for
    backward, as FlashAttention does, and no L x L matrix."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v)[0]


def activation_bytes(model: nn.Module, batch: int, n_img: int, n_out: int, n_txt: int,
                     dtype: torch.dtype, fused_attention: bool = True) -> int:
    """Bytes the model's forward keeps for backward at these shapes (counted by running it;
    on `meta` nothing is allocated)."""
    device = next(model.parameters()).device
    p = model.params
    with torch.device(device):
        args = dict(
            img=torch.zeros(batch, n_img, p.in_channels, dtype=dtype),
            img_ids=torch.zeros(batch, n_img, 3), txt=torch.zeros(batch, n_txt, p.context_in_dim, dtype=dtype),
            txt_ids=torch.zeros(batch, n_txt, 3), t=torch.zeros(batch, dtype=dtype),
            y=torch.zeros(batch, p.vec_in_dim, dtype=dtype),
            guidance=torch.zeros(batch, dtype=dtype) if p.guidance_embed else None, n_out=n_out)
    patch = mock.patch.object(attention_module, "_sdpa", _fused_sdpa) if fused_attention else contextlib.nullcontext()
    with patch, torch.enable_grad():
        return parallel.retained_bytes(lambda: model(**args))


def plan(cfg: PlanConfig) -> Plan:
    params = get_params(cfg.model)
    compute = getattr(torch, cfg.param_dtype)
    model = build_flux(params, device="meta", dtype=compute)
    n = cfg.gpus
    out = Plan(params=sum(p.numel() for p in model.parameters()))
    out.trained = lora_parameters(model, cfg.lora_rank) if cfg.lora_rank else out.params
    units = [sum(p.numel() for p in b.parameters()) for b in parallel.blocks(model)]
    out.largest_unit = max(units)
    out.largest_tensor = max(p.numel() for p in model.parameters())
    side = cfg.resolution // 16
    n_out = side * side
    out.tokens = n_out * (1 + cfg.contexts) + cfg.txt_tokens

    pb, rb = DTYPE_BYTES[cfg.param_dtype], DTYPE_BYTES[cfg.reduce_dtype]
    gpu = out.gpu
    if cfg.lora_rank:  # the base frozen in the compute dtype (or quantised), the adapters in fp32
        gpu["weights (sharded)"] = (frozen_base_bytes(model, pb, cfg.quantize_base) + 4 * out.trained) / n
    else:
        gpu["weights (sharded, fp32)"] = 4 * out.params / n
    gpu["gradients (sharded, fp32)"] = 4 * out.trained / n
    gpu["AdamW moments (sharded, fp32)"] = 8 * out.trained / n
    gpu["EMA (sharded, fp32)"] = 4 * out.trained / n if cfg.ema else 0
    if n > 1:  # one GPU holds the whole model: nothing is gathered or reduce-scattered
        gpu["gathered weights (2 units)"] = 2 * pb * out.largest_unit
        gpu["one unit's whole gradient"] = (pb + rb) * out.largest_unit if not cfg.lora_rank else 0

    for block in parallel.blocks(model):
        parallel.checkpoint_block(block, cfg.ac)
    kept = activation_bytes(model, cfg.batch, n_out * (1 + cfg.contexts), n_out, cfg.txt_tokens, compute)
    gpu["activations kept for backward"] = kept
    if cfg.ac != "none":  # backward recomputes one block at a time, whole
        largest = max(parallel.blocks(model), key=lambda b: sum(p.numel() for p in b.parameters()))
        gpu["one block recomputed"] = _block_activations(largest, params, cfg, n_out, compute)
    if cfg.teacher and n > 1:
        gpu[f"teacher (sharded, {cfg.param_dtype})"] = pb * out.params / n
    else:
        gpu["teacher (whole, fp32)"] = 4 * out.params if cfg.teacher else 0
    gpu["frozen encoders"] = encoder_bytes(params.context_in_dim == 4096) if cfg.encoders_on_gpu else 0

    file_bytes = 2 * out.params if cfg.init_from else 0
    if n > 1 and not cfg.lora_rank:  # built on meta, each rank's rows read or drawn one tensor at a time
        out.host_per_rank = 4 * out.largest_tensor
    elif cfg.lora_rank and cfg.init_from:  # the base holds the file's (bf16) tensors, cast once if need be
        out.host_per_rank = file_bytes + (pb * out.params if pb != 2 else 0)
    else:
        # the fp32 model, filled from an `init_from` source one tensor at a time, and its EMA copy
        out.host_per_rank = 4 * out.params + max(4 * out.largest_tensor if cfg.init_from else 0,
                                                 4 * out.params if cfg.ema else 0)
        out.host_per_rank += 4 * out.params if cfg.teacher else 0
    out.host = out.host_per_rank * min(cfg.gpus_per_host, n)
    return out


def _block_activations(block: nn.Module, params, cfg: PlanConfig, n_out: int, dtype: torch.dtype) -> int:
    """Full activations of one block (no checkpointing) at the planned shapes, on `meta`."""
    from kontext.network.layers import DoubleStreamBlock, EmbedND, SingleStreamBlock

    d, heads, b = params.hidden_size, params.num_heads, cfg.batch
    n_img, n_txt = n_out * (1 + cfg.contexts), cfg.txt_tokens
    with torch.device("meta"):
        fresh = (DoubleStreamBlock(d, heads, params.mlp_ratio, params.qkv_bias) if isinstance(block, DoubleStreamBlock)
                 else SingleStreamBlock(d, heads, params.mlp_ratio)).to(dtype)
        pe = EmbedND(d // heads, params.theta, params.axes_dim)(torch.zeros(b, n_txt + n_img, 3))
        img = torch.zeros(b, n_img, d, dtype=dtype, requires_grad=True)
        txt = torch.zeros(b, n_txt, d, dtype=dtype, requires_grad=True)
        vec = torch.zeros(b, d, dtype=dtype)
    call = (lambda: fresh(img, txt, vec, pe)) if isinstance(fresh, DoubleStreamBlock) else (
        lambda: fresh(torch.cat((txt, img), 1), vec, pe))
    with mock.patch.object(attention_module, "_sdpa", _fused_sdpa), torch.enable_grad():
        return parallel.retained_bytes(call)


def report(cfg: PlanConfig, result: Plan) -> str:
    total = sum(result.gpu.values())
    lines = [
        f"{cfg.model}: {result.params / 1e9:.2f}B parameters, {result.trained / 1e9:.3f}B trained"
        f"{f' (LoRA rank {cfg.lora_rank})' if cfg.lora_rank else ''}"
        f"{f', base {cfg.quantize_base} weight-only' if cfg.quantize_base else ''}; {cfg.gpus} GPU(s), "
        f"params {cfg.param_dtype} / reduce {cfg.reduce_dtype}, checkpointing {cfg.ac}; "
        f"{cfg.batch} x {cfg.resolution}px + {cfg.contexts} context(s) + {cfg.txt_tokens} text = "
        f"{result.tokens} tokens per sample",
        "",
        "| per GPU | GiB |",
        "|---|---:|",
        *(f"| {name} | {value / GIB:.2f} |" for name, value in result.gpu.items() if value),
        f"| **total** | **{total / GIB:.2f}** |",
        "",
        *([f"largest single all-gather: {result.largest_unit * DTYPE_BYTES[cfg.param_dtype] / GIB:.2f} GiB "
           f"({result.largest_unit / 1e6:.0f}M parameters in {cfg.param_dtype})"] if cfg.gpus > 1 else []),
        f"host memory while building: {result.host_per_rank / GIB:.1f} GiB per rank, "
        f"{result.host / GIB:.1f} GiB for the {min(cfg.gpus_per_host, cfg.gpus)} rank(s) of one host",
    ]
    if cfg.gpu_gib:
        room = cfg.gpu_gib - total / GIB
        lines.append(f"on {cfg.gpu_gib:g} GiB GPUs: {'fits' if room > 0 else 'does not fit'}, "
                     f"{room:+.1f} GiB before the CUDA context and allocator reserve")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    d = PlanConfig()
    parser.add_argument("--model", default=d.model)
    parser.add_argument("--gpus", type=int, default=d.gpus)
    parser.add_argument("--gpus-per-host", type=int, default=d.gpus_per_host)
    parser.add_argument("--parallel", choices=sorted(RECIPES), default="paper",
                        help="the parallel recipe (configs/parallel): dtypes and checkpointing")
    parser.add_argument("--ac", choices=["none", "full", "selective"], help="override the recipe's checkpointing")
    parser.add_argument("--resolution", type=int, default=d.resolution)
    parser.add_argument("--contexts", type=int, default=d.contexts)
    parser.add_argument("--batch", type=int, default=d.batch)
    parser.add_argument("--txt-tokens", type=int, default=d.txt_tokens)
    parser.add_argument("--lora-rank", type=int, default=0)
    parser.add_argument("--quantize-base", choices=sorted(QUANTIZED_BYTES),
                        help="with --lora-rank: the frozen base's block linears stored weight-only quantised")
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument("--teacher", action="store_true", help="a distillation stage's teacher")
    parser.add_argument("--cached-features", action="store_true", help="no encoders on the GPU")
    parser.add_argument("--gpu-gib", type=float)
    a = parser.parse_args(argv)
    for name, value in (("--gpus", a.gpus), ("--gpus-per-host", a.gpus_per_host), ("--batch", a.batch),
                        ("--txt-tokens", a.txt_tokens)):
        if value < 1:
            parser.error(f"{name} must be at least 1, got {value}")
    if a.resolution < 16 or a.resolution % 16 or a.contexts < 0 or a.lora_rank < 0:
        parser.error("--resolution must be a positive multiple of 16; --contexts and --lora-rank at least 0")
    if a.quantize_base and (not a.lora_rank or a.gpus > 1):
        parser.error("--quantize-base quantises a one-GPU LoRA run's frozen base: give --lora-rank and --gpus 1")
    try:
        get_params(a.model)
    except KeyError as e:
        parser.error(str(e.args[0]))
    recipe = RECIPES[a.parallel]
    cfg = PlanConfig(model=a.model, gpus=a.gpus, gpus_per_host=a.gpus_per_host, param_dtype=recipe["param_dtype"],
                     reduce_dtype=recipe["reduce_dtype"], ac=a.ac or recipe["ac"], resolution=a.resolution,
                     contexts=a.contexts, batch=a.batch, txt_tokens=a.txt_tokens, lora_rank=a.lora_rank,
                     quantize_base=a.quantize_base,
                     ema=not a.no_ema, teacher=a.teacher, encoders_on_gpu=not a.cached_features,
                     gpu_gib=a.gpu_gib)
    print(report(cfg, plan(cfg)))


if __name__ == "__main__":
    main()
