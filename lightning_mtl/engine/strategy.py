"""The one interface behind which every capture strategy sits.

A :class:`CaptureStrategy` knows how to get the task gradients of one model into a Gramian, and the weighted
gradient back into the step. :class:`~lightning_mtl.engine.GradientEngine` chooses one when it binds the tasks (in
parameter mode: once it has found the shared parameters) and from then on only calls :meth:`~CaptureStrategy.capture`
(once per micro-batch) and :meth:`~CaptureStrategy.apply` (once per optimiser step):

* :class:`~lightning_mtl.engine.parameter.ParameterCapture`: parameter mode, plain or DDP-replicated parameters;
* :class:`~lightning_mtl.engine.sharded.ShardedCapture`: parameter mode, FSDP2-sharded shared parameters;
* :class:`~lightning_mtl.engine.representation.RepresentationCapture`: representation mode;
* :class:`~lightning_mtl.engine.single.SingleTaskParameters`,
  :class:`~lightning_mtl.engine.single.SingleTaskRepresentation`: one task, nothing to weight: training is left
  exactly as it is, the true values are recorded.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Protocol

from torch import Tensor, nn

from lightning_mtl.tasks import TaskLosses

__all__ = ["CaptureStrategy", "Host"]


class Host(Protocol):
    """What a strategy may ask of its engine: weigh a Gramian, record one, count all-reduced bytes."""

    bytes_all_reduced: int

    def _weigh(self, gram: Tensor) -> Tensor:
        """Ask the weighting for the weights of ``gram`` (unscaled, float64, global) and record both."""
        ...

    def _record(self, gram: Tensor, weights: Tensor) -> None:
        """Record a Gramian and the weights used without asking the weighting."""
        ...


class CaptureStrategy(ABC):
    """How the task gradients are captured and the weighted gradient applied.

    Args:
        host: the engine (the weighting, and where the last Gramian and weights are kept).
    """

    #: the shared parameters the strategy combines (parameter mode), ``None`` where it works on features
    shared_params: list[nn.Parameter] | None = None

    def __init__(self, host: Host) -> None:
        self.host = host

    @abstractmethod
    def capture(self, record: TaskLosses, factor: Tensor, *, loss_scale: Tensor | float) -> None:
        """Once per micro-batch, after the forward and before the loop's own backward of ``record.total * factor``.

        Args:
            record: the task losses (and shared features) of this micro-batch.
            factor: ``loss_scale / accumulation`` as a float32 tensor: what the loop's backward multiplies by.
            loss_scale: the loss scale S as the loop gave it (``1.0``, or a GradScaler's scale tensor).
        """

    @abstractmethod
    def apply(self, grad_scale: Tensor | float) -> Tensor | None:
        """Once per optimiser step, after the loop's backward: weight the tasks, write the weighted gradient where
        the strategy has not already put it, and return the weights.

        Args:
            grad_scale: the loss scale the ``.grad`` tensors still carry (1 once a GradScaler has unscaled them).
        """
