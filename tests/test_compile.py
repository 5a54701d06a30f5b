"""torch.compile: a compiled module or submodule trains with MultiTaskGradient exactly like the eager one, or is
refused with a message (issue 16, cases 1, 4 and 5).

The tests compile with the ``aot_eager`` backend: everything that matters here (one ``CompiledFunctionBackward``
autograd node per graph, donated buffers) is AOTAutograd's, which every training backend shares, and ``aot_eager``
compiles in a fraction of inductor's time on CPU. Set ``LIGHTNING_MTL_COMPILE_BACKEND=inductor`` to run them with
the default backend.
"""

from __future__ import annotations

import os

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_mtl as mtl
from lightning_mtl.callbacks import MultiTaskGradient
from tests._mtl_models import trainer

BACKEND = os.environ.get("LIGHTNING_MTL_COMPILE_BACKEND", "aot_eager")


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    """Every test compiles its own graphs (and never hits dynamo's recompile limit, which would fall back to eager)."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compiled_in_graph(t: torch.Tensor) -> bool:
    seen, stack = set(), [t.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if type(fn).__name__.startswith("CompiledFunction"):
            return True
        stack.extend(n for n, _ in fn.next_functions)
    return False


class SeesCompiled(L.Callback):
    """Records whether each training loss ran through a compiled graph (so that a test cannot pass on eager code)."""

    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_before_backward(self, trainer, pl_module, loss):
        self.seen.append(_compiled_in_graph(loss))


class Net(L.LightningModule):
    """The reproduction of issue 16: trunk Linear(20, 32) + GELU, a classification and a regression head."""

    def __init__(self, compile_trunk: bool = False, zero_reg_at_first_step: bool = False) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.trunk = nn.Sequential(nn.Linear(20, 32), nn.GELU())
        self.cls = nn.Linear(32, 4)
        self.reg = nn.Linear(32, 1)
        if compile_trunk:
            self.trunk = torch.compile(self.trunk, backend=BACKEND)
        self.zero_reg_at_first_step = zero_reg_at_first_step

    def training_step(self, batch, batch_idx):
        x, y, t = batch
        z = self.trunk(x)
        reg = F.mse_loss(self.reg(z).squeeze(-1), t)
        if self.zero_reg_at_first_step and batch_idx == 0:
            reg = 0 * reg  # a task without data in this batch, as the README recommends
        return mtl.task_losses(self, {"cls": F.cross_entropy(self.cls(z), y), "reg": reg}, shared=z)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _net_data() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    ds = TensorDataset(
        torch.randn(48, 20, generator=g), torch.randint(0, 4, (48,), generator=g), torch.randn(48, generator=g)
    )
    return DataLoader(ds, batch_size=16)


def _fit(module: L.LightningModule, data, weighting, compile_module: bool = False, **kw) -> SeesCompiled:
    seen = SeesCompiled()
    fitted = torch.compile(module, backend=BACKEND, dynamic=False) if compile_module else module
    trainer(max_steps=3, callbacks=[MultiTaskGradient(weighting, **kw), seen]).fit(fitted, data)
    return seen


def _assert_same_parameters(a: nn.Module, b: nn.Module) -> None:
    for (name, pa), pb in zip(a.named_parameters(), b.parameters(), strict=True):
        torch.testing.assert_close(pa, pb, rtol=0, atol=1e-6, msg=name)


# --- case 1: parameter mode, the whole module compiled --------------------------------------------------------------
@pytest.mark.parametrize("make", [mtl.MGDA, mtl.GradNormalize], ids=["MGDA", "GradNormalize"])
def test_compiled_module_parameter_mode_equals_eager(make):
    """One compiled graph lists every parameter: the heads must still be found task-specific (probed), so the
    compiled run takes the eager run's steps. Before the fix the regression head got w_reg·g_reg (0.15% of its
    gradient under MGDA) and the parameters differed by 0.1 after three steps."""
    eager, compiled = Net(), Net()
    _fit(eager, _net_data(), make())
    seen = _fit(compiled, _net_data(), make(), compile_module=True)
    assert seen.seen == [True, True, True]
    _assert_same_parameters(compiled, eager)


@pytest.mark.parametrize("shared", ["trunk", ["trunk.0.weight", "trunk.0.bias"], lambda m: m.trunk])
def test_compiled_module_with_named_shared_parameters_equals_eager(shared):
    eager, compiled = Net(), Net()
    _fit(eager, _net_data(), mtl.MGDA())
    _fit(compiled, _net_data(), mtl.MGDA(), compile_module=True, shared_parameters=shared)
    _assert_same_parameters(compiled, eager)


def test_probing_a_compiled_graph_counts_a_zero_weighted_task():
    """The shared set is found at the first batch, where the regression loss is 0 * loss: the trunk must still count
    as shared (a NaN probe survives the multiplication by 0), as it does in the eager graph. Inductor folds the
    multiplication away, so the probe sees nothing of that task: then the engine says it cannot tell."""
    eager, compiled = Net(zero_reg_at_first_step=True), Net(zero_reg_at_first_step=True)
    _fit(eager, _net_data(), mtl.MGDA())
    if BACKEND == "inductor":
        with pytest.raises(ValueError, match=r"task 'reg'.*cannot tell.*shared_parameters="):
            _fit(compiled, _net_data(), mtl.MGDA(), compile_module=True)
        return
    _fit(compiled, _net_data(), mtl.MGDA(), compile_module=True)
    _assert_same_parameters(compiled, eager)


# --- case 4: representation mode ----------------------------------------------------------------------------------
def test_compiled_module_representation_mode_is_refused_with_a_message():
    """Trunk and heads in one graph hide z from autograd: a clear refusal, not an AttributeError in a hook."""
    with pytest.raises(ValueError, match=r"torch\.compile.*Compile the trunk only"):
        _fit(Net(), _net_data(), mtl.MGDA(), compile_module=True, mode="representation")


def test_compiled_trunk_representation_mode_equals_eager():
    eager, compiled = Net(), Net(compile_trunk=True)
    _fit(eager, _net_data(), mtl.MGDA(), mode="representation")
    seen = _fit(compiled, _net_data(), mtl.MGDA(), mode="representation")
    assert all(seen.seen)
    _assert_same_parameters(compiled, eager)


def test_compiled_trunk_with_dynamic_shapes_parameter_mode_equals_eager():
    """A graph compiled with dynamic shapes compiles its backward at once, with donated buffers unless the callback
    turned them off for the forward (before the fix: torch's "non-empty donated buffers" error)."""
    eager, compiled = Net(), Net()
    compiled.trunk = torch.compile(compiled.trunk, backend=BACKEND, dynamic=True)
    _fit(eager, _net_data(), mtl.MGDA())
    seen = _fit(compiled, _net_data(), mtl.MGDA())
    assert all(seen.seen)
    _assert_same_parameters(compiled, eager)


def test_a_graph_compiled_with_donated_buffers_earlier_is_refused_with_a_message():
    """A graph compiled (and backpropagated) before the fit, under torch's default donated buffers, cannot run once
    per task: the engine says so (and what to do) instead of running it twice."""
    net = Net(compile_trunk=True)
    net.trunk(torch.randn(16, 20)).square().mean().backward()  # compiled here, with donated buffers
    net.zero_grad()
    with pytest.raises(RuntimeError, match=r"donated buffers.*torch\._dynamo\.reset\(\)"):
        _fit(net, _net_data(), mtl.MGDA())


# --- case 5: a compiled Hugging Face encoder ------------------------------------------------------------------------
class Encoder(L.LightningModule):
    """A tiny BertModel (optionally compiled as a submodule), mean pooling, two heads."""

    def __init__(self, compile_encoder: bool = False, dynamic: bool | None = False) -> None:
        super().__init__()
        transformers = pytest.importorskip("transformers")
        config = transformers.BertConfig(
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            intermediate_size=37,
            vocab_size=100,
            hidden_dropout_prob=0.0,  # inductor draws its own dropout masks: no comparison with eager otherwise
            attention_probs_dropout_prob=0.0,
        )
        torch.manual_seed(0)
        self.enc = transformers.BertModel(config)
        if compile_encoder:
            self.enc = torch.compile(self.enc, backend=BACKEND, dynamic=dynamic)  # see _padded_batches
        self.a = nn.Linear(32, 3)
        self.b = nn.Linear(32, 1)

    def training_step(self, batch, batch_idx):
        ids, mask, y, t = batch
        h = self.enc(input_ids=ids, attention_mask=mask).last_hidden_state
        z = (h * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
        losses = {"a": F.cross_entropy(self.a(z), y), "b": F.mse_loss(self.b(z).squeeze(-1), t)}
        return mtl.task_losses(self, losses, shared=z)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


def _padded_batches() -> DataLoader:
    """Two batches padded to different lengths: two compiled graphs. By default (``dynamic=None``) torch compiles the
    second one with dynamic shapes, and such a graph compiles its backward at once, with donated buffers: the
    failure of issue 16. Dynamo traces a BertModel with symbolic shapes about four times slower than with static
    ones, so only that test uses them; the others compile static graphs."""
    g = torch.Generator().manual_seed(0)
    batches = []
    for n in (5, 7):
        ids = torch.randint(1, 100, (4, n), generator=g)
        mask = torch.ones(4, n, dtype=torch.long)
        mask[0, -2:] = 0
        ids[0, -2:] = 0
        batches.append((ids, mask, torch.randint(0, 3, (4,), generator=g), torch.randn(4, generator=g)))
    return DataLoader(batches, batch_size=None)


@pytest.fixture(scope="module")
def eager_encoders():
    """The eager reference runs, once per mode."""
    pytest.importorskip("transformers")
    out = {}
    for mode in ("parameter", "representation"):
        module = Encoder()
        _fit(module, _padded_batches(), mtl.MGDA(), mode=mode)
        out[mode] = module
    return out


@pytest.mark.parametrize(
    "how, mode, dynamic",
    [("submodule", "parameter", None), ("submodule", "representation", False), ("module", "parameter", False)],
)
def test_compiled_encoder_equals_eager(eager_encoders, how, mode, dynamic):
    """A compiled BertModel as a submodule (both modes) or the whole module compiled (parameter mode): the same
    parameters as eager, without the user touching torch's donated-buffer switch. Before the fix the first case
    stopped with torch's "compiled with non-empty donated buffers ... requires retain_graph=False"."""
    module = Encoder(compile_encoder=how == "submodule", dynamic=dynamic)
    seen = _fit(module, _padded_batches(), mtl.MGDA(), compile_module=how == "module", mode=mode)
    assert seen.seen == [True, True]
    _assert_same_parameters(module, eager_encoders[mode])
    assert torch._functorch.config.donated_buffer  # restored after the fit


def test_compiled_encoder_module_representation_mode_is_refused_with_a_message():
    pytest.importorskip("transformers")
    with pytest.raises(ValueError, match=r"torch\.compile.*mode='parameter'"):
        _fit(Encoder(), _padded_batches(), mtl.MGDA(), compile_module=True, mode="representation")


# --- the engine in a loop of one's own ----------------------------------------------------------------------------
def test_engine_loop_with_a_compiled_trunk_equals_eager():
    """Fabric / hand-written loops: the forward under without_donated_buffers(), then engine.backward."""

    def run(compiled: bool) -> Net:
        net = Net(compile_trunk=compiled)
        engine = mtl.GradientEngine(mtl.MGDA())
        opt = torch.optim.SGD(net.parameters(), lr=0.1)
        for x, y, t in _net_data():
            opt.zero_grad()
            with mtl.engine.without_donated_buffers():
                z = net.trunk(x)
            losses = {"cls": F.cross_entropy(net.cls(z), y), "reg": F.mse_loss(net.reg(z).squeeze(-1), t)}
            engine.backward(losses, module=net)
            engine.apply()
            opt.step()
        return net

    _assert_same_parameters(run(True), run(False))
