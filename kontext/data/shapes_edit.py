"""Shapes-Edit: the embedded (reference, instruction, target) dataset and its exact scorer.

Implements spec v1 (`shapes_edit.md`): a 9-colour palette, three shape kinds on a 3x3 grid,
five edit operations plus text-to-image (the task families of KontextBench in miniature),
deterministic case generation by (split, seed, index), multi-turn edit chains, and the
class-map scorer. Everything here is plain Python + Pillow + NumPy; no torch.
"""

from __future__ import annotations

import hashlib
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace

import numpy as np
from PIL import Image, ImageDraw

PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 70),
    "blue": (40, 90, 220),
    "yellow": (235, 200, 40),
    "purple": (140, 60, 180),
    "orange": (240, 130, 30),
    "white": (245, 245, 245),
    "black": (25, 25, 25),
    "gray": (128, 128, 128),
}
PALETTE_NAMES: tuple[str, ...] = tuple(PALETTE)
SHAPE_COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
BACKGROUND_COLORS: tuple[str, ...] = ("white", "black", "gray")
KINDS: tuple[str, ...] = ("circle", "square", "triangle")
POSITIONS: tuple[str, ...] = (
    "top left", "top", "top right", "left", "center", "right", "bottom left", "bottom", "bottom right",
)
EDIT_OPS: tuple[str, ...] = ("recolor", "remove", "add", "move", "background")
OPS: tuple[str, ...] = EDIT_OPS + ("t2i",)
SPLITS: tuple[str, ...] = ("train", "val", "bench")
DEFAULT_SIZE = 64
PASS_EDIT, PASS_KEEP = 0.80, 0.95

# Canonical template first; the others are used only with paraphrase=True.
TEMPLATES: dict[str, tuple[str, ...]] = {
    "recolor": ("make the {color} {kind} {new_color}", "change the color of the {color} {kind} to {new_color}",
                "turn the {color} {kind} {new_color}", "recolor the {color} {kind} {new_color}"),
    "remove": ("remove the {color} {kind}", "delete the {color} {kind}", "erase the {color} {kind}",
               "take away the {color} {kind}"),
    "add": ("add a {color} {kind} in the {pos}", "put a {color} {kind} in the {pos}",
            "place a {color} {kind} in the {pos}"),
    "move": ("move the {color} {kind} to the {pos}", "shift the {color} {kind} to the {pos}",
             "put the {color} {kind} in the {pos}"),
    "background": ("change the background to {bg}", "make the background {bg}", "use a {bg} background"),
    "t2i": ("{shapes} on a {bg} background", "{shapes}, on a {bg} background"),
}


# ---------------------------------------------------------------------------------------- scenes
@dataclass(frozen=True)
class Shape:
    color: str  # one of SHAPE_COLORS
    kind: str  # one of KINDS
    cell: int  # 0..8, row-major: row = cell // 3, col = cell % 3

    @property
    def phrase(self) -> str:
        return f"{self.color} {self.kind}"


@dataclass(frozen=True)
class Scene:
    background: str
    shapes: tuple[Shape, ...]  # kept sorted by cell, which is also the draw order

    def __post_init__(self):
        object.__setattr__(self, "shapes", tuple(sorted(self.shapes, key=lambda s: s.cell)))
        if self.background not in BACKGROUND_COLORS:
            raise ValueError(f"background {self.background!r} not in {BACKGROUND_COLORS}")
        if not 1 <= len(self.shapes) <= 3:
            raise ValueError(f"a scene holds 1 to 3 shapes, got {len(self.shapes)}")
        for s in self.shapes:
            if s.color not in SHAPE_COLORS or s.kind not in KINDS or not 0 <= s.cell < 9:
                raise ValueError(f"invalid shape {s}")
        if len({s.cell for s in self.shapes}) != len(self.shapes):
            raise ValueError("two shapes share a cell")
        if len({(s.color, s.kind) for s in self.shapes}) != len(self.shapes):
            raise ValueError("two shapes share colour and kind, so a phrase would be ambiguous")

    def empty_cells(self) -> list[int]:
        used = {s.cell for s in self.shapes}
        return [c for c in range(9) if c not in used]

    def to_dict(self) -> dict:
        return {"background": self.background,
                "shapes": [{"color": s.color, "kind": s.kind, "cell": s.cell} for s in self.shapes]}

    @classmethod
    def from_dict(cls, d: Mapping) -> Scene:
        return cls(d["background"], tuple(Shape(s["color"], s["kind"], s["cell"]) for s in d["shapes"]))


