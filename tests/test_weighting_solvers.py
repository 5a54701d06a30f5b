"""The min-norm solvers beyond the exact enumeration (K > 8): MGDA and PrimaryAuxiliary against independent QP
solvers (quadprog, scipy SLSQP), the KKT conditions, and TorchJD's MGDAWeighting."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.optimize import minimize

import lightning_mtl as mtl
from lightning_mtl.weighting import min_norm_weights

LARGE_K = [12, 20, 32, 50]
SEEDS = [0, 1, 2]


def _jacobian(k: int, n: int, seed: int) -> torch.Tensor:
    return torch.randn(k, n, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _shapes(k: int) -> list[tuple[str, int]]:
    """More gradient dimensions than tasks (full rank), and fewer (rank-deficient: 0 may lie in the hull)."""
    return [("full_rank", 2 * k), ("rank_deficient", max(2, k // 3))]


CASES = [(k, name, n, seed) for k in LARGE_K for name, n in _shapes(k) for seed in SEEDS]
CASE_IDS = [f"K{k}-{name}-seed{seed}" for k, name, _, seed in CASES]


def _reference(gram: np.ndarray, primary: list[int]) -> float:
    """Independent reference: the best of quadprog (if installed) and SLSQP on min x'Gx, x_P in the simplex,
    x >= 0."""
    k = gram.shape[0]
    is_p = np.isin(np.arange(k), primary)
    candidates = []
    try:
        import quadprog

        # quadprog needs a positive definite matrix; the ridge moves the optimum by at most 1e-12 * max diag
        ridge = 1e-12 * float(np.diag(gram).max())
        constraints = np.hstack([is_p[:, None] * 1.0, np.eye(k)])
        rhs = np.concatenate([[1.0], np.zeros(k)])
        x = quadprog.solve_qp(gram + ridge * np.eye(k), np.zeros(k), constraints, rhs, meq=1)[0]
        candidates.append(x)
    except ImportError:
        pass
    cons = [{"type": "eq", "fun": lambda x: x[is_p].sum() - 1.0, "jac": lambda x: is_p * 1.0}]
    res = minimize(
        lambda x: x @ gram @ x,
        np.where(is_p, 1.0 / is_p.sum(), 0.0),
        jac=lambda x: 2 * gram @ x,
        bounds=[(0, None)] * k,
        constraints=cons,
        method="SLSQP",
        options={"ftol": 1e-15, "maxiter": 1000},
    )
    candidates.append(res.x)
    best = np.inf
    for x in candidates:
        x = np.clip(x, 0, None)
        x[is_p] /= x[is_p].sum()
        best = min(best, float(x @ gram @ x))
    return best


def _kkt_violation(gram: torch.Tensor, w: torch.Tensor, primary: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """KKT of min w'Gw on {w >= 0, sum_P w = 1}, nu = w'Gw: (Gw)_i >= nu [i in P] for every i, with equality where
    w_i > 0. Returns how far each task falls below its bound, and how far it is from it on the support (0 off it)."""
    gw = gram @ w
    nu = w @ gw
    p = torch.zeros_like(w)
    p[primary] = 1.0
    slack = gw - nu * p
    on_support = w > 1e-9 * float(w.max())
    return (-slack).clamp_min(0), torch.where(on_support, slack.abs(), 0.0)


def _assert_optimal(gram: torch.Tensor, w: torch.Tensor, primary: list[int]) -> None:
    k = gram.shape[0]
    is_p = torch.zeros(k, dtype=torch.bool)
    is_p[primary] = True
    assert (w >= 0).all()
    assert abs(float(w[is_p].sum()) - 1) < 1e-12
    scale = float(gram.diagonal().max())
    ours = float(w @ gram @ w)
    ref = _reference(gram.numpy(), primary)
    # within 1e-6 of the reference relative to the optimum, or better than it; round-off of the objective (1e-13 of
    # the largest squared norm) where the optimum is 0 (the origin in the hull)
    assert ours <= ref + 1e-6 * abs(ref) + 1e-13 * scale, (ours, ref)
    below, off_equality = _kkt_violation(gram, w, primary)
    # relative to the optimum, plus round-off of (Gw)_i (auxiliary weights can exceed 1)
    tol = 1e-9 * ours + 1e-12 * (gram.abs() @ w)
    assert (below <= tol).all(), float((below - tol).max())
    assert (off_equality <= tol).all(), float((off_equality - tol).max())


# --- MGDA ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(("k", "shape", "n", "seed"), CASES, ids=CASE_IDS)
def test_mgda_large_k_is_the_min_norm_point(k, shape, n, seed):
    jac = _jacobian(k, n, seed)
    gram = jac @ jac.T
    w = mtl.MGDA()(gram)
    _assert_optimal(gram, w, list(range(k)))
    # the dual statement of MTL(2): no task's loss rises, <g_i, u> >= |u|^2
    u = w @ jac
    assert ((jac @ u) >= u.dot(u) - 1e-12 * float(gram.diagonal().max())).all()


@pytest.mark.parametrize("k", LARGE_K)
def test_mgda_large_k_hard_gramians(k):
    """Duplicated tasks, strongly conflicting pairs and task scales spread over 1e-3..1e3."""
    gen = torch.Generator().manual_seed(k)
    base = torch.randn(k // 2, 2 * k, generator=gen, dtype=torch.float64)
    duplicated = torch.cat([base, base, base[:1]])[:k]
    conflicting = torch.randn(k, 2 * k, generator=gen, dtype=torch.float64)
    conflicting[1::2] = -0.7 * conflicting[0::2][: conflicting[1::2].shape[0]] + 0.1 * conflicting[1::2]
    scales = torch.logspace(-3, 3, k, dtype=torch.float64)[:, None]
    scaled = torch.randn(k, 2 * k, generator=gen, dtype=torch.float64) * scales
    for jac in (duplicated, conflicting, scaled):
        gram = jac @ jac.T
        _assert_optimal(gram, mtl.MGDA()(gram), list(range(k)))


@pytest.mark.parametrize("k", LARGE_K)
def test_mgda_large_k_nearly_singular_gramian(k):
    """Gradient spectrum spread over 1e0..1e-8 (Gramian eigenvalues down to 1e-16): the hardest case for the fixed
    step count; the result is still within 1e-9 of the largest squared norm, and far closer than Frank-Wolfe."""
    gen = torch.Generator().manual_seed(k)
    basis, _ = torch.linalg.qr(torch.randn(k, k, generator=gen, dtype=torch.float64))
    jac = basis * torch.logspace(0, -8, k, dtype=torch.float64)
    gram = jac @ jac.T
    w = mtl.MGDA()(gram)
    assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12
    scale = float(gram.diagonal().max())
    ref = _reference(gram.numpy(), list(range(k)))
    assert float(w @ gram @ w) <= ref + 1e-9 * scale
    fw = mtl.MGDA(method="frank_wolfe")(gram)
    assert float(w @ gram @ w) <= float(fw @ gram @ fw)


@pytest.mark.parametrize("k", [3, 5, 8])
def test_active_set_equals_the_exact_enumeration(k):
    for seed in range(10):
        jac = _jacobian(k, 2 + seed % 7, seed)
        gram = jac @ jac.T
        exact = mtl.MGDA(method="exact")(gram)
        active = mtl.MGDA(method="active_set")(gram)
        scale = float(gram.diagonal().max())
        assert abs(float(active @ gram @ active - exact @ gram @ exact)) <= 1e-12 * scale


def test_auto_keeps_the_exact_solver_up_to_8_tasks():
    jac = _jacobian(8, 5, 0)
    gram = jac @ jac.T
    torch.testing.assert_close(mtl.MGDA()(gram), mtl.MGDA(method="exact")(gram), rtol=0, atol=0)


@pytest.mark.parametrize("k", LARGE_K)
def test_mgda_is_not_worse_than_torchjd(k):
    aggregation = pytest.importorskip("torchjd.aggregation")
    for seed in SEEDS:
        for _, n in _shapes(k):
            jac = _jacobian(k, n, seed)
            gram = jac @ jac.T
            ours = mtl.MGDA()(gram)
            theirs = aggregation.MGDAWeighting()(gram)
            scale = float(gram.diagonal().max())
            assert float(ours @ gram @ ours) <= float(theirs @ gram @ theirs) + 1e-13 * scale


def test_active_set_step_count_follows_max_iter():
    """max_iter caps the fixed number of active-set steps; one step from the best vertex is already feasible."""
    jac = _jacobian(20, 40, 0)
    gram = jac @ jac.T
    one = mtl.MGDA(method="active_set", max_iter=1)(gram)
    assert (one >= 0).all() and abs(float(one.sum()) - 1) < 1e-12
    full = mtl.MGDA(max_iter=100)(gram)
    assert float(full @ gram @ full) <= float(one @ gram @ one)


def test_min_norm_weights_validates_method_and_max_iter():
    gram = torch.eye(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="'exact', 'active_set' or 'iterative'"):
        min_norm_weights(gram, [0, 1, 2], method="quadprog")
    with pytest.raises(ValueError, match=r"max_iter=\.\.\.\) must be >= 1, got 0"):
        min_norm_weights(gram, [0, 1, 2], method="active_set", max_iter=0)
    with pytest.raises(ValueError, match=r"MGDA\(max_iter=\.\.\.\) must be >= 1"):
        mtl.MGDA(max_iter=0)


# --- PrimaryAuxiliary (same solver) -------------------------------------------------------------------------------
@pytest.mark.parametrize(("k", "shape", "n", "seed"), CASES, ids=CASE_IDS)
@pytest.mark.parametrize("primary", [[0], [0, 1]], ids=["one_primary", "two_primaries"])
def test_primary_auxiliary_large_k_is_optimal(k, shape, n, seed, primary):
    jac = _jacobian(k, n, seed)
    gram = jac @ jac.T
    w = mtl.PrimaryAuxiliary(primary)(gram)
    _assert_optimal(gram, w, primary)
    if len(primary) == 1:
        assert w[0] == 1
        u = w @ jac
        tol = 1e-9 * float(jac.norm(dim=1).max()) * float(u.norm() + 1)
        assert ((jac[1:] @ u) >= -tol).all()  # no auxiliary loss rises


# --- timing -------------------------------------------------------------------------------------------------------
