"""MultiTaskGradient inside a real Trainer: exactness against brute force, semantics, checkpoints, bad use."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.loggers import CSVLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException

import lightning_mtl as mtl
from lightning_mtl.callbacks import MultiTaskGradient
from tests._mtl_models import GradRecorder, TwoHeads, loader, make_data, per_task_grads, trainer

WEIGHTINGS = {
    "mean": lambda: mtl.Mean(),
    "gradnorm": lambda: mtl.GradNormalize(),
    "mgda": lambda: mtl.MGDA(),
    "primary": lambda: mtl.PrimaryAuxiliary("t0"),
    "pcgrad": lambda: mtl.PCGrad(seed=5),
}


def _shared(module: TwoHeads) -> list[torch.nn.Parameter]:
    return list(module.trunk.parameters())


def _replay(module: TwoHeads, ds, recorder: GradRecorder, batch_size: int) -> list:
    """Rebuild each step's module and batch from what the recorder saw."""
    steps = []
    for i, params in enumerate(recorder.params_before):
        m = copy.deepcopy(module)
        m.load_state_dict(params)
        batch = ds[i * batch_size : (i + 1) * batch_size]
        steps.append((m, batch))
    return steps


@pytest.mark.parametrize("name", list(WEIGHTINGS))
@pytest.mark.parametrize("k", [2, 3])
def test_parameter_mode_equals_brute_force(name, k):
    """Per-task gradients of the shared parameters equal one backward per task (float64), the final .grad of the
    shared parameters is sum_k w_k g_k, and every head keeps its own task's gradient."""
    torch.manual_seed(0)
    ds = make_data(k=k, dtype=torch.float64)
    model = TwoHeads(k=k).double()
    reference_weighting = WEIGHTINGS[name]()
    reference_weighting.bind(model.names)
    recorder = GradRecorder()
    cb = MultiTaskGradient(WEIGHTINGS[name]())
    trainer(max_steps=3, precision="64-true", callbacks=[cb, recorder]).fit(copy.deepcopy(model), loader(ds))
    for step, (m, batch) in enumerate(_replay(model, ds, recorder, 8)):
        jac = per_task_grads(m, batch, _shared(m))
        w = reference_weighting(jac @ jac.T)
        expected = w @ jac
        got = torch.cat([recorder.grads[step][f"trunk.{n}"].reshape(-1) for n, _ in m.trunk.named_parameters()])
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        if step == 2:
            torch.testing.assert_close(cb.engine.last_weights, w)
        losses, _ = m.task_dict(batch)
        for i, (task, loss) in enumerate(losses.items()):
            head = m.heads[i]
            own = torch.autograd.grad(loss, list(head.parameters()), retain_graph=True)
            for (pn, _), g in zip(head.named_parameters(), own):
                torch.testing.assert_close(recorder.grads[step][f"heads.{i}.{pn}"], g, rtol=1e-12, atol=1e-14)
            del task


def test_explicit_last_task_equals_subtraction():
    ds = make_data(k=3, dtype=torch.float64)
    torch.manual_seed(0)
    model = TwoHeads(k=3).double()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    trainer(max_steps=3, precision="64-true", callbacks=[MultiTaskGradient(mtl.MGDA())]).fit(a, loader(ds))
    trainer(max_steps=3, precision="64-true", callbacks=[MultiTaskGradient(mtl.MGDA(), subtract_last=False)]).fit(
        b, loader(ds)
    )
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)


