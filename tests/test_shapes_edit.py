import random
import re

import numpy as np
import pytest
from PIL import Image

from kontext.data import shapes_edit as se
from kontext.data.shapes_edit import Scene, Shape


def test_palette_matches_spec():
    assert se.PALETTE == {
        "red": (220, 40, 40), "green": (40, 170, 70), "blue": (40, 90, 220), "yellow": (235, 200, 40),
        "purple": (140, 60, 180), "orange": (240, 130, 30), "white": (245, 245, 245),
        "black": (25, 25, 25), "gray": (128, 128, 128),
    }
    assert set(se.SHAPE_COLORS) | set(se.BACKGROUND_COLORS) == set(se.PALETTE)
    assert not set(se.SHAPE_COLORS) & set(se.BACKGROUND_COLORS)


@pytest.mark.parametrize("size", [32, 64, 208])
def test_geometry_pixels(size):
    d = round(0.22 * size)
    scene = Scene("white", (Shape("red", "square", 0), Shape("blue", "circle", 4), Shape("green", "triangle", 8)))
    px = np.asarray(se.render(scene, size))
    assert px.shape == (size, size, 3)
    # Exactly the palette colours appear: no anti-aliasing.
    colours = {tuple(c) for c in px.reshape(-1, 3)}
    assert colours == {se.PALETTE[c] for c in ("white", "red", "blue", "green")}

    def mask(name):
        return (px == se.PALETTE[name]).all(-1)

    # square in cell 0: exactly the d x d box from the formulas
    cx, cy = round(size / 6), round(size / 6)
    x0, y0 = cx - d // 2, cy - d // 2
    sq = np.zeros((size, size), bool)
    sq[y0:y0 + d, x0:x0 + d] = True
    assert (mask("red") == sq).all()
    # circle in cell 4: inside its box, touches all four sides, centre filled
    x0, y0, x1, y1 = se.shape_box(4, size)
    ys, xs = np.nonzero(mask("blue"))
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (x0, x1, y0, y1)
    assert mask("blue")[round(size / 2), round(size / 2)]
    assert not mask("blue")[y0, x0]  # a box corner is outside the circle
    # triangle in cell 8: apex at (cx, y0), full base row at y1
    x0, y0, x1, y1 = se.shape_box(8, size)
    cx = round(size * 5 / 6)
    tri = mask("green")
    assert tri[y0, cx] and tri[y0].sum() <= 2
    assert tri[y1, x0:x1 + 1].all() and tri.sum() < d * d * 0.6
    ys, xs = np.nonzero(tri)
    assert (xs.min(), xs.max(), ys.min(), ys.max()) == (x0, x1, y0, y1)


def test_cell_centres_and_draw_order():
    assert se.cell_center(0, 64) == (11, 11) and se.cell_center(5, 64) == (53, 32)
    assert se.cell_center(7, 48) == (24, 40)
    # shapes are sorted row-major whatever order they were given in
    s = Scene("gray", (Shape("red", "circle", 7), Shape("blue", "circle", 2)))
    assert [sh.cell for sh in s.shapes] == [2, 7]


def test_scene_validation():
    with pytest.raises(ValueError):
        Scene("white", (Shape("red", "circle", 0), Shape("red", "circle", 1)))  # ambiguous phrase
    with pytest.raises(ValueError):
        Scene("white", (Shape("red", "circle", 0), Shape("blue", "circle", 0)))  # shared cell
    with pytest.raises(ValueError):
        Scene("red", (Shape("blue", "circle", 0),))  # shape colour as background
    with pytest.raises(ValueError):
        se.render(Scene("white", (Shape("red", "circle", 0),)), 40)  # not a multiple of 16


CANONICAL = {
    "recolor": r"make the (\w+) (\w+) (\w+)",
    "remove": r"remove the (\w+) (\w+)",
    "add": r"add a (\w+) (\w+) in the ([\w ]+)",
    "move": r"move the (\w+) (\w+) to the ([\w ]+)",
    "background": r"change the background to (\w+)",
}


