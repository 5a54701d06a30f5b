r"""
Multi-task gradient callback
^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Rewrites the gradient of the shared parameters as a weighted combination of the per-task gradients, in
``on_before_optimizer_step``, for a LightningModule whose ``training_step`` returns
:func:`lightning_mtl.task_losses`.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import lightning.pytorch as pl
import torch
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

from lightning_mtl.callbacks._base import InstanceCallback
from lightning_mtl.callbacks._host_read import DeferredRead
from lightning_mtl.engine import GradientEngine, SharedParameters, StepSummary
from lightning_mtl.engine._compile import DonatedBufferSwitch
from lightning_mtl.tasks import pop_task_losses
from lightning_mtl.weighting import Weighting

__all__ = ["MultiTaskGradient"]


class MultiTaskGradient(InstanceCallback, example_args="mtl.MGDA()"):
    r"""Combine the per-task gradients of the shared parameters with a :class:`~lightning_mtl.weighting.Weighting`.

    The module's ``training_step`` returns ``lightning_mtl.task_losses(self, {name: loss, ...}, shared=z)``.
    Each optimiser step the callback computes the Gramian of the task gradients, asks the weighting for weights
    ``w`` and writes :math:`\sum_k w_k g_k` into the shared parameters' ``.grad``; task-specific parameters
    (heads) keep their own task's gradient. Gradient clipping, the GradScaler and the optimiser then act on the
    rewritten gradient as usual.

    Strategies: a single device, DDP (``"ddp"``, ``"ddp_spawn"``) and FSDP2 (``ModelParallelStrategy`` with
    ``fully_shard``), in both modes; every rank computes the same weights from the global task gradients.
    ``strategy="fsdp"`` (FSDP1) and DeepSpeed are refused at setup.

    **torch.compile.** Supported, with the same update as the eager module:

    * a compiled submodule (``self.encoder = torch.compile(encoder)``, e.g. a Hugging Face encoder fed batches padded
      to different lengths, so with dynamic-shape recompiles): both modes;
    * the whole module (``trainer.fit(torch.compile(module))``): parameter mode. Representation mode refuses it with a
      message: trunk and heads compiled into one graph hide the shared features ``z`` from autograd; compile the
      trunk (any submodule that ends at ``z``) instead.

    A compiled graph is one autograd node that lists every parameter it reads, so parameter mode finds the shared
    parameters behind it by probing each task once per detection (see :mod:`lightning_mtl.engine.detect`), or takes
    them from ``shared_parameters=``. Where the probe cannot tell (a task whose loss the compiler folded away, e.g.
    ``0 * loss`` under inductor; a compiled graph over FSDP2 shards), it raises and asks for ``shared_parameters=``.
    Each task's backward runs through the same compiled graph, which torch forbids for graphs compiled with donated
    buffers; the callback therefore sets ``torch._functorch.config.donated_buffer = False`` while each training
    forward runs (graphs compiled then donate nothing; it costs only the memory the backward would have reused) and
    restores the previous value before the backward. The engine's own per-task backwards run with it off too, after
    checking that no graph on the way was compiled with donated buffers: a graph compiled earlier under torch's
    default (an earlier fit or forward without the callback) stops the fit with a message instead of running twice;
    call ``torch._dynamo.reset()`` before the fit. Nothing is changed for a module that is not compiled.

    **One task.** With a single task loss there is nothing to weight: the callback leaves training exactly as it
    would be without it (bit for bit, both modes), warns once, and logs weight 1 and the task's true gradient norm.

    Args:
        weighting: how to weight the tasks: :class:`~lightning_mtl.Mean`, :class:`~lightning_mtl.Sum`,
            :class:`~lightning_mtl.GradNormalize`, :class:`~lightning_mtl.MGDA`,
            :class:`~lightning_mtl.PrimaryAuxiliary`, :class:`~lightning_mtl.PCGrad`, or a torchjd ``Weighting``.
        mode: ``"parameter"``: exact task gradients of the shared parameters (one forward + K backward passes).
            ``"representation"``: gradients w.r.t. the shared features ``z`` only (MGDA-UB; about the cost of a
            plain step). See :mod:`lightning_mtl.engine` for both, and for the semantics under gradient
            accumulation.
        validate: check every micro-batch that the task losses are finite (without a GradScaler; with one,
            non-finite values are left to the scaler, which skips the step) and that ``training_step`` returned the
            value of ``task_losses`` unchanged. The verdict is computed on the device and read without waiting for
            it: on a CUDA GPU it is copied to pinned host memory and read once the copy has landed (usually at the
            next micro-batch; at the latest at the end of the epoch), so a fault is reported a step or two late and
            no step stalls the GPU. On CPU it is read at once; on other accelerators (MPS) the copy waits.
        log: log per-task weights (``mtl/weight/<task>``), gradient norms (``mtl/grad_norm/<task>``; in
            representation mode the norms of dL/dz) and pairwise cosines (``mtl/cos/<a>~<b>``) at the Trainer's
            ``log_every_n_steps``.
        rank_local: representation mode under DDP: weight with each rank's own Gramian (no all-reduce).
        subtract_last: parameter mode: recover the last task's gradient by subtraction (K backward passes; put the
            dominant loss last under fp16) or compute it explicitly (``False``, K+1 passes).
        shared_parameters: parameter mode: name the shared parameters instead of letting the callback find them: an
            attribute path of the module (``"trunk"``, ``"encoder.layers"``; a list of paths from a LightningCLI
            config), a module, an iterable of parameters, or a callable ``module -> any of these``. Default: the
            parameters that more than one task loss reaches.

    Raises:
        MisconfigurationException: for manual optimisation (drive :class:`~lightning_mtl.engine.GradientEngine`
            with ``engine.backward(...)`` instead), or a strategy that is not supported.
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
        shared_parameters: SharedParameters | None = None,
    ) -> None:
        if mode not in ("parameter", "representation"):
            raise MisconfigurationException(
                f"MultiTaskGradient(mode=...) should be 'parameter' or 'representation', got {mode!r}."
            )
        if rank_local and mode != "representation":
            raise MisconfigurationException("MultiTaskGradient(rank_local=True) only applies to mode='representation'.")
        if shared_parameters is not None and mode != "parameter":
            raise MisconfigurationException(
                "MultiTaskGradient(shared_parameters=...) only applies to mode='parameter'; representation mode reads "
                "the shared features from task_losses(..., shared=z)."
            )
        self.engine = GradientEngine(
            weighting,
            mode,
            rank_local=rank_local,
            subtract_last=subtract_last,
            shared_parameters=shared_parameters,
        )
        self.validate = validate
        self.log = log
        self._donated = DonatedBufferSwitch()
        self._verdicts = DeferredRead()

    @property
    def weighting(self) -> Weighting:
        return self.engine.weighting

    @property
    def mode(self) -> str:
        return self.engine.mode

    @property
    def last_step(self) -> StepSummary | None:
        """A read-only view of the last optimiser step, with task names, Gramian, weights, gradient norms and
        cosines (``None`` before the first step). The logged metrics and the probes read it."""
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
                "MultiTaskGradient works with automatic optimisation only. With manual optimisation, drive the engine "
                "yourself: create `self.engine = lightning_mtl.GradientEngine(weighting)` once, and in training_step "
                "replace `self.manual_backward(loss)` by `self.engine.backward({name: loss, ...}, module=self, "
                "backward=self.manual_backward)` (add `shared=z` for mode='representation'), then call "
                "`self.engine.apply()` before `optimizer.step()`."
            )
        _check_strategy(trainer.strategy, self.engine.mode)
        self.engine.weighting.to(pl_module.device)
        self.engine.reset()  # a callback reused for another fit must not keep the previous model's parameters

    @override
    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.engine.reset()  # find the shared parameters again (layers frozen or unfrozen between epochs)

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        self._donated.off()  # graphs torch.compile builds in this forward can be backpropagated once per task

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._verdicts.flush()  # the loop waits here anyway: the last verdicts of the epoch

    @override
    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._verdicts.flush()

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._donated.restore()
        self._verdicts.clear()

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        self._donated.restore()

    # --- per micro-batch --------------------------------------------------------------------------------------
    @override
    def on_before_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule, loss: Tensor) -> None:
        self._donated.restore()  # the forward is over; a graph compiled before with donated buffers fails loudly
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
            where = f"epoch {trainer.current_epoch}, batch {trainer.fit_loop.epoch_loop.batch_idx}"
            self._validate(record.losses, record.total, loss, scale, accumulation, scaler is not None, where)
        self.engine.capture(record, pl_module, grad_scale=scale, accumulation=accumulation)
        combines = self.engine.shared_params is not None  # parameter mode with several tasks
        if combines and isinstance(trainer.strategy, ModelParallelStrategy):
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
        where: str,
    ) -> None:
        """Compute the verdict on the device, read it on the host when it has landed (see ``validate``)."""
        self._verdicts.poll()  # earlier micro-batches' verdicts that have reached the host
        values = torch.stack([v.detach().reshape(()).float() for v in losses.values()])
        expected = total.detach().float() * (scale / acc if isinstance(scale, float) else scale.float() / acc)
        got = loss.detach().float()
        same = torch.isclose(got, expected, rtol=1e-4, atol=1e-6) | ~torch.isfinite(expected)
        verdict = torch.cat([same.float().reshape(1), got.reshape(1), expected.reshape(1), values])  # fp32: MPS too
        names = list(losses)
        self._verdicts.put(verdict, lambda v: _raise_if_invalid(v, names, amp, where))

    # --- per optimiser step -----------------------------------------------------------------------------------
    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        scaler = _scaler(trainer)
        still_scaled = scaler is not None and getattr(optimizer, "_step_supports_amp_scaling", False)
        # fused optimizers unscale inside their step, so .grad still carries the loss scale here
        weights = self.engine.apply(grad_scale=scaler._scale if still_scaled else 1.0)
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


def _raise_if_invalid(verdict: Any, names: list[str], amp: bool, where: str) -> None:
    """Raise for a verdict of :meth:`MultiTaskGradient._validate`: ``[same, got, expected, *task losses]``."""
    same, got, expected, values = bool(verdict[0]), float(verdict[1]), float(verdict[2]), verdict[3:]
    if not same:
        raise ValueError(
            f"training_step returned a loss that is not the value of task_losses(...) ({where}: backward got "
            f"{got:.6g}, expected {expected:.6g}). Return task_losses(...) unchanged; put any extra term "
            "(a regulariser, ...) into the dict as a task of its own."
        )
    bad = {n: float(v) for n, v in zip(names, values, strict=True) if not math.isfinite(v)}
    if bad and not amp:
        raise FloatingPointError(
            f"Non-finite task loss(es) {bad} ({where}). Without a GradScaler this would put NaN into the parameters. "
            "Fix the loss (learning rate, log of 0, ...) or enable anomaly detection to find it."
        )


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