# ------------------------------------------------------------------------------------- rendering
def shape_size(size: int) -> int:
    return round(0.22 * size)


def cell_center(cell: int, size: int) -> tuple[int, int]:
    r, c = divmod(cell, 3)
    return round(size * (2 * c + 1) / 6), round(size * (2 * r + 1) / 6)


def shape_box(cell: int, size: int) -> tuple[int, int, int, int]:
    """Inclusive pixel box (x0, y0, x1, y1) of a shape in `cell`."""
    d = shape_size(size)
    cx, cy = cell_center(cell, size)
    x0, y0 = cx - d // 2, cy - d // 2
    return x0, y0, x0 + d - 1, y0 + d - 1


def check_size(size: int) -> None:
    if size % 16 or not 32 <= size <= 512:
        raise ValueError(f"canvas size must be a multiple of 16 in [32, 512], got {size}")


def render(scene: Scene, size: int = DEFAULT_SIZE) -> Image.Image:
    check_size(size)
    img = Image.new("RGB", (size, size), PALETTE[scene.background])
    draw = ImageDraw.Draw(img)  # ImageDraw never anti-aliases
    for s in scene.shapes:  # row-major order
        x0, y0, x1, y1 = shape_box(s.cell, size)
        cx, _ = cell_center(s.cell, size)
        fill = PALETTE[s.color]
        if s.kind == "circle":
            draw.ellipse([x0, y0, x1, y1], fill=fill)
        elif s.kind == "square":
            draw.rectangle([x0, y0, x1, y1], fill=fill)
        else:
            draw.polygon([(cx, y0), (x0, y1), (x1, y1)], fill=fill)
    return img


# ------------------------------------------------------------------------------------ operations
@dataclass(frozen=True)
class Edit:
    op: str
    instruction: str
    before: Scene | None  # None for t2i
    after: Scene


def _template(op: str, rng: random.Random, paraphrase: bool) -> str:
    return rng.choice(TEMPLATES[op]) if paraphrase else TEMPLATES[op][0]


def describe(scene: Scene) -> str:
    """The shapes part of a t2i instruction: 'a red circle in the top left, ... and a ...'."""
    parts = [f"a {s.color} {s.kind} in the {POSITIONS[s.cell]}" for s in scene.shapes]
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def valid_ops(scene: Scene) -> list[str]:
    """Edit operations that keep `scene` a valid scene (remove needs 2+ shapes, add at most 2)."""
    ops = ["recolor", "move", "background"]
    if len(scene.shapes) >= 2:
        ops.append("remove")
    if len(scene.shapes) <= 2:
        ops.append("add")
    return [op for op in EDIT_OPS if op in ops]


def apply_op(scene: Scene, op: str, rng: random.Random, paraphrase: bool = False) -> Edit:
    """Draw one valid `op` edit of `scene`; the instruction names exactly one shape."""
    if op not in valid_ops(scene):
        raise ValueError(f"{op!r} is not valid on a scene of {len(scene.shapes)} shapes")
    shapes, bg = list(scene.shapes), scene.background
    taken = {(s.color, s.kind) for s in shapes}
    if op == "background":
        new_bg = rng.choice([b for b in BACKGROUND_COLORS if b != bg])
        text = _template(op, rng, paraphrase).format(bg=new_bg)
        return Edit(op, text, scene, Scene(new_bg, scene.shapes))
    if op == "add":
        color, kind = rng.choice([ck for ck in _all_pairs() if ck not in taken])
        cell = rng.choice(scene.empty_cells())
        after = Scene(bg, (*shapes, Shape(color, kind, cell)))
        text = _template(op, rng, paraphrase).format(color=color, kind=kind, pos=POSITIONS[cell])
        return Edit(op, text, scene, after)
    i = rng.randrange(len(shapes))
    s = shapes[i]
    if op == "recolor":
        new_color = rng.choice([c for c in SHAPE_COLORS if (c, s.kind) not in taken])
        shapes[i] = replace(s, color=new_color)
        text = _template(op, rng, paraphrase).format(color=s.color, kind=s.kind, new_color=new_color)
    elif op == "remove":
        del shapes[i]
        text = _template(op, rng, paraphrase).format(color=s.color, kind=s.kind)
    else:  # move
        cell = rng.choice(scene.empty_cells())
        shapes[i] = replace(s, cell=cell)
        text = _template(op, rng, paraphrase).format(color=s.color, kind=s.kind, pos=POSITIONS[cell])
    return Edit(op, text, scene, Scene(bg, tuple(shapes)))