@pytest.mark.parametrize("op", se.EDIT_OPS)
def test_edit_templates_and_semantics(op):
    for index in range(40):
        case = se.make_case(op, seed=3, index=index)
        m = re.fullmatch(CANONICAL[op], case.instruction)
        assert m, case.instruction
        before, after = case.reference_scene, case.target_scene
        pairs = {(s.color, s.kind): s for s in before.shapes}
        if op == "background":
            assert after.background == m[1] != before.background and after.shapes == before.shapes
            continue
        assert after.background == before.background
        named = (m[1], m[2])
        if op == "add":
            assert named not in pairs and len(before.shapes) <= 2
            new = [s for s in after.shapes if (s.color, s.kind) == named]
            assert len(new) == 1 and se.POSITIONS[new[0].cell] == m[3] and new[0].cell in before.empty_cells()
            continue
        shape = pairs[named]  # the phrase names exactly one shape of the reference
        rest = [s for s in before.shapes if s is not shape]
        if op == "recolor":
            assert Shape(m[3], shape.kind, shape.cell) in after.shapes and (m[3], shape.kind) not in pairs
        elif op == "remove":
            assert len(before.shapes) >= 2 and set(after.shapes) == set(rest)
        else:
            cell = se.POSITIONS.index(m[3])
            assert cell in before.empty_cells() and Shape(shape.color, shape.kind, cell) in after.shapes
        assert set(rest) <= set(after.shapes) and len(after.shapes) == len(before.shapes) - (op == "remove")


def test_t2i_template():
    scene = Scene("white", (Shape("green", "triangle", 8), Shape("red", "circle", 0), Shape("blue", "square", 4)))
    assert se.describe(scene) + f" on a {scene.background} background" == (
        "a red circle in the top left, a blue square in the center and a green triangle in the bottom right"
        " on a white background")
    assert se.describe(Scene("gray", (Shape("red", "circle", 1),))) == "a red circle in the top"
    case = se.make_case("t2i", seed=0, index=5)
    assert case.reference is None and case.instruction.endswith(f"on a {case.target_scene.background} background")
    assert case.instruction == se.describe(case.target_scene) + f" on a {case.target_scene.background} background"


def test_determinism_and_split_namespaces():
    a = se.make_case(None, split="train", seed=7, index=11, size=32)
    b = se.make_case(None, split="train", seed=7, index=11, size=32)
    assert a.instruction == b.instruction and a.target.tobytes() == b.target.tobytes()
    assert (a.reference is None) == (b.reference is None)
    train = [se.make_case("t2i", split="train", seed=0, index=i).target_scene for i in range(50)]
    bench = [se.make_case("t2i", split="bench", seed=0, index=i).target_scene for i in range(50)]
    assert train != bench
    with pytest.raises(ValueError):
        se.case_rng("test", 0, 0)


def test_op_mix_and_paraphrases():
    ops = [c.op for c in se.generate(60, seed=1, mix="recolor=1,t2i=1")]
    assert set(ops) == {"recolor", "t2i"}
    assert se.parse_mix(None) == {op: 1.0 for op in se.OPS}
    with pytest.raises(ValueError):
        se.parse_mix("rotate=1")
    canon = se.make_case("remove", seed=2, index=0)
    para = [se.make_case("remove", seed=2, index=i, paraphrase=True) for i in range(30)]
    assert len({p.instruction.split(" the ")[0] for p in para}) > 1
    # paraphrasing changes only the words, never the scenes
    assert para[0].target_scene == canon.target_scene and para[0].reference_scene == canon.reference_scene


