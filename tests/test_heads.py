"""GlobalPointer / Efficient GlobalPointer heads and their rotary embedding (lightning_mtl.heads)."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_mtl.heads import EfficientGlobalPointer, GlobalPointer, apply_rotary, rotary_cos_sin
from lightning_mtl.losses import multilabel_crossentropy, sparse_multilabel_crossentropy

HEADS = (GlobalPointer, EfficientGlobalPointer)


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def rotation(x: torch.Tensor, pos: int, base: float = 10000.0) -> torch.Tensor:
    """Interleaved RoPE by hand: pair (2i, 2i+1) rotated by pos · base^(-2i/d), float64."""
    d = x.shape[-1]
    out = x.clone()
    for i in range(d // 2):
        angle = pos * base ** (-2 * i / d)
        c, s = math.cos(angle), math.sin(angle)
        out[..., 2 * i] = x[..., 2 * i] * c - x[..., 2 * i + 1] * s
        out[..., 2 * i + 1] = x[..., 2 * i + 1] * c + x[..., 2 * i] * s
    return out


# --- parameter counts (kexue.fm/archives/8877) ---------------------------------------------------------------------
@pytest.mark.parametrize(("hidden", "types", "d"), [(768, 100, 64), (32, 3, 8), (10, 1, 4)])
def test_parameter_counts_follow_the_article(hidden: int, types: int, d: int) -> None:
    # GP: 2·D·d per type (+ 2d biases per type)
    assert n_params(GlobalPointer(hidden, types, d, bias=False)) == 2 * hidden * d * types
    assert n_params(GlobalPointer(hidden, types, d)) == 2 * hidden * d * types + 2 * d * types
    # EGP: shared 2·D·d + 4d per type (+ 2d shared biases + 2 biases, start and end, per type)
    assert n_params(EfficientGlobalPointer(hidden, types, d, bias=False)) == 2 * hidden * d + 4 * d * types
    assert n_params(EfficientGlobalPointer(hidden, types, d)) == 2 * hidden * d + 4 * d * types + 2 * d + 2 * types
    if (hidden, types, d) == (768, 100, 64):  # the article's example: ≈ 9.8M for GP
        assert 2 * hidden * d * types == 9_830_400


# --- masks ----------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("head_cls", HEADS)
@pytest.mark.parametrize("tril", [True, False])
def test_padding_and_tril_masks_exactly_where_expected(head_cls: type, tril: bool) -> None:
    torch.manual_seed(0)
    head = head_cls(16, 3, 8, tril_mask=tril)
    lengths = [6, 4, 1]
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in lengths])
    scores = head(torch.randn(3, 6, 16), mask)
    assert scores.shape == (3, 3, 6, 6)
    low = torch.finfo(scores.dtype).min
    i, j = torch.meshgrid(torch.arange(6), torch.arange(6), indexing="ij")
    for b, n in enumerate(lengths):
        expected = (i >= n) | (j >= n)
        if tril:
            expected |= i > j
        masked = scores[b] == low
        assert torch.equal(masked, expected.expand(3, 6, 6)), (b, n)
        assert torch.isfinite(scores[b]).all()  # finfo.min, not -inf
    # no mask and no tril: nothing masked
    free = head_cls(16, 3, 8, tril_mask=False)(torch.randn(2, 5, 16))
    assert (free > torch.finfo(free.dtype).min).all()
    # float 0/1 and bool masks are the same
    torch.testing.assert_close(
        head(torch.ones(1, 6, 16), mask[1:2].float()), head(torch.ones(1, 6, 16), mask[1:2].bool())
    )


# --- RoPE -----------------------------------------------------------------------------------------------------------
def test_rotary_tables_interleaved_formula() -> None:
    cos, sin = rotary_cos_sin(7, 6, offset=3, dtype=torch.float64)
    for p in range(7):
        for f in range(6):
            theta = (p + 3) * 10000.0 ** (-2 * (f // 2) / 6)
            assert cos[p, f].item() == pytest.approx(math.cos(theta), abs=1e-6)
            assert sin[p, f].item() == pytest.approx(math.sin(theta), abs=1e-6)
    x = torch.randn(7, 6, dtype=torch.float64)
    cos64, sin64 = rotary_cos_sin(7, 6, dtype=torch.float64)
    got = apply_rotary(x, cos64, sin64)
    want = torch.stack([rotation(x[p], p) for p in range(7)])
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)  # the tables are float32-made


def test_rotate_half_layout_equals_the_gau_functions() -> None:
    """layout='half' reproduces lightning_gen.gau's rotate-half RoPE exactly (so the GAU could share this one)."""
    from lightning_gen.gau import apply_rotary as gau_apply
    from lightning_gen.gau import rotary_cos_sin as gau_cos_sin

    x = torch.randn(2, 9, 12)
    for dim, offset in [(12, 0), (8, 5)]:  # full and partial rotation
        cos, sin = rotary_cos_sin(9, dim, offset=offset, layout="half")
        gcos, gsin = gau_cos_sin(9, dim, offset=offset)
        assert torch.equal(cos, gcos) and torch.equal(sin, gsin)
        assert torch.equal(apply_rotary(x, cos, sin, layout="half"), gau_apply(x, gcos, gsin))


