"""ExponentiatedStepSize (kexue.fm/8968) and ProjectedWeightDecay (/8907): the pure functions against the formulas,
the callbacks against hand-written loops, and their behaviour under DDP, FSDP2, AMP, accumulation and resume."""

from __future__ import annotations

import copy
import itertools
import os
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from lightning.pytorch.plugins import MixedPrecision
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn

from lightning_mtl.callbacks import ExponentiatedStepSize, ProjectedWeightDecay
from lightning_mtl.callbacks.exponentiated import exponentiated_multiplier_update
from lightning_mtl.callbacks.projected_decay import check_strategy, project_weight_decay, weight_decay_coefficient
from tests._distributed import shut_down
from tests._mtl_models import GradRecorder, TwoHeads, loader, make_data, trainer

mp.set_sharing_strategy("file_system")  # several spawns in one process (as in tests/test_distributed.py)


def _model(dtype=torch.float64, **kw) -> TwoHeads:
    torch.manual_seed(0)
    model = TwoHeads(**kw).to(dtype)
    model.return_plain = True  # the plain sum of the task losses: these callbacks need no task structure
    return model


def _grads(model: nn.Module, batch) -> dict[str, torch.Tensor]:
    """The gradient of the summed task losses, by hand (no Lightning)."""
    model.zero_grad()
    losses, _ = model.task_dict(batch)
    sum(losses.values()).backward()
    return {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def _batches(ds, batch_size: int) -> list:
    return list(loader(ds, batch_size))


class Snapshots(L.Callback):
    """Put after ExponentiatedStepSize: copies of its multipliers, previous gradients and step counts after every
    optimizer step (``on_before_optimizer_step`` runs whether or not the scaler then skips the step)."""

    def __init__(self, eg: ExponentiatedStepSize) -> None:
        self.eg = eg
        self.states: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.states.append(
            {
                "nu": {n: t.clone() for n, t in self.eg.multipliers.items()},
                "prev": {n: t.clone() for n, t in self.eg._prev.items()},
                "steps": self.eg.steps,
            }
        )


# --- the pure functions ------------------------------------------------------------------------------------------
def test_multiplier_update_is_the_formula():
    g = torch.Generator().manual_seed(0)
    nu, prev, cur = (torch.rand(5, 3, generator=g, dtype=torch.float64) + 0.5 for _ in range(3))
    prev = prev - 1.0
    torch.testing.assert_close(exponentiated_multiplier_update(nu, prev, cur, 0.7), nu * torch.exp(0.7 * prev * cur))
    layer = exponentiated_multiplier_update(torch.tensor(1.5, dtype=torch.float64), prev, cur, 0.7, per_layer=True)
    torch.testing.assert_close(layer, 1.5 * torch.exp(0.7 * (prev * cur).sum()))
    clamped = exponentiated_multiplier_update(nu, prev, cur, 50.0, clamp=(0.5, 2.0))
    torch.testing.assert_close(clamped, (nu * torch.exp(50.0 * prev * cur)).clamp(0.5, 2.0))
    assert clamped.min() == 0.5 and clamped.max() == 2.0
    assert torch.equal(exponentiated_multiplier_update(nu, prev, cur, 0.0), nu)  # gamma = 0: exactly nu


# entries of magnitude >= 1e-100 (or 0): products and squares stay normal float64 numbers (see the docstring of
# project_weight_decay for what happens where ||theta||^2 underflows)
_floats = st.floats(-1e3, 1e3, allow_nan=False, allow_infinity=False).filter(lambda v: v == 0 or abs(v) >= 1e-100)


@settings(max_examples=200, deadline=None)
@given(
    st.integers(1, 24).flatmap(
        lambda n: st.tuples(st.lists(_floats, min_size=n, max_size=n), st.lists(_floats, min_size=n, max_size=n))
    )
)
def test_projection_never_grows_the_norm_and_leaves_agreeing_gradients(pair):
    g, theta = (torch.tensor(v, dtype=torch.float64) for v in pair)
    u = project_weight_decay(g, theta)
    dot, sq = (g * theta).sum(), (theta * theta).sum()
    scale = float(g.norm() * theta.norm()) + 1e-300
    assert float((u * theta).sum()) >= -1e-9 * scale  # <u, theta> >= 0: the step does not grow ||theta||
    if dot >= 0 or sq == 0:
        assert torch.equal(u, g)  # nothing to correct: the gradient is left exactly as it was
    else:
        c = -dot / sq
        torch.testing.assert_close(u, g + c * theta)  # u - g is a positive multiple of theta
        assert abs(float((u * theta).sum())) <= 1e-9 * scale  # tangent to the sphere


def test_projection_by_hand_and_zero_weights():
    theta = torch.tensor([3.0, 4.0])
    torch.testing.assert_close(project_weight_decay(torch.tensor([-3.0, 0.0]), theta), torch.tensor([-1.92, 1.44]))
    assert torch.equal(project_weight_decay(torch.tensor([1.0, -0.5]), theta), torch.tensor([1.0, -0.5]))
    assert torch.equal(project_weight_decay(torch.tensor([1.0, -2.0]), torch.zeros(2)), torch.tensor([1.0, -2.0]))
    assert float(weight_decay_coefficient(torch.tensor(-1.0), torch.tensor(0.0))) == 0.0
    with pytest.raises(ValueError, match="same shape"):
        project_weight_decay(torch.ones(3), torch.ones(2))


# --- ExponentiatedStepSize in a Trainer ------------------------------------------------------------------------
def _plain_eg(model, batches, gamma, *, per_layer=False, clamp=None, warmup=0, lr=0.1):
    """The article's rule written out in a plain loop: nu_{t+1} = nu_t * exp(gamma g_{t-1} g_t), then
    theta -= lr * nu_{t+1} * g_t. Returns the multipliers and the raw gradients of every step."""
    nu: dict[str, torch.Tensor] = {}
    prev: dict[str, torch.Tensor] = {}
    seen = []
    for t, batch in enumerate(batches):
        grads = _grads(model, batch)
        seen.append(grads)
        with torch.no_grad():
            for n, p in model.named_parameters():
                g = grads[n]
                if n not in nu:
                    nu[n] = torch.ones((), dtype=g.dtype) if per_layer else torch.ones_like(g)
                if t >= max(warmup, 1):
                    corr = (prev[n] * g).sum() if per_layer else prev[n] * g
                    nu[n] = nu[n] * torch.exp(gamma * corr)
                    if clamp is not None:
                        nu[n] = nu[n].clamp(*clamp)
                prev[n] = g
                p.sub_(lr * (nu[n] * g))
    return nu, seen


def _fit_eg(model, ds, eg, batch_size=8, **kw):
    snap = Snapshots(eg)
    before = GradRecorder()
    trainer(precision="64-true", callbacks=[before, eg, snap], **kw).fit(model, loader(ds, batch_size))
    return before, snap


def test_nu_after_two_steps_is_exp_gamma_g0_g1():
    ds = make_data(n=16, dtype=torch.float64)
    model = _model()
    batches = _batches(ds, 8)
    hand = copy.deepcopy(model)
    _, seen = _plain_eg(hand, batches, gamma=5.0)  # also updates ``hand`` by the article's rule
    g0, g1 = seen
    eg = ExponentiatedStepSize(5.0)
    lit = copy.deepcopy(model)
    before, snap = _fit_eg(lit, ds, eg)
    assert eg.steps == {n: 2 for n in g0}
    for n in g0:
        torch.testing.assert_close(before.grads[1][n], g1[n], rtol=1e-12, atol=1e-14)  # same raw gradient
        torch.testing.assert_close(eg.multipliers[n], torch.exp(5.0 * g0[n] * g1[n]), rtol=1e-12, atol=0)
        assert torch.equal(snap.states[0]["nu"][n], torch.ones_like(g0[n]))  # nu_1 = 1
    assert any(not torch.allclose(v, torch.ones_like(v)) for v in eg.multipliers.values())  # it moved
    for (n, p), q in zip(lit.named_parameters(), hand.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14, msg=n)


def test_gamma_zero_leaves_training_bitwise_identical():
    ds = make_data(n=32)
    plain, with_eg = _model(torch.float32), _model(torch.float32)
    trainer(max_epochs=2).fit(plain, loader(ds))
    eg = ExponentiatedStepSize(0.0)
    trainer(max_epochs=2, callbacks=[eg]).fit(with_eg, loader(ds))
    for a, b in zip(plain.parameters(), with_eg.parameters(), strict=True):
        assert torch.equal(a, b)
    assert all(torch.equal(v, torch.ones_like(v)) for v in eg.multipliers.values())


def test_per_layer_multipliers_by_hand():
    ds = make_data(n=24, dtype=torch.float64)
    model = _model()
    hand = copy.deepcopy(model)
    nu_hand, seen = _plain_eg(hand, _batches(ds, 8), gamma=3.0, per_layer=True)
    eg = ExponentiatedStepSize(3.0, per_layer=True)
    lit = copy.deepcopy(model)
    _fit_eg(lit, ds, eg)
    for n, nu in eg.multipliers.items():
        assert nu.ndim == 0
        expected = torch.exp(3.0 * ((seen[0][n] * seen[1][n]).sum() + (seen[1][n] * seen[2][n]).sum()))
        torch.testing.assert_close(nu, expected, rtol=1e-12, atol=0, msg=n)
        torch.testing.assert_close(nu, nu_hand[n], rtol=1e-12, atol=0, msg=n)
    for p, q in zip(lit.parameters(), hand.parameters(), strict=True):
        torch.testing.assert_close(p.detach(), q.detach(), rtol=1e-12, atol=1e-14)


def test_clamp_is_respected():
    ds = make_data(n=32, dtype=torch.float64)
    model = _model()
    hand = copy.deepcopy(model)
    nu_hand, _ = _plain_eg(hand, _batches(ds, 8), gamma=200.0, clamp=(0.5, 2.0))
    eg = ExponentiatedStepSize(200.0, clamp=(0.5, 2.0))
    _, snap = _fit_eg(copy.deepcopy(model), ds, eg)
    values = torch.cat([v.reshape(-1) for s in snap.states for v in s["nu"].values()])
    assert values.min() >= 0.5 and values.max() <= 2.0
    assert (values == 0.5).any() and (values == 2.0).any()  # gamma this large hits both bounds
    for n, nu in eg.multipliers.items():
        torch.testing.assert_close(nu, nu_hand[n], rtol=1e-12, atol=0)


def test_warmup_keeps_nu_at_one_then_uses_the_last_warmup_gradient():
    ds = make_data(n=32, dtype=torch.float64)
    model = _model()
    eg = ExponentiatedStepSize(5.0, warmup_steps=2)
    before, snap = _fit_eg(copy.deepcopy(model), ds, eg, max_steps=3)
    for state in snap.states[:2]:
        assert all(torch.equal(v, torch.ones_like(v)) for v in state["nu"].values())
    g1, g2 = before.grads[1], before.grads[2]
    for n, nu in eg.multipliers.items():
        torch.testing.assert_close(nu, torch.exp(5.0 * g1[n] * g2[n]), rtol=1e-12, atol=0)
    nu_hand, _ = _plain_eg(copy.deepcopy(model), _batches(ds, 8)[:3], gamma=5.0, warmup=2)
    for n, nu in eg.multipliers.items():
        torch.testing.assert_close(nu, nu_hand[n], rtol=1e-12, atol=0)


def test_gradient_accumulation_updates_once_per_optimizer_step():
    ds = make_data(n=32, dtype=torch.float64)
    model = _model()
    eg = ExponentiatedStepSize(5.0)
    acc = copy.deepcopy(model)
    before, snap = _fit_eg(acc, ds, eg, batch_size=8, accumulate_grad_batches=2)  # 4 micro-batches, 2 steps
    assert len(snap.states) == 2 and set(eg.steps.values()) == {2}
    for n, nu in eg.multipliers.items():  # from the accumulated gradients the optimizer saw
        torch.testing.assert_close(nu, torch.exp(5.0 * before.grads[0][n] * before.grads[1][n]), rtol=1e-12, atol=0)
    eg_big = ExponentiatedStepSize(5.0)
    big = copy.deepcopy(model)
    _fit_eg(big, ds, eg_big, batch_size=16)  # one step per 16 samples: the same steps
    for n, nu in eg.multipliers.items():
        torch.testing.assert_close(nu, eg_big.multipliers[n], rtol=1e-10, atol=1e-12)
    for p, q in zip(acc.parameters(), big.parameters(), strict=True):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_resume_is_bit_exact(tmp_path):
    ds = make_data(n=32)
    model = _model(torch.float32, optimizer="adam", lr=0.01)
    kw = dict(clamp=(0.2, 5.0), warmup_steps=1)
    full_eg = ExponentiatedStepSize(20.0, **kw)
    full = copy.deepcopy(model)
    trainer(max_epochs=2, callbacks=[full_eg]).fit(full, loader(ds))

    first = tmp_path / "first"
    trainer(
        max_epochs=1, callbacks=[ExponentiatedStepSize(20.0, **kw)], enable_checkpointing=True, default_root_dir=first
    ).fit(copy.deepcopy(model), loader(ds))
    ckpt = next(first.rglob("*.ckpt"))
    saved = torch.load(ckpt, weights_only=False)["callbacks"]["ExponentiatedStepSize"]
    assert set(saved) == {"per_layer", "nu", "prev", "steps"} and set(saved["steps"].values()) == {4}
    resumed_eg = ExponentiatedStepSize(20.0, **kw)
    resumed = copy.deepcopy(model)
    trainer(max_epochs=2, callbacks=[resumed_eg], default_root_dir=tmp_path / "resumed").fit(
        resumed, loader(ds), ckpt_path=str(ckpt)
    )
    for a, b in zip(full.parameters(), resumed.parameters(), strict=True):
        assert torch.equal(a, b)
    assert resumed_eg.steps == full_eg.steps
    for n, nu in full_eg.multipliers.items():
        assert torch.equal(resumed_eg.multipliers[n], nu)
        assert torch.equal(resumed_eg._prev[n], full_eg._prev[n])


def test_resume_with_another_per_layer_setting_is_refused():
    eg = ExponentiatedStepSize(1.0)
    with pytest.raises(ValueError, match="per_layer=True"):
        eg.load_state_dict({"per_layer": True, "nu": {}, "prev": {}, "steps": {}})


class InjectInf(L.Callback):
    """At the given optimizer steps (0-based, counted by this callback), put an inf into one gradient after the
    backward, so that the GradScaler finds it and skips the step."""

    def __init__(self, steps: set[int]) -> None:
        self.steps, self.count = steps, 0

    def on_after_backward(self, trainer, pl_module):
        if self.count in self.steps:
            next(pl_module.parameters()).grad.view(-1)[0] = float("inf")
        self.count += 1


def test_fp16_scaler_unscaled_gradients_and_skipped_steps():
    ds = make_data(n=40)
    model = _model(torch.float32)
    eg = ExponentiatedStepSize(5.0)
    before, snap = GradRecorder(), Snapshots(eg)
    precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
    t = trainer(plugins=[precision], callbacks=[InjectInf({2}), before, eg, snap])
    t.fit(model, loader(ds))
    assert len(before.grads) == 5
    assert torch.isinf(before.grads[2][next(iter(before.grads[2]))].view(-1)[0])
    # the skipped step left the state exactly as the step before it
    for key in ("nu", "prev"):
        for n, v in snap.states[1][key].items():
            assert torch.equal(snap.states[2][key][n], v), (key, n)
    assert snap.states[2]["steps"] == snap.states[1]["steps"]
    assert set(eg.steps.values()) == {4}
    # nu from the unscaled gradients of the steps taken (0, 1, 3, 4); the scaled ones are 4096 times larger
    taken = [before.grads[i] for i in (0, 1, 3, 4)]
    for n, nu in eg.multipliers.items():
        expected = torch.ones_like(nu)
        for a, b in itertools.pairwise(taken):
            expected = expected * torch.exp(5.0 * a[n] * b[n])
        torch.testing.assert_close(nu, expected, rtol=1e-5, atol=0, msg=n)
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fused_optimizer_scaled_gradients_give_the_same_nu():
    """A fused Adam unscales inside its step, so .grad still carries the loss scale in the hook: the callback
    divides by it, and nu matches the run with a plain Adam (up to the optimizers' own rounding)."""
    ds = make_data(n=32)
    nus = []
    for fused in (False, True):
        model = _model(torch.float32)
        model.configure_optimizers = lambda m=model, f=fused: torch.optim.Adam(m.parameters(), lr=0.01, fused=f)
        eg = ExponentiatedStepSize(5.0)
        precision = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=2.0**12))
        trainer(plugins=[precision], callbacks=[eg]).fit(model, loader(ds))
        nus.append(eg.multipliers)
    assert any(not torch.allclose(nu, torch.ones_like(nu)) for nu in nus[0].values())
    for n, nu in nus[0].items():
        torch.testing.assert_close(nus[1][n], nu, rtol=1e-3, atol=1e-4, msg=n)


