"""Kontext token packing: layout, ids, any number of contexts, and the target slice."""

import pytest
import torch

from kontext.network.model import build_flux
from kontext.network.packing import (
    compact_text,
    make_ids,
    model_text,
    pack,
    prepare,
    target_slice,
    txt_ids,
    unpack,
)


def test_pack_layout_and_round_trip():
    x = torch.randn(2, 16, 6, 10)
    tokens = pack(x)
    assert tokens.shape == (2, 3 * 5, 64)
    # token (row r, col c) holds channel c*4 + ph*2 + pw of pixel (2r + ph, 2c + pw)
    for r, col, ch, ph, pw in [(0, 0, 0, 0, 0), (2, 4, 15, 1, 1), (1, 3, 7, 0, 1), (2, 0, 3, 1, 0)]:
        assert tokens[1, r * 5 + col, ch * 4 + ph * 2 + pw] == x[1, ch, 2 * r + ph, 2 * col + pw]
    assert torch.equal(unpack(tokens, 6, 10), x)


def test_pack_rejects_odd_sizes():
    with pytest.raises(ValueError, match="even"):
        pack(torch.randn(1, 16, 5, 4))


def test_make_ids_and_txt_ids():
    ids = make_ids(3, 4, 6, t=2)
    assert ids.shape == (3, 2 * 3, 3) and ids.dtype == torch.float32
    want = torch.tensor([[2, r, c] for r in range(2) for c in range(3)], dtype=torch.float32)
    assert torch.equal(ids[0], want) and torch.equal(ids[2], want)
    t = txt_ids(2, 7)
    assert t.shape == (2, 7, 3) and not t.any()


def test_prepare_context_ids_for_several_resolutions():
    target = torch.randn(2, 16, 8, 8)
    contexts = [torch.randn(2, 16, 4, 6), torch.randn(2, 16, 10, 2)]
    tok = prepare(target, contexts)
    assert tok.img.shape == (2, 16, 64) and tok.n_img == 16
    assert tok.ctx.shape == (2, 6 + 5, 64) and tok.ctx_ids.shape == (2, 11, 3)
    assert torch.equal(tok.img_ids, make_ids(2, 8, 8, t=0))
    # i-th context: axis 0 == i, spatial ids start at 0 on its own grid
    first, second = tok.ctx_ids[:, :6], tok.ctx_ids[:, 6:]
    assert (first[..., 0] == 1).all() and (second[..., 0] == 2).all()
    assert torch.equal(first[0, :, 1:], make_ids(1, 4, 6)[0, :, 1:])
    assert torch.equal(second[0, :, 1:], make_ids(1, 10, 2)[0, :, 1:])
    assert first[..., 1:].min() == 0 and second[..., 1:].min() == 0
    assert torch.equal(tok.ctx[:, :6], pack(contexts[0])) and torch.equal(tok.ctx[:, 6:], pack(contexts[1]))

    tokens, ids = tok.joint()
    assert tokens.shape == (2, 27, 64) and ids.shape == (2, 27, 3)
    assert torch.equal(tokens[:, :16], tok.img) and torch.equal(ids[:, 16:], tok.ctx_ids)
    z = torch.randn_like(tok.img)
    tokens, _ = tok.joint(z)
    assert torch.equal(tokens[:, :16], z) and torch.equal(tokens[:, 16:], tok.ctx)
    assert torch.equal(tok.unpack(target_slice(tokens, tok.n_img)), unpack(z, 8, 8))


def test_prepare_without_context_is_plain_text_to_image():
    target = torch.randn(1, 16, 4, 4)
    tok = prepare(target, [])
    tokens, ids = tok.joint()
    assert tok.ctx.shape == (1, 0, 64) and tokens is tok.img and ids is tok.img_ids


def test_prepare_rejects_mismatched_context():
    with pytest.raises(ValueError, match="context 1"):
        prepare(torch.randn(2, 16, 4, 4), [torch.randn(2, 8, 4, 4)])
    with pytest.raises(ValueError, match="target tokens"):
        prepare(torch.randn(1, 16, 4, 4), [torch.randn(1, 16, 4, 4)]).joint(torch.randn(1, 3, 64))


