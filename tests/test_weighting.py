"""Properties the articles claim for each weighting, checked on random Gramians (hypothesis) and by hand."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.optimize import minimize

import lightning_mtl as mtl
from lightning_mtl.weighting import min_norm_weights

SETTINGS = settings(max_examples=60, deadline=None, derandomize=True)


@st.composite
def jacobians(draw, k_min: int = 2, k_max: int = 6, n_min: int = 1, n_max: int = 12):
    k = draw(st.integers(k_min, k_max))
    n = draw(st.integers(n_min, n_max))
    seed = draw(st.integers(0, 2**31 - 1))
    scale = draw(st.sampled_from([1e-3, 1.0, 1e3]))
    gen = torch.Generator().manual_seed(seed)
    jac = torch.randn(k, n, generator=gen, dtype=torch.float64) * scale
    # sometimes make tasks conflict strongly or duplicate one another
    mode = draw(st.sampled_from(["random", "conflict", "duplicate"]))
    if mode == "conflict":
        jac[1] = -0.7 * jac[0] + 0.1 * jac[1]
    elif mode == "duplicate":
        jac[-1] = jac[0]
    return jac


def _qp(gram: np.ndarray, primary: list[int]) -> float:
    """Independent reference: SLSQP on the same problem, from several starts."""
    k = gram.shape[0]
    aux = [i for i in range(k) if i not in primary]
    cons = [
        {
            "type": "eq",
            "fun": lambda x: x[primary].sum() - 1.0,
            "jac": lambda x: np.isin(np.arange(k), primary) * 1.0,
        }
    ]
    best = np.inf
    starts = [np.where(np.isin(np.arange(k), primary), 1.0 / len(primary), 0.0)] + [np.eye(k)[p] for p in primary]
    for x0 in starts:
        res = minimize(
            lambda x: x @ gram @ x,
            x0,
            jac=lambda x: 2 * gram @ x,
            bounds=[(0, None)] * k,
            constraints=cons,
            method="SLSQP",
            options={"ftol": 1e-15, "maxiter": 500},
        )
        x = np.clip(res.x, 0, None)
        x[primary] /= x[primary].sum()
        best = min(best, float(x @ gram @ x))
    del aux
    return best


# --- Mean / Sum --------------------------------------------------------------------------------------------------
def test_mean_and_sum():
    gram = torch.eye(3, dtype=torch.float64)
    assert torch.equal(mtl.Mean()(gram), torch.full((3,), 1 / 3, dtype=torch.float64))
    assert torch.equal(mtl.Sum()(gram), torch.ones(3, dtype=torch.float64))


# --- GradNormalize (MTL(1), MTL(2)) ------------------------------------------------------------------------------
@SETTINGS
@given(jacobians(), st.floats(1e-3, 1e3))
def test_grad_normalize_is_scale_invariant(jac, c):
    """Multiplying one task's loss by c > 0 multiplies its gradient by c; the update must not change.
    (Shifting a loss leaves its gradient, hence the Gramian, unchanged, so shift invariance holds by construction.)"""
    w = mtl.GradNormalize()
    u = w(jac @ jac.T) @ jac
    scaled = jac.clone()
    scaled[0] *= c
    u2 = w(scaled @ scaled.T) @ scaled
    torch.testing.assert_close(u2, u, rtol=1e-9, atol=1e-12)  # u is a sum of unit vectors


@SETTINGS
@given(jacobians(k_min=2, k_max=2))
def test_grad_normalize_two_tasks_never_conflicts(jac):
    """MTL(2): for K=2, u = g1/|g1| + g2/|g2| has a non-negative inner product with both gradients."""
    u = mtl.GradNormalize()(jac @ jac.T) @ jac
    dots = jac @ u
    assert (dots >= -1e-12 * jac.norm(dim=1)).all()  # u is a sum of two unit vectors


def test_grad_normalize_mean_keeps_overall_scale():
    jac = torch.tensor([[3.0, 0.0], [0.0, 1.0]], dtype=torch.float64)
    unit = mtl.GradNormalize("unit")(jac @ jac.T) @ jac
    mean = mtl.GradNormalize("mean")(jac @ jac.T) @ jac
    torch.testing.assert_close(unit, torch.tensor([1.0, 1.0], dtype=torch.float64))
    torch.testing.assert_close(mean, torch.tensor([2.0, 2.0], dtype=torch.float64))
    # equivariant to a common scale of all losses
    torch.testing.assert_close(mtl.GradNormalize("mean")(100 * jac @ jac.T) @ (10 * jac), 10 * mean)


def test_grad_normalize_zero_gradient_gets_zero_weight():
    gram = torch.diag(torch.tensor([4.0, 0.0], dtype=torch.float64))
    torch.testing.assert_close(mtl.GradNormalize()(gram), torch.tensor([0.5, 0.0], dtype=torch.float64))


# --- MGDA (MTL(2)) -----------------------------------------------------------------------------------------------
@SETTINGS
@given(jacobians(k_max=7))
def test_mgda_matches_an_independent_qp(jac):
    gram = jac @ jac.T
    w = mtl.MGDA()(gram)
    assert (w >= 0).all() and abs(float(w.sum()) - 1) < 1e-12  # on the simplex
    ours = float(w @ gram @ w)
    ref = _qp(gram.numpy(), list(range(gram.shape[0])))
    scale = float(gram.diagonal().max())
    assert ours <= ref + 1e-6 * scale


@SETTINGS
@given(jacobians(k_max=7))
def test_mgda_update_descends_every_task(jac):
    """Dual optimality: <g_i, u> >= |u|^2 for every task (no task rises to first order)."""
    gram = jac @ jac.T
    u = mtl.MGDA()(gram) @ jac
    assert ((jac @ u) >= u.dot(u) - 1e-8 * float(gram.diagonal().max())).all()


@SETTINGS
@given(jacobians(k_min=2, k_max=2))
def test_mgda_closed_form_equals_general_solver(jac):
    gram = jac @ jac.T
    closed = mtl.MGDA(method="closed_form")(gram)
    exact = mtl.MGDA(method="exact")(gram)
    assert abs(float(closed @ gram @ closed - exact @ gram @ exact)) <= 1e-9 * float(gram.diagonal().max())


@SETTINGS
@given(jacobians(k_min=3, k_max=6))
def test_frank_wolfe_approaches_the_exact_solution(jac):
    gram = jac @ jac.T
    fw = mtl.MGDA(method="frank_wolfe", max_iter=400)(gram)
    exact = mtl.MGDA(method="exact")(gram)
    assert (fw >= 0).all() and abs(float(fw.sum()) - 1) < 1e-9
    gap = float(fw @ gram @ fw - exact @ gram @ exact)
    assert -1e-9 * float(gram.diagonal().max()) <= gap <= 1e-3 * float(gram.diagonal().max())


def test_mgda_pareto_stationary_gives_zero_update():
    jac = torch.tensor([[1.0, 0.0], [-1.0, 0.0]], dtype=torch.float64)
    u = mtl.MGDA()(jac @ jac.T) @ jac
    assert float(u.norm()) < 1e-12


# --- PrimaryAuxiliary (MTL(3)) -----------------------------------------------------------------------------------
@SETTINGS
@given(jacobians(k_max=7))
def test_primary_auxiliary_never_raises_an_auxiliary(jac):
    gram = jac @ jac.T
    w = mtl.PrimaryAuxiliary(primary=0)(gram)
    assert w[0] == 1 and (w[1:] >= 0).all()
    u = w @ jac
    tol = 1e-8 * float(jac.norm(dim=1).max()) * float(u.norm() + 1)
    assert ((jac[1:] @ u) >= -tol).all()
    ref = _qp(gram.numpy(), [0])
    assert float(w @ gram @ w) <= ref + 1e-6 * float(gram.diagonal().max())


@SETTINGS
@given(jacobians(k_min=3, k_max=7, n_max=6))
def test_primary_auxiliary_iterative_solver_with_several_auxiliaries(jac):
    """The K > 8 path (article's re-fit swept over the auxiliaries, then a KKT polish), also on rank-deficient
    Jacobians, where picking only the most violated auxiliary stalls."""
    gram = jac @ jac.T
    exact = mtl.PrimaryAuxiliary(0, method="exact")(gram)
    it = mtl.PrimaryAuxiliary(0, method="iterative", max_iter=200)(gram)
    assert it[0] == 1 and (it[1:] >= 0).all()
    scale = float(gram.diagonal().max())
    assert float(it @ gram @ it) <= float(exact @ gram @ exact) + 1e-4 * scale


def test_primary_auxiliary_leaves_a_non_conflicting_gradient_alone():
    jac = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.5, 0.0, 3.0]], dtype=torch.float64)
    w = mtl.PrimaryAuxiliary(0)(jac @ jac.T)
    torch.testing.assert_close(w @ jac, jac[0])


@SETTINGS
@given(jacobians(k_min=2, k_max=2))
def test_primary_auxiliary_closed_form_equals_general_solver(jac):
    gram = jac @ jac.T
    closed = mtl.PrimaryAuxiliary(1, method="closed_form")(gram)
    exact = mtl.PrimaryAuxiliary(1, method="exact")(gram)
    iterative = mtl.PrimaryAuxiliary(1, method="iterative")(gram)
    torch.testing.assert_close(closed, exact, rtol=1e-7, atol=1e-9)
    torch.testing.assert_close(closed, iterative, rtol=1e-7, atol=1e-9)


def test_primary_auxiliary_one_auxiliary_projects_onto_the_normal_plane():
    g0 = torch.tensor([1.0, 1.0], dtype=torch.float64)
    g1 = torch.tensor([-1.0, 0.0], dtype=torch.float64)
    jac = torch.stack([g0, g1])
    weighting = mtl.PrimaryAuxiliary("main")
    weighting.bind(["main", "aux"])
    u = weighting(jac @ jac.T) @ jac
    torch.testing.assert_close(u, torch.tensor([0.0, 1.0], dtype=torch.float64))


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    jacobians(k_min=3, k_max=6, n_min=8)
)  # iterative solver: checked where gradients span K dimensions, as in training
def test_primary_auxiliary_mixed_case(jac):
    """Two primaries (simplex) and the rest auxiliaries: exact solver vs an independent QP, and the iterative
    (Frank-Wolfe + coordinate re-fit) solver close to it."""
    gram = jac @ jac.T
    w = mtl.PrimaryAuxiliary([0, 1])(gram)
    assert (w >= 0).all() and abs(float(w[:2].sum()) - 1) < 1e-12
    scale = float(gram.diagonal().max())
    assert float(w @ gram @ w) <= _qp(gram.numpy(), [0, 1]) + 1e-6 * scale
    it = mtl.PrimaryAuxiliary([0, 1], method="iterative", max_iter=500)(gram)
    assert float(it @ gram @ it) <= float(w @ gram @ w) + 1e-3 * scale


def test_primary_by_name_and_errors():
    w = mtl.PrimaryAuxiliary("clean")
    with pytest.raises(ValueError, match="'clean' is not among the tasks"):
        w.bind(["noisy", "other"])
    with pytest.raises(RuntimeError, match="bind"):
        w(torch.eye(2, dtype=torch.float64))
    with pytest.raises(ValueError, match="out of range"):
        mtl.PrimaryAuxiliary(5).bind(["a", "b"])
    with pytest.raises(ValueError, match="at least one"):
        mtl.PrimaryAuxiliary([])
    with pytest.raises(ValueError, match="method"):
        mtl.MGDA(method="quadprog")


# --- PCGrad ------------------------------------------------------------------------------------------------------
def _pcgrad_reference(jac: torch.Tensor, orders: list[list[int]]) -> torch.Tensor:
    out = []
    for i in range(jac.shape[0]):
        g = jac[i].clone()
        for j in orders[i]:
            if j == i:
                continue
            d = g @ jac[j]
            if d < 0:
                g = g - d / (jac[j] @ jac[j]) * jac[j]
        out.append(g)
    return torch.stack(out).sum(0)


@SETTINGS
@given(jacobians(k_max=5))
def test_pcgrad_matches_the_vector_algorithm(jac):
    weighting = mtl.PCGrad(seed=3)
    gen = torch.Generator().manual_seed(3)
    orders = torch.rand(jac.shape[0], jac.shape[0], generator=gen, dtype=torch.float32).argsort(dim=1).tolist()
    u = weighting(jac @ jac.T) @ jac
    torch.testing.assert_close(u, _pcgrad_reference(jac, orders), rtol=1e-8, atol=1e-8 * float(jac.abs().max()))


def test_pcgrad_state_dict_restores_the_random_order():
    gram = torch.randn(4, 6, dtype=torch.float64)
    gram = gram @ gram.T
    a = mtl.PCGrad(seed=1)
    a(gram)
    state = a.state_dict()
    expected = a(gram)
    b = mtl.PCGrad(seed=99)
    b.load_state_dict(state)
    torch.testing.assert_close(b(gram), expected)


# --- robustness --------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "make",
    [
        mtl.Mean,
        mtl.GradNormalize,
        mtl.MGDA,
        lambda: mtl.MGDA(method="frank_wolfe"),
        mtl.PCGrad,
        lambda: mtl.PrimaryAuxiliary(0),
        lambda: mtl.PrimaryAuxiliary(0, method="iterative"),
    ],
)
@pytest.mark.parametrize("bad", ["nan", "inf", "asymmetric"])
def test_bad_gramian_falls_back_to_mean_and_warns_once(make, bad):
    weighting = make()
    gram = torch.tensor([[2.0, -1.0, 0.0], [-1.0, 3.0, 0.5], [0.0, 0.5, 1.0]], dtype=torch.float64)
    if bad == "nan":
        gram[0, 1] = gram[1, 0] = float("nan")
    elif bad == "inf":
        gram[2, 2] = float("inf")
    else:
        gram[0, 1] = 5.0
    with pytest.warns(RuntimeWarning, match="equal weights"):
        w = weighting(gram)
    torch.testing.assert_close(w, torch.full((3,), 1 / 3, dtype=torch.float64))
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        weighting(gram)  # second time: counted, not warned again
    assert int(weighting.fallbacks) == 2


def test_bad_shapes_raise():
    with pytest.raises(ValueError, match="square"):
        mtl.MGDA()(torch.ones(2, 3))
    with pytest.raises(ValueError, match="square"):
        mtl.MGDA()(torch.ones(3))


def test_min_norm_weights_needs_a_primary():
    with pytest.raises(ValueError, match="primary"):
        min_norm_weights(torch.eye(2), [])


def test_torchjd_weightings_plug_in():
    aggregation = pytest.importorskip("torchjd.aggregation")
    jac = torch.randn(3, 8, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    gram = (jac @ jac.T).float()
    ours = mtl.as_weighting(aggregation.MeanWeighting())
    torch.testing.assert_close(ours(gram), torch.full((3,), 1 / 3, dtype=torch.float64))
    upgrad = mtl.as_weighting(aggregation.UPGradWeighting())
    u = upgrad(gram) @ jac
    assert ((jac @ u) >= -1e-5).all()  # UPGrad's guarantee: no task conflicts with the update
    with pytest.raises(TypeError, match="Weighting"):
        mtl.as_weighting(lambda g: g)


# --- torchjd aggregators and classes passed as weightings (issue 16) ---------------------------------------------
def test_torchjd_upgrad_aggregator_gives_the_upgrad_weighting():
    """UPGrad() maps a Jacobian to a vector; passed as a weighting it must act as UPGradWeighting() on the Gramian,
    not be applied to the Gramian as if it were a Jacobian (which gave [0.839, 1.102] on this G)."""
    aggregation = pytest.importorskip("torchjd.aggregation")
    gram = torch.tensor([[4.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    from_aggregator = mtl.as_weighting(aggregation.UPGrad())(gram)
    from_weighting = mtl.as_weighting(aggregation.UPGradWeighting())(gram)
    torch.testing.assert_close(from_aggregator, from_weighting, rtol=0, atol=0)
    torch.testing.assert_close(from_aggregator, torch.tensor([0.625, 0.9998], dtype=torch.float64), atol=1e-4, rtol=0)
    for seed in range(10):
        jac = torch.randn(5, 3 + seed, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        gram = jac @ jac.T
        torch.testing.assert_close(
            mtl.as_weighting(aggregation.UPGrad())(gram), mtl.as_weighting(aggregation.UPGradWeighting())(gram)
        )


@pytest.mark.parametrize(
    ("aggregator", "weighting"),
    [
        ("MGDA", "MGDAWeighting"),
        ("DualProj", "DualProjWeighting"),
        ("IMTLG", "IMTLGWeighting"),
        ("AlignedMTL", "AlignedMTLWeighting"),
        ("Mean", "MeanWeighting"),
        ("Sum", "SumWeighting"),
    ],
)
def test_torchjd_weighted_aggregators_match_their_weightings(aggregator, weighting):
    aggregation = pytest.importorskip("torchjd.aggregation")
    for seed in range(5):
        jac = torch.randn(4, 7, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
        gram = jac @ jac.T
        ours = mtl.as_weighting(getattr(aggregation, aggregator)())(gram)
        theirs = mtl.as_weighting(getattr(aggregation, weighting)())(gram)
        torch.testing.assert_close(ours, theirs, rtol=0, atol=0)
        # and the update equals what the aggregator itself computes from the Jacobian
        direct = getattr(aggregation, aggregator)()(jac)
        torch.testing.assert_close(ours @ jac, direct, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (lambda a: a.ConFIG(), "ConFIG does not combine the task gradients with weights"),
        (lambda a: a.TrimmedMean(trim_number=1), "TrimmedMean does not combine"),
        (lambda a: a.GradDrop(), "GradDrop does not combine"),
        (lambda a: a.ExcessMTL(), r"ExcessMTL's weighting \(ExcessMTLWeighting\) reads the Jacobian itself"),
    ],
)
def test_torchjd_aggregators_without_a_gramian_weighting_are_refused(make, message):
    aggregation = pytest.importorskip("torchjd.aggregation")
    with pytest.raises(TypeError, match=message) as info:
        mtl.as_weighting(make(aggregation))
    assert "maps the K×n Jacobian to an update vector" in str(info.value)
    assert "UPGradWeighting()" in str(info.value)


def test_torchjd_jacobian_weightings_are_refused():
    aggregation = pytest.importorskip("torchjd.aggregation")
    with pytest.raises(TypeError, match="ExcessMTLWeighting, which reads the K×n Jacobian itself"):
        mtl.as_weighting(aggregation.ExcessMTLWeighting())
    with pytest.raises(TypeError, match="reads the K×n Jacobian itself"):
        mtl.as_weighting(aggregation.UPGrad().weighting)  # UPGradWeighting composed with compute_gramian
    # a wrapper of a Gramian weighting is fine
    gram = torch.tensor([[4.0, -1.0], [-1.0, 1.0]], dtype=torch.float64)
    wrapped = mtl.as_weighting(aggregation.CRMOGMWeighting(aggregation.UPGradWeighting()))
    torch.testing.assert_close(wrapped(gram), mtl.as_weighting(aggregation.UPGradWeighting())(gram))


def test_a_class_instead_of_an_instance_says_so():
    with pytest.raises(TypeError, match=r"got the class MGDA: pass an instance, e\.g\. `MGDA\(\)`"):
        mtl.as_weighting(mtl.MGDA)
    with pytest.raises(TypeError, match=r"pass an instance, e\.g\. `GradNormalize\(\)`"):
        mtl.as_weighting(mtl.GradNormalize)
    aggregation = pytest.importorskip("torchjd.aggregation")
    with pytest.raises(TypeError, match=r"pass an instance, e\.g\. `UPGradWeighting\(\)`"):
        mtl.as_weighting(aggregation.UPGradWeighting)


def test_pcgrad_saved_before_its_first_draw_resumes_from_its_seed_without_a_warning():
    gram = torch.randn(4, 6, dtype=torch.float64)
    gram = gram @ gram.T
    b = mtl.PCGrad(seed=1)
    b.load_state_dict(mtl.PCGrad(seed=1).state_dict())  # nothing drawn yet: no device in the state
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        torch.testing.assert_close(b(gram), mtl.PCGrad(seed=1)(gram))