def test_a_reused_callback_rewrites_the_new_models_gradient():
    """One callback, two fits on two models: the second model must get the weighted gradient, not the plain sum."""
    ds = make_data(dtype=torch.float64)
    cb = MultiTaskGradient(mtl.GradNormalize())
    torch.manual_seed(0)
    trainer(max_steps=1, precision="64-true", callbacks=[cb]).fit(TwoHeads().double(), loader(ds))
    torch.manual_seed(1)
    second = TwoHeads().double()
    start = copy.deepcopy(second)
    recorder = GradRecorder()
    trainer(max_steps=1, precision="64-true", callbacks=[cb, recorder]).fit(second, loader(ds))
    jac = per_task_grads(start, ds[:8], _shared(start))
    expected = mtl.GradNormalize()(jac @ jac.T) @ jac
    got = torch.cat([recorder.grads[0][f"trunk.{n}"].reshape(-1) for n, _ in start.trunk.named_parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


def test_a_shared_parameter_without_gradient_keeps_none():
    """A shared parameter that no task reaches in a step keeps .grad None, so the optimizer skips it."""

    class Gated(TwoHeads):
        def __init__(self):
            super().__init__()
            self.extra = torch.nn.Linear(8, 8)  # shared by both heads, used only on even steps

        def forward(self, x):
            z = self.trunk(x)
            if self.global_step % 2 == 0:
                z = z + self.extra(z)
            return z, [h(z).squeeze(-1) for h in self.heads]

    class Check(L.Callback):
        def __init__(self):
            self.none_on_odd = []

        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step % 2 == 1:
                self.none_on_odd.append(pl_module.extra.weight.grad is None)

    check = Check()
    trainer(max_steps=4, callbacks=[MultiTaskGradient(mtl.MGDA()), check]).fit(Gated(), loader(make_data()))
    assert check.none_on_odd == [True, True]


@pytest.mark.parametrize("name", ["mgda", "gradnorm", "primary"])
def test_representation_mode_equals_brute_force(name):
    """The trunk receives the backward of sum_k w_k dL_k/dz with w from the Gramian of the dL_k/dz."""
    torch.manual_seed(0)
    ds = make_data(dtype=torch.float64)
    model = TwoHeads().double()
    ref = WEIGHTINGS[name]()
    ref.bind(model.names)
    recorder = GradRecorder()
    cb = MultiTaskGradient(WEIGHTINGS[name](), mode="representation")
    trainer(max_steps=3, precision="64-true", callbacks=[cb, recorder]).fit(copy.deepcopy(model), loader(ds))
    for step, (m, batch) in enumerate(_replay(model, ds, recorder, 8)):
        losses, z = m.task_dict(batch)
        d = torch.stack([torch.autograd.grad(v, z, retain_graph=True)[0].reshape(-1) for v in losses.values()])
        w = ref(d @ d.T)
        combined = (w @ d).view_as(z)
        expected = torch.autograd.grad(z, _shared(m), grad_outputs=combined)
        for (pn, _), g in zip(m.trunk.named_parameters(), expected):
            torch.testing.assert_close(recorder.grads[step][f"trunk.{pn}"], g, rtol=1e-9, atol=1e-12)


def test_parameter_mode_accumulation_equals_one_large_batch():
    """Documented semantics: with N micro-batches the weighting sees the task gradients of the whole accumulated
    batch, so accumulate_grad_batches=2 with batch 8 equals batch 16 (equal-sized micro-batches, mean losses)."""
    ds = make_data(n=32, dtype=torch.float64)
    torch.manual_seed(0)
    model = TwoHeads().double()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    trainer(
        max_epochs=2,
        precision="64-true",
        accumulate_grad_batches=2,
        callbacks=[MultiTaskGradient(mtl.MGDA())],
    ).fit(a, loader(ds, 8))
    trainer(max_epochs=2, precision="64-true", callbacks=[MultiTaskGradient(mtl.MGDA())]).fit(b, loader(ds, 16))
    for pa, pb in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-10, atol=1e-12)


def test_representation_mode_accumulation_weights_each_micro_batch():
    """Documented semantics: each micro-batch is combined with its own weights; the step uses their mean."""
    ds = make_data(n=16, dtype=torch.float64)
    torch.manual_seed(0)
    model = TwoHeads().double()
    recorder = GradRecorder()
    trainer(
        max_steps=1,
        precision="64-true",
        accumulate_grad_batches=2,
        callbacks=[MultiTaskGradient(mtl.MGDA(), mode="representation"), recorder],
    ).fit(copy.deepcopy(model), loader(ds))
    expected = [torch.zeros_like(p) for p in _shared(model)]
    for micro in range(2):
        losses, z = model.task_dict(ds[micro * 8 : (micro + 1) * 8])
        d = torch.stack([torch.autograd.grad(v, z, retain_graph=True)[0].reshape(-1) for v in losses.values()])
        w = mtl.MGDA()(d @ d.T)
        grads = torch.autograd.grad(z, _shared(model), grad_outputs=(w @ d).view_as(z) / 2)
        expected = [e + g for e, g in zip(expected, grads)]
    for (pn, _), e in zip(model.trunk.named_parameters(), expected):
        torch.testing.assert_close(recorder.grads[0][f"trunk.{pn}"], e, rtol=1e-9, atol=1e-12)


def test_task_losses_without_the_callback_trains_like_the_plain_sum():
    ds = make_data()
    torch.manual_seed(0)
    model = TwoHeads()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    b.return_plain = True
    trainer(max_epochs=2).fit(a, loader(ds))
    trainer(max_epochs=2).fit(b, loader(ds))
    for pa, pb in zip(a.parameters(), b.parameters()):
        assert torch.equal(pa, pb)


def test_clipping_acts_on_the_rewritten_gradient():
    ds = make_data(dtype=torch.float64)
    torch.manual_seed(0)
    model = TwoHeads(lr=1.0).double()
    trained = copy.deepcopy(model)
    recorder = GradRecorder()
    trainer(
        max_steps=1,
        precision="64-true",
        gradient_clip_val=1e-3,
        gradient_clip_algorithm="norm",
        callbacks=[MultiTaskGradient(mtl.GradNormalize()), recorder],
    ).fit(trained, loader(ds))
    rewritten = torch.cat([g.reshape(-1) for g in recorder.grads[0].values()])
    step = torch.cat([(p0 - p1).reshape(-1) for p0, p1 in zip(model.parameters(), trained.parameters())])
    assert float(step.norm()) == pytest.approx(1e-3, rel=1e-4)  # lr=1: the step is the clipped gradient
    torch.testing.assert_close(step / step.norm(), rewritten / rewritten.norm(), rtol=1e-8, atol=1e-10)


def test_resume_from_a_checkpoint_continues_exactly(tmp_path):
    """PCGrad draws random orders and Adam has state: both must come back from the checkpoint."""
    ds = make_data(n=32)
    torch.manual_seed(0)
    model = TwoHeads(k=3, optimizer="adam", lr=0.01)
    ds = make_data(n=32, k=3)

    def run(m, epochs, ckpt=None):
        t = trainer(max_epochs=epochs, callbacks=[MultiTaskGradient(mtl.PCGrad(seed=1))], default_root_dir=tmp_path)
        t.fit(m, loader(ds), ckpt_path=ckpt)
        return t

    full = copy.deepcopy(model)
    run(full, 3)
    first = copy.deepcopy(model)
    t = run(first, 1)
    t.save_checkpoint(tmp_path / "mid.ckpt")
    resumed = copy.deepcopy(model)
    run(resumed, 3, ckpt=str(tmp_path / "mid.ckpt"))
    for pa, pb in zip(full.parameters(), resumed.parameters()):
        assert torch.equal(pa, pb)
    state = torch.load(tmp_path / "mid.ckpt", weights_only=False)["callbacks"]
    assert any("MultiTaskGradient" in key for key in state)


def test_bf16_mixed_trains_and_stays_finite():
    ds = make_data(n=64)
    torch.manual_seed(0)
    model = TwoHeads()
    cb = MultiTaskGradient(mtl.MGDA())
    trainer(max_epochs=3, precision="bf16-mixed", callbacks=[cb]).fit(model, loader(ds))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert cb.engine.steps == 24 and torch.isfinite(cb.engine.last_weights).all()


def test_logs_weights_norms_and_cosines(tmp_path):
    ds = make_data()
    cb = MultiTaskGradient(mtl.MGDA())
    logger = CSVLogger(tmp_path, name="run")
    trainer(max_steps=2, logger=logger, log_every_n_steps=1, callbacks=[cb]).fit(TwoHeads(), loader(ds))
    header = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()[0]
    for key in ["mtl/weight/t0", "mtl/weight/t1", "mtl/grad_norm/t0", "mtl/cos/t0~t1"]:
        assert key in header


# --- bad use ------------------------------------------------------------------------------------------------------
def test_plain_loss_with_the_callback_is_an_error():
    model = TwoHeads()
    model.return_plain = True
    with pytest.raises(ValueError, match=r"did not return lightning_mtl\.task_losses"):
        trainer(max_steps=1, callbacks=[MultiTaskGradient(mtl.Mean())]).fit(model, loader(make_data()))


def test_modified_return_value_is_an_error():
    class Extra(TwoHeads):
        def training_step(self, batch, batch_idx):
            return super().training_step(batch, batch_idx) + 0.5 * self.trunk[0].weight.square().sum()

    with pytest.raises(ValueError, match="unchanged"):
        trainer(max_steps=1, callbacks=[MultiTaskGradient(mtl.Mean())]).fit(Extra(), loader(make_data()))


def test_non_scalar_and_non_tensor_losses():
    m = TwoHeads()
    with pytest.raises(ValueError, match="must be a scalar"):
        mtl.task_losses(m, {"a": torch.ones(3)})
    with pytest.raises(TypeError, match="not a Tensor"):
        mtl.task_losses(m, {"a": 1.0})
    with pytest.raises(ValueError, match="non-empty"):
        mtl.task_losses(m, {})


def test_non_finite_task_loss_is_an_error_without_a_scaler():
    class Bad(TwoHeads):
        def task_dict(self, batch):
            losses, z = super().task_dict(batch)
            losses["t1"] = losses["t1"] * float("nan")
            return losses, z

    model = Bad()
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(FloatingPointError, match="t1"):
        trainer(max_steps=1, callbacks=[MultiTaskGradient(mtl.MGDA())]).fit(model, loader(make_data()))
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # nothing reached the parameters


def test_task_set_change_is_an_error():
    class Changing(TwoHeads):
        def task_dict(self, batch):
            losses, z = super().task_dict(batch)
            if self.global_step == 1:
                losses.pop("t1")
            return losses, z

    with pytest.raises(ValueError, match="tasks changed between steps"):
        trainer(max_steps=3, callbacks=[MultiTaskGradient(mtl.MGDA())]).fit(Changing(), loader(make_data()))


def test_unknown_primary_is_an_error_at_the_first_step():
    with pytest.raises(ValueError, match="'clean' is not among the tasks"):
        trainer(max_steps=1, callbacks=[MultiTaskGradient(mtl.PrimaryAuxiliary("clean"))]).fit(
            TwoHeads(), loader(make_data())
        )


def test_manual_optimisation_is_refused_at_setup():
    class Manual(TwoHeads):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            opt = self.optimizers()
            loss = super().training_step(batch, batch_idx)
            self.manual_backward(loss)
            opt.step()
            opt.zero_grad()

    with pytest.raises(MisconfigurationException, match="automatic optimisation"):
        trainer(max_steps=1, callbacks=[MultiTaskGradient(mtl.Mean())]).fit(Manual(), loader(make_data()))


def test_representation_mode_needs_a_live_shared_tensor():
    class Detached(TwoHeads):
        def training_step(self, batch, batch_idx):
            losses, z = self.task_dict(batch)
            return mtl.task_losses(self, losses, shared=z.detach())

    class Missing(TwoHeads):
        def training_step(self, batch, batch_idx):
            losses, _ = self.task_dict(batch)
            return mtl.task_losses(self, losses)

    with pytest.raises(ValueError, match="does not require grad"):
        trainer(max_steps=1, callbacks=[MultiTaskGradient(mtl.Mean(), mode="representation")]).fit(
            Detached(), loader(make_data())
        )
    with pytest.raises(ValueError, match="needs the shared features"):
        trainer(max_steps=1, callbacks=[MultiTaskGradient(mtl.Mean(), mode="representation")]).fit(
            Missing(), loader(make_data())
        )


def test_constructor_validation():
    with pytest.raises(MisconfigurationException, match="mode"):
        MultiTaskGradient(mtl.Mean(), mode="both")
    with pytest.raises(MisconfigurationException, match="rank_local"):
        MultiTaskGradient(mtl.Mean(), rank_local=True)
    with pytest.raises(TypeError, match="Weighting"):
        MultiTaskGradient("mgda")


def test_no_shared_parameter_is_an_error():
    class Separate(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(3, 1)
            self.b = torch.nn.Linear(3, 1)

        def training_step(self, batch, batch_idx):
            x, y = batch
            return mtl.task_losses(
                self,
                {
                    "a": F.mse_loss(self.a(x[:, :3]).squeeze(-1), y[:, 0]),
                    "b": F.mse_loss(self.b(x[:, :3]).squeeze(-1), y[:, 1]),
                },
            )

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.1)

    with pytest.raises(ValueError, match="No parameter is reached by more than one task"):
        trainer(max_steps=1, callbacks=[MultiTaskGradient(mtl.Mean())]).fit(Separate(), loader(make_data()))


# --- named shared parameters --------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "shared",
    ["trunk", ["trunk.0", "trunk.2"], lambda m: m.trunk, lambda m: list(m.trunk.parameters())],
    ids=["path", "paths", "callable-module", "callable-parameters"],
)
def test_named_shared_parameters_equal_the_found_ones(shared):
    ds = make_data(dtype=torch.float64)
    torch.manual_seed(0)
    model = TwoHeads().double()
    found, named = copy.deepcopy(model), copy.deepcopy(model)
    trainer(max_steps=3, precision="64-true", callbacks=[MultiTaskGradient(mtl.MGDA())]).fit(found, loader(ds))
    cb = MultiTaskGradient(mtl.MGDA(), shared_parameters=shared)
    trainer(max_steps=3, precision="64-true", callbacks=[cb]).fit(named, loader(ds))
    assert [id(p) for p in cb.engine.shared_params] == [id(p) for p in named.trunk.parameters()]
    for pa, pb in zip(found.parameters(), named.parameters()):
        assert torch.equal(pa, pb)


