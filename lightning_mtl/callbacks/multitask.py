r"""
Multi-task gradient callback
^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Rewrites the gradient of the shared parameters as a weighted combination of the per-task gradients, in
``on_before_optimizer_step``, for a LightningModule whose ``training_step`` returns
:func:`lightning_mtl.task_losses`.
"""

from __future__ import annotations

from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import (
    DDPStrategy,
    DeepSpeedStrategy,
    FSDPStrategy,
    ModelParallelStrategy,
    SingleDeviceStrategy,
    Strategy,
)
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch import Tensor, nn
from typing_extensions import override

from lightning_mtl.engine import GradientEngine, StepSummary
from lightning_mtl.tasks import pop_task_losses
from lightning_mtl.weighting import Weighting

__all__ = ["MultiTaskGradient"]


class MultiTaskGradient(Callback):
    r"""Combine the per-task gradients of the shared parameters with a :class:`~lightning_mtl.weighting.Weighting`.

    The module's ``training_step`` returns ``lightning_mtl.task_losses(self, {name: loss, ...}, shared=z)``.
    Each optimiser step the callback computes the Gramian of the task gradients, asks the weighting for weights
    ``w`` and writes :math:`\sum_k w_k g_k` into the shared parameters' ``.grad``; task-specific parameters
    (heads) keep their own task's gradient. Gradient clipping, the GradScaler and the optimiser then act on the
    rewritten gradient as usual.

    Strategies: a single device, DDP (``"ddp"``, ``"ddp_spawn"``) and FSDP2 (``ModelParallelStrategy`` with
    ``fully_shard``), in both modes; every rank computes the same weights from the global task gradients.
    ``strategy="fsdp"`` (FSDP1) and DeepSpeed are refused at setup.

    Args:
        weighting: how to weight the tasks: :class:`~lightning_mtl.Mean`, :class:`~lightning_mtl.Sum`,
            :class:`~lightning_mtl.GradNormalize`, :class:`~lightning_mtl.MGDA`,
            :class:`~lightning_mtl.PrimaryAuxiliary`, :class:`~lightning_mtl.PCGrad`, or a torchjd ``Weighting``.
        mode: ``"parameter"``: exact task gradients of the shared parameters (one forward + K backward passes).
            ``"representation"``: gradients w.r.t. the shared features ``z`` only (MGDA-UB; about the cost of a
            plain step). See :mod:`lightning_mtl.engine` for both, and for the semantics under gradient
            accumulation.
        validate: check every step that the task losses are finite (without a GradScaler; with one, non-finite
            values are left to the scaler, which skips the step) and that ``training_step`` returned the value of
            ``task_losses`` unchanged. Costs one device synchronisation per step; turn off once the setup works.
        log: log per-task weights (``mtl/weight/<task>``), gradient norms (``mtl/grad_norm/<task>``; in
            representation mode the norms of dL/dz) and pairwise cosines (``mtl/cos/<a>~<b>``) at the Trainer's
            ``log_every_n_steps``.
        rank_local: representation mode under DDP: weight with each rank's own Gramian (no all-reduce).
        subtract_last: parameter mode: recover the last task's gradient by subtraction (K backward passes; put the
            dominant loss last under fp16) or compute it explicitly (``False``, K+1 passes).

    Raises:
        MisconfigurationException: for manual optimisation, or a strategy that is not supported.
        ValueError / TypeError: at the first step, if ``training_step`` did not return ``task_losses(...)``, a task
            loss is not a scalar, the task set changes between steps, or ``shared`` is missing or detached in
            representation mode. ``FloatingPointError`` if a task loss is NaN/inf (with ``validate=True`` and no
            GradScaler).

    Example::

        >>> import lightning as L
        >>> import lightning_mtl as mtl
        >>> from lightning_mtl.callbacks import MultiTaskGradient
        >>> trainer = L.Trainer(callbacks=[MultiTaskGradient(mtl.MGDA())])
    """

    def __init__(
        self,
        weighting: Weighting | nn.Module,
        mode: Literal["parameter", "representation"] = "parameter",
        *,
        validate: bool = True,
        log: bool = True,
        rank_local: bool = False,
        subtract_last: bool = True,
    ) -> None:
        if mode not in ("parameter", "representation"):
            raise MisconfigurationException(
                f"MultiTaskGradient(mode=...) should be 'parameter' or 'representation', got {mode!r}."
            )
        if rank_local and mode != "representation":
            raise MisconfigurationException("MultiTaskGradient(rank_local=True) only applies to mode='representation'.")
        self.engine = GradientEngine(weighting, mode, rank_local=rank_local, subtract_last=subtract_last)
        self.validate = validate
        self.log = log
        self._checked = False

    @property
    def weighting(self) -> Weighting:
        return self.engine.weighting

    @property
    def mode(self) -> str:
        return self.engine.mode

    @property
    def last_step(self) -> StepSummary | None:
        """Read-only view of the last optimiser step: task names, Gramian, weights, gradient norms and cosines
        (``None`` before the first step). The logged metrics and the probes read it."""
        return self.engine.last_step

    @property
    def state_key(self) -> str:
        return self._generate_state_key(weighting=type(self.engine.weighting).__name__, mode=self.engine.mode)

    # --- environment ------------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        if not pl_module.automatic_optimization:
            raise MisconfigurationException(
                "MultiTaskGradient works with automatic optimisation only. With manual optimisation, drive "
                "lightning_mtl.engine.GradientEngine yourself: engine.capture(record) before "
                "self.manual_backward(loss), engine.apply() before optimizer.step()."
            )
        _check_strategy(trainer.strategy, self.engine.mode)
        self.engine.weighting.to(pl_module.device)
        self.engine.reset()  # a callback reused for another fit must not keep the previous model's parameters

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.reset()  # find the shared parameters again (layers frozen or unfrozen between epochs)

    # --- per micro-batch --------------------------------------------------------------------------------------
    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        record = pop_task_losses(pl_module)
        if record is None:
            raise ValueError(
                "MultiTaskGradient is attached but training_step did not return lightning_mtl.task_losses(...). "
                "Return `task_losses(self, {name: loss, ...})` (it returns the sum), or remove the callback."
            )
        scaler = _scaler(trainer)
        scale: Tensor | float = scaler._scale if scaler is not None and scaler._scale is not None else 1.0
        accumulation = trainer.accumulate_grad_batches
        if self.validate:
            self._validate(record.losses, record.total, loss, scale, accumulation, scaler is not None)
        self.engine.capture(record, pl_module, grad_scale=scale, accumulation=accumulation)
        if self.engine.mode == "parameter" and isinstance(trainer.strategy, ModelParallelStrategy):
            if not self.engine.sharded:
                raise MisconfigurationException(
                    "MultiTaskGradient(mode='parameter') with ModelParallelStrategy needs the shared parameters "
                    "sharded by FSDP2 (`fully_shard` in configure_model): without it nothing reduces their gradients "
                    "across ranks. Apply fully_shard, or use mode='representation'."
                )

    def _validate(
        self,
        losses: dict[str, Tensor],
        total: Tensor,
        loss: Tensor,
        scale: Tensor | float,
        acc: int,
        amp: bool,
    ) -> None:
        values = torch.stack([v.detach().float() for v in losses.values()])
        expected = total.detach().float() * (scale / acc if isinstance(scale, float) else scale.float() / acc)
        same = torch.isclose(loss.detach().float(), expected, rtol=1e-4, atol=1e-6) | ~torch.isfinite(expected)
        finite = torch.isfinite(values)
        flags = torch.cat([same.reshape(1), finite]).tolist()  # the one synchronisation
        if not flags[0]:
            raise ValueError(
                "training_step returned a loss that is not the value of task_losses(...) "
                f"(backward got {float(loss):.6g}, expected {float(expected):.6g}). Return task_losses(...) unchanged; "
                "put any extra term (a regulariser, ...) into the dict as a task of its own."
            )
        if not amp and not all(flags[1:]):
            bad = {n: float(v) for n, v, ok in zip(losses, values.tolist(), flags[1:], strict=True) if not ok}
            raise FloatingPointError(
                f"Non-finite task loss(es) {bad}. Without a GradScaler this would put NaN into the parameters. "
                "Fix the loss (learning rate, log of 0, ...) or enable anomaly detection to find it."
            )

    # --- per optimiser step -----------------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = _scaler(trainer)
        still_scaled = scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False)
        # fused optimizers unscale inside their step, so .grad still carries the loss scale here
        weights = self.engine.apply(grads_scale=scaler._scale if still_scaled else 1.0)
        if weights is None:
            return
        if self.log and trainer._logger_connector.should_update_logs:  # the steps the Trainer writes out
            self._log(pl_module)

    def _log(self, pl_module: pl.LightningModule) -> None:
        step = self.last_step
        if step is None:
            return
        names = step.tasks
        metrics: dict[str, Tensor] = {}
        for i, a in enumerate(names):
            metrics[f"mtl/weight/{a}"] = step.weights[i].float()
            metrics[f"mtl/grad_norm/{a}"] = step.norms[i].float()
            for j in range(i + 1, len(names)):
                metrics[f"mtl/cos/{a}~{names[j]}"] = step.cosines[i, j].float()
        pl_module.log_dict(metrics, on_step=True, on_epoch=False, sync_dist=False)
        self.engine.weighting.report_fallbacks()

    # --- checkpointing ----------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return self.engine.state_dict()

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.engine.load_state_dict(state_dict)


