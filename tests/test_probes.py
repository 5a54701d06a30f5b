"""Tests of the training probes (lightning_mtl.callbacks.GradientMagnitudeProbe/ResidualProbe, lightning_mtl.probes)."""

from __future__ import annotations

import copy
import csv
import json
import math
import os

import lightning.pytorch as pl
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.callbacks import GradientMagnitudeProbe, ResidualProbe
from lightning_mtl.probes import find_residual_blocks, parameter_stats, reduce_sharded_rows, select_layers
from tests._distributed import shut_down

pytestmark = pytest.mark.usefixtures("one_thread")


# ------------------------------------------------------------------------------------------------------------------
# tiny models
# ------------------------------------------------------------------------------------------------------------------
class Block(nn.Module):
    def __init__(self, width: int, eps: float, dropout: float = 0.0, norm: bool = False) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(width, width), nn.Tanh(), nn.Dropout(dropout))
        self.norm = nn.BatchNorm1d(width) if norm else nn.Identity()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x + self.eps * self.ffn(x))


class Net(pl.LightningModule):
    def __init__(
        self, depth: int = 3, width: int = 4, eps: float = 0.5, opt: str = "sgd", lr: float = 0.1, **kw: object
    ) -> None:
        super().__init__()
        self.inp = nn.Linear(3, width)
        self.blocks = nn.ModuleList([Block(width, eps, **kw) for _ in range(depth)])  # type: ignore[arg-type]
        self.out = nn.Linear(width, 2)
        self.opt, self.lr = opt, lr

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.out(h)

    def loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        x, y = batch
        return nn.functional.mse_loss(self(x), y)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        loss = self.loss(batch)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        if self.opt == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def data(n: int = 16, batch: int = 8, seed: int = 0) -> DataLoader:
    g = torch.Generator().manual_seed(seed)
    ds = TensorDataset(torch.randn(n, 3, generator=g), torch.randn(n, 2, generator=g))
    return DataLoader(ds, batch_size=batch, shuffle=False)


def trainer(tmp_path, steps: int, callbacks=(), **kw) -> pl.Trainer:  # type: ignore[no-untyped-def]
    opts = dict(
        max_steps=steps,
        logger=False,
        enable_progress_bar=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        devices=1,
    )
    opts.update(kw)
    return pl.Trainer(callbacks=list(callbacks), **opts)


# ------------------------------------------------------------------------------------------------------------------
# hand computations
# ------------------------------------------------------------------------------------------------------------------
def test_gradient_probe_equals_hand_computation_sgd(tmp_path):
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    probe = GradientMagnitudeProbe(every_n_steps=2)
    trainer(tmp_path, 2, [probe]).fit(model, data())

    # by hand: SGD step 1 on batch 0, then step 2 on batch 1 (the probe step)
    batches = list(data())
    opt = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt.zero_grad()
    ref.loss(batches[0]).backward()
    opt.step()
    opt.zero_grad()
    loss_before = ref.loss(batches[1])
    loss_before.backward()
    before = {n: p.detach().clone() for n, p in ref.named_parameters()}
    grads = {n: p.grad.clone() for n, p in ref.named_parameters()}
    opt.step()
    with torch.no_grad():
        loss_after = ref.loss(batches[1])

    assert [h["step"] for h in probe.history] == [1, 2]  # the first step of fit is always probed
    entry = probe.history[-1]
    total = math.sqrt(sum(float(g.square().sum()) for g in grads.values()))
    assert entry["grad_norm/total"] == pytest.approx(total, rel=1e-6)
    layer = "blocks.1.ffn.0"
    g_l = math.sqrt(float(grads[f"{layer}.weight"].square().sum() + grads[f"{layer}.bias"].square().sum()))
    assert entry[f"grad_norm/{layer}"] == pytest.approx(g_l, rel=1e-6)
    d = sum(
        float((ref.get_parameter(f"{layer}.{k}").detach() - before[f"{layer}.{k}"]).square().sum())
        for k in ("weight", "bias")
    )
    w = sum(float(before[f"{layer}.{k}"].square().sum()) for k in ("weight", "bias"))
    assert entry[f"update_ratio/{layer}"] == pytest.approx(math.sqrt(d / w), rel=1e-5)
    assert entry["loss_change/predicted"] == pytest.approx(-0.1 * total**2, rel=1e-6)
    assert entry["loss_change/linear"] == pytest.approx(-0.1 * total**2, rel=1e-4)  # plain SGD: <g, -ηg>
    assert entry["loss_change/observed"] == pytest.approx(float(loss_after - loss_before.detach()), rel=1e-5, abs=1e-8)
    assert probe.layer_names == ["inp", "blocks.0.ffn.0", "blocks.1.ffn.0", "blocks.2.ffn.0", "out"]
    # the trained model equals the hand-trained one
    for (_, p), (_, q) in zip(model.named_parameters(), ref.named_parameters(), strict=True):
        torch.testing.assert_close(p, q)


