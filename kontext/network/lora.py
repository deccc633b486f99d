"""LoRA fine-tuning of the transformer through `peft` (Hu et al. 2021, arXiv 2106.09685).

A rank-r adapter on a linear layer adds `(alpha / r) * B A x` to `W x`, with A (r, in) and
B (out, r); B starts at zero, so training starts from the base model exactly. The layers are
chosen by their reference names (`double_blocks.*.img_attn.qkv`, `img_mlp`, `linear1`, ...);
the fused qkv and `linear1` projections take one adapter each, as ComfyUI and the reference
layout have them (diffusers' split names come from `kontext.formats.lora_files`).

`add_adapters` injects peft's LoRA layers into a `Flux` in place and freezes everything else:
the base keeps its parameters under `<layer>.base_layer.*`, the adapters are
`<layer>.lora_A.default.weight` / `lora_B.default.weight`. `adapters` reads them back as an
`Adapter` (plain tensors by layer name), and `unwrap` puts the plain layers back, so that a
trained model merges and exports like any other. The training stage's helpers are here too:
checkpoints of the adapters alone, their average swapped in for sampling, dropout that a resumed
run repeats exactly. A base stored quantised (`quantize_base`) is :mod:`kontext.network.quantized`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import fnmatch
from dataclasses import dataclass

import torch
from torch import nn

from kontext.config_check import KEYS, options
from kontext.errors import KontextError
from kontext.formats.lora_files import Adapter, LoraWeights

ADAPTER = "default"  # peft's name for the one adapter a training run has


@dataclass
class LoraOptions:
    """The stage's `lora` options (the `adapter` group; configs/adapter/lora.yaml mirrors the
    defaults): every linear layer of every block except the adaLN modulation, rank 16, scale
    alpha / rank = 1. Each value is checked for its type and range, errors naming it as the
    command line does (`adapter.rank`)."""

    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    quantize_base: str | None = None  # int8 | fp8: the frozen base's block linears stored weight-only quantised (torchao)
    targets: tuple[str, ...] = ("double_blocks.*.img_attn.qkv", "double_blocks.*.img_attn.proj",
                                "double_blocks.*.img_mlp", "double_blocks.*.txt_attn.qkv",
                                "double_blocks.*.txt_attn.proj", "double_blocks.*.txt_mlp",
                                "single_blocks.*.linear1", "single_blocks.*.linear2")

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if problem := KEYS[f"adapter.{field.name}"].problem(value):
                raise KontextError(f"adapter.{field.name}={value!r}: {problem}")
        self.targets = tuple(self.targets)


LORA = LoraOptions()


def lora_options(given) -> LoraOptions | None:
    """The `lora` options (a mapping, or `LoraOptions`) over `LORA`; None: no adapters."""
    return None if given is None else options(LORA, given, "adapter")


def matches(name: str, pattern: str) -> bool:
    """Whether the module `name` is named by `pattern` (shell wildcards, `*` also spans dots): the
    whole name, its trailing components, or a module that holds it (`img_mlp` names
    `double_blocks.0.img_mlp.0` and `.2`; `txt_*` every text-stream layer)."""
    return any(fnmatch.fnmatchcase(name, p) for p in (pattern, f"*.{pattern}", f"{pattern}.*", f"*.{pattern}.*"))


def resolve_targets(model: nn.Module, patterns) -> list[str]:
    """The linear layers of `model` named by any of `patterns`, in model order. A pattern that
    names no linear layer is an error (a misspelt target would silently train nothing)."""
    linears = [name for name, m in model.named_modules() if isinstance(m, nn.Linear)]
    chosen: set[str] = set()
    for pattern in patterns:
        hit = [name for name in linears if matches(name, pattern)]
        if not hit:
            raise KontextError(f"adapter.targets: {pattern!r} names no linear layer of the model "
                               f"(they are named like {', '.join(dict.fromkeys(linears[:1] + linears[-3:]))})")
        chosen.update(hit)
    return [name for name in linears if name in chosen]


def add_adapters(model: nn.Module, cfg: LoraOptions) -> list[str]:
    """Inject rank-`cfg.rank` LoRA layers (peft) into the layers `cfg.targets` names, in place;
    only the adapters train afterwards. Returns the adapted layers' names."""
    from peft import LoraConfig, inject_adapter_in_model

    names = resolve_targets(model, cfg.targets)
    config = LoraConfig(r=int(cfg.rank), lora_alpha=float(cfg.alpha), lora_dropout=float(cfg.dropout),
                        target_modules=names)
    inject_adapter_in_model(config, model, adapter_name=ADAPTER)
    model.requires_grad_(False)
    for name in names:  # trained in fp32 whatever the base's dtype (peft gives them the base's)
        layer = model.get_submodule(name)
        layer.lora_A[ADAPTER].float().requires_grad_(True)
        layer.lora_B[ADAPTER].float().requires_grad_(True)
    if (found := len(adapted_layers(model))) != len(names):
        raise RuntimeError(f"peft adapted {found} layers where {len(names)} were asked for")
    return names


def is_adapter_key(key: str) -> bool:
    """A parameter or state-dict name of an adapter weight (`...lora_A.default.weight`)."""
    return ".lora_A." in key or ".lora_B." in key


def adapted_layers(model: nn.Module) -> dict[str, nn.Module]:
    """The peft LoRA layers of `model`, by name."""
    return {name: m for name, m in model.named_modules()
            if isinstance(getattr(m, "lora_A", None), nn.ModuleDict) and ADAPTER in m.lora_A}