def _scaler(trainer: pl.Trainer) -> torch.amp.GradScaler | None:
    return getattr(trainer.precision_plugin, "scaler", None)


def _check_strategy(strategy: Strategy, mode: str) -> None:
    """Single device, DDP and FSDP2 (ModelParallelStrategy with ``fully_shard``): both modes. Others: refused."""
    name = type(strategy).__name__
    if isinstance(strategy, DeepSpeedStrategy):  # a DDPStrategy subclass: checked first
        raise MisconfigurationException(
            "MultiTaskGradient does not support DeepSpeed: DeepSpeed runs its own backward and gradient partitioning "
            "(ZeRO), so the per-task gradients and the rewritten .grad never meet. Supported: a single device, "
            "DDP, and ModelParallelStrategy / FSDP2 (both modes)."
        )
    if isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)):
        return
    if isinstance(strategy, FSDPStrategy):
        raise MisconfigurationException(
            "MultiTaskGradient does not support strategy='fsdp' (FSDP1): its flat-parameter gradient shards are "
            "not reachable per task. Use ModelParallelStrategy with `fully_shard` (FSDP2; both modes), or DDP."
        )
    raise MisconfigurationException(
        f"MultiTaskGradient does not support {name}. Supported: a single device, DDP, and "
        "ModelParallelStrategy / FSDP2 (both modes)."
    )