def test_parameters_without_gradient_are_skipped():
    ds = make_data(n=24, dtype=torch.float64)
    model = _model()
    model.heads[1].requires_grad_(False)
    eg = ExponentiatedStepSize(5.0)
    _fit_eg(model, ds, eg)
    assert not any(n.startswith("heads.1") for n in eg.multipliers)
    assert eg.steps["trunk.0.weight"] == 3


# --- ProjectedWeightDecay in a Trainer ---------------------------------------------------------------------------
def _flat(tensors) -> torch.Tensor:
    return torch.cat([t.reshape(-1) for t in tensors])


def test_projected_decay_on_trained_weights():
    """Every step: <u, theta> >= 0 over the decayed tensors, u = g exactly when <g, theta> >= 0, u is the pure
    function of the concatenation, and biases keep their gradient."""
    ds = make_data(n=64, dtype=torch.float64)
    model = _model()
    trainer(precision="64-true", max_epochs=3).fit(model, loader(ds))  # trained weights
    g_rec, u_rec = GradRecorder(), GradRecorder()
    trainer(precision="64-true", max_epochs=2, callbacks=[g_rec, ProjectedWeightDecay(), u_rec]).fit(model, loader(ds))
    decayed = [n for n, p in model.named_parameters() if p.ndim >= 2]
    kept = [n for n, p in model.named_parameters() if p.ndim < 2]
    projected = 0
    for g, u, theta in zip(g_rec.grads, u_rec.grads, g_rec.params_before, strict=True):
        gf, uf, tf = (_flat(d[n] for n in decayed) for d in (g, u, theta))
        assert float(uf @ tf) >= -1e-12 * float(gf.norm() * tf.norm())
        if float(gf @ tf) >= 0:
            assert torch.equal(uf, gf)
        else:
            projected += 1
            assert abs(float(uf @ tf)) <= 1e-12 * float(gf.norm() * tf.norm())
        torch.testing.assert_close(uf, project_weight_decay(gf, tf), rtol=1e-12, atol=1e-15)
        for n in kept:
            assert torch.equal(u[n], g[n])
    assert 0 < projected < len(g_rec.grads)  # both cases happened