def freeze_base(model: nn.Module, dtype: torch.dtype | None) -> None:
    """Store every frozen (base) weight in `dtype`, e.g. bf16 when the run computes in bf16:
    half the memory of fp32, and no cast per step. The adapters keep their dtype (fp32)."""
    if dtype is None:
        return
    with torch.no_grad():
        for p in model.parameters():
            if not p.requires_grad and p.is_floating_point():
                p.data = p.data.to(dtype)


def precision_dtype(precision: str) -> torch.dtype | None:
    """The dtype a Lightning `trainer.precision` computes in when it is not fp32, else None."""
    precision = str(precision)
    return torch.bfloat16 if precision.startswith("bf16") else torch.float16 if precision.startswith("16") else None


def adapters(model: nn.Module, weights: dict[str, torch.Tensor] | None = None) -> Adapter:
    """The adapters of a peft-injected `model` as an `Adapter` (detached copies; A and B from
    `weights`, by parameter name, when given, e.g. their EMA)."""
    out = {}
    for name, layer in adapted_layers(model).items():
        a, b = f"{name}.lora_A.{ADAPTER}.weight", f"{name}.lora_B.{ADAPTER}.weight"
        down = (weights or {}).get(a, layer.lora_A[ADAPTER].weight)
        up = (weights or {}).get(b, layer.lora_B[ADAPTER].weight)
        out[name] = LoraWeights(down.detach().clone(), up.detach().clone(), float(layer.lora_alpha[ADAPTER]))
    return Adapter(out)


def adapters_from_state(state: dict[str, torch.Tensor], alpha: float) -> Adapter:
    """An `Adapter` from peft parameter names (`<layer>.lora_A.default.weight`), as a training
    checkpoint holds them (its EMA or raw adapters), and the run's alpha."""
    layers: dict[str, dict] = {}
    for key, value in state.items():
        for part in ("lora_A", "lora_B"):
            suffix = f".{part}.{ADAPTER}.weight"
            if key.endswith(suffix):
                layers.setdefault(key[: -len(suffix)], {})[part] = value
    broken = sorted(k for k, v in layers.items() if len(v) != 2)
    if broken:
        raise KontextError(f"adapter weights without their pair: {', '.join(broken[:3])}")
    return Adapter({k: LoraWeights(v["lora_A"], v["lora_B"], float(alpha)) for k, v in layers.items()})


def unwrap(model: nn.Module) -> nn.Module:
    """Replace every peft LoRA layer of `model` by its base layer, in place (the adapters are
    dropped: read them with `adapters` first). The model is plain again, with reference names."""
    for name, layer in adapted_layers(model).items():
        parent, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent) if parent else model, child, layer.get_base_layer())
    if hasattr(model, "peft_config"):
        del model.peft_config
    return model


# ------------------------------------------------------------------------------ in training

def checkpoint_adapters_only(module: nn.Module) -> None:
    """State-dict hooks of a module whose `model` carries adapters (the training stage): its
    state dict leaves out the frozen base, and loading refuses base weights (unexpected: a full
    run's checkpoint is not an adapter checkpoint) without missing them."""
    module.register_state_dict_post_hook(_drop_base)
    module.register_load_state_dict_pre_hook(_refuse_base)
    module.register_load_state_dict_post_hook(_base_not_missing)


def _is_base(key: str, prefix: str = "") -> bool:
    return key.startswith(f"{prefix}model.") and not is_adapter_key(key)


def _drop_base(module, state_dict: dict, prefix: str, local_metadata) -> None:
    for key in [k for k in state_dict if _is_base(k, prefix)]:
        del state_dict[key]


def _refuse_base(module, state_dict: dict, prefix: str, local_metadata, strict, missing_keys, unexpected_keys,
                 error_msgs) -> None:
    for key in [k for k in state_dict if _is_base(k, prefix)]:
        del state_dict[key]
        unexpected_keys.append(key)


def _base_not_missing(module, incompatible_keys) -> None:
    incompatible_keys.missing_keys[:] = [k for k in incompatible_keys.missing_keys if not _is_base(k)]


@contextlib.contextmanager
def swapped_in(model: nn.Module, weights: nn.Module):
    """Within the block, the parameters of `model` that `weights` names (e.g. the EMA of its
    adapters, same names) take their values; afterwards the trained values and the training mode
    come back. A sharded model swaps each rank's shards and regathers around the swap."""
    from kontext.scale.parallel import reshard

    live = dict(model.named_parameters())
    pairs = [(live[name], value) for name, value in weights.named_parameters()]
    trained = [p.detach().clone() for p, _ in pairs]
    training = model.training
    reshard(model)  # a unit still gathered would keep the weights it gathered
    with torch.no_grad():
        for param, value in pairs:
            param.copy_(value)
    try:
        yield
    finally:
        with torch.no_grad():
            for (param, _), value in zip(pairs, trained, strict=True):
                param.copy_(value)
        reshard(model)
        model.train(training)


@contextlib.contextmanager
def seeded_rng(seed: int, device: torch.device):
    """Random draws from `seed` within the block, and the global generator as it was afterwards.
    Adapter dropout draws from the global generator (peft's `nn.Dropout`), which the data loader
    also draws from when an epoch starts, at another point of a resumed run: seeded per
    micro-batch, a resumed run draws the same masks. (Activation checkpointing replays the
    forward's generator state in backward by itself.)"""
    cuda = device.type == "cuda"
    with torch.random.fork_rng(devices=[device] if cuda else [], device_type="cuda"):
        torch.default_generator.manual_seed(seed)
        if cuda:
            torch.cuda.manual_seed(seed)
        yield