def test_adam_first_step_is_sign_descent(tmp_path):
    """First bias-corrected Adam step is -η·sign(g): <g, Δθ> = -η‖g‖₁, the article's Adam prediction."""
    torch.manual_seed(0)
    probe = GradientMagnitudeProbe(every_n_steps=1)
    trainer(tmp_path, 1, [probe]).fit(Net(opt="adam", lr=1e-3), data())
    (entry,) = probe.history
    assert entry["loss_change/predicted"] == entry["loss_change/predicted_adam"]
    assert entry["loss_change/linear"] == pytest.approx(entry["loss_change/predicted_adam"], rel=1e-3)
    assert entry["loss_change/observed"] < 0


def test_gradient_is_read_before_clipping(tmp_path):
    """‖g‖ and <g, Δθ> use the gradient of the loss, not the clipped one the optimizer receives."""
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    probe = GradientMagnitudeProbe(every_n_steps=1)
    trainer(tmp_path, 1, [probe], gradient_clip_val=0.01).fit(model, data())
    ref.loss(next(iter(data()))).backward()
    g = torch.cat([p.grad.reshape(-1) for p in ref.parameters()])
    delta = torch.cat([(p - q).detach().reshape(-1) for p, q in zip(model.parameters(), ref.parameters(), strict=True)])
    torch.testing.assert_close(delta, -0.1 * 0.01 * g / g.norm(), rtol=1e-4, atol=5e-8)  # SGD on the clipped g (fp32 θ)
    (entry,) = probe.history
    assert entry["grad_norm/total"] == pytest.approx(float(g.norm()), rel=1e-6)  # not 0.01
    assert entry["loss_change/linear"] == pytest.approx(float(g @ delta), rel=1e-4)  # = -0.1 * 0.01 * |g|
    assert entry["loss_change/predicted"] == pytest.approx(-0.1 * float(g.norm()) ** 2, rel=1e-5)  # no clipping


def test_residual_probe_equals_hand_computation(tmp_path):
    torch.manual_seed(0)
    model = Net(depth=3, eps=0.5)
    ref = copy.deepcopy(model)
    probe = ResidualProbe(every_n_steps=2, probe_size=5)
    trainer(tmp_path, 4, [probe]).fit(model, data())
    assert probe.block_names == ["blocks.0", "blocks.1", "blocks.2"]
    assert [h["step"] for h in probe.history] == [0, 1, 2, 4]  # reference, first step, every 2nd
    x = next(iter(data()))[0][:5]
    with torch.no_grad():
        h0 = ref.inp(x)
        branch = 0.5 * ref.blocks[0].ffn(h0)
        out0, out4 = ref(x), model(x)
    assert probe.history[0]["branch_ratio/blocks.0"] == pytest.approx(float(branch.norm() / h0.norm()), rel=1e-6)
    assert probe.history[0]["model_update"] == 0
    assert probe.history[-1]["model_update"] == pytest.approx(float((out4 - out0).norm()), rel=1e-5)
    assert probe.history[-1]["model_update/relative"] == pytest.approx(
        float((out4 - out0).norm() / out0.norm()), rel=1e-5
    )
    assert probe.history[-1]["output_norm"] == pytest.approx(float(out4.norm()), rel=1e-6)


def test_math_helpers():
    names = ["a", "b.0", "b.1", "b.2", "c"]
    assert select_layers(names, "all") == names
    assert select_layers(names, "first,middle,last") == ["a", "b.1", "c"]
    assert select_layers(names, "0,-2") == ["a", "b.2"]
    assert select_layers(names, r"^b\.") == ["b.0", "b.1", "b.2"]
    with pytest.raises(ValueError, match="matches none of the 5 layers"):
        select_layers(names, "nothing_like_this")
    p = [torch.tensor([3.0, -4.0])]
    rows = parameter_stats(p, [torch.tensor([1.0, -2.0])], [torch.tensor([3.0, -3.0])])
    torch.testing.assert_close(rows, torch.tensor([[5.0, 3.0, 1.0, 18.0, 2.0]], dtype=torch.float64))
    no_update = parameter_stats(p, [None], None)  # missing gradient = 0; weight column from the params
    torch.testing.assert_close(no_update, torch.tensor([[0.0, 0.0, 0.0, 25.0, 0.0]], dtype=torch.float64))
    assert reduce_sharded_rows(rows, p) is rows  # plain tensors: nothing to reduce