def _grad_setup(seed: int = 0) -> tuple[nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 5), nn.LayerNorm(5), nn.Linear(5, 3))
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt = torch.optim.SGD(
        [{"params": [model[0].weight, model[0].bias]}, {"params": [model[1].weight, model[1].bias, model[2].weight]}],
        lr=0.1,
    )
    return model, opt


def test_projection_per_group_per_tensor_and_no_decay():
    model, opt = _grad_setup()
    model[0].weight.grad = -2.0 * model[0].weight.detach()  # conflicts with its weights: projected to 0
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    ProjectedWeightDecay().project(opt.param_groups)
    torch.testing.assert_close(model[0].weight.grad, torch.zeros_like(model[0].weight), rtol=0, atol=1e-6)
    expected = project_weight_decay(g["2.weight"], model[2].weight.detach())  # alone in its group once 1-D are out
    torch.testing.assert_close(model[2].weight.grad, expected, rtol=1e-6, atol=1e-7)
    for n in ("0.bias", "1.weight", "1.bias"):  # no-decay parameters (LayerNorm gain too): untouched
        assert torch.equal(dict(model.named_parameters())[n].grad, g[n])

    model, opt = _grad_setup(1)
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    ProjectedWeightDecay(exclude_no_decay=False).project(opt.param_groups)
    params = dict(model.named_parameters())
    for names in (["0.weight", "0.bias"], ["1.weight", "1.bias", "2.weight"]):
        gf, tf = _flat(g[n] for n in names), _flat(params[n].detach() for n in names)
        torch.testing.assert_close(_flat(params[n].grad for n in names), project_weight_decay(gf, tf))
        assert float(_flat(params[n].grad for n in names) @ tf) >= -1e-5

    model, opt = _grad_setup(2)
    g = {n: p.grad.clone() for n, p in model.named_parameters()}
    ProjectedWeightDecay(per_tensor=True, exclude_no_decay=False).project(opt.param_groups)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, project_weight_decay(g[n], p.detach()))
        assert float((p.grad * p.detach()).sum()) >= -1e-5


