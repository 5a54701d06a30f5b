"""Small helpers that several parts of the project need (private): train/eval mode, random-generator state and
nested-batch traversal.

Kept here so that each is written once; the models in :mod:`lightning_gen` use them too.
"""

from __future__ import annotations

import contextlib
import random
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

__all__ = ["RngState", "eval_mode", "first_tensor", "map_tensors"]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` (every submodule) in eval mode, and give each submodule back its own ``training`` flag on
    exit, also after an exception (a submodule frozen in eval mode stays so)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass
class RngState:
    """A snapshot of every random generator a training step may draw from: torch (CPU), CUDA, Python, NumPy."""

    torch_cpu: Tensor
    cuda: list[Tensor] | None
    python: Any
    numpy: Any

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        try:
            import numpy as np

            np_state: Any = np.random.get_state()
        except ImportError:  # pragma: no cover - numpy ships with torch wheels
            np_state = None
        return cls(torch.get_rng_state(), cuda, random.getstate(), np_state)

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        if self.numpy is not None:
            import numpy as np

            np.random.set_state(self.numpy)


def first_tensor(x: Any) -> Tensor | None:
    """``x`` if a Tensor, else the first Tensor of a tuple/list/dict, else ``x.logits`` (``None`` if none)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        for item in x:
            if isinstance(item, Tensor):
                return item
    logits = getattr(x, "logits", None)
    return logits if isinstance(logits, Tensor) else None


def map_tensors(x: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every Tensor in a nested tuple/list/dict/namedtuple, keeping the structure."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return type(x)({k: map_tensors(v, fn) for k, v in x.items()})  # type: ignore[call-arg]
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(map_tensors(v, fn) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(map_tensors(v, fn) for v in x)
    return x
