"""RoPE and attention kernels: interleaved-pair rotation, relative positions, backend choice."""

import math

import pytest
import torch

from kontext.network import attention as attn_mod
from kontext.network.attention import apply_rope, attention, resolve_backend, rope, set_attention_backend
from kontext.network.layers import EmbedND

AXES = [4, 6, 6]  # head_dim 16
THETA = 10_000


@pytest.fixture(autouse=True)
def _restore_backend():
    before = attn_mod.get_attention_backend()
    yield
    attn_mod._backend = before


def _complex_rope(x, ids):
    """Independent RoPE: pairs (x[2j], x[2j+1]) as complex numbers times exp(i * pos * omega)."""
    angles = []
    for axis, dim in enumerate(AXES):
        omega = THETA ** (-torch.arange(0, dim, 2, dtype=torch.float64) / dim)
        angles.append(ids[..., axis, None].double() * omega)
    rot = torch.polar(torch.ones(()), torch.cat(angles, dim=-1).float())[:, None]  # (B, 1, L, D/2)
    xc = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2).contiguous())
    return torch.view_as_real(xc * rot).flatten(-2)


def _ids(b, n):
    return torch.randint(0, 20, (b, n, 3)).float()


def test_rope_shape_and_rotation_angles():
    pos = torch.tensor([[0.0, 3.0]])
    r = rope(pos, 4, THETA)
    assert r.shape == (1, 2, 2) and r.dtype == torch.complex64
    torch.testing.assert_close(r[0, 0], torch.ones(2, dtype=torch.complex64))  # position 0: no turn
    angle = 3.0 * THETA ** (-2 / 4)
    # Frequency 1 at position 3 is the reference's block [[cos, -sin], [sin, cos]] of that angle.
    torch.testing.assert_close(r[0, 1, 1], torch.tensor(complex(math.cos(angle), math.sin(angle)), dtype=torch.complex64))


def test_apply_rope_rotates_interleaved_pairs():
    b, h, n, d = 2, 3, 5, sum(AXES)
    ids = _ids(b, n)
    pe = EmbedND(d, THETA, AXES)(ids)
    assert pe.shape == (b, 1, n, d // 2)
    q, k = torch.randn(b, h, n, d), torch.randn(b, h, n, d)
    q_rot, k_rot = apply_rope(q, k, pe)
    torch.testing.assert_close(q_rot, _complex_rope(q, ids), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(k_rot, _complex_rope(k, ids), atol=1e-5, rtol=1e-5)
    # A half-split (non-interleaved) rotation would not preserve each adjacent pair's norm.
    pair_norm = lambda x: x.reshape(*x.shape[:-1], -1, 2).norm(dim=-1)
    torch.testing.assert_close(pair_norm(q_rot), pair_norm(q))


def test_apply_rope_keeps_dtype_and_computes_in_fp32():
    q = torch.randn(1, 2, 4, 16)
    pe = EmbedND(16, THETA, AXES)(_ids(1, 4))
    q16, _ = apply_rope(q.bfloat16(), q.bfloat16(), pe)
    q32, _ = apply_rope(q.bfloat16().float(), q.bfloat16().float(), pe)
    assert q16.dtype == torch.bfloat16
    torch.testing.assert_close(q16, q32.bfloat16(), atol=0, rtol=0)


def test_rope_score_depends_only_on_relative_position():
    d = sum(AXES)
    embed = EmbedND(d, THETA, AXES)
    q, k = torch.randn(1, 1, 1, d), torch.randn(1, 1, 1, d)

    def score(pos_q, pos_k):
        ids = torch.tensor([[pos_q, pos_k]], dtype=torch.float32)  # (1, 2, 3)
        pe = embed(ids)
        q_rot, _ = apply_rope(q, q, pe[:, :, :1])
        _, k_rot = apply_rope(k, k, pe[:, :, 1:])
        return (q_rot * k_rot).sum()

    base = score([0.0, 2.0, 5.0], [1.0, 7.0, 3.0])
    for shift in ([0.0, 0.0, 4.0], [1.0, 3.0, 0.0], [2.0, 11.0, 6.0]):
        shifted = score([0.0 + shift[0], 2.0 + shift[1], 5.0 + shift[2]], [1.0 + shift[0], 7.0 + shift[1], 3.0 + shift[2]])
        torch.testing.assert_close(shifted, base, atol=1e-4, rtol=1e-5)
    # ...and does depend on it, on every axis.
    for axis in range(3):
        moved = [1.0, 7.0, 3.0]
        moved[axis] += 1.0
        assert not torch.allclose(score([0.0, 2.0, 5.0], moved), base, atol=1e-3)


def test_attention_matches_explicit_softmax():
    b, h, n, d = 2, 3, 7, sum(AXES)
    ids = _ids(b, n)
    pe = EmbedND(d, THETA, AXES)(ids)
    q, k, v = torch.randn(3, b, h, n, d).unbind(0)
    out = attention(q, k, v, pe, backend="sdpa")
    qr, kr = _complex_rope(q, ids), _complex_rope(k, ids)
    w = torch.softmax(qr @ kr.transpose(-1, -2) / math.sqrt(d), dim=-1)
    want = (w @ v).transpose(1, 2).reshape(b, n, h * d)
    assert out.shape == (b, n, h * d)
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)


def test_auto_uses_sdpa_on_cpu():
    q = torch.randn(1, 2, 4, 16)
    assert resolve_backend(q, "auto") == "sdpa"
    assert resolve_backend(q.bfloat16(), "auto") == "sdpa"
    set_attention_backend("sdpa")
    assert resolve_backend(q) == "sdpa"


def test_bad_or_unavailable_backend_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown attention backend"):
        set_attention_backend("xformers")
    q = torch.randn(1, 2, 4, 16)
    pe = EmbedND(16, THETA, AXES)(_ids(1, 4))
    with pytest.raises(RuntimeError, match="flash"):
        attention(q, q, q, pe, backend="flash")  # CPU fp32: never flash
    if attn_mod._flash_kernel() is None:
        with pytest.raises(RuntimeError, match="flash_attn"):
            set_attention_backend("flash")


def test_flash_path_layout(monkeypatch):
    """The flash branch hands (B, L, H, D) tensors to the kernel and merges heads like SDPA."""
    seen = []

    def fake_flash(q, k, v):  # the flash_attn_func convention, built from SDPA
        seen.append(q.shape)
        out = torch.nn.functional.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return out.transpose(1, 2), None  # some FA3 builds also return the log-sum-exp

    monkeypatch.setattr(attn_mod, "_FLASH", ("fake", fake_flash))
    monkeypatch.setattr(attn_mod, "flash_unsupported_reason", lambda q: None)
    b, h, n, d = 2, 3, 5, sum(AXES)
    pe = EmbedND(d, THETA, AXES)(_ids(b, n))
    q, k, v = torch.randn(3, b, h, n, d).unbind(0)
    set_attention_backend("flash")
    out = attention(q, k, v, pe)
    assert seen == [(b, n, h, d)]
    torch.testing.assert_close(out, attention(q, k, v, pe, backend="sdpa"))