def test_layouts_are_a_feature_permutation_of_each_other() -> None:
    d, n = 8, 10
    q, k = torch.randn(n, d, dtype=torch.float64), torch.randn(n, d, dtype=torch.float64)
    perm = torch.cat([torch.arange(0, d, 2), torch.arange(1, d, 2)])  # interleaved pair (2i, 2i+1) -> (i, i + d/2)
    ci, si = rotary_cos_sin(n, d, dtype=torch.float64)
    ch, sh = rotary_cos_sin(n, d, layout="half", dtype=torch.float64)
    inter = apply_rotary(q, ci, si) @ apply_rotary(k, ci, si).T
    half = apply_rotary(q[:, perm], ch, sh, layout="half") @ apply_rotary(k[:, perm], ch, sh, layout="half").T
    torch.testing.assert_close(inter, half, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(apply_rotary(q, ci, si)[:, perm], apply_rotary(q[:, perm], ch, sh, layout="half"))


@pytest.mark.parametrize("head_cls", HEADS)
def test_rope_scores_depend_on_relative_position_only(head_cls: type) -> None:
    torch.manual_seed(1)
    head = head_cls(16, 2, 8, tril_mask=False).double()
    content = torch.randn(1, 5, 16, dtype=torch.float64)
    for shift in (1, 4, 11):
        padded = torch.randn(1, 5 + shift + 2, 16, dtype=torch.float64)
        padded[:, shift : shift + 5] = content
        block = head(padded)[..., shift : shift + 5, shift : shift + 5]
        torch.testing.assert_close(block, head(content), rtol=1e-5, atol=1e-5)  # float32 RoPE tables
    # ... and RoPE does encode position: one token repeated gives scores that vary with i - j, constant without RoPE
    same = torch.randn(1, 1, 16, dtype=torch.float64).expand(1, 6, 16)
    with_rope = head(same)[0, 0]
    assert with_rope.diagonal(1).std() < 1e-5 < (with_rope[0, 1:] - with_rope[0, 1]).abs().max()
    no_rope = head_cls(16, 2, 8, rope=False, tril_mask=False).double()
    no_rope.load_state_dict(head.state_dict())
    flat = no_rope(same)[0, 0]
    torch.testing.assert_close(flat, flat[0, 0].expand(6, 6))


# --- scores by hand -------------------------------------------------------------------------------------------------
def test_global_pointer_scores_by_hand() -> None:
    torch.manual_seed(2)
    hidden, types, d, n = 6, 2, 4, 5
    head = GlobalPointer(hidden, types, d, tril_mask=False).double()
    h = torch.randn(1, n, hidden, dtype=torch.float64)
    scores = head(h)
    w, bias = head.dense.weight, head.dense.bias
    for a in range(types):
        rows = slice(2 * d * a, 2 * d * (a + 1))  # per type: [q_α; k_α]
        wa, ba = w[rows], bias[rows]
        for i in range(n):
            q = rotation(wa[:d] @ h[0, i] + ba[:d], i)
            for j in range(n):
                k = rotation(wa[d:] @ h[0, j] + ba[d:], j)
                assert scores[0, a, i, j].item() == pytest.approx((q @ k).item() / math.sqrt(d), abs=1e-5)


def test_efficient_global_pointer_decomposition_by_hand() -> None:
    """s_α(i,j) = (R_i q_i)ᵀ(R_j k_j)/√d + w_αᵀ[q_i; k_i; q_j; k_j] + c_α, w_α and c_α read off the weights."""
    torch.manual_seed(3)
    hidden, types, d, n = 6, 3, 4, 5
    head = EfficientGlobalPointer(hidden, types, d, tril_mask=False).double()
    h = torch.randn(1, n, hidden, dtype=torch.float64)
    scores = head(h)
    x = h[0] @ head.dense.weight.T + head.dense.bias
    q, k = x[:, 0::2], x[:, 1::2]
    u, beta = head.type_dense.weight, head.type_dense.bias  # (2T, 2d): columns act on interleaved [q; k]
    for a in range(types):
        start, end = u[2 * a + 1], u[2 * a]
        w_alpha = 0.5 * torch.cat([start[0::2], start[1::2], end[0::2], end[1::2]])  # R^{4d}
        c_alpha = 0.5 * (beta[2 * a + 1] + beta[2 * a])
        assert w_alpha.shape == (4 * d,)
        for i in range(n):
            for j in range(n):
                span = rotation(q[i], i) @ rotation(k[j], j) / math.sqrt(d)
                cls = w_alpha @ torch.cat([q[i], k[i], q[j], k[j]]) + c_alpha
                assert scores[0, a, i, j].item() == pytest.approx((span + cls).item(), abs=1e-5)
    # without RoPE the first term is the plain q_iᵀ k_j / √d
    plain = EfficientGlobalPointer(hidden, types, d, rope=False, tril_mask=False).double()
    plain.load_state_dict(head.state_dict())
    delta = plain(h)[0] - (q @ k.T / math.sqrt(d))
    start_bias = 0.5 * (x @ u[1::2].T + beta[1::2]).T  # (T, n) by row i
    end_bias = 0.5 * (x @ u[0::2].T + beta[0::2]).T  # (T, n) by column j
    torch.testing.assert_close(delta, start_bias[:, :, None] + end_bias[:, None, :])


# --- low precision, integration, errors -----------------------------------------------------------------------------
@pytest.mark.parametrize("head_cls", HEADS)
def test_bf16_autocast_forward_finite_and_trains_with_the_losses(head_cls: type) -> None:
    torch.manual_seed(4)
    head = head_cls(32, 3, 8)
    h = torch.randn(2, 7, 32, requires_grad=True)
    mask = torch.tensor([[1] * 7, [1] * 4 + [0] * 3])
    targets = torch.zeros(2, 3, 7, 7, dtype=torch.bool)
    targets[0, 1, 2, 4] = targets[1, 0, 0, 3] = targets[1, 2, 1, 1] = True
    index = torch.zeros(2, 3, 2, dtype=torch.long)
    index[0, 1, 0], index[1, 0, 0], index[1, 2, 0] = 2 * 7 + 4, 0 * 7 + 3, 1 * 7 + 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        scores = head(h, mask)
        assert scores.dtype == torch.bfloat16
        assert torch.isfinite(scores).all()
        low = torch.finfo(torch.bfloat16).min
        assert (scores[1, :, 4:, :] == low).all() and (scores[1, :, :, 4:] == low).all()
        dense = multilabel_crossentropy(scores.flatten(-2), targets.flatten(-2))
        sparse = sparse_multilabel_crossentropy(scores.flatten(-2), index)  # 0 = padding (pair (0, 0))
    assert torch.isfinite(dense) and torch.isfinite(sparse)
    (dense + sparse).backward()
    assert torch.isfinite(h.grad).all() and all(torch.isfinite(p.grad).all() for p in head.parameters())


@pytest.mark.parametrize("head_cls", HEADS)
def test_bad_arguments_raise_value_error(head_cls: type) -> None:
    name = head_cls.__name__
    with pytest.raises(ValueError, match=rf"{name}: head_size must be even with rope=True"):
        head_cls(8, 2, 5)
    head_cls(8, 2, 5, rope=False)  # odd is fine without RoPE
    head = head_cls(8, 2, 4)
    with pytest.raises(ValueError, match=rf"{name}: hidden_states must be \(batch, n, 8\), got \(2, 3, 7\)"):
        head(torch.zeros(2, 3, 7))
    with pytest.raises(ValueError, match=rf"{name}: hidden_states must be"):
        head(torch.zeros(3, 8))
    with pytest.raises(ValueError, match=rf"{name}: attention_mask must be \(batch, n\) = \(2, 3\) .* got \(2, 4\)"):
        head(torch.zeros(2, 3, 8), torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"layout must be 'interleaved' .* got 'halves'"):
        rotary_cos_sin(3, 4, layout="halves")
    with pytest.raises(ValueError, match=r"rotary dim must be a positive even number"):
        rotary_cos_sin(3, 5)