def test_named_shared_parameters_are_used_exactly():
    """Only the named layer is combined; the rest keeps the plain sum of the task gradients (the backward's)."""
    ds = make_data(dtype=torch.float64)
    torch.manual_seed(0)
    model = TwoHeads().double()
    recorder = GradRecorder()
    cb = MultiTaskGradient(mtl.GradNormalize(), shared_parameters="trunk.2")
    trainer(max_steps=1, precision="64-true", callbacks=[cb, recorder]).fit(copy.deepcopy(model), loader(ds))
    named = list(model.trunk[2].parameters())
    jac = per_task_grads(model, ds[:8], named)
    expected = mtl.GradNormalize()(jac @ jac.T) @ jac
    got = torch.cat([recorder.grads[0][f"trunk.2.{n}"].reshape(-1) for n, _ in model.trunk[2].named_parameters()])
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    plain = per_task_grads(model, ds[:8], [model.trunk[0].weight]).sum(0).view_as(model.trunk[0].weight)
    torch.testing.assert_close(recorder.grads[0]["trunk.0.weight"], plain, rtol=1e-9, atol=1e-12)


def test_named_shared_parameters_bad_use():
    with pytest.raises(ValueError, match="'stem' is neither a submodule nor a parameter of TwoHeads"):
        trainer(max_steps=1, callbacks=[MultiTaskGradient(mtl.MGDA(), shared_parameters="stem")]).fit(
            TwoHeads(), loader(make_data())
        )
    stranger = torch.nn.Linear(2, 2)
    with pytest.raises(ValueError, match="not parameters of TwoHeads"):
        trainer(max_steps=1, callbacks=[MultiTaskGradient(mtl.MGDA(), shared_parameters=stranger)]).fit(
            TwoHeads(), loader(make_data())
        )
    with pytest.raises(MisconfigurationException, match="only applies to mode='parameter'"):
        MultiTaskGradient(mtl.MGDA(), mode="representation", shared_parameters="trunk")