# ------------------------------------------------------------------------------------------------------------------
# no effect on training
# ------------------------------------------------------------------------------------------------------------------
def _train(tmp_path, callbacks):  # type: ignore[no-untyped-def]
    torch.manual_seed(1)
    model = Net(depth=3, width=6, eps=1.0, opt="adam", lr=1e-2, dropout=0.3, norm=True)
    trainer(tmp_path, 6, callbacks).fit(model, data(n=32))
    return model, torch.get_rng_state()


def test_probes_do_not_change_training_bitwise(tmp_path):
    plain, rng_plain = _train(tmp_path / "a", [])
    probes = [GradientMagnitudeProbe(every_n_steps=2), ResidualProbe(every_n_steps=2)]
    probed, rng_probed = _train(tmp_path / "b", probes)
    assert len(probes[0].history) == 4 and len(probes[1].history) == 5  # steps (0,) 1, 2, 4, 6
    assert "loss_change/observed" in probes[0].history[0]
    for (n, a), (_, b) in zip(plain.state_dict().items(), probed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n  # parameters and BatchNorm buffers
    assert torch.equal(rng_plain, rng_probed)
    assert probed.training and all(m.training for m in probed.modules())


# ------------------------------------------------------------------------------------------------------------------
# logging, plots, options
# ------------------------------------------------------------------------------------------------------------------
def test_logger_gets_selected_layers_and_png(tmp_path):
    torch.manual_seed(0)
    logger = CSVLogger(tmp_path, name="run")
    gp, rp = GradientMagnitudeProbe(every_n_steps=2), ResidualProbe(every_n_steps=2, log_blocks="last")
    trainer(tmp_path, 4, [gp, rp], logger=logger, log_every_n_steps=1).fit(Net(depth=4), data())
    with open(os.path.join(logger.log_dir, "metrics.csv")) as f:
        header = next(csv.reader(f))
    assert "probe/grad_norm/total" in header and "probe/model_update" in header
    layer_keys = sorted(k for k in header if k.startswith("probe/grad_norm/") and k != "probe/grad_norm/total")
    assert layer_keys == ["probe/grad_norm/blocks.2.ffn.0", "probe/grad_norm/inp", "probe/grad_norm/out"]
    assert [k for k in header if k.startswith("probe/branch_ratio/")] == ["probe/branch_ratio/blocks.3"]
    assert len([k for k in gp.history[0] if k.startswith("grad_norm/")]) == 7  # all layers kept on the callback
    assert gp.plot_path == os.path.join(logger.log_dir, "gradient_magnitude_probe.png")
    assert os.path.getsize(gp.plot_path) > 1000 and os.path.getsize(rp.plot_path) > 1000


def test_no_logger_keeps_history_and_writes_png_to_root_dir(tmp_path, caplog):
    probe = GradientMagnitudeProbe(every_n_steps=1, layers=r"blocks\.\d\.ffn", loss_change=False)
    with caplog.at_level("INFO"):
        trainer(tmp_path, 2, [probe]).fit(Net(), data())
    assert sum("has no logger" in r.getMessage() for r in caplog.records) == 1
    assert probe.layer_names == ["blocks.0.ffn.0", "blocks.1.ffn.0", "blocks.2.ffn.0"]
    assert len(probe.history) == 2 and "loss_change/observed" not in probe.history[0]
    assert probe.plot_path == os.path.join(str(tmp_path), "gradient_magnitude_probe.png")
    assert os.path.exists(probe.plot_path)


def test_accumulation_skips_observed_change(tmp_path):
    probe = GradientMagnitudeProbe(every_n_steps=1)
    with pytest.warns(UserWarning, match="accumulate_grad_batches > 1"):
        trainer(tmp_path, 2, [probe], accumulate_grad_batches=2).fit(Net(), data(n=32))
    assert [h["step"] for h in probe.history] == [1, 2]
    assert "loss_change/observed" not in probe.history[0] and "update_ratio/total" in probe.history[0]


def test_state_dict_round_trip(tmp_path):
    rp = ResidualProbe(every_n_steps=1)
    trainer(tmp_path, 2, [rp]).fit(Net(), data())
    state = rp.state_dict()
    fresh = ResidualProbe(every_n_steps=1)
    fresh.load_state_dict(state)
    assert fresh.history == rp.history
    assert torch.equal(fresh._ref_out, rp._ref_out)


# ------------------------------------------------------------------------------------------------------------------
# bad arguments
# ------------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("every", [0, -3, 1.5, True])
def test_bad_interval(every):  # type: ignore[no-untyped-def]
    with pytest.raises(MisconfigurationException, match=r"every_n_steps=\.\.\.\) must be a positive integer"):
        GradientMagnitudeProbe(every_n_steps=every)
    with pytest.raises(MisconfigurationException, match="every_n_steps"):
        ResidualProbe(every_n_steps=every)


def test_bad_arguments_messages(tmp_path):
    with pytest.raises(MisconfigurationException, match="not a valid regular expression"):
        GradientMagnitudeProbe(layers="blocks(")
    with pytest.raises(MisconfigurationException, match="rule"):
        GradientMagnitudeProbe(rule="lamb")  # type: ignore[arg-type]
    with pytest.raises(MisconfigurationException, match="probe_size"):
        ResidualProbe(probe_size=0)
    with pytest.raises(MisconfigurationException, match=r"layers='attention'\).*matches none of the 5 layers"):
        trainer(tmp_path, 1, [GradientMagnitudeProbe(layers="attention")]).fit(Net(), data())
    plain = Net()
    plain.blocks = nn.ModuleList([nn.Linear(4, 4), nn.Tanh()])  # no repeated block class
    with pytest.raises(MisconfigurationException, match="found no residual blocks"):
        trainer(tmp_path, 1, [ResidualProbe()]).fit(plain, data())
    with pytest.raises(MisconfigurationException, match="blocks='attn' matched no submodule"):
        trainer(tmp_path, 1, [ResidualProbe(blocks="attn")]).fit(Net(), data())
    with pytest.raises(MisconfigurationException, match="has no submodule 'mlp'"):
        trainer(tmp_path, 1, [ResidualProbe(branch="mlp")]).fit(Net(), data())


def test_block_discovery_rule():
    model = Net(depth=2)
    assert [n for n, _ in find_residual_blocks(model)] == ["blocks.0", "blocks.1"]


# ------------------------------------------------------------------------------------------------------------------
# several processes
# ------------------------------------------------------------------------------------------------------------------
class _DumpHistories(Callback):
    """Write every probe's history of this rank to ``rank<r>.json`` (the spawned processes' callbacks are copies)."""

    def __init__(self, path: str) -> None:
        self.path = path

    def on_fit_end(self, trainer, pl_module):  # type: ignore[no-untyped-def]
        histories = [cb.history for cb in trainer.callbacks if isinstance(cb, (GradientMagnitudeProbe, ResidualProbe))]
        with open(os.path.join(self.path, f"rank{trainer.global_rank}.json"), "w") as f:
            json.dump({"histories": histories, "fsdp2": _fsdp2_check()}, f)

    def teardown(self, trainer, pl_module, stage):  # type: ignore[no-untyped-def]
        shut_down()  # the FSDP2 check's gloo work must not outlive the interpreter


def _fsdp2_check() -> str:
    """Real FSDP2 (``fully_shard`` over the 2 gloo processes): sums of squares of DTensor shards are all-reduced.

    Runs inside the ddp_spawn processes of the DDP test, which saves starting two more processes.
    """
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2))
    ref = copy.deepcopy(model)
    fully_shard(model)
    x = torch.randn(6, 3)
    model(x).square().mean().backward()  # same data on both ranks: the averaged gradient is the full one
    ref(x).square().mean().backward()
    params = list(model.parameters())
    if not all(hasattr(p, "to_local") for p in params):
        return "expected DTensor parameters"
    before = [p.to_local().detach().clone() for p in params]
    local = parameter_stats(params, [p.grad for p in params], before)
    rows = reduce_sharded_rows(local, params)
    expected = parameter_stats(list(ref.parameters()), [p.grad for p in ref.parameters()], None)
    if torch.allclose(local[:, 0], expected[:, 0]):
        return "a local shard already gave the global norm: the check is vacuous"
    try:
        torch.testing.assert_close(rows[:, :2], expected[:, :2])  # squared L2 and L1 grad norms: global
        torch.testing.assert_close(rows[:, 3], expected[:, 3])  # weight norms
    except AssertionError as err:
        return str(err)
    return "ok"