def _all_pairs() -> list[tuple[str, str]]:
    return [(c, k) for c in SHAPE_COLORS for k in KINDS]


def random_scene(rng: random.Random, n_shapes: int | None = None) -> Scene:
    n = rng.randint(1, 3) if n_shapes is None else n_shapes
    cells = rng.sample(range(9), n)
    pairs = rng.sample(_all_pairs(), n)
    bg = rng.choice(BACKGROUND_COLORS)
    return Scene(bg, tuple(Shape(c, k, cell) for (c, k), cell in zip(pairs, cells, strict=True)))


def scene_for_op(op: str, rng: random.Random) -> Scene:
    """A random scene on which `op` is valid (shape counts drawn uniformly over the valid range)."""
    lo, hi = {"remove": (2, 3), "add": (1, 2)}.get(op, (1, 3))
    return random_scene(rng, rng.randint(lo, hi))


# ----------------------------------------------------------------------------------------- cases
def case_rng(split: str, seed: int, index: int, stream: str = "case") -> random.Random:
    """The RNG of one case. Splits are separate namespaces of the seed space: a (seed, index)
    of the "bench" split never yields the random stream of any "train" case."""
    if split not in SPLITS:
        raise ValueError(f"split {split!r} not in {SPLITS}")
    digest = hashlib.sha256(f"shapes-edit/v1/{stream}/{split}/{int(seed)}/{int(index)}".encode()).digest()
    return random.Random(int.from_bytes(digest[:16], "big"))


def parse_mix(mix: str | Mapping[str, float] | None) -> dict[str, float]:
    """Operation weights: None = uniform over all six; "recolor=2,t2i=1" or a mapping."""
    if mix is None:
        return {op: 1.0 for op in OPS}
    if isinstance(mix, str):
        mix = {k.strip(): float(v) for k, v in (p.split("=") for p in mix.split(",") if p.strip())}
    bad = set(mix) - set(OPS)
    if bad or not mix or any(w < 0 for w in mix.values()) or sum(mix.values()) <= 0:
        raise ValueError(f"bad op mix {dict(mix)}: ops must be in {OPS} with non-negative weights")
    return {op: float(mix[op]) for op in OPS if mix.get(op, 0) > 0}


@dataclass
class Case:
    op: str
    instruction: str
    reference: Image.Image | None  # None for t2i
    target: Image.Image
    reference_scene: Scene | None
    target_scene: Scene
    split: str = "train"
    seed: int = 0
    index: int = 0
    size: int = DEFAULT_SIZE

    @property
    def key(self) -> str:
        return f"{self.split}-{self.seed}-{self.index:09d}"


def make_case(op: str | None = None, *, split: str = "train", seed: int = 0, index: int = 0,
              size: int = DEFAULT_SIZE, mix: str | Mapping[str, float] | None = None,
              paraphrase: bool = False, rng: random.Random | None = None) -> Case:
    """One case, a pure function of (op, split, seed, index, size, mix, paraphrase) unless `rng`
    is given. With `op=None` the operation is drawn from `mix`."""
    check_size(size)
    rng = case_rng(split, seed, index) if rng is None else rng
    if op is None:
        weights = parse_mix(mix)
        op = rng.choices(list(weights), weights=list(weights.values()))[0]
    if op not in OPS:
        raise ValueError(f"op {op!r} not in {OPS}")
    scene = scene_for_op(op, rng)
    if op == "t2i":
        text = _template("t2i", rng, paraphrase).format(shapes=describe(scene), bg=scene.background)
        return Case(op, text, None, render(scene, size), None, scene, split, seed, index, size)
    edit = apply_op(scene, op, rng, paraphrase)
    return Case(op, edit.instruction, render(edit.before, size), render(edit.after, size),
                edit.before, edit.after, split, seed, index, size)


