"""Mixed precision: fp16 with a GradScaler (real fp16 on CPU through the MixedPrecision plugin), fused optimizers."""

from __future__ import annotations

import copy

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision

import lightning_mtl as mtl
from lightning_mtl.callbacks import MultiTaskGradient
from tests._mtl_models import GradRecorder, TwoHeads, loader, make_data, trainer


def fp16(init_scale: float = 2.0**16) -> MixedPrecision:
    return MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu", init_scale=init_scale))


def _flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.cat([g.float().reshape(-1) for _, g in sorted(grads.items())])


def _first_update(model, plugins, weighting, optimizer="sgd", **kw) -> torch.Tensor:
    recorder = GradRecorder()
    m = copy.deepcopy(model)
    m.optimizer = optimizer
    trainer(max_steps=1, plugins=plugins, callbacks=[MultiTaskGradient(weighting, **kw), recorder]).fit(
        m, loader(make_data(n=64), 64)
    )
    return _flat(recorder.grads[0])


@pytest.mark.parametrize("make", [mtl.MGDA, mtl.GradNormalize, lambda: mtl.PrimaryAuxiliary(0)])
def test_fp16_with_a_scaler_gives_the_fp32_direction(make):
    """The loss scale (2^16) must neither leak into the weights (g/|g| would strip it) nor into the update."""
    torch.manual_seed(0)
    model = TwoHeads(dim=6, hidden=32)
    ref = _first_update(model, [], make())
    half = _first_update(model, [fp16()], make())
    cos = F.cosine_similarity(ref, half, dim=0)
    assert float(cos) > 0.999
    assert float(half.norm() / ref.norm()) == pytest.approx(1.0, rel=0.02)  # unscaled, same size


@pytest.mark.parametrize("order", ["small task first", "small task last, explicit"])
def test_fp16_with_very_unbalanced_tasks(order):
    """Recovering the last task by subtraction costs eps·|sum g| of precision: with a 300x smaller task, either put
    it first (the dominant loss last) or compute it explicitly (subtract_last=False)."""
    torch.manual_seed(0)
    model = TwoHeads(dim=6, hidden=32)
    model.loss_scale = [1.0, 300.0] if order == "small task first" else [300.0, 1.0]
    kw = {} if order == "small task first" else {"subtract_last": False}
    ref = _first_update(model, [], mtl.GradNormalize())
    half = _first_update(model, [fp16(init_scale=2.0**6)], mtl.GradNormalize(), **kw)  # no overflow at step 1
    assert float(F.cosine_similarity(ref, half, dim=0)) > 0.999


def test_fused_optimizer_sees_consistently_scaled_gradients():
    """Fused Adam unscales inside its step, so .grad is still scaled in on_before_optimizer_step: the engine must
    weight with the true Gramian and write back in the scaled units."""
    torch.manual_seed(0)
    model = TwoHeads(dim=6, hidden=32, lr=1e-3)

    class FusedAdam(TwoHeads):
        def configure_optimizers(self):
            return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True)

    def run(m, plugins):
        cb = MultiTaskGradient(mtl.GradNormalize())
        trainer(max_steps=3, plugins=plugins, callbacks=[cb]).fit(m, loader(make_data(n=64), 16))
        return cb.engine.last_weights, torch.cat([p.detach().reshape(-1) for p in m.parameters()])

    fused = FusedAdam(dim=6, hidden=32, lr=1e-3)
    fused.load_state_dict(model.state_dict())
    plain = copy.deepcopy(model)
    plain.optimizer = "adam"
    w_fused, p_fused = run(fused, [fp16()])
    w_plain, p_plain = run(plain, [fp16()])
    torch.testing.assert_close(w_fused, w_plain, rtol=1e-2, atol=1e-3)  # weights of the true (unscaled) Gramian
    start = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    cos = F.cosine_similarity(p_fused - start, p_plain - start, dim=0)
    assert float(cos) > 0.999


class Snapshots(L.Callback):
    def __init__(self) -> None:
        self.params: list[torch.Tensor] = []
        self.scales: list[float] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append(torch.cat([p.detach().reshape(-1) for p in pl_module.parameters()]))
        self.scales.append(float(trainer.precision_plugin.scaler.get_scale()))


@pytest.mark.parametrize("mode", ["parameter", "representation"])
def test_an_inf_in_one_task_skips_the_step_and_training_goes_on(mode):
    class InfAtStep2(TwoHeads):
        def task_dict(self, batch):
            losses, z = super().task_dict(batch)
            if self.trainer.global_step == 2 and not getattr(self, "_fired", False):
                self._fired = True
                losses["t1"] = losses["t1"] * float("inf")
            return losses, z

    torch.manual_seed(0)
    model = InfAtStep2(dim=6, hidden=32)
    snaps = Snapshots()
    cb = MultiTaskGradient(mtl.MGDA(), mode=mode)
    with pytest.warns(RuntimeWarning, match="equal weights"):
        trainer(max_steps=5, plugins=[fp16()], callbacks=[cb, snaps]).fit(model, loader(make_data(n=64), 8))
    p = snaps.params
    assert all(torch.isfinite(x).all() for x in p)
    # batches 0, 1 step; batch 2 has the inf: skipped (no change), scale halved; batch 3 trains again
    assert not torch.equal(p[0], p[1])
    assert torch.equal(p[1], p[2])
    assert snaps.scales[2] == snaps.scales[1] / 2
    assert not torch.equal(p[2], p[3])
    assert int(cb.weighting.fallbacks) == 1