@pytest.mark.slow
def test_ddp_spawn_global_norm_on_every_rank_and_fsdp2_sharded_norms(tmp_path):
    torch.manual_seed(0)
    model = Net()
    ref = copy.deepcopy(model)
    probes = [GradientMagnitudeProbe(every_n_steps=1), ResidualProbe(every_n_steps=1)]
    t = trainer(tmp_path, 1, [*probes, _DumpHistories(str(tmp_path))], strategy="ddp_spawn", devices=2)
    t.fit(model, data(n=16, batch=8))  # each rank: one batch of 8 of the 16 samples
    with open(tmp_path / "rank0.json") as f0, open(tmp_path / "rank1.json") as f1:
        result0, result1 = json.load(f0), json.load(f1)
    assert result0["fsdp2"] == "ok" and result1["fsdp2"] == "ok"
    rank0, rank1 = result0["histories"], result1["histories"]
    assert rank0 == rank1  # every rank computed the same (global) values

    full = next(iter(data(n=16, batch=16)))  # the mean of the two rank means is the full-batch mean
    loss_before = ref.loss(full)
    loss_before.backward()
    total = math.sqrt(sum(float(p.grad.square().sum()) for p in ref.parameters()))
    with torch.no_grad():
        for p in ref.parameters():
            p.sub_(0.1 * p.grad)
        loss_after = ref.loss(full)
    (entry,) = rank0[0]
    assert entry["grad_norm/total"] == pytest.approx(total, rel=1e-5)
    assert entry["loss_change/observed"] == pytest.approx(float(loss_after - loss_before.detach()), rel=1e-4)
    assert [h["step"] for h in rank0[1]] == [0, 1]


