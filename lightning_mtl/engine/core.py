"""The engine: binds the tasks, chooses one capture strategy, weighs, keeps state; see :mod:`lightning_mtl.engine`."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_mtl.engine._common import as_tensor
from lightning_mtl.engine.detect import SharedParameters, find_shared, reached_parameters, trainable_parameters
from lightning_mtl.engine.parameter import ParameterCapture
from lightning_mtl.engine.representation import RepresentationCapture
from lightning_mtl.engine.sharded import ShardedCapture
from lightning_mtl.engine.single import SingleTaskParameters, SingleTaskRepresentation
from lightning_mtl.engine.strategy import CaptureStrategy
from lightning_mtl.engine.summary import StepSummary, summarize_step
from lightning_mtl.tasks import TaskLosses
from lightning_mtl.weighting import Weighting, as_weighting

__all__ = ["GradientEngine", "StepSummary", "reached_parameters", "summarize_step"]

Mode = Literal["parameter", "representation"]

_SINGLE_TASK = (
    "Only one task loss was given: there is nothing to weight, so the gradient is left exactly as it is (weight 1; "
    "the logged gradient norm is the task's own)."
)


class GradientEngine:
    """Per-task gradients → Gramian → weights → weighted gradient, for one model.

    Args:
        weighting: a :class:`~lightning_mtl.weighting.Weighting` (or a torchjd ``Weighting``).
        mode: ``"parameter"`` (exact) or ``"representation"`` (cheap; needs ``shared=`` features).
        rank_local: representation mode under DDP: use each rank's own Gramian instead of the all-reduced global
            one (saves a K×K all-reduce; ranks then combine with different weights and their averaged update is
            not the weighting of any one Gramian).
        subtract_last: parameter mode: recover the last task's gradient as ``.grad`` minus the others (K backward
            passes). Its rounding error is about eps·‖Σg‖, so a last task whose gradient is much smaller than the
            others' is imprecise in fp16; put the dominant loss last in the dict, or set ``False`` to compute every
            task gradient explicitly (K+1 backward passes).
        shared_parameters: parameter mode: the shared parameters, named instead of found: an attribute path of the
            module (``"trunk"``, ``"encoder.layers"``, ``"trunk.0.weight"``), a list of paths, a module, an iterable
            of parameters, or a callable ``module -> any of these``. ``None`` (default): the parameters that more
            than one task loss reaches (see :mod:`lightning_mtl.engine.detect`).
    """

    def __init__(
        self,
        weighting: Weighting | nn.Module,
        mode: Mode = "parameter",
        *,
        rank_local: bool = False,
        subtract_last: bool = True,
        shared_parameters: SharedParameters | None = None,
    ) -> None:
        if mode not in ("parameter", "representation"):
            raise ValueError(f"mode must be 'parameter' or 'representation', got {mode!r}.")
        if shared_parameters is not None and mode != "parameter":
            raise ValueError("shared_parameters only applies to mode='parameter' (representation mode uses shared=z).")
        self.weighting = as_weighting(weighting)
        self.mode: Mode = mode
        self.rank_local = rank_local
        self.subtract_last = subtract_last
        self.shared_parameters = shared_parameters
        self.tasks: tuple[str, ...] | None = None
        self.last_gramian: Tensor | None = None
        self.last_weights: Tensor | None = None
        self.steps = 0
        self.bytes_all_reduced = 0  # for the scaling benchmark
        self._strategy: CaptureStrategy | None = None
        self._captured = 0  # micro-batches captured since the last apply
        self._warned_single = False

    def reset(self) -> None:
        """Forget the model: the shared parameters are found again at the next capture (a new ``fit``, or
        parameters frozen or unfrozen). The task order and the weighting's state are kept."""
        self._strategy = None
        self._captured = 0

    # ----------------------------------------------------------------------------------------------------------
    @property
    def strategy(self) -> CaptureStrategy | None:
        """The capture strategy chosen at the first capture since the last :meth:`reset` (``None`` before)."""
        return self._strategy

    @property
    def shared_params(self) -> list[nn.Parameter] | None:
        """The shared parameters in parameter mode, known after the first capture (``None`` before)."""
        return None if self._strategy is None else self._strategy.shared_params

    @property
    def sharded(self) -> bool:
        """Parameter mode found FSDP2-sharded shared parameters (known after the first capture)."""
        return isinstance(self._strategy, ShardedCapture)

    @property
    def last_step(self) -> StepSummary | None:
        """Tasks, Gramian, weights, norms and cosines of the last weighting (``None`` before the first step)."""
        if self.last_gramian is None or self.last_weights is None or self.tasks is None:
            return None
        return summarize_step(self.tasks, self.last_gramian, self.last_weights)

    # ----------------------------------------------------------------------------------------------------------
    def _bind(self, record: TaskLosses, module: nn.Module | None) -> CaptureStrategy:
        names = record.names
        if self.tasks is None:
            self.weighting.bind(names)
            self.tasks = names
        elif names != self.tasks:
            raise ValueError(
                f"The tasks changed between steps: first {list(self.tasks)}, now {list(names)}. The task set and "
                "order are fixed by the first step; return every task each step (use a zero loss, e.g. "
                "`0 * head(z).sum()`, for a task without data in this batch)."
            )
        if self._strategy is None:
            self._strategy = self._choose(record, module)
        return self._strategy

    def _choose(self, record: TaskLosses, module: nn.Module | None) -> CaptureStrategy:
        """The one place where the capture strategy is decided."""
        if len(record.losses) == 1:
            if not self._warned_single:
                self._warned_single = True
                warnings.warn(_SINGLE_TASK, UserWarning, stacklevel=4)
            if self.mode == "representation":
                return SingleTaskRepresentation(self, rank_local=self.rank_local)
            if module is None:
                raise ValueError("Parameter mode needs the module whose parameters the task losses reach.")
            return SingleTaskParameters(self, trainable_parameters(module))
        if self.mode == "representation":
            return RepresentationCapture(self, rank_local=self.rank_local)
        found = find_shared(record, module, self.shared_parameters)
        if found.sharded:
            return ShardedCapture(self, found.params, found.groups, found.holders, subtract_last=self.subtract_last)
        return ParameterCapture(self, found.params, subtract_last=self.subtract_last)

    def _weigh(self, gram: Tensor) -> Tensor:
        w = self.weighting(gram)
        self._record(gram, w)
        return w

    def _record(self, gram: Tensor, weights: Tensor) -> None:
        self.last_gramian = gram.detach()
        self.last_weights = weights.detach()

    # ----------------------------------------------------------------------------------------------------------
    def capture(
        self,
        record: TaskLosses,
        module: nn.Module | None = None,
        *,
        grad_scale: Tensor | float = 1.0,
        accumulation: int = 1,
    ) -> None:
        """Compute what the coming ordinary backward of ``record.total * grad_scale / accumulation`` cannot.

        Call it after the forward pass and before that backward, once per micro-batch.
        """
        strategy = self._bind(record, module)
        factor = as_tensor(grad_scale, record.total) / accumulation
        strategy.capture(record, factor, loss_scale=grad_scale)
        self._captured += 1

    def apply(self, grad_scale: Tensor | float = 1.0, **deprecated: Any) -> Tensor | None:
        """Write the weighted gradient into ``.grad`` (parameter mode); call after the backward, before the step.

        Args:
            grad_scale: the loss scale the ``.grad`` tensors still carry: 1 once a GradScaler has unscaled them
                (the usual case), the scale itself for optimizers that unscale inside their fused step. (The old
                name ``grads_scale=`` is still accepted, with a ``DeprecationWarning``.)

        Returns the weights used (representation mode: those of the last micro-batch), or ``None`` if nothing was
        captured since the last call.
        """
        if deprecated:
            if set(deprecated) != {"grads_scale"}:
                unknown = sorted(set(deprecated) - {"grads_scale"})
                raise TypeError(f"GradientEngine.apply() got unexpected keyword argument(s) {unknown}.")
            warnings.warn(
                "GradientEngine.apply(grads_scale=...) is deprecated; use grad_scale=... (the name capture() and "
                "backward() use). The old name will be removed in the next release.",
                DeprecationWarning,
                stacklevel=2,
            )
            grad_scale = deprecated["grads_scale"]
        if self._captured == 0:
            return None
        assert self._strategy is not None
        self._captured = 0
        self.steps += 1
        return self._strategy.apply(grad_scale)

    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        module: nn.Module | None = None,
        shared: Tensor | None = None,
        backward: Callable[[Tensor], Any] | None = None,
        grad_scale: Tensor | float = 1.0,
        accumulation: int = 1,
    ) -> Tensor:
        """For hand-written, Fabric and manual-optimisation loops: capture, then run ``backward(sum(losses) /
        accumulation)``.

        ``backward`` defaults to ``Tensor.backward``; pass ``fabric.backward`` under Fabric or
        ``self.manual_backward`` in a LightningModule with manual optimisation (they apply the strategy's and
        precision's behaviour). ``grad_scale`` is the loss scale that ``backward`` applies (fp16 GradScaler).
        Call :meth:`apply` before the optimiser step. Returns the (unscaled, undivided) summed loss.
        """
        record = TaskLosses(dict(losses), shared, torch.stack([v.reshape(()) for v in losses.values()]).sum())
        self.capture(record, module, grad_scale=grad_scale, accumulation=accumulation)
        (backward or Tensor.backward)(record.total / accumulation)
        return record.total.detach()

    # ----------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "steps": self.steps, "weighting": self.weighting.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tasks = None if state.get("tasks") is None else tuple(state["tasks"])
        if self.tasks is not None:
            self.weighting.bind(self.tasks)
        self.steps = int(state.get("steps", 0))
        if "weighting" in state:
            self.weighting.load_state_dict(state["weighting"])
