"""A CPU stand-in for ``torch.cuda.set_sync_debug_mode("error")``: :class:`NoHostSync` fails on every operation that
would make the host wait for an accelerator, so the CPU suite proves that a training step never stalls a GPU.

What it refuses, by the ATen operation that carries it:

- ``aten._local_scalar_dense``: a value read on the host (``.item()``, ``bool(t)``, ``float(t)``, ``int(t)``,
  ``if t:``, indexing with a 0-d tensor);
- ``Tensor.tolist()`` (patched while the mode is active: on CPU it dispatches nothing);
- ``aten.lift_fresh``: a tensor built from Python data (``torch.tensor([...])``), a host-to-device copy on a GPU;
- data-dependent shapes (``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing), which read a count back;
- a copy between devices (``.to(other_device)``, ``.cpu()``).

``Tensor.numpy()`` is allowed: it only works on host memory (it raises for a CUDA tensor), so it cannot hide one.
Tensor factories with Python scalars (``torch.full``, ``torch.zeros``) are allowed: they launch a kernel, no copy.
"""

from __future__ import annotations

import traceback
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten


class HostSyncError(AssertionError):
    """An operation that synchronises the host with an accelerator ran inside :class:`NoHostSync`."""


_REFUSED = {
    aten._local_scalar_dense.default: "reads a tensor's value on the host (.item(), bool(), float(), int(), or "
    "indexing with a 0-d tensor)",
    aten.lift_fresh.default: "builds a tensor from Python data (torch.tensor(...)): a host-to-device copy on a GPU",
    aten.lift_fresh_copy.default: "builds a tensor from Python data (torch.tensor(...)): a host-to-device copy on "
    "a GPU",
    aten.nonzero.default: "has a data-dependent shape (nonzero / boolean indexing): the count is read on the host",
    aten.masked_select.default: "has a data-dependent shape (masked_select): the count is read on the host",
    aten._unique2.default: "has a data-dependent shape (unique)",
    aten.unique_consecutive.default: "has a data-dependent shape (unique_consecutive)",
    aten.unique_dim.default: "has a data-dependent shape (unique)",
}
_INDEXING = {aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default}
_COPIES = {aten._to_copy.default, aten.copy_.default}


def _devices(func: Any, args: tuple, kwargs: dict) -> tuple[torch.device, torch.device] | None:
    if func is aten._to_copy.default:
        src, dst = args[0].device, kwargs.get("device")
        return (src, torch.device(dst)) if dst is not None else None
    dst, src = args[0], args[1]
    return (src.device, dst.device) if isinstance(src, torch.Tensor) else None


class NoHostSync(TorchDispatchMode):
    """Raise :class:`HostSyncError` (with the Python stack of the offending line) on a host synchronisation."""

    def __init__(self, where: str = "") -> None:
        super().__init__()
        self.where = where

    def _fail(self, what: str) -> None:
        stack = "".join(traceback.format_stack(limit=12)[:-2])
        raise HostSyncError(f"{self.where}: an operation {what}.\n{stack}")

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _REFUSED:
            self._fail(_REFUSED[func])
        if func in _INDEXING:
            indices = args[1] if len(args) > 1 else kwargs.get("indices", ())
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                self._fail("indexes with a boolean mask (a data-dependent shape: the count is read on the host)")
        if func in _COPIES:
            pair = _devices(func, args, kwargs)
            if pair is not None and pair[0].type != pair[1].type:
                self._fail(f"copies between devices ({pair[0]} -> {pair[1]})")
        return func(*args, **kwargs)

    def __enter__(self) -> NoHostSync:
        self._tolist = torch.Tensor.tolist
        mode = self

        def tolist(t: torch.Tensor) -> Any:
            mode._fail("reads a tensor on the host (.tolist())")

        torch.Tensor.tolist = tolist  # type: ignore[method-assign]
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        torch.Tensor.tolist = self._tolist  # type: ignore[method-assign]
        return super().__exit__(*exc)


def checked(fn: Callable[..., Any], where: str, active: Callable[[], bool] = lambda: True) -> Callable[..., Any]:
    """``fn`` run inside :class:`NoHostSync` whenever ``active()`` (e.g. after the first step, which finds the shared
    parameters and is allowed to read the host)."""

    def wrapper(*args: Any, **kwargs: Any) -> Any:
        if not active():
            return fn(*args, **kwargs)
        with NoHostSync(where):
            return fn(*args, **kwargs)

    return wrapper


def check_hooks(obj: Any, hooks: tuple[str, ...], active: Callable[[], bool] = lambda: True) -> Any:
    """Wrap the named methods of ``obj`` (an instance) in :func:`checked`; returns ``obj``."""
    for name in hooks:
        setattr(obj, name, checked(getattr(obj, name), f"{type(obj).__name__}.{name}", active))
    return obj


@contextmanager
def accelerator_paths(monkeypatch: Any) -> Iterator[None]:
    """Make the library take the branches it takes on an accelerator (see ``lightning_mtl._device``) on CPU."""
    import lightning_mtl._device as device

    monkeypatch.setattr(device, "on_host", lambda t: False)
    yield