# ------------------------------------------------------------------------------------------------------------------
# multi-task engine, AMP with a fused optimizer
# ------------------------------------------------------------------------------------------------------------------
class TwoTasks(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Linear(3, 4)
        self.h1, self.h2 = nn.Linear(4, 1), nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        from lightning_mtl import task_losses

        x, y = batch
        z = torch.tanh(self.trunk(x))
        losses = {"a": (self.h1(z)[:, 0] - y[:, 0]).square().mean(), "b": (self.h2(z)[:, 0] - y[:, 1]).square().mean()}
        return task_losses(self, losses)

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.SGD(self.parameters(), lr=0.1)


def test_per_task_norms_and_cosines_from_the_engine(tmp_path):
    from lightning_mtl import MGDA
    from lightning_mtl.callbacks import MultiTaskGradient

    mtl = MultiTaskGradient(MGDA())
    probe = GradientMagnitudeProbe(every_n_steps=2)
    trainer(tmp_path, 2, [probe, mtl]).fit(TwoTasks(), data())  # the probe listed first still sees this step
    entry = probe.history[-1]
    assert entry["step"] == 2
    gram = mtl.engine.last_gramian
    assert entry["task/grad_norm/a"] == pytest.approx(float(gram[0, 0].sqrt()), rel=1e-6)
    assert entry["task/grad_norm/b"] == pytest.approx(float(gram[1, 1].sqrt()), rel=1e-6)
    cos = float(gram[0, 1] / (gram[0, 0] * gram[1, 1]).sqrt())
    assert entry["task/cos/a~b"] == pytest.approx(cos, rel=1e-6)
    assert entry["task/weight/a"] + entry["task/weight/b"] == pytest.approx(1.0)


class FusedAdam(Net):
    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.Adam(self.parameters(), lr=1e-3, fused=True)


def test_fused_optimizer_with_grad_scaler_leaves_gradients_out(tmp_path):
    from lightning.pytorch.plugins import MixedPrecision

    amp = MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))
    probe = GradientMagnitudeProbe(every_n_steps=1, loss_change=False)
    with pytest.warns(UserWarning, match="fused optimizer with a GradScaler"):
        trainer(tmp_path, 1, [probe], plugins=[amp]).fit(FusedAdam(), data())
    (entry,) = probe.history
    assert "grad_norm/total" not in entry and "update_ratio/total" in entry


def test_branch_option_and_dict_batch_message(tmp_path):
    torch.manual_seed(0)
    model = Net(eps=0.5)
    a, b = ResidualProbe(every_n_steps=1), ResidualProbe(every_n_steps=1, branch="ffn")
    trainer(tmp_path, 1, [a, b]).fit(model, data())
    for name in a.block_names:  # y - x = 0.5 * ffn(x), so the block ratio is half the raw branch ratio
        assert a.history[0][f"branch_ratio/{name}"] == pytest.approx(0.5 * b.history[0][f"branch_ratio/{name}"])

    class DictNet(Net):
        def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
            return super().training_step((batch["x"], batch["y"]), batch_idx)

    loader = DataLoader([{"x": torch.randn(3), "y": torch.randn(2)} for _ in range(8)], batch_size=4)
    with pytest.raises(MisconfigurationException, match="pass forward_fn="):
        trainer(tmp_path, 1, [ResidualProbe()]).fit(DictNet(), loader)
    probe = ResidualProbe(every_n_steps=1, forward_fn=lambda m, batch: m(batch["x"]))
    trainer(tmp_path, 1, [probe]).fit(DictNet(), loader)
    assert [h["step"] for h in probe.history] == [0, 1]


