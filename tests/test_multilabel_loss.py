"""Multi-label "softmax + CE" (dense and sparse, lightning_mtl.losses) against float64 brute-force definitions."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_mtl.losses import multilabel_crossentropy, sparse_multilabel_crossentropy


# --- brute-force definitions (python floats, math.fsum) -------------------------------------------------------------
def dense_brute(scores: list[float], targets: list[int], valid: list[bool] | None = None) -> float:
    """log(1 + Σ_neg e^s) + log(1 + Σ_pos e^-s) over the valid classes."""
    valid = valid or [True] * len(scores)
    neg = [math.exp(s) for s, t, v in zip(scores, targets, valid) if v and not t]
    pos = [math.exp(-s) for s, t, v in zip(scores, targets, valid) if v and t]
    return math.log(math.fsum([1.0, *neg])) + math.log(math.fsum([1.0, *pos]))


def sparse_brute(scores: list[float], index: list[int], mask_zero: bool) -> float:
    """The dense loss of the positives listed in ``index`` (each once; index 0 is padding and class 0 unused when
    ``mask_zero``)."""
    positives = {i for i in index if not (mask_zero and i == 0)}
    targets = [int(c in positives) for c in range(len(scores))]
    return dense_brute(scores, targets, [not (mask_zero and c == 0) for c in range(len(scores))])


def rows(x: torch.Tensor) -> list:
    return x.reshape(-1, x.shape[-1]).tolist()


# --- dense ----------------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    classes=st.integers(1, 7),
    seed=st.integers(0, 2**31 - 1),
    use_mask=st.booleans(),
)
def test_dense_equals_brute_force(lead: list[int], classes: int, seed: int, use_mask: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    shape = (*lead, classes)
    scores = torch.randn(shape, generator=g, dtype=torch.float64) * 5
    targets = torch.randint(0, 2, shape, generator=g)
    mask = torch.rand(shape, generator=g) < 0.7 if use_mask else None
    got = multilabel_crossentropy(scores, targets, mask, reduction="none")
    assert got.shape == tuple(lead) and got.dtype == torch.float64
    masks = rows(mask) if use_mask else [None] * len(rows(scores))
    want = [dense_brute(s, t, m) for s, t, m in zip(rows(scores), rows(targets), masks)]
    torch.testing.assert_close(got.reshape(-1), torch.tensor(want, dtype=torch.float64), rtol=1e-12, atol=1e-12)


def test_reductions_and_doc_values() -> None:
    scores = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -2.0, -1.0]])
    targets = torch.tensor([[1, 0, 1], [0, 0, 0]])
    none = multilabel_crossentropy(scores, targets, reduction="none")
    want = torch.tensor([dense_brute([2.0, -1.0, 0.5], [1, 0, 1]), dense_brute([-3.0, -2.0, -1.0], [0, 0, 0])])
    torch.testing.assert_close(none, want)
    torch.testing.assert_close(multilabel_crossentropy(scores, targets, reduction="sum"), want.sum())
    torch.testing.assert_close(multilabel_crossentropy(scores, targets), want.mean())
    # bool, int and float 0/1 targets are the same thing
    for t in (targets.bool(), targets.float()):
        torch.testing.assert_close(multilabel_crossentropy(scores, t, reduction="none"), none)


def test_single_class_is_binary_cross_entropy_with_logits() -> None:
    """m = 2 (one class per row): log(1 + e^-s) for a positive, log(1 + e^s) for a negative (archives/9158)."""
    s = torch.linspace(-30, 30, 41, dtype=torch.float64).unsqueeze(-1)
    for label in (0.0, 1.0):
        t = torch.full_like(s, label)
        got = multilabel_crossentropy(s, t, reduction="none")
        want = F.binary_cross_entropy_with_logits(s, t, reduction="none").squeeze(-1)
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
        sign = -1.0 if label else 1.0
        exact = torch.tensor([math.log1p(math.exp(sign * v)) for v in s.flatten().tolist()], dtype=torch.float64)
        torch.testing.assert_close(got, exact, rtol=1e-12, atol=1e-12)


def test_mask_broadcasts_and_excludes_classes() -> None:
    g = torch.Generator().manual_seed(0)
    scores, targets = torch.randn(4, 6, generator=g), torch.randint(0, 2, (4, 6), generator=g)
    keep = torch.tensor([True, False, True, True, False, True])
    got = multilabel_crossentropy(scores, targets, keep, reduction="none")  # (C,) broadcasts over rows
    want = multilabel_crossentropy(scores[:, keep], targets[:, keep], reduction="none")
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(multilabel_crossentropy(scores, targets, keep.long(), reduction="none"), want)


def test_all_masked_rows_are_zero_with_finite_gradients() -> None:
    scores = torch.tensor([[50.0, -50.0, 3.0], [1.0, 2.0, 3.0]], requires_grad=True)
    targets = torch.tensor([[1, 0, 1], [0, 1, 0]])
    mask = torch.tensor([[False, False, False], [True, True, True]])
    loss = multilabel_crossentropy(scores, targets, mask, reduction="none")
    assert loss[0].item() == 0.0 and torch.isfinite(loss).all()
    loss.sum().backward()
    assert torch.isfinite(scores.grad).all() and torch.equal(scores.grad[0], torch.zeros(3))


def test_dense_gradients_finite_for_extreme_scores() -> None:
    scores = torch.tensor([[1e4, -1e4, 0.0, 88.0, -88.0]], requires_grad=True)
    targets = torch.tensor([[0, 1, 1, 0, 1]])
    loss = multilabel_crossentropy(scores, targets)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(scores.grad).all()
    assert loss.item() == pytest.approx(1e4 + 1e4, rel=1e-6)


def test_dense_finfo_min_scores_from_a_masked_head_are_harmless() -> None:
    """GlobalPointer heads put finfo(dtype).min on masked pairs; as negatives they contribute e^min = 0."""
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        scores = torch.tensor([[torch.finfo(dtype).min, 1.0, -2.0]], dtype=dtype, requires_grad=True)
        targets = torch.tensor([[0, 1, 0]])
        loss = multilabel_crossentropy(scores, targets)
        loss.backward()
        assert loss.item() == pytest.approx(dense_brute([-math.inf, 1.0, -2.0], [0, 1, 0]), rel=1e-6)
        assert torch.isfinite(scores.grad.float()).all()


# --- sparse ---------------------------------------------------------------------------------------------------------
@settings(max_examples=60, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=1, max_size=2),
    classes=st.integers(2, 9),
    seed=st.integers(0, 2**31 - 1),
    mask_zero=st.booleans(),
)
def test_sparse_equals_brute_force_and_dense(lead: list[int], classes: int, seed: int, mask_zero: bool) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn((*lead, classes), generator=g, dtype=torch.float64) * 4
    n_rows = math.prod(lead)
    targets = torch.zeros(n_rows, classes, dtype=torch.bool)
    if mask_zero:  # a varying number of positives in 1..C-1 per row, padded with 0
        index = torch.zeros(n_rows, classes, dtype=torch.long)
        for r in range(n_rows):
            k = int(torch.randint(0, classes, (), generator=g))
            pos = torch.randperm(classes - 1, generator=g)[:k] + 1
            index[r, :k], targets[r, pos] = pos, True
    else:  # no padding: every row lists exactly k distinct positives, class 0 included
        k = int(torch.randint(1, classes + 1, (), generator=g))
        index = torch.stack([torch.randperm(classes, generator=g)[:k] for _ in range(n_rows)])
        targets.scatter_(1, index, True)
    index, targets = index.reshape(*lead, -1), targets.reshape(*lead, classes)
    got = sparse_multilabel_crossentropy(scores, index, mask_zero=mask_zero, reduction="none")
    assert got.shape == tuple(lead) and got.dtype == torch.float64
    want = [sparse_brute(s, i, mask_zero) for s, i in zip(rows(scores), rows(index))]
    torch.testing.assert_close(got.reshape(-1), torch.tensor(want, dtype=torch.float64), rtol=1e-10, atol=1e-10)
    mask = torch.ones(classes, dtype=torch.bool)
    mask[0] = not mask_zero
    dense = multilabel_crossentropy(scores, targets, mask, reduction="none")
    torch.testing.assert_close(got, dense, rtol=1e-9, atol=1e-9)


def test_sparse_equals_dense_float32_gpl_shapes() -> None:
    """(batch, types, n·n) rows as GlobalPointer gives them; positives padded with 0 (the pair (0, 0))."""
    g = torch.Generator().manual_seed(1)
    b, t, n = 3, 4, 6
    scores = torch.randn(b, t, n * n, generator=g) * 3
    targets = torch.zeros(b, t, n * n, dtype=torch.bool)
    index = torch.zeros(b, t, 5, dtype=torch.long)
    for bi in range(b):
        for ti in range(t):
            pos = torch.randperm(n * n - 1, generator=g)[: (bi + ti) % 6] + 1
            targets[bi, ti, pos] = True
            index[bi, ti, : len(pos)] = pos
    mask = torch.ones(n * n, dtype=torch.bool)
    mask[0] = False
    sparse = sparse_multilabel_crossentropy(scores, index, reduction="none")
    dense = multilabel_crossentropy(scores, targets, mask, reduction="none")
    torch.testing.assert_close(sparse, dense, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sparse_multilabel_crossentropy(scores, index), dense.mean(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(
        sparse_multilabel_crossentropy(scores, index, reduction="sum"), dense.sum(), rtol=1e-4, atol=1e-4
    )


def test_sparse_doc_values_and_class_zero_ignored() -> None:
    scores = torch.tensor([[0.0, 2.0, -1.0, 0.5], [0.0, -3.0, -2.0, -1.0]])
    index = torch.tensor([[1, 3], [0, 0]])
    got = sparse_multilabel_crossentropy(scores, index, reduction="none")
    want = multilabel_crossentropy(scores[:, 1:], torch.tensor([[1, 0, 1], [0, 0, 0]]), reduction="none")
    torch.testing.assert_close(got, want)
    moved = scores.clone()
    moved[:, 0] = 1e4  # class 0 takes part in nothing with mask_zero
    torch.testing.assert_close(sparse_multilabel_crossentropy(moved, index, reduction="none"), got)


def test_sparse_no_positive_rows_and_gradients_finite() -> None:
    scores = torch.tensor([[0.0, -3.0, 2.0, 1.0], [0.0, 80.0, -80.0, 5.0]], requires_grad=True)
    index = torch.zeros(2, 3, dtype=torch.long)  # only padding: no positive anywhere
    loss = sparse_multilabel_crossentropy(scores, index, reduction="none")
    want = multilabel_crossentropy(scores[:, 1:].detach(), torch.zeros(2, 3), reduction="none")
    torch.testing.assert_close(loss.detach(), want)
    loss.sum().backward()
    assert torch.isfinite(scores.grad).all() and scores.grad[:, 0].eq(0).all()
    # zero positive slots (K = 0) behaves the same
    torch.testing.assert_close(sparse_multilabel_crossentropy(scores.detach(), index[:, :0], reduction="none"), want)


def issue_27_row(margin: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Issue 27's row: padding class 0, one positive ``margin`` above log(1 + Σ_N e^s), 48 negatives at -2."""
    positive = math.log1p(48 * math.exp(-2.0)) + margin
    return torch.tensor([[0.0, positive] + [-2.0] * 48]), torch.tensor([[1]])


