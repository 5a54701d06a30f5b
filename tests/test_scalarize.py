"""Loss-level scalarisations of MTL(1): values, gradients, invariances, state."""

from __future__ import annotations

import math

import pytest
import torch

import lightning_mtl as mtl
from lightning_mtl.scalarize import classification_prior, regression_prior


def _losses(a: float = 2.0, b: float = 0.5) -> dict[str, torch.Tensor]:
    return {
        "a": torch.tensor(a, dtype=torch.float64, requires_grad=True),
        "b": torch.tensor(b, dtype=torch.float64, requires_grad=True),
    }


def _grads(value: torch.Tensor, losses: dict[str, torch.Tensor]) -> list[float]:
    return [float(g) for g in torch.autograd.grad(value, list(losses.values()))]


def test_initial_loss_normalization_is_scale_invariant_and_resumes():
    norm = mtl.InitialLossNormalization(warmup_steps=2)
    first = norm(_losses(2.0, 0.5))
    assert float(first) == pytest.approx(2.0)
    norm(_losses(4.0, 1.5))  # second warm-up call: initial = mean of (2, 4) and (0.5, 1.5)
    assert {k: float(v) for k, v in norm.initial.items()} == {"a": 3.0, "b": 1.0}
    losses = _losses(6.0, 3.0)
    assert float(norm(losses)) == pytest.approx(2.0 + 3.0)
    # state survives a round trip
    clone = mtl.InitialLossNormalization(warmup_steps=2)
    clone.load_state_dict(norm.state_dict())
    assert float(clone(_losses(6.0, 3.0))) == pytest.approx(5.0)
    # scaling a task's loss by c from the start leaves the objective unchanged
    scaled = mtl.InitialLossNormalization()
    scaled({"a": torch.tensor(20.0), "b": torch.tensor(0.5)})
    plain = mtl.InitialLossNormalization()
    plain({"a": torch.tensor(2.0), "b": torch.tensor(0.5)})
    assert float(scaled({"a": torch.tensor(10.0), "b": torch.tensor(1.0)})) == pytest.approx(
        float(plain({"a": torch.tensor(1.0), "b": torch.tensor(1.0)}))
    )


def test_initial_loss_given_up_front_and_errors():
    norm = mtl.InitialLossNormalization(initial={"a": math.log(10), "b": 1.0})
    assert float(norm({"a": torch.tensor(math.log(10)), "b": torch.tensor(2.0)})) == pytest.approx(3.0)
    with pytest.raises(KeyError, match="'c' was not seen"):
        norm({"c": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="warmup_steps"):
        mtl.InitialLossNormalization(warmup_steps=0)
    fresh = mtl.InitialLossNormalization().eval()
    with pytest.raises(RuntimeError, match="training mode"):
        fresh({"a": torch.tensor(1.0)})


def test_prior_normalization_and_priors():
    assert classification_prior([5, 5]) == pytest.approx(math.log(2))
    assert classification_prior([1, 0, 0]) == pytest.approx(0.0)
    y = torch.tensor([[1.0, 0.0], [3.0, 2.0]])
    assert regression_prior(y) == pytest.approx(2.0)  # each row is 1+1 away from the mean
    norm = mtl.PriorLossNormalization({"a": 2.0, "b": 0.25})
    assert float(norm(_losses(2.0, 0.5))) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="positive"):
        mtl.PriorLossNormalization({"a": 0.0})
    with pytest.raises(KeyError, match="no prior"):
        norm({"c": torch.tensor(1.0)})


def test_real_time_normalization_has_the_gradient_of_the_log_sum():
    losses = _losses(2.0, 0.5)
    norm = mtl.RealTimeNormalization(eps=0.0)
    assert _grads(norm(losses), losses) == pytest.approx([1 / 2.0, 1 / 0.5])
    losses = _losses(2.0, 0.5)
    terms = norm.terms(losses)
    assert [float(t) for t in terms.values()] == pytest.approx([1.0, 1.0])
    assert _grads(sum(terms.values()), losses) == pytest.approx([1 / 2.0, 1 / 0.5])


@pytest.mark.parametrize("gamma", [-1.0, 0.0, 1.0, 2.0])
def test_generalized_mean_values_and_terms(gamma):
    losses = _losses(2.0, 0.5)
    value = float(mtl.GeneralizedMean(gamma)(losses))
    expected = math.sqrt(2.0 * 0.5) if gamma == 0 else ((2.0**gamma + 0.5**gamma) / 2) ** (1 / gamma)
    assert value == pytest.approx(expected)
    mean = mtl.GeneralizedMean(gamma)
    g_value = _grads(mean(losses), losses)
    losses = _losses(2.0, 0.5)
    g_terms = _grads(sum(mean.terms(losses).values()), losses)
    assert g_terms == pytest.approx(g_value)


def test_generalized_mean_increases_with_gamma():
    losses = {"a": torch.tensor(3.0), "b": torch.tensor(0.2), "c": torch.tensor(1.0)}
    values = [float(mtl.GeneralizedMean(g)(losses)) for g in (-4, -1, 0, 1, 4, 30)]
    assert values == sorted(values)
    assert values[-1] == pytest.approx(3.0, rel=0.05)  # towards the max


def test_uncertainty_weighting_learns_the_loss_scale():
    uw = mtl.UncertaintyWeighting(["a", "b"])
    opt = torch.optim.SGD(uw.parameters(), lr=0.1)
    for _ in range(500):
        opt.zero_grad()
        uw({"a": torch.tensor(4.0), "b": torch.tensor(0.25)}).backward()
        opt.step()
    # optimum of 0.5 e^{-s} L + 0.5 s is e^{s} = L
    assert uw.log_var.exp().tolist() == pytest.approx([4.0, 0.25], rel=1e-3)
    with pytest.raises(KeyError, match="built for tasks"):
        uw({"a": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="distinct"):
        mtl.UncertaintyWeighting(["a", "a"])