# ------------------------------------------------------------------------------------------------------------------
# issue 16, item 8: short runs
# ------------------------------------------------------------------------------------------------------------------
def _fit_seeded(tmp_path, callbacks, **kw):  # type: ignore[no-untyped-def]
    torch.manual_seed(2)
    model = Net(opt="adam", lr=1e-2, dropout=0.3)
    trainer(tmp_path, kw.pop("steps", -1), callbacks, **kw).fit(model, data(n=16, batch=8))
    return model


@pytest.mark.parametrize(("limit", "last"), [({"steps": 5}, 5), ({"max_epochs": 3}, 6)])
def test_short_run_records_first_and_last_step_and_plots_without_warning(tmp_path, limit, last):
    """Fewer steps than every_n_steps (default 50): the first and the last step are probed, the PNGs are drawn,
    matplotlib does not warn, and training is bitwise the same as without the probes."""
    import warnings

    plain = _fit_seeded(tmp_path / "plain", [], **dict(limit))
    gp, rp = GradientMagnitudeProbe(), ResidualProbe()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        probed = _fit_seeded(tmp_path / "probed", [gp, rp], **dict(limit))
    assert [h["step"] for h in gp.history] == [1, last]
    assert [h["step"] for h in rp.history] == [0, 1, last]
    assert "loss_change/observed" in gp.history[-1]
    problems = [str(w.message) for w in caught if "matplotlib" in w.filename or "log-scale" in str(w.message)]
    assert problems == []
    assert not [w for w in caught if "too little to draw" in str(w.message)]
    assert os.path.getsize(gp.plot_path) > 1000 and os.path.getsize(rp.plot_path) > 1000
    for (n, a), (_, b) in zip(plain.state_dict().items(), probed.state_dict().items(), strict=True):
        assert torch.equal(a, b), n


class OneLayer(Net):
    def __init__(self) -> None:
        super().__init__()
        self.inp, self.blocks, self.out = nn.Identity(), nn.ModuleList(), nn.Linear(3, 2)


def test_too_little_to_plot_warns_once_instead_of_an_empty_png(tmp_path):
    """One layer and one step: no line to draw. One clear warning per probe, no PNG."""
    probe = GradientMagnitudeProbe()
    with pytest.warns(UserWarning, match=r"GradientMagnitudeProbe: 1 probe step\(s\) recorded, too little") as rec:
        trainer(tmp_path, 1, [probe]).fit(OneLayer(), data())
    assert len(probe.history) == 1 and probe.plot_path is None
    assert not os.path.exists(os.path.join(str(tmp_path), probe.PLOT_NAME))
    assert sum("too little" in str(w.message) for w in rec) == 1
    gp, rp = GradientMagnitudeProbe(), ResidualProbe()
    with pytest.warns(UserWarning, match="0 probe step") as rec:
        trainer(tmp_path / "none", 0, [gp, rp]).fit(Net(), data())  # max_steps=0: nothing recorded
    assert sum("too little" in str(w.message) for w in rec) == 2 and gp.plot_path is None and rp.plot_path is None


# ------------------------------------------------------------------------------------------------------------------
# issue 16, item 9: dict batches, post-norm blocks
# ------------------------------------------------------------------------------------------------------------------
class PostNormBlock(nn.Module):
    """``LayerNorm(alpha x + F(x))``: Post-LN (alpha = 1) or DeepNorm (alpha > 1)."""

    def __init__(self, width: int, alpha: float) -> None:
        super().__init__()
        self.ffn = nn.Sequential(nn.Linear(width, width), nn.Tanh())
        self.norm = nn.LayerNorm(width)
        self.alpha = alpha

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.alpha * x + self.ffn(x))


