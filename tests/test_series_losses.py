"""The rest of the series' generic losses (lightning_mtl.losses): the "n × m" multi-label cross-entropy, attempts 1
and 2 of https://kexue.fm/archives/9158, and EXACT's expected accuracy, https://kexue.fm/archives/9098,
each against a definition written independently here (python floats, scipy integration)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from lightning_mtl.losses import (
    exact_loss,
    exact_probability,
    multilabel_crossentropy,
    nxm_crossentropy,
    nxm_crossentropy_soft,
)

scipy_stats = pytest.importorskip("scipy.stats")
scipy_integrate = pytest.importorskip("scipy.integrate")


# --- brute-force definitions (python floats) ------------------------------------------------------------------------
def nxm_brute(s: list[list[float]], t: list[list[float]], valid: list[bool], attempt: int) -> float:
    """The article (kexue.fm/archives/9158) as written: Σ_j log(1 + Σ_i Σ_{k≠j} t_ij e^{-s_ij + s_ik}) (attempt 1) or
    Σ_j log(1 + Σ_i t_ij e^{-s_ij + mean_k s_ik}) (attempt 2), over the valid positions i."""
    n, m = len(s), len(s[0])
    loss = 0.0
    for j in range(m):
        terms = []
        for i in range(n):
            if not valid[i]:
                continue
            if attempt == 1:
                terms += [t[i][j] * math.exp(-s[i][j] + s[i][k]) for k in range(m) if k != j]
            else:
                terms.append(t[i][j] * math.exp(-s[i][j] + math.fsum(s[i]) / m))
        loss += math.log1p(math.fsum(terms))
    return loss


def one_hot(y: list[int], m: int) -> list[list[float]]:
    return [[1.0 if j == c else 0.0 for j in range(m)] for c in y]


def orthant_probability_3(mu: list[float], sigma: float, y: int) -> float:
    """p(y) for 3 classes by 2-D integration of the density of Δ_i = (μ_y - μ_i)/σ + ε_y - ε_i (i ≠ y), which is
    N(d, [[2, 1], [1, 2]]), over the positive quadrant: independent of the 1-D reduction the library integrates."""
    d1, d2 = ((mu[y] - mu[i]) / sigma for i in range(3) if i != y)
    norm = 1 / (2 * math.pi * math.sqrt(3))  # det [[2, 1], [1, 2]] = 3, inverse [[2, -1], [-1, 2]] / 3

    def density(b: float, a: float) -> float:
        x, z = a - d1, b - d2
        return norm * math.exp(-(x * x - x * z + z * z) / 3)

    value, _ = scipy_integrate.dblquad(density, 0, math.inf, 0, math.inf, epsabs=1e-13, epsrel=1e-11)
    return value


# --- n × m: the definitions -----------------------------------------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    lead=st.lists(st.integers(1, 3), min_size=0, max_size=2),
    n=st.integers(1, 5),
    m=st.integers(2, 5),
    seed=st.integers(0, 2**31 - 1),
    use_mask=st.booleans(),
    soft=st.booleans(),
    attempt=st.sampled_from([1, 2]),
)
def test_nxm_equals_its_definition(lead, n, m, seed, use_mask, soft, attempt) -> None:
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn((*lead, n, m), generator=g, dtype=torch.float64) * 4
    if soft:
        targets = torch.rand((*lead, n, m), generator=g, dtype=torch.float64)
        targets = torch.where(targets < 0.2, 0.0, targets)  # some zero weights
        targets = targets / targets.sum(-1, keepdim=True).clamp_min(1e-12)
    else:
        targets = torch.randint(0, m, (*lead, n), generator=g)
    mask = torch.rand((*lead, n), generator=g) < 0.7 if use_mask else None
    loss = nxm_crossentropy if attempt == 1 else nxm_crossentropy_soft
    got = loss(scores, targets, mask, reduction="none")
    assert got.shape == tuple(lead) and got.dtype == torch.float64

    s_rows = scores.reshape(-1, n, m).tolist()
    if soft:
        t_rows = targets.reshape(-1, n, m).tolist()
    else:
        t_rows = [one_hot(y, m) for y in targets.reshape(-1, n).tolist()]
    v_rows = mask.reshape(-1, n).tolist() if use_mask else [[True] * n] * len(s_rows)
    want = [nxm_brute(s, t, v, attempt) for s, t, v in zip(s_rows, t_rows, v_rows)]
    torch.testing.assert_close(got.reshape(-1), torch.tensor(want, dtype=torch.float64), rtol=1e-11, atol=1e-12)


def test_nxm_masked_positions_take_part_in_nothing() -> None:
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(2, 6, 4, generator=g, dtype=torch.float64)
    targets = torch.randint(0, 4, (2, 6), generator=g)
    mask = torch.tensor([[True, True, False, True, False, True]] * 2)
    padded = torch.where(mask, targets, torch.full_like(targets, -100))  # ignore-index style padding
    for loss in (nxm_crossentropy, nxm_crossentropy_soft):
        got = loss(scores, padded, mask, reduction="none")
        kept = loss(scores[:, mask[0]], targets[:, mask[0]], reduction="none")
        torch.testing.assert_close(got, kept, rtol=1e-13, atol=1e-13)
        all_masked = loss(scores, padded, torch.zeros_like(mask), reduction="none")
        torch.testing.assert_close(all_masked, torch.zeros(2, dtype=torch.float64))


@pytest.mark.parametrize("loss", [nxm_crossentropy, nxm_crossentropy_soft])
def test_nxm_hard_labels_equal_one_hot_soft_labels(loss) -> None:
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(3, 5, 4, generator=g, dtype=torch.float64) * 3
    targets = torch.randint(0, 4, (3, 5), generator=g)
    soft = torch.nn.functional.one_hot(targets, 4).double()
    torch.testing.assert_close(loss(scores, targets), loss(scores, soft), rtol=1e-13, atol=1e-13)


def test_nxm_reductions() -> None:
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(4, 3, 5, 3, generator=g)
    targets = torch.randint(0, 3, (4, 3, 5), generator=g)
    for loss in (nxm_crossentropy, nxm_crossentropy_soft):
        per_row = loss(scores, targets, reduction="none")
        assert per_row.shape == (4, 3)
        torch.testing.assert_close(loss(scores, targets), per_row.mean())
        torch.testing.assert_close(loss(scores, targets, reduction="sum"), per_row.sum())
        assert loss(scores[0, 0], targets[0, 0], reduction="none").shape == ()  # one row: (n, m)


# --- n × m: the m = 2 correspondence with the multi-label cross-entropy ---------------------------------------------
@settings(max_examples=40, deadline=None)
@given(lead=st.integers(1, 4), n=st.integers(1, 8), seed=st.integers(0, 2**31 - 1), use_mask=st.booleans())
def test_m2_reduces_to_multilabel_crossentropy(lead, n, seed, use_mask) -> None:
    """kexue.fm/archives/9158: "both reduce to multi-label CE at m = 2". The n positions become the classes of one
    multi-label row; a position labelled 1 is a positive class. Attempt 1: scores s_i1 - s_i0 (exactly the
    multi-label CE); attempt 2: -s_i1 + mean_j s_ij = -(s_i1 - s_i0)/2, so scores (s_i1 - s_i0)/2."""
    g = torch.Generator().manual_seed(seed)
    scores = torch.randn(lead, n, 2, generator=g, dtype=torch.float64) * 5
    y = torch.randint(0, 2, (lead, n), generator=g)
    mask = torch.rand(lead, n, generator=g) < 0.7 if use_mask else None
    margin = scores[..., 1] - scores[..., 0]
    attempt_1 = nxm_crossentropy(scores, y, mask, reduction="none")
    attempt_2 = nxm_crossentropy_soft(scores, y, mask, reduction="none")
    torch.testing.assert_close(attempt_1, multilabel_crossentropy(margin, y == 1, mask, reduction="none"))
    torch.testing.assert_close(attempt_2, multilabel_crossentropy(margin / 2, y == 1, mask, reduction="none"))


# --- n × m attempt 2: the stated optimum; attempt 1: no such optimum; the hard-label failure ------------------------
def _soft_targets(seed: int, n: int, m: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.softmax(torch.randn(n, m, generator=g, dtype=torch.float64) * 1.5, dim=-1)


@settings(max_examples=30, deadline=None)
@given(n=st.integers(1, 6), m=st.integers(2, 6), seed=st.integers(0, 2**31 - 1))
def test_attempt_2_is_stationary_at_softmax_equal_to_the_labels(n, m, seed) -> None:
    """At s_ij = log t_ij + c_i (softmax(s_i) = t_i) the gradient of attempt 2 vanishes, for any shifts c_i."""
    t = _soft_targets(seed, n, m)
    shifts = torch.randn(n, 1, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64) * 3
    s = (t.log() + shifts).requires_grad_()
    (grad,) = torch.autograd.grad(nxm_crossentropy_soft(s, t), s)
    torch.testing.assert_close(grad, torch.zeros_like(grad), rtol=0, atol=1e-12)


def test_attempt_2_minimised_from_scratch_learns_the_label_distribution() -> None:
    t = _soft_targets(3, n=5, m=4)
    s = torch.zeros(5, 4, dtype=torch.float64, requires_grad=True)
    optimizer = torch.optim.LBFGS([s], lr=1, max_iter=200, tolerance_grad=1e-13, tolerance_change=1e-15)

    def closure():
        optimizer.zero_grad()
        loss = nxm_crossentropy_soft(s, t)
        loss.backward()
        return loss

    optimizer.step(closure)
    torch.testing.assert_close(torch.softmax(s.detach(), dim=-1), t, rtol=1e-6, atol=1e-7)


def test_attempt_1_is_not_stationary_at_soft_labels() -> None:
    """ "Failure 1" of the article: with soft labels, softmax(s) = t is not where attempt 1's gradient vanishes."""
    t = _soft_targets(4, n=3, m=3)
    s = t.log().requires_grad_()
    (grad,) = torch.autograd.grad(nxm_crossentropy(s, t), s)
    assert grad.abs().max() > 1e-2