def test_chain_is_valid_and_exact():
    chain = se.make_chain(8, seed=4, index=1, size=32)
    assert len(chain.edits) == 8 and len(chain.renders) == 9
    scene = chain.start
    for k, edit in enumerate(chain.edits):
        assert edit.before == scene
        scene = edit.after
        assert chain.renders[k + 1].tobytes() == se.render(scene, 32).tobytes()
    again = se.make_chain(8, seed=4, index=1, size=32)
    assert [e.instruction for e in again.edits] == [e.instruction for e in chain.edits]


def test_class_map_nearest_and_resize():
    img = np.zeros((32, 32, 3), np.uint8)
    img[:] = (230, 45, 35)  # near red
    img[:16] = (120, 130, 125)  # near gray
    cm = se.class_map(img, 32)
    assert (cm[:16] == se.PALETTE_NAMES.index("gray")).all() and (cm[16:] == se.PALETTE_NAMES.index("red")).all()
    big = Image.fromarray(img).resize((128, 128), Image.NEAREST)
    assert (se.class_map(big, 32) == cm).all()


def test_scorer_perfect_blank_partial():
    case = se.make_case("move", seed=0, index=2, size=64)
    ref, tgt = case.reference, case.target
    assert se.score_case(tgt, ref, tgt, "move").passed
    assert se.score_case(tgt.resize((128, 128), Image.NEAREST), ref, tgt, "move").passed
    blank = Image.new("RGB", (64, 64), (0, 255, 255))  # nearest blue: never right everywhere
    s = se.score_case(blank, ref, tgt, "move")
    assert not s.passed and s.edit_acc < 0.5
    # returning the reference unchanged: keep region perfect, edit region wrong
    s = se.score_case(ref, ref, tgt, "move")
    assert s.keep_acc == 1.0 and s.edit_acc == 0.0 and not s.passed
    # hand-made partial output: fix exactly 85% of the edit pixels, spoil 3% of the keep pixels
    R, T = np.asarray(ref), np.asarray(tgt)
    edit = (R != T).any(-1)
    out = R.copy()
    e_idx, k_idx = np.flatnonzero(edit), np.flatnonzero(~edit)
    n_fix = int(np.ceil(0.85 * len(e_idx)))
    flat = out.reshape(-1, 3)
    flat[e_idx[:n_fix]] = T.reshape(-1, 3)[e_idx[:n_fix]]
    n_bad = int(0.03 * len(k_idx))
    used = {s.color for s in case.reference_scene.shapes + case.target_scene.shapes}
    used |= {case.reference_scene.background}
    other = np.array(se.PALETTE[next(c for c in se.PALETTE_NAMES if c not in used)], np.uint8)
    flat[k_idx[:n_bad]] = other
    s = se.score_case(out, ref, tgt, "move")
    assert s.edit_acc == pytest.approx(n_fix / len(e_idx))
    assert s.keep_acc == pytest.approx(1 - n_bad / len(k_idx))
    assert s.passed
    flat[k_idx[: int(0.06 * len(k_idx))]] = other  # 6% keep errors: fails
    assert not se.score_case(out, ref, tgt, "move").passed


def test_scorer_t2i_and_empty_region():
    case = se.make_case("t2i", seed=0, index=0, size=32)
    bg = se.PALETTE[case.target_scene.background]
    s = se.score_case(Image.new("RGB", (32, 32), bg), None, case.target, "t2i")
    assert s.keep_acc == 1.0 and s.edit_acc == 0.0
    assert se.score_case(case.target, None, case.target, "t2i").passed
    # a t2i target with no shape pixels would have an empty edit region: accuracy 1.0 by definition
    plain = Image.new("RGB", (32, 32), bg)
    assert se.score_case(plain, None, plain, "t2i") == se.CaseScore(1.0, 1.0)
    with pytest.raises(ValueError):
        se.score_case(case.target, None, case.target, "recolor")


def test_random_ops_valid_on_random_scenes():
    rng = random.Random(0)
    for _ in range(300):
        scene = se.random_scene(rng)
        for op in se.valid_ops(scene):
            edit = se.apply_op(scene, op, rng)
            assert edit.after != scene