def test_post_norm_blocks_measure_the_branch(tmp_path):
    """LN(αx + F(x)): branch_ratio is ‖F(x)‖/‖αx‖, not ‖LN(...) − x‖/‖x‖; a block whose branch cannot be found
    (norm(x + 0.5 F(x)): the module output before the add is F(x), not 0.5 F(x)) warns that it is not the ratio."""
    for alpha in (1.0, 2.0):
        torch.manual_seed(0)
        model = Net(depth=3, eps=1.0)
        model.blocks = nn.ModuleList([PostNormBlock(4, alpha) for _ in range(3)])
        ref = copy.deepcopy(model)
        probe = ResidualProbe(every_n_steps=1, probe_size=5)
        trainer(tmp_path, 1, [probe]).fit(model, data())
        assert probe.branch_names == probe.block_names == ["blocks.0", "blocks.1", "blocks.2"]
        x = next(iter(data()))[0][:5]
        with torch.no_grad():
            h0 = ref.inp(x)
            f = ref.blocks[0].ffn(h0)
            y = ref.blocks[0](h0)
        ratio = probe.history[0]["branch_ratio/blocks.0"]
        assert ratio == pytest.approx(float(f.norm() / (alpha * h0.norm())), rel=1e-5)
        assert ratio != pytest.approx(float((y - h0).norm() / h0.norm()), rel=1e-2)
    model = Net(depth=3, eps=0.5, norm=True)  # BatchNorm(x + 0.5 ffn(x))
    probe = ResidualProbe(every_n_steps=1)
    with pytest.warns(UserWarning, match=r"'blocks.0' \(Block\) is post-norm .* not the branch ratio"):
        trainer(tmp_path, 1, [probe]).fit(model, data())
    assert "branch_ratio/blocks.0" in probe.history[0]