def test_projection_skips_parameters_without_gradient_and_zero_weights():
    model, opt = _grad_setup()
    model[0].weight.grad = None
    with torch.no_grad():
        model[2].weight.zero_()
    g = model[2].weight.grad.clone()
    ProjectedWeightDecay().project(opt.param_groups)
    assert model[0].weight.grad is None
    assert torch.equal(model[2].weight.grad, g)  # ||theta|| = 0: left alone


# --- several processes ---------------------------------------------------------------------------------------------
class SaveState(L.Callback):
    """Every rank writes its parameters and the ExponentiatedStepSize multipliers to ``out/rank{r}.pt``."""

    def __init__(self, out: Path) -> None:
        self.out = out

    def on_train_end(self, trainer, pl_module):
        eg = next(c for c in trainer.callbacks if isinstance(c, ExponentiatedStepSize))
        params = [p.detach().cpu() for p in pl_module.parameters()]
        torch.save((params, eg.multipliers), self.out / f"rank{trainer.global_rank}.pt")


@pytest.mark.slow
def test_ddp_spawn_equals_one_process_on_the_concatenated_batch(tmp_path):
    from tests.test_distributed import InOrder

    ds = make_data(n=64, dtype=torch.float64)  # 4 steps of 2 x 8
    model = _model()

    def callbacks():
        return [ProjectedWeightDecay(), ExponentiatedStepSize(5.0, clamp=(0.25, 4.0))]

    trainer(
        strategy="ddp_spawn",
        devices=2,
        precision="64-true",
        callbacks=[*callbacks(), SaveState(tmp_path)],
        use_distributed_sampler=False,
    ).fit(copy.deepcopy(model), InOrder(ds, 8))
    (p0, nu0), (p1, nu1) = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    single = copy.deepcopy(model)
    one = callbacks()
    trainer(precision="64-true", callbacks=one).fit(single, loader(ds, 16))
    for a, b, c in zip(p0, p1, single.parameters(), strict=True):
        assert torch.equal(a, b), "ranks diverged"
        torch.testing.assert_close(a, c.detach(), rtol=0, atol=1e-10)
    for n, nu in one[1].multipliers.items():
        assert torch.equal(nu0[n], nu1[n])
        torch.testing.assert_close(nu0[n], nu, rtol=1e-10, atol=0)
    assert any(not torch.allclose(v, torch.ones_like(v)) for v in nu0.values())


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)  # hidden widths 7 and 5: uneven shards on 2 ranks (4 + 3 and 3 + 2 rows)
    return nn.Sequential(nn.Linear(6, 7), nn.Tanh(), nn.Linear(7, 5), nn.Tanh(), nn.Linear(5, 1))