def test_model_output_sliced_to_target_tokens():
    model = build_flux("tiny").eval()
    for p in model.parameters():  # leave adaLN-Zero so the output depends on the input
        p.data.normal_(0, 0.1)
    target, context = torch.randn(2, 16, 8, 8), torch.randn(2, 16, 4, 8)
    txt, y, t, g = torch.randn(2, 5, 384), torch.randn(2, 384), torch.rand(2), torch.full((2,), 2.5)

    def run(tok):
        tokens, ids = tok.joint()
        pred = model(tokens, ids, txt, txt_ids(2, 5), t, y, guidance=g)
        assert pred.shape == (2, tokens.shape[1], 64)
        return target_slice(pred, tok.n_img)

    with torch.no_grad():
        tok = prepare(target, [context])
        out = run(tok)
        assert out.shape == (2, 16, 64) and tok.unpack(out).shape == target.shape
        # The target prediction sees the context and its ids; the context is never in the output.
        assert not torch.allclose(out, run(prepare(target, [torch.randn_like(context)])), atol=1e-4)
        moved = prepare(target, [context])
        moved.ctx_ids[..., 0] = 0
        assert not torch.allclose(out, run(moved), atol=1e-4)
        assert not torch.allclose(out, run(prepare(target, [])), atol=1e-4)


def _zero_padded(lengths: list[int], length: int = 32, dim: int = 384) -> torch.Tensor:
    txt = torch.randn(len(lengths), length, dim)
    for i, n in enumerate(lengths):
        txt[i, n:] = 0
    return txt


def test_compact_text_keeps_the_prompts_and_counts_the_dropped_rows():
    txt = _zero_padded([3, 10, 7, 2])
    short, mult = compact_text(txt)
    assert short.shape == (4, 11, 384) and torch.equal(short, txt[:, :11])  # longest 10 + one zero row
    assert torch.equal(mult[1, :10], torch.ones(10)) and torch.allclose(mult[1, 10:], torch.full((1,), 22.0))
    assert torch.allclose(mult[0, 3:], torch.full((8,), 29 / 8))
    # Each sample's kept rows stand for exactly its original L rows.
    assert torch.allclose(mult.sum(dim=1), torch.full((4,), 32.0))
    short16, mult16 = compact_text(txt, multiple=16)  # rounded up: 11 -> 16 rows
    assert short16.shape[1] == 16 and torch.allclose(mult16[1, 10:], torch.full((6,), 22 / 6))
    assert torch.allclose(mult16.sum(dim=1), torch.full((4,), 32.0))
    # Nothing to drop: a full-length prompt, a rounded length that reaches L, or no zero rows (T5).
    for unchanged, multiple in ((_zero_padded([32, 3]), 1), (_zero_padded([20, 3]), 16), (torch.randn(2, 32, 8), 1)):
        same, none = compact_text(unchanged, multiple)
        assert same is unchanged and none is None
    assert compact_text(_zero_padded([20, 3]), multiple=8)[0].shape[1] == 24
    # Only trailing zero rows count as padding: a zero row inside the prompt stays.
    inner = _zero_padded([6, 6])
    inner[0, 2] = 0
    assert torch.equal(compact_text(inner)[1][0, :6], torch.ones(6))


def test_model_text_passes_the_counts_only_when_rows_were_dropped():
    padded, full = _zero_padded([3, 10]), torch.randn(2, 32, 8)
    short, extra = model_text(padded)
    assert short.shape[1] == 11 and torch.equal(extra["txt_multiplicity"], compact_text(padded)[1])
    for txt, compact in ((full, True), (padded, False)):
        same, none = model_text(txt, compact)
        assert same is txt and none == {}


def test_compacted_text_gives_the_same_outputs_and_gradients():
    model = build_flux("tiny")
    for p in model.parameters():  # leave adaLN-Zero so that every block matters
        p.data.normal_(0, 0.1)
    txt = _zero_padded([3, 10, 7, 2])
    tok = prepare(torch.randn(4, 16, 8, 8), [torch.randn(4, 16, 8, 8)])
    img, ids = tok.joint()
    t, y, g = torch.rand(4), torch.randn(4, 384), torch.full((4,), 3.0)

    def loss_and_grads(txt, mult):
        model.zero_grad()
        out = model(img, ids, txt, txt_ids(4, txt.shape[1]), t, y, guidance=g, txt_multiplicity=mult)
        out.square().mean().backward()
        return out.detach(), [p.grad.clone() for p in model.parameters()]

    full, full_grads = loss_and_grads(txt, None)
    short, mult = compact_text(txt)
    out, grads = loss_and_grads(short, mult)
    assert short.shape[1] == 11
    torch.testing.assert_close(out, full, rtol=1e-4, atol=1e-5)
    for a, b in zip(grads, full_grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-6)
    # Dropping the rows without their counts is not the same model.
    assert not torch.allclose(loss_and_grads(short, None)[0], full, atol=1e-3)
    with pytest.raises(ValueError, match="txt_multiplicity"):
        model(img, ids, short, txt_ids(4, 11), t, y, guidance=g, txt_multiplicity=mult[:, :8])
