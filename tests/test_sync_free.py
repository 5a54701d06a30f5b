"""No host synchronisation in a training step: the engine (both modes, K <= 8 and K > 8, every weighting), the
callbacks' per-step hooks and the span losses, run on CPU with the accelerator branches forced and every operation
that would stall a GPU refused (``tests/_sync.py``); on CUDA the same under ``torch.cuda.set_sync_debug_mode``."""

from __future__ import annotations

import warnings

import pytest
import torch

import lightning_mtl as mtl
from lightning_mtl.callbacks import MultiTaskGradient
from tests._mtl_models import TwoHeads, loader, make_data, trainer
from tests._sync import HostSyncError, NoHostSync, accelerator_paths, check_hooks

WEIGHTINGS = {
    "Sum": mtl.Sum,
    "Mean": mtl.Mean,
    "GradNormalize": mtl.GradNormalize,
    "MGDA": mtl.MGDA,
    "MGDA-iterative": lambda: mtl.MGDA(method="iterative"),
    "PrimaryAuxiliary": lambda: mtl.PrimaryAuxiliary(primary="t0"),
    "PCGrad": mtl.PCGrad,
}

_STEP_HOOKS = ("on_before_backward", "on_before_optimizer_step")


def test_the_checker_catches_what_it_claims():
    t = torch.randn(4)
    for op in (
        lambda: t.sum().item(),
        lambda: bool(t.sum() > 0),
        lambda: t.tolist(),
        lambda: torch.tensor([1.0, 2.0]),
        lambda: t[t > 0],
        lambda: t.nonzero(),
        lambda: t[t.argmin()],
    ):
        with pytest.raises(HostSyncError), NoHostSync("test"):
            op()
    with NoHostSync("test"):  # kernels with Python scalars are fine
        torch.where(t > 0, t, float("-inf")).mul(2.0).add(torch.full((), 1.0)).numpy()


def _fit_checked(cb: MultiTaskGradient, k: int, accumulate: int = 1, **kw) -> None:
    model = TwoHeads(k=k)
    steps = {"n": 0}

    class Count(mtl_callback_base()):
        def on_train_batch_end(self, *a, **k) -> None:
            steps["n"] += 1

    check_hooks(cb, _STEP_HOOKS, active=lambda: steps["n"] >= accumulate)  # the first step finds the shared params
    t = trainer(callbacks=[cb, Count()], max_steps=3, accumulate_grad_batches=accumulate, log_every_n_steps=1000, **kw)
    t.fit(model, loader(make_data(n=64, k=k)))
    assert steps["n"] >= 2 * accumulate


def mtl_callback_base():
    import lightning as L

    return L.Callback


@pytest.mark.parametrize("name", list(WEIGHTINGS))
@pytest.mark.parametrize("mode", ["parameter", "representation"])
@pytest.mark.parametrize("k", [3, 9])
def test_engine_step_is_sync_free(monkeypatch, name, mode, k):
    with accelerator_paths(monkeypatch):
        _fit_checked(MultiTaskGradient(WEIGHTINGS[name](), mode=mode), k)


@pytest.mark.parametrize("mode", ["parameter", "representation"])
def test_engine_step_is_sync_free_with_accumulation_and_one_task(monkeypatch, mode):
    with accelerator_paths(monkeypatch):
        _fit_checked(MultiTaskGradient(mtl.MGDA(), mode=mode), 2, accumulate=2)
        _fit_checked(MultiTaskGradient(mtl.MGDA(), mode=mode), 1)


# --- the series callbacks and the scalarisers ---------------------------------------------------------------------
def _fp16() -> object:
    from lightning.pytorch.plugins.precision import MixedPrecision

    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))