# --- one task -------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["parameter", "representation"])
def test_one_task_trains_bit_for_bit_as_without_the_callback(mode, tmp_path):
    """K = 1: nothing to weight. Even a weighting that would rescale (GradNormalize(scale="unit") gives 1/|g|) must
    leave training exactly as without the callback; one warning; the logged weight is 1 and the logged norm is the
    true one (the whole gradient in parameter mode, dL/dz in representation mode)."""
    ds = make_data(k=1)
    torch.manual_seed(0)
    model = TwoHeads(k=1)
    with_cb, without = copy.deepcopy(model), copy.deepcopy(model)
    cb = MultiTaskGradient(mtl.GradNormalize(scale="unit"), mode=mode)
    recorder = GradRecorder()
    logger = CSVLogger(tmp_path, name="run")
    with pytest.warns(UserWarning, match="Only one task loss") as caught:
        trainer(max_epochs=2, logger=logger, log_every_n_steps=1, callbacks=[cb, recorder]).fit(with_cb, loader(ds))
    trainer(max_epochs=2).fit(without, loader(ds))
    for pa, pb in zip(with_cb.parameters(), without.parameters()):
        assert torch.equal(pa, pb)
    assert sum("Only one task loss" in str(w.message) for w in caught) == 1

    last = len(recorder.grads) - 1
    if mode == "parameter":
        expected = torch.cat([g.reshape(-1) for g in recorder.grads[last].values()]).double().norm()
    else:
        m = copy.deepcopy(model)
        m.load_state_dict(recorder.params_before[last])
        losses, z = m.task_dict(ds[(last % 4) * 8 : (last % 4 + 1) * 8])
        expected = torch.autograd.grad(losses["t0"], z)[0].double().norm()
    step = cb.last_step
    assert step.tasks == ("t0",) and step.weights.tolist() == [1.0]
    torch.testing.assert_close(step.norms[0], expected, rtol=1e-6, atol=0)
    rows = (tmp_path / "run" / "version_0" / "metrics.csv").read_text().splitlines()
    header, values = rows[0].split(","), rows[-1].split(",")
    logged = dict(zip(header, values))
    assert float(logged["mtl/weight/t0"]) == 1.0
    assert float(logged["mtl/grad_norm/t0"]) == pytest.approx(float(expected), rel=1e-5)