@pytest.mark.parametrize("margin", [10.0, 12.0, 14.0, 16.0, 20.0, 40.0, 60.0])
def test_sparse_float32_issue_27_row_equals_dense(margin: float) -> None:
    """Issue 27: the article's a + log(1 - e^(b-a)) cancels in float32: sparse gave 2.0016 at m = 10, 2.0974 at
    m = 12 and -0.1037 (a negative loss) at m = 14 where the dense loss is 2.0144 (and a + log(1e-7) past m = 16)."""
    scores, index = issue_27_row(margin)
    want = math.log1p(48 * math.exp(-2.0)) + math.log1p(math.exp(-scores[0, 1].item()))
    got = sparse_multilabel_crossentropy(scores, index, reduction="none")
    assert got.item() == pytest.approx(want, rel=1e-6)
    scores.requires_grad_()
    sparse_multilabel_crossentropy(scores, index).backward()
    # d/ds of the positive: -σ(-s) ≈ -e^-s, never the article's clipped +1
    assert -1e-4 < scores.grad[0, 1].item() < 0 and scores.grad[0, 0].item() == 0.0
    torch.testing.assert_close(scores.grad[0, 2:], torch.full((48,), math.exp(-2.0) / (1 + 48 * math.exp(-2.0))))


@settings(max_examples=150, deadline=None)
@given(
    classes=st.integers(2, 40),
    rows_=st.integers(1, 3),
    seed=st.integers(0, 2**31 - 1),
    margin=st.floats(0.0, 60.0),
    scale=st.floats(0.1, 10.0),
    mask_zero=st.booleans(),
    slots=st.integers(0, 6),
    dtype=st.sampled_from([torch.float32, torch.bfloat16]),
)
def test_sparse_equals_float64_dense_for_every_margin_and_mask(
    classes: int,
    rows_: int,
    seed: int,
    margin: float,
    scale: float,
    mask_zero: bool,
    slots: int,
    dtype: torch.dtype,
) -> None:
    """Random positives (repeats and padding included), lifted by up to 60 above the rest, in float32 and in bf16
    under autocast: relative 1e-5 to the dense loss computed in float64 on the same (rounded) scores."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(rows_, classes, generator=g, dtype=torch.float64) * scale
    index = torch.randint(0, classes, (rows_, slots), generator=g)
    targets = torch.zeros(rows_, classes, dtype=torch.bool).scatter_(1, index, True)
    if mask_zero:
        targets[:, 0] = False
    scores = (scores + margin * targets).to(dtype)
    mask = torch.ones(classes, dtype=torch.bool)
    mask[0] = not mask_zero
    want = multilabel_crossentropy(scores.double(), targets, mask, reduction="none")
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        got = sparse_multilabel_crossentropy(scores, index, mask_zero=mask_zero, reduction="none")
        dense = multilabel_crossentropy(scores, targets, mask, reduction="none")
    assert got.dtype == dense.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-30)
    torch.testing.assert_close(dense.double(), want, rtol=1e-5, atol=1e-30)


def test_sparse_repeated_index_counts_once() -> None:
    scores = torch.tensor([[0.0, 2.0, -1.0, 0.5]])
    once = sparse_multilabel_crossentropy(scores, torch.tensor([[1, 3, 0]]), reduction="none")
    twice = sparse_multilabel_crossentropy(scores, torch.tensor([[1, 3, 3, 1]]), reduction="none")
    torch.testing.assert_close(twice, once)
    torch.testing.assert_close(once, multilabel_crossentropy(scores[:, 1:], torch.tensor([[1, 0, 1]])).view(1))


def test_tiny_losses_keep_their_relative_precision_in_float32() -> None:
    """log(1 + x) for small x as log1p: a row scored 12 below/above its targets still gets e^-12 to 1e-6."""
    scores = torch.tensor([[-12.0, 12.0], [-20.0, 30.0]])
    targets = torch.tensor([[0, 1], [0, 1]])
    want = torch.tensor(
        [2 * math.log1p(math.exp(-12)), math.log1p(math.exp(-20)) + math.log1p(math.exp(-30))], dtype=torch.float64
    )
    got = multilabel_crossentropy(scores, targets, reduction="none")
    torch.testing.assert_close(got.double(), want, rtol=1e-6, atol=0)
    sparse = sparse_multilabel_crossentropy(scores, torch.tensor([[1], [1]]), mask_zero=False, reduction="none")
    torch.testing.assert_close(sparse.double(), want, rtol=1e-6, atol=0)


def test_no_tensor_from_python_data_per_call(monkeypatch: pytest.MonkeyPatch) -> None:
    """No ``torch.tensor(<python data>)`` in the losses (a host-to-device copy per call on a GPU)."""

    def refuse(*args, **kwargs):
        raise AssertionError("torch.tensor called inside the loss")

    scores, index = torch.randn(2, 3, 6), torch.tensor([[[1, 2], [0, 0], [3, 0]]] * 2)
    targets = torch.zeros(2, 3, 6, dtype=torch.bool).scatter_(-1, index, True)
    monkeypatch.setattr(torch, "tensor", refuse)
    multilabel_crossentropy(scores, targets, torch.ones(6, dtype=torch.bool))
    sparse_multilabel_crossentropy(scores, index)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_bf16_inputs_compute_in_float32(dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(2)
    scores32 = torch.randn(4, 3, 10, generator=g) * 8
    targets = torch.rand(4, 3, 10, generator=g) < 0.3
    targets[..., 0] = False
    index = torch.zeros(4, 3, 10, dtype=torch.long)
    for r, t_row in enumerate(targets.view(-1, 10)):
        pos = t_row.nonzero().flatten()
        index.view(-1, 10)[r, : len(pos)] = pos
    low = scores32.to(dtype).requires_grad_()
    mask = torch.arange(10) > 0
    with torch.autocast("cpu", dtype=torch.bfloat16):
        dense = multilabel_crossentropy(low, targets, mask)
        sparse = sparse_multilabel_crossentropy(low, index)
    assert dense.dtype == sparse.dtype == torch.float32
    reference = multilabel_crossentropy(low.detach().double(), targets, mask)  # the same rounded inputs
    torch.testing.assert_close(dense.double(), reference, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(sparse.double(), reference, rtol=1e-5, atol=1e-5)
    (dense + sparse).backward()
    assert low.grad.dtype == dtype and torch.isfinite(low.grad.float()).all()
    # scores far outside bf16-exp range: still finite
    big = torch.tensor([[0.0, 300.0, -300.0, 200.0]], dtype=dtype)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.isfinite(multilabel_crossentropy(big, torch.tensor([[0, 0, 1, 1]])))
        assert torch.isfinite(sparse_multilabel_crossentropy(big, torch.tensor([[2, 3]])))


# --- bad arguments --------------------------------------------------------------------------------------------------
def test_bad_arguments_raise_value_error() -> None:
    s = torch.zeros(2, 3)
    with pytest.raises(ValueError, match=r"reduction must be one of 'none', 'mean' or 'sum', got 'avg'"):
        multilabel_crossentropy(s, torch.zeros(2, 3), reduction="avg")
    with pytest.raises(ValueError, match=r"reduction must be one of .* got 'batchmean'"):
        sparse_multilabel_crossentropy(s, torch.zeros(2, 1, dtype=torch.long), reduction="batchmean")
    with pytest.raises(ValueError, match=r"targets must have the shape of scores \(2, 3\), got \(2, 4\)"):
        multilabel_crossentropy(s, torch.zeros(2, 4))
    with pytest.raises(ValueError, match=r"mask of shape \(4,\) does not broadcast to the shape of scores \(2, 3\)"):
        multilabel_crossentropy(s, torch.zeros(2, 3), torch.ones(4, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"mask of shape \(2, 2, 3\) does not broadcast"):
        multilabel_crossentropy(s, torch.zeros(2, 3), torch.ones(2, 2, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"scores must be a floating-point tensor of logits, got torch.int64"):
        multilabel_crossentropy(torch.zeros(2, 3, dtype=torch.long), torch.zeros(2, 3))
    with pytest.raises(ValueError, match=r"must have a class axis"):
        multilabel_crossentropy(torch.tensor(1.0), torch.tensor(1.0))
    with pytest.raises(ValueError, match=r"positive_index of shape \(3, 1\) must be \(\*\(2,\), K\)"):
        sparse_multilabel_crossentropy(s, torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ValueError, match=r"positive_index of shape \(2,\) must be"):
        sparse_multilabel_crossentropy(s, torch.zeros(2, dtype=torch.long))
    with pytest.raises(ValueError, match=r"positive_index must be an integer tensor of class indices, got torch.float"):
        sparse_multilabel_crossentropy(s, torch.zeros(2, 1))
    with pytest.raises(ValueError, match=r"positive_index is a bool tensor"):
        sparse_multilabel_crossentropy(s, torch.zeros(2, 3, dtype=torch.bool))


def test_unflattened_pair_scores_are_refused_with_the_fix() -> None:
    """Issue 27: GlobalPointer scores (B, T, n, n) given as they come were read as B·T·n rows of n classes."""
    scores = torch.randn(2, 3, 5, 5)
    targets = torch.rand(2, 3, 5, 5) < 0.2
    with pytest.raises(
        ValueError,
        match=r"multilabel_crossentropy: expected scores of shape \(\.\.\., C\) .* got \(2, 3, 5, 5\).*"
        r"Pass scores\.flatten\(-2\) and targets\.flatten\(-2\), shape \(2, 3, 25\)",
    ):
        multilabel_crossentropy(scores, targets)
    index = torch.tensor([[[6, 0], [7, 12], [0, 0]]] * 2)
    with pytest.raises(
        ValueError,
        match=r"sparse_multilabel_crossentropy: expected scores of shape \(\.\.\., C\) .* got \(2, 3, 5, 5\).*"
        r"Pass scores\.flatten\(-2\), shape \(2, 3, 25\), whose class i·n \+ j is the pair \(i, j\)",
    ):
        sparse_multilabel_crossentropy(scores, index)
    # the flattened forms are accepted and agree; so are rows whose last two axes differ, or 3-D (n, C) blocks
    flat = scores.flatten(-2)
    dense = multilabel_crossentropy(
        flat, torch.zeros_like(flat, dtype=torch.bool).scatter_(-1, index, True), ~(torch.arange(25) == 0)
    )
    torch.testing.assert_close(sparse_multilabel_crossentropy(flat, index), dense)
    assert multilabel_crossentropy(scores[..., :4], targets[..., :4], reduction="none").shape == (2, 3, 5)
    assert multilabel_crossentropy(scores[0], targets[0], reduction="none").shape == (3, 5)
    # the escape hatch the message gives for a real (..., n, C) with n == C
    rows_ = multilabel_crossentropy(scores.flatten(0, -2), targets.flatten(0, -2), reduction="none")
    assert rows_.view(scores.shape[:-1]).shape == (2, 3, 5)


def test_sparse_gradients_equal_dense_gradients_and_pass_gradcheck() -> None:
    g = torch.Generator().manual_seed(3)
    scores = (torch.randn(2, 3, 9, generator=g, dtype=torch.float64) * 4).requires_grad_()
    index = torch.tensor([[[1, 4, 4], [0, 0, 0], [8, 2, 0]], [[3, 0, 0], [5, 6, 7], [1, 1, 1]]])
    targets = torch.zeros(2, 3, 9, dtype=torch.bool).scatter_(-1, index, True)
    targets[..., 0] = False
    (sparse_grad,) = torch.autograd.grad(sparse_multilabel_crossentropy(scores, index), scores)
    (dense_grad,) = torch.autograd.grad(multilabel_crossentropy(scores, targets, torch.arange(9) > 0), scores)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-12, atol=1e-15)
    assert torch.autograd.gradcheck(lambda s: sparse_multilabel_crossentropy(s, index, reduction="none"), (scores,))
    lifted = (scores.detach() + 40 * targets).requires_grad_()  # positives far above: gradients still exact
    (sparse_grad,) = torch.autograd.grad(sparse_multilabel_crossentropy(lifted.float(), index), lifted)
    (dense_grad,) = torch.autograd.grad(multilabel_crossentropy(lifted, targets, torch.arange(9) > 0), lifted)
    torch.testing.assert_close(sparse_grad, dense_grad, rtol=1e-5, atol=1e-9)


@pytest.mark.cuda
def test_cuda_bf16_autocast_equals_dense_without_a_host_sync() -> None:
    """On the GPU, under bf16 autocast: the sparse loss equals the float64 dense one for margins up to 60, and neither
    loss synchronises the host with the device (``set_sync_debug_mode("error")`` raises on a sync)."""
    g = torch.Generator().manual_seed(4)
    scores = torch.randn(4, 9, 30 * 30, generator=g) * 3
    index = torch.randint(1, 900, (4, 9, 12), generator=g)
    index[..., 8:] = 0  # padding
    targets = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, index, True)
    targets[..., 0] = False
    scores = (scores + torch.linspace(0, 60, 9).view(1, 9, 1) * targets).bfloat16()
    mask = torch.arange(900) > 0
    want = multilabel_crossentropy(scores.double(), targets, mask, reduction="none")
    s, i, t, m = (x.cuda() for x in (scores, index, targets, mask))
    s.requires_grad_()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            sparse = sparse_multilabel_crossentropy(s, i, reduction="none")
            dense = multilabel_crossentropy(s, t, m, reduction="none")
        (sparse.sum() + dense.sum()).backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    torch.testing.assert_close(sparse.double().cpu(), want, rtol=1e-5, atol=0)
    torch.testing.assert_close(dense.double().cpu(), want, rtol=1e-5, atol=0)