@pytest.mark.parametrize("amp", ["fp32", "fp16", "fp16-fused"])
@pytest.mark.parametrize(
    "make",
    [
        lambda: _series().ExponentiatedStepSize(gamma=0.1, warmup_steps=1),
        lambda: _series().ExponentiatedStepSize(gamma=0.1, per_layer=True, clamp=(0.5, 2.0)),
        lambda: _series().ProjectedWeightDecay(),
    ],
    ids=["exponentiated", "exponentiated-per-layer", "projected-decay"],
)
def test_series_callbacks_step_is_sync_free(monkeypatch, make, amp):
    cb = make()
    model = TwoHeads(k=2, optimizer="adam" if amp == "fp16-fused" else "sgd")
    if amp == "fp16-fused":
        model.configure_optimizers = lambda: torch.optim.Adam(model.parameters(), lr=0.01, fused=True)
    steps = {"n": 0}

    class Count(mtl_callback_base()):
        def on_train_batch_end(self, *a, **k) -> None:
            steps["n"] += 1

    check_hooks(cb, ("on_before_optimizer_step",), active=lambda: steps["n"] >= 1)
    plugins = [_fp16()] if amp != "fp32" else []
    with accelerator_paths(monkeypatch):
        trainer(callbacks=[cb, Count()], max_steps=4, plugins=plugins, log_every_n_steps=1000).fit(
            model, loader(make_data(n=64))
        )
    assert steps["n"] == 4


def _series():
    import lightning_mtl.callbacks as callbacks

    return callbacks


@pytest.mark.parametrize(
    "make",
    [
        lambda: mtl.scalarize.InitialLossNormalization(warmup_steps=1),
        lambda: mtl.scalarize.InitialLossNormalization(initial={"a": 2.0, "b": 1.0}),
        lambda: mtl.scalarize.PriorLossNormalization({"a": 2.0, "b": 1.0}),
        lambda: mtl.scalarize.RealTimeNormalization(),
        lambda: mtl.scalarize.GeneralizedMean(gamma=2.0),
        lambda: mtl.scalarize.UncertaintyWeighting(["a", "b"]),
    ],
    ids=["initial-warmup", "initial-given", "prior", "real-time", "generalized-mean", "uncertainty"],
)
def test_scalarizers_are_sync_free_after_their_first_call(make):
    scalarizer = make()
    x = torch.tensor([1.0, 2.0], requires_grad=True)

    def losses() -> dict[str, torch.Tensor]:
        return {"a": x[0].square() + 1, "b": x[1].abs() + 0.5}

    scalarizer(losses()).backward()  # the first call may learn its initial losses
    with NoHostSync("scalarizer"):
        for _ in range(2):
            scalarizer(losses()).backward()
            scalarizer.terms(losses())


# --- what the accelerator paths defer -----------------------------------------------------------------------------
def test_off_the_host_a_bad_task_loss_is_reported_a_step_late_with_where_it_happened(monkeypatch):
    """On a GPU the validation verdict is read once its copy has landed: the error names the batch at fault."""

    class Bad(TwoHeads):
        def task_dict(self, batch):
            losses, z = super().task_dict(batch)
            if self.global_step == 1:
                losses["t1"] = losses["t1"] * float("nan")
            return losses, z

    with accelerator_paths(monkeypatch), pytest.raises(FloatingPointError, match=r"'t1'.*epoch 0, batch 1"):
        trainer(max_steps=4, callbacks=[MultiTaskGradient(mtl.MGDA())]).fit(Bad(), loader(make_data()))


def test_off_the_host_a_changed_loss_is_reported_by_the_end_of_the_epoch(monkeypatch):
    """The last micro-batch's verdict is read at the end of the epoch, where the loop waits anyway."""

    class Changed(TwoHeads):
        def training_step(self, batch, batch_idx):
            out = super().training_step(batch, batch_idx)
            return out * 2 if batch_idx == 3 else out  # the last batch of the epoch

    with accelerator_paths(monkeypatch), pytest.raises(ValueError, match="epoch 0, batch 3"):
        trainer(max_epochs=1, callbacks=[MultiTaskGradient(mtl.Sum())]).fit(Changed(), loader(make_data()))


def test_off_the_host_the_fallback_warning_waits_for_the_logging_interval(monkeypatch):
    weighting = mtl.MGDA()
    gram = torch.tensor([[1.0, float("nan")], [float("nan"), 1.0]], dtype=torch.float64)
    with accelerator_paths(monkeypatch):
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # no warning, and no read of the counter, at the call
            with NoHostSync("weighting"):
                w = weighting(gram)
        torch.testing.assert_close(w, torch.full((2,), 0.5, dtype=torch.float64))
        with pytest.warns(RuntimeWarning, match="not finite or not symmetric"):
            assert weighting.report_fallbacks() == 1