def generate(n: int, *, split: str = "train", seed: int = 0, start: int = 0, size: int = DEFAULT_SIZE,
             mix: str | Mapping[str, float] | None = None, paraphrase: bool = False) -> Iterator[Case]:
    for index in range(start, start + n):
        yield make_case(None, split=split, seed=seed, index=index, size=size, mix=mix, paraphrase=paraphrase)


def benchmark_cases(n_per_op: int = 50, *, seed: int = 0, size: int = DEFAULT_SIZE) -> Iterator[Case]:
    """The benchmark set: n_per_op cases of each of the six ops, from the "bench" split."""
    for k, op in enumerate(OPS):
        for i in range(n_per_op):
            yield make_case(op, split="bench", seed=seed, index=k * n_per_op + i, size=size)


# ---------------------------------------------------------------------------------------- chains
@dataclass
class Chain:
    start: Scene
    edits: list[Edit]
    renders: list[Image.Image]  # renders[0] = start, renders[k] = exact result after k edits
    seed: int = 0
    index: int = 0


def make_chain(turns: int = 8, *, split: str = "bench", seed: int = 0, index: int = 0,
               size: int = DEFAULT_SIZE, paraphrase: bool = False) -> Chain:
    """A starting scene and `turns` successive valid edits (op uniform over those valid now)."""
    rng = case_rng(split, seed, index, stream="chain")
    scene = random_scene(rng)
    chain = Chain(scene, [], [render(scene, size)], seed, index)
    for _ in range(turns):
        edit = apply_op(scene, rng.choice(valid_ops(scene)), rng, paraphrase)
        scene = edit.after
        chain.edits.append(edit)
        chain.renders.append(render(scene, size))
    return chain


# --------------------------------------------------------------------------------------- scoring
_PALETTE_ARRAY = np.array([PALETTE[n] for n in PALETTE_NAMES], dtype=np.int32)  # (9, 3)


def class_map(img: Image.Image | np.ndarray, size: int) -> np.ndarray:
    """(size, size) int array of palette indices (into PALETTE_NAMES), nearest colour in RGB;
    ties go to the earlier palette entry. Resized bilinearly first if the size differs."""
    if isinstance(img, np.ndarray):
        img = Image.fromarray(img.astype(np.uint8))
    img = img.convert("RGB")
    if img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    px = np.asarray(img, dtype=np.int32)[:, :, None, :]  # (S, S, 1, 3)
    return ((px - _PALETTE_ARRAY) ** 2).sum(-1).argmin(-1)


@dataclass(frozen=True)
class CaseScore:
    edit_acc: float
    keep_acc: float
    passed: bool = field(init=False)

    def __post_init__(self):
        object.__setattr__(self, "passed", self.edit_acc >= PASS_EDIT and self.keep_acc >= PASS_KEEP)


def _mean_over(hit: np.ndarray, region: np.ndarray) -> float:
    # An empty region cannot be got wrong: its accuracy is 1.0.
    return float(hit[region].mean()) if region.any() else 1.0


def score_case(output: Image.Image | np.ndarray, reference: Image.Image | np.ndarray | None,
               target: Image.Image | np.ndarray, op: str, size: int | None = None) -> CaseScore:
    """Spec scoring of one case at the target's size (or `size`). For t2i the background is the
    target's top-left pixel class: the canvas corner is never covered by a shape."""
    if size is None:
        size = target.size[0] if isinstance(target, Image.Image) else target.shape[1]
    O, T = class_map(output, size), class_map(target, size)
    if op == "t2i":
        edit = T != T[0, 0]
    else:
        if reference is None:
            raise ValueError(f"op {op!r} needs the reference image")
        edit = class_map(reference, size) != T
    hit = O == T
    return CaseScore(_mean_over(hit, edit), _mean_over(hit, ~edit))