FSDP2_CONFIGS = {"coordinate": (False, False), "layer": (True, True)}  # (per_layer, per_tensor)


def _fsdp2_loop(model, opt, batches, eg_factory, pwd, resume_at: int | None = None):
    """SGD on the mean-squared error; ProjectedWeightDecay then ExponentiatedStepSize before each step. At
    ``resume_at`` the ExponentiatedStepSize is replaced by a fresh one loaded from the old one's state_dict."""
    eg = eg_factory()
    for step, (x, y) in enumerate(batches):
        if step == resume_at:
            state = eg.state_dict()
            eg = eg_factory()
            eg.load_state_dict(state)
        opt.zero_grad()
        F.mse_loss(model(x).squeeze(-1), y[:, 0]).backward()
        pwd.project(opt.param_groups)
        eg.apply(model.named_parameters())
        opt.step()
    return eg.state_dict()


def _fsdp2_batches(rank: int, world: int, steps: int = 5, batch: int = 8):
    ds = make_data(n=steps * batch * world, k=1)
    x, y = ds.tensors
    return [
        (x[idx], y[idx])
        for idx in (torch.arange(s * batch * world, (s + 1) * batch * world)[rank::world] for s in range(steps))
    ]


def _fsdp2_worker(rank: int, world: int, port: int, out: str) -> None:
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (world,))
    results = {}
    for name, (per_layer, per_tensor) in FSDP2_CONFIGS.items():
        model = _mlp()
        for layer in model:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(model, mesh=mesh)
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        state = _fsdp2_loop(
            model,
            opt,
            _fsdp2_batches(rank, world),
            lambda pl=per_layer: ExponentiatedStepSize(20.0, per_layer=pl),
            ProjectedWeightDecay(per_tensor=per_tensor),
            resume_at=3,
        )
        params = {n: p.full_tensor().detach() for n, p in model.named_parameters()}
        results[name] = (params, state)
    torch.save(results, f"{out}/fsdp2_rank{rank}.pt")
    shut_down()


