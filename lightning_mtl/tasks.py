"""How a module hands its per-task losses (and, optionally, shared features) to the multi-task callbacks."""

from __future__ import annotations

import functools
from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import Tensor, nn

__all__ = ["TaskLosses", "pop_task_losses", "task_losses"]

_ATTR = "_lightning_mtl_task_losses"


@dataclass(frozen=True)
class TaskLosses:
    """What :func:`task_losses` recorded for one (micro-)batch.

    Attributes:
        losses: the task losses, in the order of the dict (this order is the Gramian's).
        shared: the shared features, for representation mode.
        total: the tensor :func:`task_losses` returned, ``sum(losses.values())``.
    """

    losses: dict[str, Tensor]
    shared: Tensor | None
    total: Tensor

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(self.losses)


def task_losses(module: nn.Module, losses: Mapping[str, Tensor], *, shared: Tensor | None = None) -> Tensor:
    """Return ``sum(losses.values())`` and record the per-task losses on ``module`` for the callbacks.

    Call it as the last line of ``training_step``. Without a multi-task callback the module trains exactly as
    if it had returned the sum; with :class:`~lightning_mtl.callbacks.MultiTaskGradient` the gradient of the shared
    parameters becomes the weighted combination of the task gradients.

    Args:
        module: the module whose ``training_step`` this is (``self``).
        losses: task name -> scalar loss. The order of the dict is the task order (for ``primary=0`` etc.).
        shared: the shared features ``z`` that every task head reads (needed for ``mode="representation"``).

    Example::

        def training_step(self, batch, batch_idx):
            z = self.trunk(batch["x"])
            return mtl.task_losses(
                self, {"left": F.cross_entropy(self.h1(z), batch["y1"]),
                       "right": F.cross_entropy(self.h2(z), batch["y2"])}, shared=z)
    """
    if not isinstance(losses, Mapping) or not losses:
        raise ValueError("task_losses(...) needs a non-empty dict {task name: scalar loss}.")
    out: dict[str, Tensor] = {}
    for name, loss in losses.items():
        if not isinstance(name, str):
            raise TypeError(f"task_losses(...): task names must be strings, got {name!r}.")
        if not isinstance(loss, Tensor):
            raise TypeError(f"task_losses(...): the loss of task {name!r} is a {type(loss).__name__}, not a Tensor.")
        if loss.numel() != 1:
            raise ValueError(
                f"task_losses(...): the loss of task {name!r} must be a scalar, got shape {tuple(loss.shape)}. "
                "Reduce it first (e.g. .mean())."
            )
        if not loss.is_floating_point():
            raise TypeError(f"task_losses(...): the loss of task {name!r} has dtype {loss.dtype}; it must be floating.")
        out[name] = loss.reshape(())
    if shared is not None and not isinstance(shared, Tensor):
        raise TypeError(f"task_losses(shared=...) must be a Tensor, got {type(shared).__name__}.")
    values = list(out.values())
    dtype = functools.reduce(torch.promote_types, (v.dtype for v in values))
    total = values[0] if len(values) == 1 else torch.stack([v.to(dtype) for v in values]).sum()
    object.__setattr__(module, _ATTR, TaskLosses(out, shared, total))
    return total


def pop_task_losses(module: nn.Module) -> TaskLosses | None:
    """Take (and clear) the record that :func:`task_losses` left on ``module``, or ``None`` if there is none."""
    record = module.__dict__.pop(_ATTR, None)
    return record