# --- the generic losses -------------------------------------------------------------------------------------------
def test_losses_are_sync_free(monkeypatch):
    from lightning_mtl import losses as L

    g = torch.Generator().manual_seed(0)
    scores = torch.randn(4, 3, 36, generator=g, requires_grad=True)
    dense = torch.rand(4, 3, 36, generator=g) > 0.8
    index = torch.randint(0, 36, (4, 3, 5), generator=g)
    nxm = torch.randn(4, 5, 6, generator=g, requires_grad=True)
    nxm_targets = torch.randint(0, 6, (4, 5), generator=g)
    soft = torch.softmax(torch.randn(4, 5, 6, generator=g), -1)
    mu = torch.randn(8, 10, generator=g, requires_grad=True)
    sigma = torch.rand(8, generator=g) + 0.5
    target = torch.randint(0, 10, (8,), generator=g)
    L.exact_loss(mu, 1.5, target)  # the first call caches the quadrature nodes on the device
    with accelerator_paths(monkeypatch), NoHostSync("losses"):
        total = (
            L.multilabel_crossentropy(scores, dense)
            + L.sparse_multilabel_crossentropy(scores, index)
            + L.nxm_crossentropy(nxm, nxm_targets)
            + L.nxm_crossentropy_soft(nxm, soft)
            + L.exact_loss(mu, sigma, target)
            + L.exact_loss(mu, 1.5, target)
        )
        total.backward()
    assert torch.isfinite(total)


def test_off_the_host_a_non_positive_sigma_gives_nan_instead_of_a_sync(monkeypatch):
    from lightning_mtl.losses import exact_loss

    mu, target = torch.randn(3, 4), torch.tensor([0, 1, 2])
    with pytest.raises(ValueError, match="sigma must be > 0"):
        exact_loss(mu, torch.tensor([1.0, 0.0, 1.0]), target, reduction="none")
    with accelerator_paths(monkeypatch):
        out = exact_loss(mu, torch.tensor([1.0, 0.0, 1.0]), target, reduction="none")
    assert out.isnan().tolist() == [False, True, False]


# --- the span models' training step -------------------------------------------------------------------------------
def _span_fit(kind: str, tiny: str, tmp_path, monkeypatch) -> int:
    """Three steps of a span model with every step after the first checked: the heads, the loss targets (built by the
    data module's loader and moved with the batch) and the losses. The encoder is Hugging Face's: its
    own checks (e.g. whether an attention mask is all ones) run outside the check."""
    import json

    import lightning as L
    from torch.utils._python_dispatch import _disable_current_modes

    from lightning_gen.span import RelationDataModule, RelationExtractor, SpanDataModule, SpanExtractor
    from tests.test_span_data import CONLL
    from tests.test_span_models import RELATIONS

    L.seed_everything(0)
    callbacks: list = []
    if kind == "relations":
        (tmp_path / "train.json").write_text(json.dumps(RELATIONS))
        model = RelationExtractor(model_name_or_path=tiny, head_size=8)
        data = RelationDataModule(train=str(tmp_path / "train.json"), val=str(tmp_path / "train.json"), batch_size=1)
        callbacks.append(MultiTaskGradient(mtl.GradNormalize(), mode="representation"))
    else:
        (tmp_path / "train.txt").write_text(CONLL)
        model = SpanExtractor(model_name_or_path=tiny, head_size=8, loss=kind)
        data = SpanDataModule(train=str(tmp_path / "train.txt"), val=str(tmp_path / "train.txt"), batch_size=1)
    encode = model.encode

    def hugging_face_encoder(*args, **kwargs):
        with _disable_current_modes():
            return encode(*args, **kwargs)

    model.encode = hugging_face_encoder
    steps = {"n": 0}

    class Count(mtl_callback_base()):
        def on_train_batch_end(self, *a, **k) -> None:
            steps["n"] += 1

    check_hooks(model, ("training_step",), active=lambda: steps["n"] >= 1)
    with accelerator_paths(monkeypatch):
        trainer(
            callbacks=[*callbacks, Count()], max_steps=3, log_every_n_steps=1000, limit_val_batches=0, max_epochs=3
        ).fit(model, data)
    assert data.pointer_targets == {}  # the model took its layout back at teardown
    return steps["n"]


@pytest.mark.parametrize("kind", ["dense", "sparse", "relations"])
def test_span_training_step_is_sync_free(kind, tmp_path, monkeypatch):
    from tests.test_span_data import make_tiny_encoder

    assert _span_fit(kind, make_tiny_encoder(tmp_path / "encoder"), tmp_path, monkeypatch) == 3