@pytest.mark.slow
def test_fsdp2_shards_equal_one_process(tmp_path):
    """fully_shard on 2 gloo processes, uneven shards: both callbacks (the decay's inner products and the per-layer
    multipliers all-reduced over the shards) give the parameters of one process on the concatenated batch, and the
    step-size state gathered by state_dict is the full one; a state_dict/load_state_dict round trip in the middle
    (gather, then each rank cuts its shard back) changes nothing."""
    port = 29500 + (os.getpid() + 357) % 1000
    mp.start_processes(_fsdp2_worker, args=(2, port, str(tmp_path)), nprocs=2, start_method="spawn", join=True)
    r0, r1 = torch.load(tmp_path / "fsdp2_rank0.pt"), torch.load(tmp_path / "fsdp2_rank1.pt")
    for name, (per_layer, per_tensor) in FSDP2_CONFIGS.items():
        model = _mlp()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        state = _fsdp2_loop(
            model,
            opt,
            _fsdp2_batches(0, 1, batch=16),
            lambda pl=per_layer: ExponentiatedStepSize(20.0, per_layer=pl),
            ProjectedWeightDecay(per_tensor=per_tensor),
        )
        for rank in (r0, r1):
            params, sharded_state = rank[name]
            for n, p in model.named_parameters():
                torch.testing.assert_close(params[n], p.detach(), rtol=1e-5, atol=1e-6, msg=f"{name}/{n}")
            assert sharded_state["steps"] == state["steps"]
            for key in ("nu", "prev"):
                for n, t in state[key].items():
                    assert sharded_state[key][n].shape == t.shape
                    torch.testing.assert_close(sharded_state[key][n], t, rtol=1e-4, atol=1e-6, msg=f"{name}/{key}/{n}")
        assert any(not torch.allclose(v, torch.ones_like(v)) for v in state["nu"].values())


