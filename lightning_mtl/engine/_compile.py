"""What the engine needs to know about ``torch.compile``: compiled autograd nodes, and donated buffers.

**Compiled nodes.** AOTAutograd (behind every ``torch.compile`` backend that trains: ``inductor``, ``aot_eager``, ...)
turns each compiled graph into a single autograd node, ``CompiledFunctionBackward``, whose inputs are every parameter
the graph reads. Walking the autograd graph from one task's loss therefore reaches every parameter of a compiled
region, including the other tasks' heads when trunk and heads are compiled together.

**Donated buffers.** By default AOTAutograd lets a compiled backward reuse ("donate") the memory of tensors it saved
for itself, which makes that backward runnable once only; torch then refuses ``retain_graph=True``. The engine runs a
backward once per task through the same graph, so

* the forward must be compiled without donated buffers: :func:`without_donated_buffers` sets
  ``torch._functorch.config.donated_buffer = False`` while it runs (the flag is read when a graph is compiled; graphs
  compiled meanwhile donate nothing) and restores the previous value (MultiTaskGradient does this around every
  training forward);
* the engine's own retained backwards (:func:`retained_backward`) run with the flag off too, because torch also reads
  it there, after checking that no compiled graph on the way was compiled *with* donated buffers (an earlier compile
  under the default): such a graph is refused with a message, never run twice.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterable, Iterator
from typing import Any

from torch import Tensor

__all__ = [
    "DonatedBufferSwitch",
    "donating_graphs",
    "is_compiled_node",
    "retained_backward",
    "without_donated_buffers",
]

_DONATED_HINT = "non-empty donated buffers"


def is_compiled_node(fn: Any) -> bool:
    """Whether an autograd node is a ``torch.compile`` (AOTAutograd) graph."""
    return type(fn).__name__.startswith("CompiledFunction")


def _functorch_config() -> Any | None:
    try:
        import torch._functorch.config as config
    except ImportError:  # pragma: no cover - very old or stripped builds
        return None
    return config if hasattr(config, "donated_buffer") else None


class DonatedBufferSwitch:
    """Turn AOTAutograd's donated buffers off (:meth:`off`) and back to what they were (:meth:`restore`); both
    idempotent, so a callback can call them from separate hooks and again on teardown."""

    def __init__(self) -> None:
        self._saved: bool | None = None

    def off(self) -> None:
        config = _functorch_config()
        if config is None or self._saved is not None:
            return
        self._saved = bool(config.donated_buffer)
        config.donated_buffer = False

    def restore(self) -> None:
        config = _functorch_config()
        if config is None or self._saved is None:
            return
        config.donated_buffer = self._saved
        self._saved = None


@contextlib.contextmanager
def without_donated_buffers() -> Iterator[None]:
    """Run a forward pass so that the graphs ``torch.compile`` builds meanwhile can be backpropagated once per task.

    :class:`~lightning_mtl.callbacks.MultiTaskGradient` does this around every training forward by itself; in a
    hand-written or Fabric loop, wrap the forward of a compiled model::

        with lightning_mtl.engine.without_donated_buffers():
            z, out_a, out_b = model(x)
        engine.backward({"a": loss_a(out_a), "b": loss_b(out_b)}, module=model, shared=z)

    It sets ``torch._functorch.config.donated_buffer = False`` (read when a graph is compiled; it only costs the
    memory the backward would have reused) and restores the previous value on exit; the engine turns it off around
    its own per-task backwards by itself. Uncompiled models pay nothing.
    """
    switch = DonatedBufferSwitch()
    switch.off()
    try:
        yield
    finally:
        switch.restore()


def _aot_ran() -> bool:
    """Whether AOTAutograd compiled anything in this process (so that a compiled node can be in a graph at all)."""
    dynamo = sys.modules.get("torch._dynamo.utils")
    counters = getattr(dynamo, "counters", None)
    return bool(counters is not None and counters["aot_autograd"]["total"])


def donating_graphs(roots: Iterable[Tensor]) -> int:
    """How many compiled graphs reachable from ``roots`` were compiled with donated buffers (private torch metadata,
    read only: ``CompiledFunction.metadata.bw_donated_idxs``)."""
    if not _aot_ran():
        return 0
    seen: set[Any] = set()
    stack = [t.grad_fn for t in roots]
    found = 0
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        if is_compiled_node(fn):
            meta = getattr(getattr(fn, "_forward_cls", None), "metadata", None)
            found += bool(getattr(meta, "bw_donated_idxs", None))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return found


_DONATED_MESSAGE = (
    "A torch.compile'd graph on the way of the task losses was compiled with donated buffers, so its backward can run "
    "only once, but the multi-task engine runs one backward per task through it. MultiTaskGradient compiles the "
    "training forward without donated buffers by itself; in your own loop run the forward under "
    "`with lightning_mtl.engine.without_donated_buffers():` (or set torch._functorch.config.donated_buffer = False "
    "before the first compiled call). If this graph was compiled before (an earlier fit or forward without the "
    "callback), call torch._dynamo.reset() first so that it is compiled again."
)


@contextlib.contextmanager
def retained_backward(roots: Iterable[Tensor]) -> Iterator[None]:
    """Around the engine's ``retain_graph=True`` backwards from ``roots``: refuse graphs compiled with donated
    buffers, run with donated buffers off (torch reads the flag at backward time too), and turn torch's own
    donated-buffer error into one that says what to do."""
    if donating_graphs(roots):
        raise RuntimeError(_DONATED_MESSAGE)
    switch = DonatedBufferSwitch()
    switch.off()
    try:
        yield
    except RuntimeError as err:
        if _DONATED_HINT not in str(err):
            raise
        raise RuntimeError(_DONATED_MESSAGE) from err
    finally:
        switch.restore()
