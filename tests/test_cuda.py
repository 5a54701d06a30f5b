"""The device paths of a GPU user, on CUDA: fp16 with the CUDA GradScaler (SGD, Adam, fused Adam) and a skipped
step, bf16-mixed, the probes' CUDA random state under dropout, torch.compile (inductor, ``mode="reduce-overhead"``),
FSDP2 on one GPU over NCCL, and DDP over NCCL on two GPUs (issue 25). The engine's own parity and sync-free CUDA
tests are in tests/test_cuda_engine.py.

Every test here except :func:`test_rng_state_cuda_branch_forced_on_cpu` is marked ``cuda`` (the DDP one also
``cuda2``) and skips without a GPU (tests/conftest.py); ``pytest -m cuda`` selects them. To check the test bodies on
a machine without one, ``LIGHTNING_MTL_TEST_DEVICE=cpu python -m pytest tests/test_cuda.py`` runs them on the CPU,
unmarked (fp16 then through a CPU GradScaler, FSDP2 and DDP over gloo); the CUDA-only parts (the CUDA generator,
CUDA graphs, NCCL) are then not what runs.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from typing import Any

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch.plugins.precision import MixedPrecision
from lightning.pytorch.strategies import ModelParallelStrategy
from torch import nn

import lightning_mtl as mtl
from lightning_mtl.callbacks import GradientMagnitudeProbe, MultiTaskGradient, ResidualProbe
from tests._distributed import shut_down
from tests._mtl_models import GradRecorder, TwoHeads, loader, make_data, trainer

DEVICE = os.environ.get("LIGHTNING_MTL_TEST_DEVICE", "cuda")
if DEVICE not in ("cuda", "cpu"):
    raise ValueError(f"LIGHTNING_MTL_TEST_DEVICE must be 'cuda' (the default) or 'cpu', got {DEVICE!r}.")
ON_CUDA = DEVICE == "cuda"


def gpu(test: Callable[..., Any]) -> Callable[..., Any]:
    """Mark ``cuda`` (skipped without a GPU), unless LIGHTNING_MTL_TEST_DEVICE=cpu runs the body on the CPU."""
    return pytest.mark.cuda(test) if ON_CUDA else test


def two_gpus(test: Callable[..., Any]) -> Callable[..., Any]:
    return pytest.mark.cuda2(pytest.mark.cuda(test)) if ON_CUDA else test


def device_trainer(**kw: Any) -> L.Trainer:
    """The tests' Trainer on DEVICE. ``deterministic=False`` unless asked: the comparisons below have tolerances,
    and torch's deterministic mode would turn any CUDA kernel without a deterministic variant into an error."""
    kw.setdefault("deterministic", False)
    return trainer(accelerator=DEVICE, **kw)


def _flat(module: nn.Module) -> torch.Tensor:
    return torch.cat([p.detach().float().reshape(-1) for p in module.parameters()]).cpu()


def _rng_state() -> torch.Tensor:
    """The generator that dropout draws from on DEVICE."""
    return torch.cuda.get_rng_state() if ON_CUDA else torch.get_rng_state()


# --- fp16 + the CUDA GradScaler -------------------------------------------------------------------------------------
class _InfAt(TwoHeads):
    """TwoHeads with SGD, Adam or fused Adam; multiplies task t1's loss by inf at one optimiser step."""

    def __init__(self, optimizer: str, inf_step: int | None, **kw: Any) -> None:
        super().__init__(dim=6, hidden=32, lr=1e-2 if "adam" in optimizer else 0.1, **kw)
        self.optimizer = optimizer
        self.inf_step = inf_step
        self.fired = False

    def task_dict(self, batch):
        losses, z = super().task_dict(batch)
        if self.trainer.global_step == self.inf_step and not self.fired:
            self.fired = True
            losses["t1"] = losses["t1"] * float("inf")
        return losses, z

    def configure_optimizers(self):
        if self.optimizer == "fused_adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, fused=True)
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr, fused=False, foreach=True)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def _fp16(init_scale: float | None = None) -> dict[str, Any]:
    """Trainer arguments for fp16 with a GradScaler. On CUDA without ``init_scale``: ``precision="16-mixed"``
    itself; else the plugin that it builds (``MixedPrecision`` with a ``GradScaler``), with the given first scale.
    (Lightning refuses ``precision="16-mixed"`` on the CPU, so the CPU stand-in always takes the plugin.)"""
    if ON_CUDA and init_scale is None:
        return {"precision": "16-mixed"}
    scaler = torch.amp.GradScaler(DEVICE, init_scale=2.0**16 if init_scale is None else init_scale)
    return {"plugins": [MixedPrecision("16-mixed", DEVICE, scaler=scaler)]}