# --- configuration -------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(gamma=-0.1), r"gamma=-0.1\) should be >= 0"),
        (dict(gamma=float("nan")), "finite number"),
        (dict(gamma="0.1"), "finite number"),
        (dict(gamma=0.1, per_layer="yes"), "True or False"),
        (dict(gamma=0.1, clamp=(0.0, 2.0)), "lo should be > 0"),
        (dict(gamma=0.1, clamp=(-1.0, 2.0)), "lo should be > 0"),
        (dict(gamma=0.1, clamp=(2.0, 0.5)), r"lo should be <= hi; swap them \(clamp=\(0.5, 2.0\)\)"),
        (dict(gamma=0.1, clamp=(1.5, 3.0)), "should contain 1"),
        (dict(gamma=0.1, clamp=(1.0,)), r"a pair \(lo, hi\)"),
        (dict(gamma=0.1, clamp=("a", 2.0)), "two numbers"),
        (dict(gamma=0.1, warmup_steps=-1), r"warmup_steps=-1\) should be >= 0"),
        (dict(gamma=0.1, warmup_steps=1.5), "should be an integer"),
    ],
)
def test_exponentiated_bad_arguments(kwargs, match):
    with pytest.raises(MisconfigurationException, match=match):
        ExponentiatedStepSize(**kwargs)