def test_attempt_2_with_hard_labels_misses_the_argmax_but_attempt_1_does_not() -> None:
    """The article's verdict on attempt 2: with a hard label, the loss is ≈ 0 once s_iy ≫ mean_j s_ij, even when
    another class has the larger score; attempt 1 still charges about log(1 + e^(s_max - s_y))."""
    scores = torch.tensor([[[30.0, -60.0, 31.0]]], dtype=torch.float64)  # target 0, but class 2 wins
    y = torch.tensor([[0]])
    assert nxm_crossentropy_soft(scores, y).item() < 1e-12
    torch.testing.assert_close(
        nxm_crossentropy(scores, y), torch.tensor(math.log1p(math.exp(1.0) + math.exp(-90.0)), dtype=torch.float64)
    )


# --- n × m: numerics ------------------------------------------------------------------------------------------------
def test_nxm_float32_matches_float64_for_large_and_tied_scores() -> None:
    scores = torch.tensor(
        [[[1e4, -1e4, 0.0], [5.0, 5.0, 5.0], [0.0, 80.0, 80.0], [-3.0, 2.0, 1.0]]], dtype=torch.float64
    )
    y = torch.tensor([[0, 1, 2, 1]])
    for loss in (nxm_crossentropy, nxm_crossentropy_soft):
        want = loss(scores, y, reduction="none")
        s32 = scores.float().requires_grad_()
        got = loss(s32, y, reduction="none")
        got.sum().backward()
        assert got.dtype == torch.float32 and torch.isfinite(s32.grad).all()
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_nxm_low_precision_scores_are_safe(dtype) -> None:
    g = torch.Generator().manual_seed(5)
    scores = (torch.randn(2, 6, 5, generator=g) * 300).to(dtype).requires_grad_()  # e^300 overflows fp16/bf16
    y = torch.randint(0, 5, (2, 6), generator=g)
    t = torch.softmax(torch.randn(2, 6, 5, generator=g), -1).to(dtype)
    for loss, targets in ((nxm_crossentropy, y), (nxm_crossentropy_soft, t)):
        value = loss(scores, targets)
        (grad,) = torch.autograd.grad(value, scores)
        assert value.dtype == torch.float32 and torch.isfinite(value) and torch.isfinite(grad).all()
        torch.testing.assert_close(
            value,
            loss(scores.detach().double(), targets.double() if targets.is_floating_point() else targets).float(),
            rtol=1e-4,
            atol=1e-3,
        )


