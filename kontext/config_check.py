"""Typed checks of a composed training config, run before anything is built.

A wrong type or an out-of-range value is one line naming the key, the value and what is
expected (a `KontextError`), instead of a `TypeError` deep inside Lightning or a stage. Two
sources of truth: `KEYS`, the values that have a range or that no annotation types (a stage's
`finish`, ...), and the annotations of each `_target_`'s parameters (`FluxParams.depth: int`,
`Trainer.max_steps: int`, ...) and of the fields of the option groups they take (a stage's
`optimizer: AdamWOptions`, `reals: Reals`, ...) for every other scalar.
A key that the chosen config does not have is not checked.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import types
import typing
from dataclasses import dataclass
from typing import TypeVar

from omegaconf import DictConfig, ListConfig, OmegaConf

from kontext.data.buckets import REFERENCE_SIZES
from kontext.errors import KontextError
from kontext.stages.options import DECAY_BY, DECAYS

T = TypeVar("T")


@dataclass(frozen=True)
class Num:
    """An int (or, with `real`, any number) in [lo, hi]; `null` allows None."""

    lo: float = -math.inf
    hi: float = math.inf
    real: bool = False
    null: bool = False
    below_hi: bool = False  # the upper bound itself is excluded
    above_lo: bool = False  # the lower bound itself is excluded

    def problem(self, value) -> str | None:
        if value is None and self.null:
            return None
        kinds = (int, float) if self.real else (int,)
        ok = (isinstance(value, kinds) and not isinstance(value, bool) and math.isfinite(value)
              and self.lo <= value <= self.hi and not (self.below_hi and value == self.hi)
              and not (self.above_lo and value == self.lo))
        return None if ok else f"expected {'a number' if self.real else 'an integer'}{self._range()}"

    def _range(self) -> str:
        lo, hi = _fmt(self.lo), _fmt(self.hi)
        if math.isinf(self.lo) and math.isinf(self.hi):
            text = ""
        elif math.isinf(self.hi):
            text = f" {'>' if self.above_lo else '>='} {lo}"
        elif math.isinf(self.lo):
            text = f" <= {hi}"
        else:
            text = f" in {'(' if self.above_lo else '['}{lo}, {hi}{')' if self.below_hi else ']'}"
        return text + (" or null" if self.null else "")


@dataclass(frozen=True)
class Choice:
    options: tuple

    def problem(self, value) -> str | None:
        return None if value in self.options else f"expected one of {', '.join(map(str, self.options))}"


@dataclass(frozen=True)
class Pair:
    """Two numbers in [lo, hi) (Adam's betas), or a low-high range (`ordered`)."""

    lo: float = 0.0
    hi: float = 1.0
    ordered: bool = False

    def problem(self, value) -> str | None:
        num = Num(self.lo, self.hi, real=True, below_hi=not self.ordered)
        ok = isinstance(value, list | tuple) and len(value) == 2 and not any(num.problem(v) for v in value)
        if ok and (not self.ordered or value[0] <= value[1]):
            return None
        what = "low <= high" if self.ordered else "two numbers"
        return f"expected [{what}]{num._range().replace(' in', ', each in')}"


@dataclass(frozen=True)
class Names:
    """A non-empty list of non-empty strings (layer-name patterns)."""

    def problem(self, value) -> str | None:
        ok = isinstance(value, list | tuple) and value and all(isinstance(v, str) and v.strip() for v in value)
        return None if ok else "expected a non-empty list of layer names or patterns"


@dataclass(frozen=True)
class Flag:
    def problem(self, value) -> str | None:
        return None if isinstance(value, bool) else "expected true or false"


@dataclass(frozen=True)
class Duration:
    """Lightning's `max_time` as "DD:HH:MM:SS", or null."""

    def problem(self, value) -> str | None:
        parts = value.split(":") if isinstance(value, str) else []
        if value is None or len(parts) == 4 and all(p.isdigit() for p in parts):
            return None
        units = {"days", "hours", "minutes", "seconds"}
        if isinstance(value, dict) and value and set(value) <= units and not any(Num(0).problem(v) for v in value.values()):
            return None
        return 'expected "DD:HH:MM:SS", {days, hours, minutes, seconds} or null'


@dataclass(frozen=True)
class Devices:
    """Lightning's `devices`: a count >= 1, -1 (all), "auto", or device indices (a list or "0,1")."""

    def problem(self, value) -> str | None:
        def index(v) -> bool:
            return isinstance(v, int) and not isinstance(v, bool) and v >= 0

        if value in ("auto", -1, "-1") or index(value) and value >= 1:
            return None
        if isinstance(value, list) and value and all(map(index, value)):
            return None
        if isinstance(value, str) and value.strip() and all(p.strip().isdigit() for p in value.split(",") if p.strip()):
            return None
        return 'expected a count >= 1, -1 (all), "auto" or a list of device indices'


def _fmt(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else f"{x:g}"


COUNT, POSITIVE = Num(0), Num(1)
FRACTION = Num(0, 1, real=True)
STEPS = Num(-1)  # -1: no limit

KEYS: dict[str, object] = {
    "seed": Num(0, 2**32 - 1),
    "threads": Num(1, null=True),
    "attention": Choice(("auto", "sdpa", "flash")),
    "trainer.max_steps": STEPS,
    "trainer.max_epochs": Num(-1, null=True),
    "trainer.num_nodes": POSITIVE,
    "trainer.devices": Devices(),
    "trainer.accumulate_grad_batches": POSITIVE,
    "trainer.log_every_n_steps": POSITIVE,
    "trainer.gradient_clip_val": Num(0, real=True, null=True),
    "trainer.num_sanity_val_steps": STEPS,
    "trainer.max_time": Duration(),
    "data.batch_size": POSITIVE,
    "data.num_workers": COUNT,
    "data.epoch_samples": POSITIVE,
    "data.bucket_area": Num(256),
    "data.max_aspect": Num(1, real=True),
    "data.size": Num(16),
    "data.mode": Choice(("resampled", "exact")),
    "data.reference_size": Choice((*REFERENCE_SIZES, "bucket")),  # bucket: strict's former name
    "data.reference_area": Num(256, null=True),
    "data.payload": Choice(("image", "features")),
    "data.t2i_fraction": FRACTION,
    "data.instruction_dropout": FRACTION,
    "data.shuffle_buffer": COUNT,
    "data.max_bad_fraction": FRACTION,
    "data.max_consecutive_bad": POSITIVE,
    "data.max_pixels": Num(1, null=True),
    "data.val_samples": COUNT,
    "adapter.rank": POSITIVE,
    "adapter.alpha": Num(0, real=True, above_lo=True),
    "adapter.dropout": Num(0, 1, real=True, below_hi=True),
    "adapter.targets": Names(),
    "adapter.quantize_base": Choice((None, "int8", "fp8")),
    "stage.optimizer.lr": Num(0, real=True),
    "stage.optimizer.betas": Pair(),
    "stage.optimizer.weight_decay": Num(0, real=True),
    "stage.optimizer.warmup_steps": COUNT,
    "stage.optimizer.decay": Choice(DECAYS),
    "stage.optimizer.decay_by": Choice(DECAY_BY),
    "stage.optimizer.min_lr_ratio": FRACTION,
    "stage.discriminator_optimizer.lr": Num(0, real=True, null=True),
    "stage.discriminator_optimizer.betas": Pair(),
    "stage.guidance_lr": Num(0, real=True, null=True),
    "stage.ema_decay": FRACTION,
    "stage.train_guidance": Num(0, real=True),
    "stage.guidance_range": Pair(0, math.inf, ordered=True),
    "stage.trajectory_steps": POSITIVE,
    "stage.grad_clip": Num(0, real=True, null=True),
    "stage.validation.every_n_steps": COUNT,
    "stage.validation.steps": Num(1, null=True),
    "stage.finish.sampler.steps": POSITIVE,
    "stage.finish.sampler.cfg": Num(0, real=True),
    "stage.finish.sampler.guidance": Num(0, real=True),
    "stage.finish.benchmark.n_per_op": COUNT,
    "stage.finish.benchmark.chains": COUNT,
    "stage.finish.export": Flag(),
    "callbacks.checkpoint.every_n_train_steps": Num(0, null=True),
    "callbacks.checkpoint.save_top_k": Num(-1),
    "callbacks.metrics.grid_every_n_steps": COUNT,
    "callbacks.validation.every_n_steps": COUNT,
    "callbacks.validation.steps": Num(1, null=True),
    "prepare.shapes_edit.n": POSITIVE,
    "prepare.shapes_edit.shard_size": POSITIVE,
    "prepare.shapes_edit.size": Num(16),
    "prepare.cache.samples_per_shard": POSITIVE,
}
_MISSING = object()


def options(defaults: T, given, what: str) -> T:
    """A group of a stage's options: `defaults` (a dataclass instance, the group's defaults
    written once) with the fields `given` (a mapping, or an instance of the same class) sets;
    a key the group does not have is an error, not ignored. The class checks the values
    (`__post_init__`)."""
    if isinstance(given, type(defaults)):
        return given
    given = plain(given) or {}
    known = [f.name for f in dataclasses.fields(defaults)]
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise KontextError(f"unknown {what} option(s) {unknown}; known: {known}")
    return dataclasses.replace(defaults, **given)


def plain(value):
    """Hydra's DictConfig / ListConfig as plain dicts and lists (what a checkpoint may hold:
    hyperparameters are saved with it and read back weights-only); anything else as it is."""
    return OmegaConf.to_container(value, resolve=True) if isinstance(value, DictConfig | ListConfig) else value


def check_config(cfg: DictConfig) -> None:
    """Raise a one-line `KontextError` for the first value of `cfg` of a wrong type or range."""
    for key, spec in KEYS.items():
        value = _value(cfg, key)
        if value is not _MISSING and (problem := spec.problem(value)):
            raise KontextError(f"{key}={value!r}: {problem}")
    if _value(cfg, "adapter") not in (_MISSING, None) and _value(cfg, "stage.lora") is _MISSING:
        raise KontextError(f"adapter=... trains adapters in the flow stage; {_value(cfg, 'stage._target_')} "
                           "takes none (drop adapter= or use stage=flow)")
    _check_targets(cfg, "")


def _value(cfg, key: str):
    try:
        value = OmegaConf.select(cfg, key, default=_MISSING, throw_on_missing=False)
    except Exception:  # an interpolation that only resolves inside a Hydra app (hydra:...)
        return _MISSING
    if isinstance(value, DictConfig | ListConfig):
        return OmegaConf.to_container(value, resolve=True)
    return value


def _check_targets(node, path: str, hints: dict | None = None) -> None:
    """Every scalar parameter of a `_target_`, or field of an option group its annotation names
    (a dataclass, e.g. a stage's `optimizer: AdamWOptions | dict | None`), whose annotation is
    int, float, bool or str (optionally None, or a Literal) must hold such a value."""
    if isinstance(node, ListConfig):
        for i, item in enumerate(node):
            if isinstance(item, DictConfig | ListConfig):
                _check_targets(item, f"{path}[{i}]")
        return
    if not isinstance(node, DictConfig):
        return
    hints = _hints(node.get("_target_")) if "_target_" in node else (hints or {})
    for key in node:
        key = str(key)
        full = f"{path}.{key}" if path else key
        if key.startswith("_") or full in KEYS:
            continue
        raw = node._get_node(key)
        if isinstance(raw, DictConfig | ListConfig):
            _check_targets(raw, full, _group_hints(hints.get(key)))
            continue
        allowed = _scalar_types(hints.get(key))
        if allowed is None:
            continue
        value = _value(node, key)
        if value is not _MISSING and not _fits(value, allowed):
            raise KontextError(f"{full}={value!r}: expected {_describe(allowed)}")


def _hints(target) -> dict:
    from hydra.utils import get_object

    try:
        obj = get_object(str(target))
        fn = obj.__init__ if inspect.isclass(obj) else obj
        return typing.get_type_hints(fn)
    except Exception:  # an unknown target is reported by instantiation; unresolvable hints are not checked
        return {}


def _group_hints(hint) -> dict:
    """The field annotations of the option-group dataclass that `hint` names (alone or in a
    union), else none."""
    args = typing.get_args(hint) if typing.get_origin(hint) in (typing.Union, types.UnionType) else (hint,)
    group = next((a for a in args if dataclasses.is_dataclass(a) and isinstance(a, type)), None)
    try:
        return typing.get_type_hints(group) if group is not None else {}
    except Exception:  # unresolvable annotations are not checked
        return {}


def _scalar_types(hint) -> tuple | None:
    """The plain values an annotation allows (types, and Literal values as a set), or None."""
    if hint is None:
        return None
    if hint in (int, float, bool, str):
        return (hint,)
    origin = typing.get_origin(hint)
    if origin is typing.Literal:
        return (frozenset(typing.get_args(hint)),)
    if origin in (typing.Union, types.UnionType):
        out, literals = [], frozenset()
        for arg in typing.get_args(hint):
            sub = (None,) if arg is type(None) else _scalar_types(arg)
            if sub is None:
                return None
            out += [k for k in sub if not isinstance(k, frozenset)]
            literals = literals.union(*[k for k in sub if isinstance(k, frozenset)])
        return tuple(out) + ((literals,) if literals else ())
    return None


def _fits(value, allowed: tuple) -> bool:
    for kind in allowed:
        if kind is None and value is None:
            return True
        if isinstance(kind, frozenset) and not isinstance(value, bool) and value in kind:
            return True
        if kind is bool and isinstance(value, bool):
            return True
        if kind is int and isinstance(value, int) and not isinstance(value, bool):
            return True
        if kind is float and isinstance(value, int | float) and not isinstance(value, bool):
            return True
        if kind is str and isinstance(value, str):
            return True
    return False


def _describe(allowed: tuple) -> str:
    names = {int: "an integer", float: "a number", bool: "true or false", str: "a string", None: "null"}
    parts = []
    for kind in allowed:
        parts.append(", ".join(sorted(map(repr, kind))) if isinstance(kind, frozenset) else names[kind])
    return " or ".join(dict.fromkeys(parts))