def test_projected_decay_bad_arguments():
    with pytest.raises(MisconfigurationException, match=r"per_tensor=...\) should be True or False"):
        ProjectedWeightDecay(per_tensor="yes")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match=r"exclude_no_decay=...\) should be True or False"):
        ProjectedWeightDecay(exclude_no_decay=1)  # type: ignore[arg-type]


def test_fsdp1_and_deepspeed_are_refused():
    from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy

    check_strategy(ModelParallelStrategy(), "X")
    with pytest.raises(MisconfigurationException, match="FSDP1"):
        check_strategy(FSDPStrategy(), "ProjectedWeightDecay")
    with pytest.raises(MisconfigurationException, match="DeepSpeed partitions"):
        check_strategy(DeepSpeedStrategy.__new__(DeepSpeedStrategy), "ExponentiatedStepSize")


def test_both_callbacks_from_lightning_cli_arguments(monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr(sys, "argv", ["lightning-mtl"])  # only ``args`` below

    args = [
        "--trainer.callbacks+=lightning_mtl.callbacks.ExponentiatedStepSize",
        "--trainer.callbacks.gamma=0.5",
        "--trainer.callbacks.clamp=[0.5, 2.0]",
        "--trainer.callbacks.warmup_steps=3",
        "--trainer.callbacks+=lightning_mtl.callbacks.ProjectedWeightDecay",
        "--trainer.callbacks.per_tensor=true",
        "--trainer.logger=false",
    ]
    cli = LightningCLI(TwoHeads, run=False, args=args, save_config_callback=None)
    eg = next(c for c in cli.trainer.callbacks if isinstance(c, ExponentiatedStepSize))
    pwd = next(c for c in cli.trainer.callbacks if isinstance(c, ProjectedWeightDecay))
    assert (eg.gamma, eg.clamp, eg.warmup_steps, eg.per_layer) == (0.5, (0.5, 2.0), 3, False)
    assert pwd.per_tensor and pwd.exclude_no_decay
