"""How the transformer is spread over devices and how it trades compute for memory: FSDP2 per
block, activation checkpointing per block, per-block `torch.compile` (FLUX.1 Kontext paper §3,
implementation details: FSDP2 with bf16 all-gathers and fp32 reduce-scatters, selective
activation checkpointing, regional compilation of the blocks; the order and the sharding units
follow torchtitan's `parallelize_flux`).

Order: checkpointing, then compile, then `fully_shard`, in units of one double or single block,
the input embedders, the final layer (kept unsharded after forward: backward needs it at once)
and the root. Checkpointing and compile keep every parameter name, so checkpoints, the EMA and
reference-format exports see the same keys whatever the recipe. The same code runs on CPU with
gloo (the mesh comes from the trainer, or `cpu_mesh()`) and on GPUs with NCCL.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import torch
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import FSDPModule, MixedPrecisionPolicy, fully_shard
from torch.utils.checkpoint import (
    CheckpointPolicy,
    checkpoint,
    create_selective_checkpoint_contexts,
)

from kontext.errors import first_line

AC_MODES = ("none", "full", "selective")
INPUT_LAYERS = ("img_in", "time_in", "vector_in", "guidance_in", "txt_in")


@dataclass
class ParallelConfig:
    """The `parallel` config group (configs/parallel/*.yaml)."""

    param_dtype: str = "float32"       # dtype of the all-gathered weights, i.e. of the compute under FSDP
    reduce_dtype: str = "float32"      # dtype of the gradient reduce-scatter
    reshard_after_forward: bool = True  # free gathered weights after each block's forward (ZeRO-3)
    activation_checkpointing: str = "none"  # none | full | selective
    compile: bool = False               # torch.compile each double and single block
    shard_frozen: bool = False          # shard the frozen encoders too (else every rank holds a copy)
    shard_teacher: bool = True          # shard a distillation teacher like the student (else a whole copy per rank)
    # Build the trained model, its EMA and a distillation teacher on `meta`, shard, then fill each
    # rank's rows (of `init_from`, of the teacher, or of the from-scratch initialisation; see
    # kontext.formats.slices): no rank holds a whole copy. None: when the trainer shards over several ranks.
    meta_build: bool | None = None

    def __post_init__(self):
        if self.activation_checkpointing not in AC_MODES:
            raise ValueError(f"activation_checkpointing must be one of {AC_MODES}, got {self.activation_checkpointing!r}")

    def mp_policy(self) -> MixedPrecisionPolicy:
        param, reduce = getattr(torch, self.param_dtype), getattr(torch, self.reduce_dtype)
        if param == reduce == torch.float32:
            return MixedPrecisionPolicy()  # fp32 training: no casts at all
        return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


def blocks(model: nn.Module) -> list[nn.Module]:
    """The repeated units of the transformer: every double-stream, then every single-stream block."""
    return [*model.double_blocks, *model.single_blocks]


# ------------------------------------------------------------------------ activation checkpointing

def _selective_policy(ctx, op, *args, **kwargs) -> CheckpointPolicy:
    # Keep what is expensive to recompute (matmuls, attention); recompute norms, modulation,
    # RoPE and activations, which hold most of the activation memory and little of the compute.
    # (Korthikanti et al. recompute the attention core instead; a fused attention kernel keeps no
    # L x L matrix, so here the element-wise work is what is worth recomputing.)
    return CheckpointPolicy.MUST_SAVE if op in _SAVED_OPS else CheckpointPolicy.PREFER_RECOMPUTE


def _saved_ops() -> set:
    aten = torch.ops.aten
    ops = {aten.mm.default, aten.addmm.default, aten.bmm.default, aten.linear.default}
    for name in ("_scaled_dot_product_flash_attention", "_scaled_dot_product_efficient_attention",
                 "_scaled_dot_product_cudnn_attention", "_scaled_dot_product_flash_attention_for_cpu"):
        ops.add(getattr(aten, name).default)
    return ops


_SAVED_OPS = _saved_ops()


def _selective_contexts():
    return create_selective_checkpoint_contexts(_selective_policy)


class _Checkpointed:
    """Mixed into a block's class by `checkpoint_block`: the block's forward runs under
    `torch.utils.checkpoint`, so backward recomputes it instead of keeping its activations.
    Without grad (sampling, EMA) the plain forward runs."""

    _ac_selective: bool = False

    def forward(self, *args, **kwargs):
        if not torch.is_grad_enabled():
            return super().forward(*args, **kwargs)
        if self._ac_selective:
            return checkpoint(super().forward, *args, use_reentrant=False, context_fn=_selective_contexts, **kwargs)
        # (no context_fn argument at all: torch.compile cannot trace one that is chosen at run time)
        return checkpoint(super().forward, *args, use_reentrant=False, **kwargs)


@functools.cache
def _checkpointed_class(cls: type) -> type:
    return type(f"Checkpointed{cls.__name__}", (_Checkpointed, cls), {})


def checkpoint_block(block: nn.Module, mode: str) -> None:
    """Activation checkpointing of one block, in place. Unlike a wrapper module this keeps the
    block's parameter names (the way `fully_shard` swaps the class of what it shards)."""
    if mode == "none" or isinstance(block, _Checkpointed):
        return
    block.__class__ = _checkpointed_class(type(block))
    block._ac_selective = mode == "selective"


def retained_bytes(fn: Callable[[], object]) -> int:
    """Bytes of the storages `fn` allocates that are still alive when it returns: for a forward
    pass, what it keeps for backward. Counted per storage at the dispatcher, so the numbers are
    exact and the same on every machine (what checkpointing saves, measured without a profiler).
    A storage counts only if an op made it: views of the weights or of the inputs (a linear's
    transposed weight) are not new memory. Storages are told apart by identity, not address, so
    this also counts a forward on the `meta` device, which allocates nothing."""
    import gc

    from torch.multiprocessing.reductions import StorageWeakRef
    from torch.utils._python_dispatch import TorchDispatchMode
    from torch.utils._pytree import tree_leaves

    seen: dict[int, StorageWeakRef] = {}  # storages met so far, by identity while they live
    made: dict[int, tuple] = {}

    def storages(tree):
        for t in tree_leaves(tree):
            if isinstance(t, torch.Tensor):
                ref = StorageWeakRef(t.untyped_storage())
                yield ref.cdata, ref, t.untyped_storage().nbytes()

    def known(key: int) -> bool:  # an address freed and reused is a new storage
        return key in seen and not seen[key].expired()

    class Track(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            seen.update((key, ref) for key, ref, _ in storages((args, kwargs)))
            out = func(*args, **(kwargs or {}))
            for key, ref, nbytes in storages(out):
                if not known(key):
                    made[key] = (ref, nbytes)
                seen[key] = ref
            return out

    with Track():
        result = fn()
    gc.collect()
    alive = sum(n for ref, n in made.values() if not ref.expired())
    del result
    return alive


# ----------------------------------------------------------------------------------- FSDP2

def cpu_mesh() -> DeviceMesh:
    """A 1-D mesh over every rank on CPU (gloo). Pass it explicitly: the default mesh would put
    the shards on CUDA when a GPU exists, which gloo collectives cannot handle."""
    return init_device_mesh("cpu", (torch.distributed.get_world_size(),))


def shard(model: nn.Module, mesh: DeviceMesh, mp_policy: MixedPrecisionPolicy | None = None,
          reshard_after_forward: bool = True, trained: bool = True) -> None:
    """FSDP2 over `mesh` (data-parallel size = mesh size), one unit per block. Also used for the
    EMA copy (`trained=False`, no mixed precision), so that each rank averages only its own shard."""
    kw = {"mesh": mesh, "mp_policy": mp_policy or MixedPrecisionPolicy()}
    for name in INPUT_LAYERS:
        layer = getattr(model, name, None)
        if layer is not None and any(True for _ in layer.parameters()):
            fully_shard(layer, reshard_after_forward=reshard_after_forward, **kw)
    for block in blocks(model):
        fully_shard(block, reshard_after_forward=reshard_after_forward, **kw)
    # Backward starts at the final layer: resharding it after forward would gather it again at
    # once. A copy that is never trained reshards it (its forwards are sampling, without backward).
    fully_shard(model.final_layer, reshard_after_forward=not trained, **kw)
    fully_shard(model, reshard_after_forward=reshard_after_forward, **kw)


def shard_frozen(encoder: nn.Module, mesh: DeviceMesh, methods: tuple[str, ...] = ("encode", "decode")) -> None:
    """Shard a frozen encoder: each element of its innermost module lists (the layers a forward
    calls one by one: T5 and MiniLM layers, the autoencoder's resnet blocks), then the root,
    whose gather also runs around the encoder's entry methods (`encode`, not only `forward`)."""
    from torch.distributed.fsdp import register_fsdp_forward_method

    for layer in _innermost_layers(encoder):
        fully_shard(layer, mesh=mesh)
    fully_shard(encoder, mesh=mesh)
    for name in methods:
        if callable(getattr(encoder, name, None)):
            register_fsdp_forward_method(encoder, name)


def _innermost_layers(module: nn.Module) -> list[nn.Module]:
    lists = [m for m in module.modules() if isinstance(m, nn.ModuleList)]
    innermost = [m for m in lists if not any(isinstance(x, nn.ModuleList) for layer in m for x in layer.modules())]
    return [layer for m in innermost for layer in m if any(True for _ in layer.parameters())]


def is_sharded(model: nn.Module) -> bool:
    return isinstance(model, FSDPModule)


# ------------------------------------------------------------------------------- the recipe

def compile_problem(device: torch.device | str | None = None) -> str | None:
    """Why `torch.compile` (inductor) cannot build kernels for `device`, or None when it can:
    on CPU it needs a C++ compiler, on CUDA Triton."""
    kind = torch.device(device).type if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cpu":
        try:
            from torch._inductor.cpp_builder import get_cpp_compiler

            get_cpp_compiler()
        except Exception as e:  # noqa: BLE001 - any failure means no usable compiler
            return f"torch.compile on CPU needs a C++ compiler ({first_line(e)})"
    elif kind == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "torch.compile on CUDA needs Triton (pip install triton)"
    return None


def parallelize(model: nn.Module, cfg: ParallelConfig, mesh: DeviceMesh | None = None,
                ema: nn.Module | None = None, device: torch.device | str | None = None) -> nn.Module:
    """Apply the recipe to a `Flux` in place: checkpointing, compile, then FSDP2 when a mesh of
    more than one rank is given (the EMA copy, if any, is sharded the same way). Without a
    working compiler for `device`, compile is skipped with a warning (the model runs eagerly)."""
    for block in blocks(model):
        checkpoint_block(block, cfg.activation_checkpointing)
    problem = compile_problem(device) if cfg.compile else None
    if problem:
        warnings.warn(f"{problem}; training without compile (parallel.compile=false silences this)", stacklevel=2)
    elif cfg.compile:
        for block in blocks(model):
            block.compile()
    if mesh is not None and mesh.size() > 1:
        # FSDP2 warns on every forward whose output is a view (any nn.Linear on (B, L, D)); the
        # hazard it names, an in-place op on that output, does not occur in this model.
        warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
        shard(model, mesh, cfg.mp_policy(), cfg.reshard_after_forward)
        if ema is not None:
            shard(ema, mesh, trained=False)
    return model


def gather_full(model: nn.Module, build: Callable[[], nn.Module]) -> nn.Module | None:
    """The unsharded model, on rank 0 (None elsewhere): a collective, every rank must call it.
    `build()` makes an empty replica of the plain module that receives the full weights."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if torch.distributed.get_rank() != 0:
        return None
    plain = build()
    plain.load_state_dict(state)
    return plain


class FSDPStrategy(ModelParallelStrategy):
    """Lightning's `ModelParallelStrategy` as pure FSDP2: data-parallel size = world size,
    tensor-parallel size 1 (its `auto` would make each node a tensor-parallel group)."""

    def __init__(self, save_distributed_checkpoint: bool = True, **kwargs):
        super().__init__(data_parallel_size=1, tensor_parallel_size=1,
                         save_distributed_checkpoint=save_distributed_checkpoint, **kwargs)

    def setup_environment(self) -> None:
        self._data_parallel_size = self.num_nodes * self.num_processes
        self._tensor_parallel_size = 1
        super().setup_environment()


def reshard(model: nn.Module) -> None:
    """Free the gathered weights of every FSDP2 unit of `model` (no-op for a plain model), so that
    the next forward gathers them again from the shards, e.g. after the shards were changed."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()