def test_nxm_under_bf16_autocast() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(8, 4)
    x = torch.randn(3, 7, 8) * 50
    y = torch.randint(0, 4, (3, 7))
    for loss in (nxm_crossentropy, nxm_crossentropy_soft):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            scores = layer(x)
            assert scores.dtype == torch.bfloat16
            value = loss(scores, y)
        value.backward()
        assert torch.isfinite(value) and all(torch.isfinite(p.grad).all() for p in layer.parameters())


# --- n × m: bad arguments -------------------------------------------------------------------------------------------
@pytest.mark.parametrize("loss", [nxm_crossentropy, nxm_crossentropy_soft])
def test_nxm_rejects_bad_arguments(loss) -> None:
    name = loss.__name__
    scores = torch.randn(2, 5, 3)
    y = torch.randint(0, 3, (2, 5))
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'mean' or 'sum', got 'avg'"):
        loss(scores, y, reduction="avg")
    with pytest.raises(ValueError, match=rf"{name}: targets must be class indices.*\(2, 5\).*got torch.int64 of shape"):
        loss(scores, torch.randint(0, 3, (2, 4)))
    with pytest.raises(ValueError, match=rf"{name}: targets must be .*label distributions.*\(2, 5, 3\)"):
        loss(scores, torch.rand(2, 5, 4))
    with pytest.raises(ValueError, match=rf"{name}: targets must be .*got torch.float32 of shape \(2, 5\)"):
        loss(scores, y.float())  # float class indices: ambiguous, rejected
    with pytest.raises(ValueError, match=rf"{name}: targets must be .*got torch.bool"):
        loss(scores, y > 0)
    with pytest.raises(ValueError, match=rf"{name}: scores must be \(\.\.\., n, m\) logits.*m >= 2.*\(2, 5, 1\)"):
        loss(torch.randn(2, 5, 1), torch.zeros(2, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=rf"{name}: scores must be \(\.\.\., n, m\).*got shape \(3,\)"):
        loss(torch.randn(3), torch.zeros((), dtype=torch.long))
    with pytest.raises(ValueError, match=rf"{name}: scores must be a floating-point tensor"):
        loss(torch.ones(2, 5, 3, dtype=torch.long), y)
    with pytest.raises(ValueError, match=rf"{name}: mask of shape \(3,\) does not broadcast to the positions \(2, 5\)"):
        loss(scores, y, torch.ones(3, dtype=torch.bool))
    loss(scores, y, torch.ones(5, dtype=torch.bool))  # broadcastable: fine


# --- EXACT: the probability against independent computations ------------------------------------------------------
@settings(max_examples=40, deadline=None)
@given(
    gap=st.floats(-30, 30, allow_nan=False),
    sigma=st.floats(0.05, 20, allow_nan=False),
    y=st.integers(0, 1),
)
def test_exact_two_classes_has_the_closed_form(gap, sigma, y) -> None:
    """C = 2: p = P(ε_y - ε_other > -(μ_y - μ_other)/σ) = Φ((μ_y - μ_other)/(σ√2)); log p stays accurate in the tail."""
    mu = torch.tensor([0.0, 0.0], dtype=torch.float64)
    mu[y] = gap
    d = gap / sigma
    log_p = exact_probability(mu, sigma, torch.tensor(y), log=True)
    want = scipy_stats.norm.logcdf(d / math.sqrt(2))
    assert math.isclose(log_p.item(), want, rel_tol=1e-9, abs_tol=1e-12)


@pytest.mark.parametrize(
    ("mu", "sigma", "y"),
    [([0.0, 0.0, 0.0], 1.0, 0), ([1.0, -0.5, 0.3], 0.7, 2), ([2.0, 1.5, -3.0], 0.5, 1), ([-1.0, 4.0, 0.0], 2.0, 0)],
)
def test_exact_three_classes_converges_to_the_2d_integral(mu, sigma, y) -> None:
    want = orthant_probability_3(mu, sigma, y)
    errors = {}
    for nodes in (1, 2, 4, 8, 16, 32, 64):
        got = exact_probability(torch.tensor(mu, dtype=torch.float64), sigma, torch.tensor(y), num_nodes=nodes)
        errors[nodes] = abs(got.item() - want)
    assert errors[32] < 1e-9 and errors[64] < 1e-9, errors  # the default, and more: at the 2-D integral's accuracy
    assert max(errors[n] for n in (8, 16, 32, 64)) < 1e-3, errors
    assert errors[32] < errors[2], errors


def test_exact_matches_monte_carlo_of_its_definition() -> None:
    """p(y) = P(argmax(μ/σ + ε) = y), ε ~ N(0, I), sampled directly (4 standard errors)."""
    g = torch.Generator().manual_seed(0)
    mu = torch.tensor([[0.3, 0.0, -0.2, 0.5], [2.0, -1.0, 0.0, 1.0]], dtype=torch.float64)
    sigma = torch.tensor([0.8, 1.5], dtype=torch.float64)
    samples = 200_000
    winners = (mu / sigma[:, None]).unsqueeze(1) + torch.randn(2, samples, 4, generator=g, dtype=torch.float64)
    winners = winners.argmax(-1)
    for y in range(4):
        frequency = (winners == y).double().mean(-1)
        p = exact_probability(mu, sigma, torch.full((2,), y))
        standard_error = (p * (1 - p) / samples).sqrt()
        assert ((frequency - p).abs() < 4 * standard_error + 1e-12).all(), (y, frequency, p)


@settings(max_examples=30, deadline=None)
@given(
    classes=st.integers(2, 12),
    spread=st.floats(0.1, 10),
    sigma=st.floats(0.1, 5),
    shift=st.floats(-100, 100),
    seed=st.integers(0, 2**31 - 1),
)
def test_exact_probabilities_sum_to_one_and_are_invariant(classes, spread, sigma, shift, seed) -> None:
    """Σ_y p(y) = 1 (some class wins); p is unchanged by adding a constant to μ or scaling μ and σ together."""
    mu = torch.randn(classes, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * spread
    every = mu.expand(classes, classes)
    y = torch.arange(classes)
    p = exact_probability(every, sigma, y)
    assert ((p >= 0) & (p <= 1 + 1e-9)).all()  # a probability, up to the quadrature error
    assert abs(p.sum().item() - 1) < 1e-6
    torch.testing.assert_close(exact_probability(every + shift, sigma, y), p, rtol=1e-6, atol=1e-9)
    torch.testing.assert_close(exact_probability(every * 3, sigma * 3, y), p, rtol=1e-6, atol=1e-9)


def test_exact_tiny_probabilities_in_log_space() -> None:
    """The nodes follow the integrand's peak, so log p stays accurate where p underflows float32 (C = 3, margins
    -25σ: p ≈ 4e-94; checked against the 1-D integral by scipy around its peak)."""
    mu = torch.tensor([0.0, 25.0, 25.0], dtype=torch.float64)

    def integrand(u: float) -> float:
        return math.exp(scipy_stats.norm.logpdf(u) + 2 * scipy_stats.norm.logcdf(u - 25.0) + 200.0)

    value, _ = scipy_integrate.quad(integrand, 0, 40, points=[16.7], epsabs=0, epsrel=1e-12, limit=200)
    want = math.log(value) - 200.0
    got = exact_probability(mu, 1.0, torch.tensor(0), log=True)
    assert math.isclose(got.item(), want, rel_tol=1e-9)
    got32 = exact_probability(mu.float(), 1.0, torch.tensor(0), log=True)
    assert math.isclose(got32.item(), want, rel_tol=1e-5)


# --- EXACT: gradients, forms, shapes --------------------------------------------------------------------------------
def test_exact_gradients_match_finite_differences() -> None:
    g = torch.Generator().manual_seed(0)
    mu = (torch.randn(3, 4, generator=g, dtype=torch.float64) * 2).requires_grad_()
    sigma = (torch.rand(3, generator=g, dtype=torch.float64) + 0.3).requires_grad_()
    y = torch.tensor([0, 3, 1])
    for form in ("prob", "log"):
        assert torch.autograd.gradcheck(lambda m, s, f=form: exact_loss(m, s, y, form=f), (mu, sigma))


def test_exact_loss_forms_and_reductions() -> None:
    g = torch.Generator().manual_seed(1)
    mu = torch.randn(5, 3, generator=g, dtype=torch.float64)
    sigma = torch.rand(5, 1, generator=g, dtype=torch.float64) + 0.5
    y = torch.randint(0, 3, (5,), generator=g)
    p = exact_probability(mu, sigma, y)
    torch.testing.assert_close(exact_loss(mu, sigma, y), -p.mean())
    torch.testing.assert_close(exact_loss(mu, sigma, y, reduction="sum"), -p.sum())
    torch.testing.assert_close(exact_loss(mu, sigma, y, reduction="none"), -p)
    torch.testing.assert_close(exact_loss(mu, sigma, y, form="log"), -p.mean().log())
    torch.testing.assert_close(exact_loss(mu, sigma, y, form="log", reduction="none"), -p.log())


def test_exact_gradient_raises_the_true_class() -> None:
    mu = torch.tensor([[0.2, 0.5, -0.1]], requires_grad=True)
    sigma = torch.tensor([0.7], requires_grad=True)
    for form in ("prob", "log"):
        mu.grad = sigma.grad = None
        exact_loss(mu, sigma, torch.tensor([0]), form=form).backward()
        assert mu.grad[0, 0] < 0 and (mu.grad[0, 1:] > 0).all()  # descent raises μ_y, lowers the others
        torch.testing.assert_close(mu.grad.sum(), torch.tensor(0.0), atol=1e-6, rtol=0)  # shift invariance


def test_exact_sigma_shapes() -> None:
    g = torch.Generator().manual_seed(2)
    mu = torch.randn(2, 3, 4, generator=g)
    y = torch.randint(0, 4, (2, 3), generator=g)
    base = exact_probability(mu, torch.full((2, 3), 0.5), y)
    assert base.shape == (2, 3) and base.dtype == torch.float32
    torch.testing.assert_close(exact_probability(mu, torch.full((2, 3, 1), 0.5), y), base)
    torch.testing.assert_close(exact_probability(mu, 0.5, y), base)
    torch.testing.assert_close(exact_probability(mu, torch.tensor(0.5), y), base)
    assert exact_probability(mu[0, 0], 0.5, y[0, 0]).shape == ()


def test_exact_under_bf16_autocast_and_low_precision() -> None:
    torch.manual_seed(0)
    layer = torch.nn.Linear(6, 5)
    x = torch.randn(8, 6) * 40  # large scores: margins of hundreds of σ
    y = torch.randint(0, 5, (8,))
    for form in ("prob", "log"):
        layer.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            mu = layer(x)
            assert mu.dtype == torch.bfloat16
            value = exact_loss(mu, torch.nn.functional.softplus(mu[:, 0]).float() + 0.1, y, form=form)
        value.backward()
        assert value.dtype == torch.float32 and torch.isfinite(value)
        assert all(torch.isfinite(p.grad).all() for p in layer.parameters())
    # fp16 scores, margins of hundreds of σ: p ≈ e^(-d²/4) underflows every float type, log p stays finite
    mu16 = (torch.randn(4, 3) * 100).half().requires_grad_()
    value = exact_loss(mu16, 1.0, torch.tensor([0, 1, 2, 0]), form="log", reduction="none")
    value.sum().backward()
    assert torch.isfinite(value).all() and torch.isfinite(mu16.grad).all()


# --- EXACT: bad arguments -------------------------------------------------------------------------------------------
def test_exact_rejects_bad_arguments() -> None:
    mu = torch.randn(4, 3)
    y = torch.tensor([0, 1, 2, 0])
    sigma = torch.ones(4)
    with pytest.raises(ValueError, match=r"exact_loss: sigma must be > 0 everywhere .*got min 0"):
        exact_loss(mu, torch.tensor([1.0, 0.0, 1.0, 1.0]), y)
    with pytest.raises(ValueError, match=r"exact_loss: sigma must be > 0 everywhere .*got min -2"):
        exact_loss(mu, -2.0, y)
    with pytest.raises(ValueError, match=r"exact_probability: sigma must be > 0 everywhere .*NaN"):
        exact_probability(mu, torch.tensor([1.0, float("nan"), 1.0, 1.0]), y)
    with pytest.raises(
        ValueError, match=r"sigma of shape \(3,\) does not match mu of shape \(4, 3\).*\(4,\) or \(4, 1\)"
    ):
        exact_loss(mu, torch.ones(3), y)
    with pytest.raises(ValueError, match=r"exact_loss: sigma must be floating point, got torch.int64"):
        exact_loss(mu, torch.ones(4, dtype=torch.long), y)
    with pytest.raises(ValueError, match=r"exact_loss: sigma must be a tensor or a positive number, got str"):
        exact_loss(mu, "1", y)
    with pytest.raises(ValueError, match=r"target of shape \(4, 1\) must have the shape of mu without its class axis"):
        exact_loss(mu, sigma, y[:, None])
    with pytest.raises(ValueError, match=r"exact_loss: target must be an integer tensor of class indices, got torch.f"):
        exact_loss(mu, sigma, y.float())
    with pytest.raises(ValueError, match=r"exact_loss: mu must be a floating-point tensor \(\.\.\., C\)"):
        exact_loss(mu.long(), sigma, y)
    with pytest.raises(ValueError, match=r"form must be 'prob' \(-E\[p\]\) or 'log' \(-log E\[p\]\), got 'nll'"):
        exact_loss(mu, sigma, y, form="nll")
    with pytest.raises(ValueError, match="reduction must be one of 'none', 'mean' or 'sum', got 'max'"):
        exact_loss(mu, sigma, y, reduction="max")
    with pytest.raises(ValueError, match=r"form='log' is -log of the mean probability.*reduction='mean'"):
        exact_loss(mu, sigma, y, form="log", reduction="sum")
    with pytest.raises(ValueError, match=r"num_nodes must be a positive int \(Gauss–Hermite nodes\), got 0"):
        exact_loss(mu, sigma, y, num_nodes=0)
