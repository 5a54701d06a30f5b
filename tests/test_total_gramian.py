"""Parameter mode on CPU with fp32 rows reads the last task off the total gradient: the K×K transform, the share
check that keeps it accurate, and the exact fallback when the last task is a small part of the total."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import lightning_mtl as mtl
import lightning_mtl.engine.parameter as parameter
from lightning_mtl.engine import GradientEngine
from lightning_mtl.engine._common import add_combination, gramian, gramian_from_total
from tests._mtl_models import TwoHeads, make_data


@settings(max_examples=60, deadline=None)
@given(st.integers(2, 6), st.integers(1, 300), st.integers(0, 2**31 - 1))
def test_gramian_from_total_is_the_gramian_of_the_task_gradients(k, p, seed):
    g = torch.Generator().manual_seed(seed)
    jac = torch.randn(k, p, generator=g, dtype=torch.float64) * torch.logspace(-2, 2, k, dtype=torch.float64)[:, None]
    with_total = torch.cat([jac[:-1], jac.sum(0, keepdim=True)])
    got = gramian_from_total(gramian(with_total))
    want = jac @ jac.T
    norms = want.diagonal().sqrt()
    scale = torch.outer(norms, norms) * (with_total[-1].norm() / norms[-1]) ** 2  # the documented error growth
    assert ((got - want).abs() <= 1e-12 * scale + 1e-300).all()


def _brute_force(module: TwoHeads, batch) -> tuple[torch.Tensor, torch.Tensor]:
    """Task Jacobian of the trunk (one autograd.grad per task) and its float64 Gramian."""
    losses, _ = module.task_dict(batch)
    params = list(module.trunk.parameters())
    grads = [torch.autograd.grad(v, params, retain_graph=True) for v in losses.values()]
    rows = [torch.cat([g.reshape(-1) for g in task]) for task in grads]
    jac = torch.stack(rows)
    return jac, jac.double() @ jac.double().T


def _step(engine: GradientEngine, module: TwoHeads, batch) -> torch.Tensor:
    losses, z = module.task_dict(batch)
    module.zero_grad()
    engine.backward(losses, module=module, shared=z)
    engine.apply()
    return torch.cat([p.grad.reshape(-1) for p in module.trunk.parameters()])


def _count_transforms(monkeypatch) -> list[int]:
    calls: list[int] = []
    original = parameter.gramian_from_total

    def spy(raw):
        calls.append(1)
        return original(raw)

    monkeypatch.setattr(parameter, "gramian_from_total", spy)
    return calls


def test_a_balanced_last_task_is_read_off_the_total_and_agrees_with_the_exact_path(monkeypatch):
    torch.manual_seed(0)
    module = TwoHeads(k=3)
    batch = make_data(k=3)[:16]
    jac, want = _brute_force(module, batch)
    calls = _count_transforms(monkeypatch)
    fast = GradientEngine(mtl.MGDA())
    grad = _step(fast, module, batch)
    assert calls == [1] and fast.strategy._total_ok
    norms = want.diagonal().sqrt()
    assert ((fast.last_gramian - want).abs() <= 1e-5 * torch.outer(norms, norms)).all()
    w = fast.last_weights
    torch.testing.assert_close(grad, (w.float() @ jac), rtol=1e-5, atol=1e-7)

    exact = GradientEngine(mtl.MGDA(), subtract_last=False)  # K backward passes of autograd.grad: no subtraction
    torch.testing.assert_close(_step(exact, module, batch), grad, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(exact.last_weights, w, rtol=1e-5, atol=1e-7)


def test_a_small_last_share_falls_back_to_exact_recovery_and_returns_when_it_grows(monkeypatch):
    torch.manual_seed(0)
    module = TwoHeads(k=3)
    module.loss_scale = [1.0, 1.0, 1e-3]  # ||g_K||^2 / ||T||^2 about 1e-6: the transform would lose ~6 % of G_KK
    batch = make_data(k=3)[:16]
    jac, want = _brute_force(module, batch)
    assert want[-1, -1] < parameter.MIN_LAST_SHARE * want.sum()
    calls = _count_transforms(monkeypatch)
    engine = GradientEngine(mtl.GradNormalize())
    grad = _step(engine, module, batch)
    assert calls == [1] and not engine.strategy._total_ok  # tried, found the share too small, recovered exactly
    torch.testing.assert_close(engine.last_gramian[-1, -1], want[-1, -1], rtol=1e-3, atol=0)
    w = engine.last_weights.float()
    subtraction_error = float(w[-1] * 1e-6 * jac.sum(0).abs().max())  # g_K = T - ... carries eps * |T|, times w_K
    torch.testing.assert_close(grad, w @ jac, rtol=0, atol=subtraction_error)

    _step(engine, module, batch)
    assert calls == [1]  # the next step goes straight to the exact path
    module.loss_scale = [1.0, 1.0, 1.0]
    _step(engine, module, batch)  # exact (decided by the last step), and sees the share back above twice the bound
    assert calls == [1] and engine.strategy._total_ok
    _step(engine, module, batch)
    assert calls == [1, 1]


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_other_row_dtypes_always_recover_exactly(monkeypatch, dtype):
    torch.manual_seed(0)
    module = TwoHeads(k=3).to(dtype)
    calls = _count_transforms(monkeypatch)
    engine = GradientEngine(mtl.MGDA())
    x, y = make_data(k=3)[:16]
    _step(engine, module, (x.to(dtype), y.to(dtype)))
    assert calls == [] and engine.last_gramian.isfinite().all()


@pytest.mark.parametrize("contiguous", [True, False])
def test_add_combination_writes_onto_the_total_in_place(contiguous):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(s)) for s in [(3, 5), (7,), (4, 2), (2,)]]
    grads = [torch.randn(3, 5), torch.randn(7), torch.randn(4, 2)]
    if not contiguous:  # a .grad with transposed strides goes through the copying branch
        grads[0] = torch.randn(5, 3).t()
    for p, g in zip(params, grads):
        p.grad = g  # the last parameter gets no gradient this step and must be left alone
    before = torch.cat([g.reshape(-1) for g in grads])
    rows = torch.randn(2, sum(p.numel() for p in params))
    weights = torch.tensor([[0.25, -1.5]])
    add_combination(0.5, weights, rows, params)
    after = torch.cat([p.grad.reshape(-1) for p in params[:-1]])
    torch.testing.assert_close(after, 0.5 * before + (weights @ rows)[0, : before.numel()])
    assert all(p.grad is g for p, g in zip(params, grads)) and params[-1].grad is None
