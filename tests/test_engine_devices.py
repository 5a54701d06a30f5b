"""The engine's accelerator paths, against a float64 brute force: on CPU with those paths forced (so CI runs the code
a GPU runs), and on CUDA (``pytest -m cuda``), also with TF32 allowed.

The paths: the Gramian formed in float64 chunks, the weighted sum written element-wise and copied into ``.grad`` by
one multi-tensor copy, the last task recovered by subtraction, the validation verdicts read without waiting, PCGrad's
orders drawn on the device.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from contextlib import contextmanager

import lightning as L
import pytest
import torch

import lightning_mtl as mtl
from lightning_mtl.callbacks import MultiTaskGradient
from tests._mtl_models import GradRecorder, TwoHeads, loader, make_data, trainer
from tests._sync import accelerator_paths

WEIGHTINGS = {
    "MGDA": mtl.MGDA,
    "GradNormalize": mtl.GradNormalize,
    "PCGrad": lambda: mtl.PCGrad(seed=4),
    "PrimaryAuxiliary": lambda: mtl.PrimaryAuxiliary(primary="t0"),
}
CASES = [("MGDA", 2), ("MGDA", 3), ("MGDA", 9), ("GradNormalize", 3), ("PCGrad", 3), ("PrimaryAuxiliary", 3)]
BATCH = 8

cuda = pytest.param("cuda", marks=pytest.mark.cuda)


@contextmanager
def on(device: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """``"cpu"`` with the accelerator paths forced, or ``"cuda"``."""
    if device == "cpu":
        with accelerator_paths(monkeypatch):
            yield "cpu"
    else:
        yield "cuda"


@contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """TF32 for fp32 matrix products on CUDA, as ``torch.set_float32_matmul_precision("high")`` allows it."""
    before = torch.backends.cuda.matmul.fp32_precision
    torch.backends.cuda.matmul.fp32_precision = "tf32" if allowed else "ieee"
    try:
        yield
    finally:
        torch.backends.cuda.matmul.fp32_precision = before


def _shared(m: TwoHeads) -> list[torch.nn.Parameter]:
    return list(m.trunk.parameters())


def _fit(model: TwoHeads, ds, cb: MultiTaskGradient | None, device: str, accumulate: int, precision: str, steps=2):
    recorder = GradRecorder()
    callbacks = [c for c in (cb, recorder) if c is not None]
    t = trainer(
        accelerator=device,
        max_steps=steps,
        precision=precision,
        accumulate_grad_batches=accumulate,
        callbacks=callbacks,
        log_every_n_steps=1000,
    )
    t.fit(model, loader(ds, BATCH))
    return recorder


def _reference_step(module: TwoHeads, micro_batches, make, mode: str, device: str) -> dict[str, torch.Tensor]:
    """The trunk's gradient of one optimiser step, in float64 on the CPU (weights on ``device``, where PCGrad
    draws its orders): parameter mode weighs the task gradients of the whole accumulated batch, representation mode
    each micro-batch's features gradients."""
    ref = make()
    ref.bind(module.names)
    params = _shared(module)
    n = len(micro_batches)
    total = [torch.zeros_like(p) for p in params]
    if mode == "parameter":
        rows = 0
        for batch in micro_batches:
            losses, _ = module.task_dict(batch)
            rows = (
                rows
                + torch.stack(
                    [
                        torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, params, retain_graph=True)])
                        for v in losses.values()
                    ]
                )
                / n
            )
        w = ref(rows @ rows.T if device == "cpu" else (rows @ rows.T).to(device)).cpu()
        flat = w @ rows
        out, offset = [], 0
        for p in params:
            out.append(flat[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        return dict(zip([n for n, _ in module.trunk.named_parameters()], out))
    for batch in micro_batches:
        losses, z = module.task_dict(batch)
        d = torch.stack([torch.autograd.grad(v, z, retain_graph=True)[0].reshape(-1) for v in losses.values()])
        w = ref((d @ d.T).to(device)).cpu()
        for acc, g in zip(total, torch.autograd.grad(z, params, grad_outputs=(w @ d).view_as(z) / n)):
            acc += g
    return dict(zip([n for n, _ in module.trunk.named_parameters()], total))


@pytest.mark.parametrize("device", ["cpu", cuda])
@pytest.mark.parametrize("accumulate", [1, 2])
@pytest.mark.parametrize("mode", ["parameter", "representation"])
@pytest.mark.parametrize(("name", "k"), CASES, ids=[f"{n}-K{k}" for n, k in CASES])
def test_accelerator_paths_equal_a_float64_brute_force(monkeypatch, device, accumulate, mode, name, k):
    torch.manual_seed(0)
    ds = make_data(n=BATCH * accumulate * 2, k=k, dtype=torch.float64)
    model = TwoHeads(k=k).double()
    with on(device, monkeypatch) as dev:
        cb = MultiTaskGradient(WEIGHTINGS[name](), mode=mode)
        rec = _fit(copy.deepcopy(model), ds, cb, dev, accumulate, "64-true")
    # the reference replays the first step from the initial parameters
    micro = [ds[i * BATCH : (i + 1) * BATCH] for i in range(accumulate)]
    expected = _reference_step(model, micro, WEIGHTINGS[name], mode, dev)
    for pn, g in expected.items():
        torch.testing.assert_close(rec.grads[0][f"trunk.{pn}"].cpu(), g, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("device", ["cpu", cuda])
@pytest.mark.parametrize("mode", ["parameter", "representation"])
def test_sum_leaves_the_plain_gradient_in_fp32(monkeypatch, device, mode):
    """With weights 1 the rewritten gradient is the loop's own gradient to fp32 rounding: nothing in the write-back
    (or the hook) rounds to a lower precision."""
    torch.manual_seed(0)
    ds = make_data(n=4 * BATCH, k=3)
    model = TwoHeads(k=3)
    with on(device, monkeypatch) as dev:
        plain = _fit(copy.deepcopy(model), ds, None, dev, 1, "32-true")
        ours = _fit(copy.deepcopy(model), ds, MultiTaskGradient(mtl.Sum(), mode=mode), dev, 1, "32-true")
    for name, g in plain.grads[0].items():
        torch.testing.assert_close(ours.grads[0][name], g, rtol=2e-6, atol=1e-7)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["parameter", "representation"])
@pytest.mark.parametrize("allowed", [False, True], ids=["ieee", "tf32"])
def test_tf32_does_not_change_the_engine(allowed, mode):
    """With TF32 allowed the model's own products round to 10-bit mantissas; the engine's must not. ``Sum`` then
    still leaves the loop's gradient (to fp32 rounding), and MGDA's Gramian equals the float64 Gramian of the task
    gradients the model produced (computed explicitly: ``subtract_last=False``)."""
    torch.manual_seed(0)
    ds = make_data(n=4 * BATCH, k=3)
    model = TwoHeads(k=3, dim=6, hidden=512)  # wide enough for TF32 rounding to show at 1e-3
    with tf32(allowed):
        plain = _fit(copy.deepcopy(model), ds, None, "cuda", 1, "32-true")
        ours = _fit(copy.deepcopy(model), ds, MultiTaskGradient(mtl.Sum(), mode=mode), "cuda", 1, "32-true")
        for name, g in plain.grads[0].items():
            torch.testing.assert_close(ours.grads[0][name], g, rtol=2e-6, atol=1e-7)
        if mode != "parameter":
            return
        cb = MultiTaskGradient(mtl.MGDA(), subtract_last=False)
        m = copy.deepcopy(model)
        rec = _fit(m, ds, cb, "cuda", 1, "32-true", steps=1)
        start = copy.deepcopy(model).cuda()
        losses, _ = start.task_dict(tuple(t.cuda() for t in ds[:BATCH]))
        rows = torch.stack(
            [
                torch.cat([g.reshape(-1) for g in torch.autograd.grad(v, _shared(start), retain_graph=True)])
                for v in losses.values()
            ]
        ).double()
        torch.testing.assert_close(cb.engine.last_gramian, rows @ rows.T, rtol=1e-6, atol=1e-10)
        w = cb.engine.last_weights
        flat = torch.cat([rec.grads[0][f"trunk.{n}"].reshape(-1) for n, _ in start.trunk.named_parameters()])
        torch.testing.assert_close(flat.double(), w @ rows, rtol=1e-5, atol=1e-8)


@pytest.mark.cuda
@pytest.mark.parametrize("mode", ["parameter", "representation"])
@pytest.mark.parametrize("name", ["MGDA", "GradNormalize", "PCGrad", "PrimaryAuxiliary"])
@pytest.mark.parametrize("k", [3, 9])
def test_cuda_step_has_no_synchronisation(mode, name, k):
    """``torch.cuda.set_sync_debug_mode("error")`` around the callback's per-step hooks after the first step."""
    model = TwoHeads(k=k)
    cb = MultiTaskGradient(WEIGHTINGS[name](), mode=mode)
    steps = {"n": 0}

    def in_sync_debug(fn):
        def wrapper(*args, **kwargs):
            if steps["n"] < 1:
                return fn(*args, **kwargs)
            torch.cuda.set_sync_debug_mode("error")
            try:
                return fn(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode(0)

        return wrapper

    for hook in ("on_before_backward", "on_before_optimizer_step"):
        setattr(cb, hook, in_sync_debug(getattr(cb, hook)))

    class Counter(L.Callback):
        def on_train_batch_end(self, *a, **kw):
            steps["n"] += 1

    trainer(accelerator="cuda", max_steps=4, callbacks=[cb, Counter()], log_every_n_steps=1000).fit(
        model, loader(make_data(n=64, k=k))
    )
    assert steps["n"] == 4


@pytest.mark.parametrize("device", ["cpu", cuda])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16])
def test_one_task_records_the_gradient_norm_in_every_dtype(monkeypatch, device, dtype):
    """One task: weight 1 and the squared norm of the whole gradient (a multi-tensor norm per width)."""
    torch.manual_seed(0)
    with on(device, monkeypatch) as dev:
        net = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 1)).to(dev, dtype)
        engine = mtl.GradientEngine(mtl.MGDA())
        with pytest.warns(UserWarning, match="Only one task loss"):
            engine.backward({"only": net(torch.randn(8, 5, device=dev, dtype=dtype)).square().mean()}, module=net)
        engine.apply()
    expected = sum(p.grad.double().square().sum() for p in net.parameters())
    torch.testing.assert_close(engine.last_gramian.cpu(), expected.reshape(1, 1).cpu(), rtol=1e-5, atol=0)