# --- manual optimisation: the engine driven by hand -----------------------------------------------------------------
def test_manual_optimisation_refusal_points_to_engine_backward():
    class Manual(TwoHeads):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False

        def training_step(self, batch, batch_idx):
            return None

    with pytest.raises(MisconfigurationException, match=r"engine\.backward\(.*backward=self\.manual_backward"):
        trainer(max_steps=1, callbacks=[MultiTaskGradient(mtl.Mean())]).fit(Manual(), loader(make_data()))


def test_manual_optimisation_with_two_optimizers_matches_the_callback():
    """What the refusal message says to do: engine.backward(..., backward=self.manual_backward), engine.apply(), then
    the optimizers' steps; with one optimizer for the trunk and one for the heads it takes the callback's steps."""

    class TwoOptimizers(TwoHeads):
        def __init__(self):
            super().__init__()
            self.automatic_optimization = False
            self.engine = mtl.GradientEngine(mtl.MGDA())

        def training_step(self, batch, batch_idx):
            trunk_opt, heads_opt = self.optimizers()
            losses, _ = self.task_dict(batch)
            trunk_opt.zero_grad()
            heads_opt.zero_grad()
            self.engine.backward(losses, module=self, backward=self.manual_backward)
            self.engine.apply()
            trunk_opt.step()
            heads_opt.step()

        def configure_optimizers(self):
            return [
                torch.optim.SGD(self.trunk.parameters(), lr=self.lr),
                torch.optim.SGD(self.heads.parameters(), lr=self.lr),
            ]

    ds = make_data(dtype=torch.float64)
    torch.manual_seed(0)
    manual = TwoOptimizers().double()
    automatic = TwoHeads().double()
    automatic.load_state_dict(manual.state_dict())
    trainer(max_epochs=2, precision="64-true").fit(manual, loader(ds))
    trainer(max_epochs=2, precision="64-true", callbacks=[MultiTaskGradient(mtl.MGDA())]).fit(automatic, loader(ds))
    assert manual.engine.steps == 8
    for pa, pb in zip(manual.parameters(), automatic.parameters()):
        torch.testing.assert_close(pa, pb, rtol=1e-12, atol=1e-14)