def _clone(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return x.detach().clone().cpu()
    if isinstance(x, dict):
        return {k: _clone(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(_clone(v) for v in x)
    return copy.deepcopy(x)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor):
        return isinstance(b, torch.Tensor) and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return isinstance(b, (list, tuple)) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


class _AfterEachBatch(L.Callback):
    """After every batch: parameters, loss scale, the optimiser's state and MultiTaskGradient's state."""

    def __init__(self, mtl_callback: MultiTaskGradient) -> None:
        self.mtl = mtl_callback
        self.params: list[torch.Tensor] = []
        self.scales: list[float] = []
        self.optimizer: list[Any] = []
        self.callback: list[dict[str, Any]] = []
        self.global_step: list[int] = []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.params.append(_flat(pl_module))
        self.scales.append(float(trainer.precision_plugin.scaler.get_scale()))
        self.optimizer.append(_clone(trainer.optimizers[0].state_dict()["state"]))
        self.callback.append(_clone(self.mtl.state_dict()))
        self.global_step.append(trainer.global_step)


@gpu
@pytest.mark.parametrize("optimizer", ["sgd", "adam", "fused_adam"])
def test_fp16_grad_scaler_trains_and_an_inf_task_loss_skips_the_step(optimizer):
    """fp16 with the CUDA GradScaler, MGDA in parameter mode, with SGD, Adam and fused Adam (which unscales inside its
    step, so the engine sees still-scaled gradients):

    * ``precision="16-mixed"`` trains 8 steps, finite;
    * the first update points where fp32's does (cosine > 0.999: the loss scale reaches neither the weights nor
      the update; fused Adam's recorded gradient is still scaled, so only the direction is compared);
    * an inf in one task loss at step 3 skips that step: parameters and optimiser state bitwise unchanged, the scale
      halved, MultiTaskGradient's state (tasks, weighting) unchanged and its step count following the Trainer's
      ``global_step`` (which counts the skipped step too); the next step trains again; the weighting counted one
      fallback to equal weights.

    The skip test starts from a scale of 2^8 (the plugin ``precision="16-mixed"`` builds, with a smaller first
    scale), so that no step before the injected inf overflows by itself and halves the scale.
    """
    torch.manual_seed(0)
    start = _InfAt(optimizer, inf_step=None)
    data = make_data(n=64)

    plain = copy.deepcopy(start)
    device_trainer(max_steps=8, callbacks=[MultiTaskGradient(mtl.MGDA())], **_fp16()).fit(plain, loader(data, 8))
    assert torch.isfinite(_flat(plain)).all()
    assert not torch.equal(_flat(plain), _flat(start)), "16-mixed did not train"

    fp32, rec32 = copy.deepcopy(start), GradRecorder()
    device_trainer(max_steps=1, callbacks=[MultiTaskGradient(mtl.MGDA()), rec32]).fit(fp32, loader(data, 8))

    model, rec16 = copy.deepcopy(start), GradRecorder()
    model.inf_step = 3
    cb = MultiTaskGradient(mtl.MGDA())
    after = _AfterEachBatch(cb)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*equal weights.*", category=RuntimeWarning)  # said at once on CPU
        device_trainer(max_steps=6, callbacks=[cb, rec16, after], **_fp16(init_scale=2.0**8)).fit(
            model, loader(data, 8)
        )

    def flat(grads: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.cat([g.float().reshape(-1) for _, g in sorted(grads.items())]).cpu()

    assert float(F.cosine_similarity(flat(rec16.grads[0]), flat(rec32.grads[0]), dim=0)) > 0.999

    p, s = after.params, after.scales
    assert model.fired and len(p) == 6
    assert all(torch.isfinite(x).all() for x in p)
    assert s[0] == s[1] == s[2] == 2.0**8, f"a step overflowed before the injected inf: scales {s}"
    assert not torch.equal(p[0], _flat(start)) and not torch.equal(p[1], p[0]) and not torch.equal(p[2], p[1])
    # batch 3 holds the inf: skipped
    assert torch.equal(p[3], p[2]), "the step with an inf task loss changed the parameters"
    assert s[3] == s[2] / 2
    assert _same(after.optimizer[3], after.optimizer[2]), "the skipped step changed the optimiser state"
    before, skipped = dict(after.callback[2]), dict(after.callback[3])
    assert skipped.pop("steps") == after.global_step[3] and before.pop("steps") == after.global_step[2]
    assert _same(skipped, before), "the skipped step changed MultiTaskGradient's state"
    # training goes on
    assert not torch.equal(p[4], p[3]) and not torch.equal(p[5], p[4])
    assert int(cb.weighting.fallbacks) == 1


# --- bf16 -------------------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize("mode", ["parameter", "representation"])
def test_bf16_mixed_trains_finite_and_close_to_fp32(mode):
    """``precision="bf16-mixed"``, MGDA: 8 steps stay finite, the weights and the parameters stay within bf16's
    precision of the fp32 run (the update differs from fp32's by a few per cent of its size)."""
    data = make_data(n=64)
    torch.manual_seed(0)
    start = TwoHeads(dim=6, hidden=32)
    runs = {}
    for precision in ("32-true", "bf16-mixed"):
        model = copy.deepcopy(start)
        cb = MultiTaskGradient(mtl.MGDA(), mode=mode)
        device_trainer(max_steps=8, precision=precision, callbacks=[cb]).fit(model, loader(data, 8))
        assert cb.last_step is not None
        runs[precision] = (_flat(model), cb.last_step.weights.detach().double().cpu())
    (p32, w32), (p16, w16) = runs["32-true"], runs["bf16-mixed"]
    assert torch.isfinite(p16).all() and torch.isfinite(w16).all()
    moved = (p32 - _flat(start)).norm()
    assert float(moved) > 0.05  # it trained
    assert float((p16 - p32).norm() / moved) < 0.05
    torch.testing.assert_close(w16, w32, rtol=0, atol=0.02)


# --- the probes' CUDA random state ------------------------------------------------------------------------------
class _TrainsOn(L.Callback):
    """Records the device type the module trains on."""

    device: str | None = None

    def on_train_start(self, trainer, pl_module):
        self.device = pl_module.device.type


@gpu
def test_probes_leave_training_with_cuda_dropout_bitwise_unchanged(tmp_path):
    """GradientMagnitudeProbe (it re-runs training_step to measure the loss change) and ResidualProbe (an extra
    forward) on a model with dropout on the GPU: they restore the CUDA generator, so six steps give bitwise the
    parameters, BatchNorm buffers and CUDA random state of the run without them. First the run without probes is
    repeated, so that a failure cannot come from a run that is not reproducible by itself."""
    from tests.test_probes import Net, data
    from tests.test_probes import trainer as probe_trainer

    def run(root, callbacks):
        torch.manual_seed(1)  # seeds the CUDA generators too
        seeded = _rng_state()
        model = Net(depth=3, width=6, eps=1.0, opt="adam", lr=1e-2, dropout=0.3, norm=True)
        where = _TrainsOn()
        probe_trainer(root, 6, [*callbacks, where], accelerator=DEVICE, deterministic="warn").fit(model, data(n=32))
        assert where.device == DEVICE  # (the Trainer moves the model back to the CPU at the end of the fit)
        state = {n: t.detach().cpu().clone() for n, t in model.state_dict().items()}
        return state, seeded, _rng_state()

    plain, seeded, rng_plain = run(tmp_path / "a", [])
    again, _, rng_again = run(tmp_path / "b", [])
    assert not torch.equal(rng_plain, seeded), f"dropout did not draw from the {DEVICE} generator"
    assert _same(plain, again) and torch.equal(rng_plain, rng_again), "training is not reproducible by itself"
    probes = [GradientMagnitudeProbe(every_n_steps=2), ResidualProbe(every_n_steps=2)]
    probed, _, rng_probed = run(tmp_path / "c", probes)
    assert "loss_change/observed" in probes[0].history[0] and len(probes[1].history) > 0
    for name, a in plain.items():
        assert torch.equal(a, probed[name]), name
    assert torch.equal(rng_plain, rng_probed)


class _FakeCudaDropout(nn.Module):
    """Dropout that draws its mask from ``generator``, which the test presents as the CUDA generator."""

    def __init__(self, p: float, generator: torch.Generator) -> None:
        super().__init__()
        self.p, self.generator = p, generator

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return x
        keep = torch.rand(x.shape, generator=self.generator) >= self.p
        return x * keep / (1 - self.p)


def test_rng_state_cuda_branch_forced_on_cpu(tmp_path, monkeypatch, one_thread):
    """Runs on the CPU (not marked): RngState's CUDA branch, forced. ``torch.cuda`` reports an initialised device
    whose generator is a CPU ``torch.Generator`` that the model's dropout draws from; the probes must capture and
    restore it, so that training stays bitwise that of the run without them. With the restore of that generator
    turned into a no-op, the same comparison fails: the test sees the branch."""
    from tests.test_probes import Net, data
    from tests.test_probes import trainer as probe_trainer

    fake = torch.Generator()
    calls = {"get": 0, "set": 0}

    def get_all() -> list[torch.Tensor]:
        calls["get"] += 1
        return [fake.get_state()]

    def set_all(states: list[torch.Tensor]) -> None:
        calls["set"] += 1
        fake.set_state(states[0])

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_rng_state_all", get_all)
    monkeypatch.setattr(torch.cuda, "set_rng_state_all", set_all)

    def run(root, callbacks):
        torch.manual_seed(1)
        fake.manual_seed(2)
        model = Net(depth=3, width=6, eps=1.0, opt="adam", lr=1e-2, dropout=0.0, norm=True)
        for block in model.blocks:
            block.ffn[2] = _FakeCudaDropout(0.3, fake)
        probe_trainer(root, 6, callbacks, accelerator="cpu").fit(model, data(n=32))
        return [p.detach().clone() for p in model.state_dict().values()], fake.get_state()

    def probes():
        return [GradientMagnitudeProbe(every_n_steps=2), ResidualProbe(every_n_steps=2)]

    plain, fake_plain = run(tmp_path / "a", [])
    lightning_calls = dict(calls)  # Lightning's isolate_rng saves and restores the CUDA states too, once a fit
    probed, fake_probed = run(tmp_path / "b", probes())
    for kind, n in lightning_calls.items():
        assert calls[kind] > 2 * n, f"the probes never called torch.cuda's {kind}_rng_state_all: {calls}"
    assert all(torch.equal(a, b) for a, b in zip(plain, probed, strict=True))
    assert torch.equal(fake_plain, fake_probed)

    monkeypatch.setattr(torch.cuda, "set_rng_state_all", lambda states: None)  # the branch's restore, broken
    broken, fake_broken = run(tmp_path / "c", probes())
    assert not torch.equal(fake_plain, fake_broken)
    assert not all(torch.equal(a, b) for a, b in zip(plain, broken, strict=True))


# --- torch.compile ----------------------------------------------------------------------------------------------
@gpu
@pytest.mark.parametrize(
    "options", [{"backend": "inductor"}, {"mode": "reduce-overhead"}], ids=["inductor", "cudagraphs"]
)
def test_compiled_module_on_cuda_equals_eager(options):
    """``trainer.fit(torch.compile(module, ...))`` with inductor, and with ``mode="reduce-overhead"`` (inductor and
    CUDA graphs), MultiTaskGradient(MGDA) in parameter mode: every loss ran through a compiled graph, and three steps
    give the eager parameters (inductor's fused kernels round differently: 1e-5). If CUDA graphs fail here (each
    task's backward replays the compiled backward of one forward), the callback should refuse
    ``mode="reduce-overhead"`` with a message, and this test should expect that message."""
    from tests.test_compile import Net, SeesCompiled, _net_data

    torch._dynamo.reset()
    try:
        eager, compiled = Net(), Net()
        device_trainer(max_steps=3, callbacks=[MultiTaskGradient(mtl.MGDA())]).fit(eager, _net_data())
        seen = SeesCompiled()
        fitted = torch.compile(compiled, dynamic=False, **options)
        device_trainer(max_steps=3, callbacks=[MultiTaskGradient(mtl.MGDA()), seen]).fit(fitted, _net_data())
    finally:
        torch._dynamo.reset()
    assert seen.seen == [True, True, True]
    for (name, a), b in zip(compiled.named_parameters(), eager.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5, msg=name)


# --- FSDP2 on one GPU -------------------------------------------------------------------------------------------
class _Sharded(TwoHeads):
    """TwoHeads with every Linear of the trunk and the whole module under ``fully_shard``."""

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.trunk:
            if isinstance(layer, nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


@pytest.fixture
def _restore_process_env():
    """ModelParallelStrategy sets the launcher's variables (MASTER_PORT, LOCAL_RANK, WORLD_SIZE, ...) in os.environ
    and leaves a process group behind: undo both, so that later tests start as they would alone."""
    saved = dict(os.environ)
    yield
    shut_down()
    os.environ.clear()
    os.environ.update(saved)


@gpu
@pytest.mark.parametrize("name", ["MGDA", "GradNormalize"])
def test_fsdp2_one_gpu_parameter_mode_equals_unsharded(name, _restore_process_env):
    """``ModelParallelStrategy(data_parallel_size=1)`` with ``fully_shard`` on one GPU (NCCL), MultiTaskGradient in
    parameter mode: the engine's sharded path (DTensor gradients, the all-reduced shard Gramian) gives the parameters
    of the unsharded single-device run after five steps."""
    weighting = {"MGDA": mtl.MGDA, "GradNormalize": mtl.GradNormalize}[name]
    data = make_data(n=40)
    torch.manual_seed(0)
    sharded = _Sharded()
    plain = TwoHeads()
    plain.load_state_dict(sharded.state_dict())
    start = _flat(plain)
    device_trainer(max_epochs=1, callbacks=[MultiTaskGradient(weighting())]).fit(plain, loader(data, 8))
    cb = MultiTaskGradient(weighting())
    t = device_trainer(
        max_epochs=1,
        strategy=ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=1),
        devices=1,
        use_distributed_sampler=False,  # Lightning's would shuffle the training data
        callbacks=[cb],
    )
    t.fit(sharded, loader(data, 8))
    assert cb.engine.sharded, "the engine did not take its FSDP2 path"
    full = [p.full_tensor() if hasattr(p, "full_tensor") else p for p in sharded.parameters()]
    assert type(sharded.trunk[0].weight).__name__ == "DTensor"
    for (n, a), b in zip(plain.named_parameters(), full, strict=True):
        torch.testing.assert_close(b.detach().cpu(), a.detach().cpu(), rtol=1e-4, atol=1e-5, msg=n)
    assert not torch.equal(_flat(plain), start)


# --- DDP over NCCL ----------------------------------------------------------------------------------------------
@two_gpus
def test_ddp_nccl_two_gpus_equals_one_process(tmp_path):
    """``strategy="ddp"`` (the subprocess launcher) on two GPUs over NCCL, float64: the configurations of the CPU test
    (MGDA and GradNormalize in both modes, MGDA with accumulation) give identical parameters on both ranks, equal
    (1e-6) to one GPU on the concatenated batch. Run as tests/scripts/ddp_fit.py in a subprocess."""
    from tests.test_distributed import DDP_CONFIGS, check_ddp_script

    check_ddp_script(tmp_path, DEVICE, DDP_CONFIGS)