class MemoryLogger(Logger):
    def __init__(self) -> None:
        super().__init__()
        self.logged: list[tuple[int | None, dict[str, float]]] = []

    @property
    def name(self) -> str:
        return "memory"

    @property
    def version(self) -> int:
        return 0

    def log_metrics(self, metrics, step=None):  # type: ignore[no-untyped-def]
        self.logged.append((step, dict(metrics)))

    def log_hyperparams(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        pass


class TinyBert(pl.LightningModule):
    """A 3-layer BERT (post-LN ``BertLayer``s) trained on a Hugging Face style dict batch."""

    def __init__(self) -> None:
        super().__init__()
        from transformers import BertConfig, BertModel

        config = BertConfig(
            hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=37, vocab_size=100
        )
        self.bert = BertModel(config)
        self.head = nn.Linear(32, 1)

    def training_step(self, batch, batch_idx):  # type: ignore[no-untyped-def]
        h = self.bert(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return (self.head(h[:, 0])[:, 0] - batch["labels"]).square().mean()

    def configure_optimizers(self):  # type: ignore[no-untyped-def]
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def bert_data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, 100, (16, 7), generator=g)
    mask = torch.ones(16, 7, dtype=torch.long)
    mask[::3, 5:] = 0
    labels = torch.randn(16, generator=g)
    rows = [{"input_ids": ids[i], "attention_mask": mask[i], "labels": labels[i]} for i in range(16)]
    return DataLoader(rows, batch_size=8)


def bert_branch_ratios(model: TinyBert, batch: dict, rows: int) -> dict[str, float]:  # type: ignore[type-arg]
    """By hand with forward hooks: per BertLayer, the attention and FFN sub-layer outputs before the add
    (``attention.output.dropout``, ``output.dropout``) against the residual input of ``LayerNorm(b + input)``."""
    seen: dict[str, dict[str, torch.Tensor]] = {}
    handles = []
    for i, layer in enumerate(model.bert.encoder.layer):
        prefix = f"bert.encoder.layer.{i}"
        for sub, name in ((layer.attention.output, f"{prefix}.attention.output"), (layer.output, f"{prefix}.output")):
            rec = seen.setdefault(name, {})
            handles.append(sub.register_forward_pre_hook(lambda m, args, rec=rec: rec.update(r=args[1])))
            handles.append(sub.dropout.register_forward_hook(lambda m, args, out, rec=rec: rec.update(b=out)))
    model.eval()
    with torch.no_grad():
        model.bert(input_ids=batch["input_ids"][:rows], attention_mask=batch["attention_mask"][:rows])
    model.train()
    for h in handles:
        h.remove()
    return {name: float(rec["b"].norm() / rec["r"].norm()) for name, rec in seen.items()}


def test_dict_batch_and_post_norm_bert(tmp_path):
    """A Hugging Face dict batch works without forward_fn, and BertLayer's branch ratios are the sub-layers' (before
    LayerNorm(b + input)), checked by hand at step 0 and after training; training is bitwise unchanged."""
    pytest.importorskip("transformers")
    torch.manual_seed(0)
    initial = TinyBert()
    batch = next(iter(bert_data()))
    expected0 = bert_branch_ratios(copy.deepcopy(initial), batch, rows=6)

    plain = copy.deepcopy(initial)
    torch.manual_seed(1)
    trainer(tmp_path / "plain", 3, []).fit(plain, bert_data())
    model, logger = copy.deepcopy(initial), MemoryLogger()
    probe = ResidualProbe(every_n_steps=2, probe_size=6, log_blocks="first", plot=False)
    torch.manual_seed(1)
    trainer(tmp_path / "probed", 3, [probe], logger=logger).fit(model, bert_data())
    for (n, a), (_, b) in zip(plain.state_dict().items(), model.state_dict().items(), strict=True):
        assert torch.equal(a, b), n

    assert probe.block_names == [f"bert.encoder.layer.{i}" for i in range(3)]
    assert probe.branch_names == list(expected0)  # attention.output, output per layer, in depth order
    assert [h["step"] for h in probe.history] == [0, 1, 2, 3]
    for name, value in expected0.items():
        assert probe.history[0][f"branch_ratio/{name}"] == pytest.approx(value, rel=1e-5)
    expected3 = bert_branch_ratios(model, batch, rows=6)
    for name, value in expected3.items():
        assert probe.history[-1][f"branch_ratio/{name}"] == pytest.approx(value, rel=1e-5)
    assert "branch_ratio/bert.encoder.layer.0" not in probe.history[0]  # not ‖LN(x + F(x)) − x‖/‖x‖
    step, logged = logger.logged[-1]
    assert step == 3
    ratios = {k for k in logged if k.startswith("probe/branch_ratio/")}
    first = "probe/branch_ratio/bert.encoder.layer.0"
    assert ratios == {f"{first}.attention.output", f"{first}.output"}
    for key in ratios:
        assert logged[key] == pytest.approx(expected3[key.removeprefix("probe/branch_ratio/")], rel=1e-5)
    with torch.no_grad():
        model.eval()
        out = model.bert(input_ids=batch["input_ids"][:6], attention_mask=batch["attention_mask"][:6])
    assert probe.history[-1]["output_norm"] == pytest.approx(float(out.last_hidden_state.norm()), rel=1e-5)


# ------------------------------------------------------------------------------------------------------------------
# old import paths
# ------------------------------------------------------------------------------------------------------------------
def test_old_paths_warn_and_name_the_new_ones():
    import lightning_mtl.callbacks.probes as old_callbacks
    import lightning_mtl.probes_math as old_math
    from lightning_mtl._utils import RngState
    from lightning_mtl.engine import summarize_step

    with pytest.warns(DeprecationWarning, match=r"moved to lightning_mtl\.callbacks\.ResidualProbe"):
        assert old_callbacks.ResidualProbe is ResidualProbe
    with pytest.warns(DeprecationWarning, match=r"moved to lightning_mtl\.probes\.find_residual_blocks"):
        assert old_callbacks.find_residual_blocks is find_residual_blocks
    with pytest.warns(DeprecationWarning, match=r"moved to lightning_mtl\.probes\.select_layers"):
        assert old_math.select_layers is select_layers
    with pytest.warns(DeprecationWarning, match=r"moved to lightning_mtl\._utils\.RngState"):
        assert old_math.RngState is RngState
    gram = torch.tensor([[4.0, -2.0], [-2.0, 9.0]], dtype=torch.float64)
    with pytest.warns(DeprecationWarning, match="summarize_step"):
        norms, cos = old_math.gramian_norms_cosines(gram)
    summary = summarize_step(["a", "b"], gram, torch.ones(2))
    assert torch.equal(norms, summary.norms) and torch.equal(cos, summary.cosines)


def test_model_call_picks_module_or_hf_model_and_drops_labels():
    from lightning_mtl.probes import model_call, positive_multiple

    class Named(nn.Module):
        def forward(self, input_ids, attention_mask=None):  # type: ignore[no-untyped-def]
            return input_ids

    batch = {"input_ids": torch.ones(2, 3), "attention_mask": torch.ones(2, 3), "labels": torch.zeros(2), "id": [1, 2]}
    target, kwargs = model_call(Named(), batch)  # type: ignore[misc]
    assert isinstance(target, Named) and sorted(kwargs) == ["attention_mask", "input_ids"]
    assert model_call(Net(), {"x": torch.ones(2, 3)}) is None  # no model input key: forward_fn is needed
    r, x = torch.tensor([2.0, 4.0], dtype=torch.float64), torch.tensor([1.0, 2.0])
    assert positive_multiple(r, [None, x], 1e-9) and not positive_multiple(-r, [x], 1e-9)
