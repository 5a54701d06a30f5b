"""The engine package (issue 12): one capture/apply interface chosen once per model, FSDP2's private API in one
module, the public names where they were, and the ``grad_scale`` spelling."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

import lightning_mtl as mtl
from lightning_mtl.engine import CaptureStrategy, GradientEngine, StepSummary, reached_parameters, summarize_step
from lightning_mtl.engine.parameter import ParameterCapture
from lightning_mtl.engine.representation import RepresentationCapture
from lightning_mtl.engine.sharded import ShardedCapture
from lightning_mtl.engine.single import SingleTaskParameters, SingleTaskRepresentation
from lightning_mtl.tasks import TaskLosses
from tests._mtl_models import TwoHeads, make_data

ENGINE = Path(mtl.__file__).parent / "engine"
PRIVATE_FSDP2 = ["_get_fsdp_state", "_fsdp_param_group", "fsdp_params", "_unsharded_param", "reduce_grads"]


def _step(engine: GradientEngine, module: TwoHeads, k_batch=slice(0, 8), **kw):
    x, y = make_data(k=len(module.names))[k_batch]
    losses, z = module.task_dict((x, y))
    module.zero_grad()
    engine.backward(losses, module=module, shared=z)
    return engine.apply(**kw)


def test_public_names_stay_importable():
    assert mtl.GradientEngine is GradientEngine
    from lightning_mtl.engine.core import GradientEngine as Core
    from lightning_mtl.engine.core import StepSummary as CoreSummary
    from lightning_mtl.engine.core import reached_parameters as core_reached
    from lightning_mtl.engine.core import summarize_step as core_summarize

    assert (Core, CoreSummary, core_reached, core_summarize) == (
        GradientEngine,
        StepSummary,
        reached_parameters,
        summarize_step,
    )


@pytest.mark.parametrize(
    "mode, k, expected",
    [
        ("parameter", 2, ParameterCapture),
        ("parameter", 3, ParameterCapture),
        ("representation", 2, RepresentationCapture),
        ("parameter", 1, SingleTaskParameters),
        ("representation", 1, SingleTaskRepresentation),
    ],
)
def test_one_strategy_is_chosen_once_per_model(mode, k, expected):
    torch.manual_seed(0)
    module = TwoHeads(k=k)
    engine = GradientEngine(mtl.MGDA(), mode)
    assert engine.strategy is None
    with pytest.warns(UserWarning, match="Only one task") if k == 1 else _no_warning():
        _step(engine, module)
    chosen = engine.strategy
    assert type(chosen) is expected and isinstance(chosen, CaptureStrategy)
    assert not engine.sharded
    _step(engine, module, slice(8, 16))
    assert engine.strategy is chosen  # kept between steps
    engine.reset()
    assert engine.strategy is None  # chosen again after a reset (new fit, epoch start)
    _step(engine, module)
    assert type(engine.strategy) is expected and engine.strategy is not chosen
    if mode == "parameter" and k > 1:
        assert [id(p) for p in engine.shared_params] == [id(p) for p in module.trunk.parameters()]


class _no_warning:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_sharded_capture_is_a_parameter_capture():
    """The FSDP2 path differs from the exact path only in how rows are captured and what is all-reduced."""
    assert issubclass(ShardedCapture, ParameterCapture)
    overridden = {n for n, v in vars(ShardedCapture).items() if callable(v) and not n.startswith("__")}
    assert overridden == {"_capture_rows", "_reduce_rows", "_reduce_gram"}


def test_private_fsdp2_api_lives_in_one_module():
    for path in [*ENGINE.glob("*.py"), ENGINE.parent / "callbacks" / "multitask.py"]:
        if path.name == "_fsdp.py":
            continue
        text = path.read_text()
        for name in [*PRIVATE_FSDP2, "placements", "Replicate"]:
            assert not re.search(rf"\b{name}\b", text), f"{path.name} uses {name}"
    fsdp = (ENGINE / "_fsdp.py").read_text()
    assert all(name in fsdp for name in PRIVATE_FSDP2)


def test_apply_takes_grad_scale_and_still_accepts_grads_scale_with_a_warning():
    torch.manual_seed(0)
    module = TwoHeads()
    a, b = GradientEngine(mtl.GradNormalize()), GradientEngine(mtl.GradNormalize())
    w_new = _step(a, module, grad_scale=1.0)
    grads_new = [p.grad.clone() for p in module.parameters()]
    with pytest.warns(DeprecationWarning, match=r"grads_scale=.*deprecated.*grad_scale="):
        w_old = _step(b, module, grads_scale=1.0)
    assert torch.equal(w_new, w_old)
    assert all(torch.equal(g, p.grad) for g, p in zip(grads_new, module.parameters()))
    with pytest.raises(TypeError, match="grad_scal"):
        _step(GradientEngine(mtl.Mean()), module, grad_scal=1.0)


def test_capture_alone_then_apply_is_the_interface_the_callback_uses():
    """capture(record, module, grad_scale=, accumulation=) / loop backward / apply(grad_scale=)."""
    torch.manual_seed(0)
    module = TwoHeads()
    engine = GradientEngine(mtl.MGDA())
    losses, z = module.task_dict(make_data()[:8])
    record = TaskLosses(losses, z, torch.stack(list(losses.values())).sum())
    engine.capture(record, module, grad_scale=1.0, accumulation=1)
    record.total.backward()
    w = engine.apply(grad_scale=1.0)
    assert w is not None and engine.steps == 1 and engine.last_step.tasks == ("t0", "t1")
    assert engine.apply() is None  # nothing captured since
