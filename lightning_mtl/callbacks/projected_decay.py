r"""
Projected weight decay callback
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

L2 regularisation as an auxiliary task (Su, https://kexue.fm/archives/8907): the gradient of each
optimizer parameter group is projected so that the step never increases the group's weight norm (to first order),
with no coefficient to tune. The math is in :func:`project_weight_decay` and :func:`weight_decay_coefficient`;
:class:`ProjectedWeightDecay` applies it to ``.grad`` in ``on_before_optimizer_step``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

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
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_mtl._dtensor import local_tensor
from lightning_mtl._utils import no_decay_groups
from lightning_mtl.callbacks._base import InstanceCallback
from lightning_mtl.probes.stats import reduce_sharded_rows

__all__ = ["ProjectedWeightDecay", "project_weight_decay", "weight_decay_coefficient"]


def weight_decay_coefficient(dot: Tensor, sq_norm: Tensor) -> Tensor:
    r"""The coefficient :math:`c = \mathrm{relu}(-\langle g,\theta\rangle)/\|\theta\|^2` of
    :math:`u = g + c\,\theta`, from ``dot`` :math:`=\langle g,\theta\rangle` and ``sq_norm``
    :math:`=\|\theta\|^2` (tensors of any matching shape, element-wise); 0 where :math:`\|\theta\| = 0`.

    No synchronisation: the result stays a tensor on ``dot``'s device.
    """
    positive = sq_norm > 0
    safe = torch.where(positive, sq_norm, torch.ones_like(sq_norm))
    return torch.where(positive, torch.relu(-dot) / safe, torch.zeros_like(dot))


def _accumulation_dtype(t: Tensor) -> torch.dtype:
    """At least float32 for the inner products (bf16/fp16 weights would lose the sign of a small product)."""
    return torch.promote_types(t.dtype, torch.float32)


def _dot(a: Tensor, b: Tensor) -> Tensor:
    """:math:`\\langle a, b\\rangle` over all elements, accumulated in at least float32, returned in float64."""
    dtype = torch.promote_types(_accumulation_dtype(a), _accumulation_dtype(b))
    return torch.dot(a.reshape(-1).to(dtype), b.reshape(-1).to(dtype)).double()


def _step_term(coef: Tensor, theta: Tensor, dtype: torch.dtype) -> Tensor:
    """:math:`c\\,\\theta` in ``theta``'s accumulation dtype (no float64 copy of float32 weights), cast to ``dtype``."""
    acc = _accumulation_dtype(theta)
    return (coef.to(device=theta.device, dtype=acc) * theta.to(acc)).to(dtype)


def project_weight_decay(g: Tensor, theta: Tensor) -> Tensor:
    r"""The gradient :math:`u = g + \dfrac{\mathrm{relu}(-\langle g,\theta\rangle)}{\|\theta\|^2}\,\theta` that
    an optimizer step :math:`\theta \leftarrow \theta - \eta u` descends instead of ``g``, for the weights ``theta``
    (one tensor standing for the concatenation of a group; ``g`` of the same shape). Returns a new tensor in ``g``'s
    dtype.

    Properties: :math:`\langle u,\theta\rangle = \max(\langle g,\theta\rangle, 0) \ge 0` (the step does not
    increase :math:`\|\theta\|` to first order), :math:`u = g` exactly when :math:`\langle g,\theta\rangle \ge 0`,
    and :math:`u = g` when :math:`\theta = 0`. See :class:`ProjectedWeightDecay` for the derivation. The inner
    products are taken in float64 for float64 weights and in float32 otherwise: where :math:`\|\theta\|^2`
    underflows there (every :math:`|\theta_i|` below about 1e-154, resp. 1e-19), :math:`\theta` counts as 0.

    Raises:
        ValueError: if ``g`` and ``theta`` do not have the same shape.
    """
    if g.shape != theta.shape:
        raise ValueError(
            f"project_weight_decay(g, theta) needs g and theta of the same shape, got {tuple(g.shape)} and "
            f"{tuple(theta.shape)}. Pass the gradient of theta (flatten and concatenate a group's tensors)."
        )
    coef = weight_decay_coefficient(_dot(g, theta), _dot(theta, theta))
    return g + _step_term(coef, theta, g.dtype)


def check_strategy(strategy: Strategy, callback: str) -> None:
    """Single device, DDP and ModelParallelStrategy (FSDP2 / DTensor) are supported; DeepSpeed and FSDP1 are refused
    (their gradients are not the parameters' ``.grad``); anything else gets a warning."""
    if isinstance(strategy, DeepSpeedStrategy):  # a DDPStrategy subclass: checked first
        raise MisconfigurationException(
            f"{callback} does not support DeepSpeed: DeepSpeed partitions the gradients itself (ZeRO), so the "
            "parameters' .grad that the callback rewrites is not what DeepSpeed steps. Use a single device, DDP, or "
            "ModelParallelStrategy with fully_shard (FSDP2)."
        )
    if isinstance(strategy, FSDPStrategy):
        raise MisconfigurationException(
            f"{callback} does not support strategy='fsdp' (FSDP1): its gradients live in flat sharded buffers whose "
            "inner products the callback cannot tell apart. Use ModelParallelStrategy with fully_shard (FSDP2), "
            "or DDP."
        )
    if not isinstance(strategy, (SingleDeviceStrategy, DDPStrategy, ModelParallelStrategy)):
        rank_zero_warn(
            f"{callback} has not been checked with {type(strategy).__name__}; it expects every parameter's .grad "
            "to hold the global (reduced) gradient, or its DTensor shard."
        )


class ProjectedWeightDecay(InstanceCallback, example_args=""):
    r"""L2 regularisation as an auxiliary task, with no coefficient: project the gradient so that a step never
    increases the weight norm (Su, https://kexue.fm/archives/8907).

    In ``on_before_optimizer_step``, for each optimizer parameter group with :math:`g` and :math:`\theta` the
    group's concatenated gradient and weights (or each tensor alone, with ``per_tensor=True``), the callback replaces
    the gradient by

    .. math::

        u = g + \frac{\mathrm{relu}(-\langle g,\theta\rangle)}{\|\theta\|^2}\,\theta .

    **Derivation and sign.** The optimizer steps :math:`\theta \leftarrow \theta - \eta u`. The main task is the
    loss, with gradient :math:`g_0 = g`; the auxiliary task is :math:`\mathcal L_1 = \tfrac12\|\theta\|^2`, with
    gradient :math:`g_1 = \theta`. To first order the step changes :math:`\mathcal L_1` by
    :math:`\langle\theta, -\eta u\rangle = -\eta\langle u,\theta\rangle`, so "the auxiliary task must not increase"
    is the constraint :math:`\langle u, g_1\rangle = \langle u,\theta\rangle \ge 0` of the article, and the update
    closest to the main gradient, :math:`\max_u \langle u,g_0\rangle - \tfrac12\|u\|^2` under that constraint, is
    its closed form for one auxiliary task:
    :math:`u = g_0 + \mathrm{relu}(-\langle g_0,g_1\rangle)/\|g_1\|^2\; g_1`, the formula above. (The article
    writes it without the trailing :math:`\theta`, a typo: the coefficient multiplies :math:`g_1 = \theta`.)
    Then :math:`\langle u,\theta\rangle = \langle g,\theta\rangle + \mathrm{relu}(-\langle g,\theta\rangle) =
    \max(\langle g,\theta\rangle, 0) \ge 0`: when :math:`\langle g,\theta\rangle \ge 0` the gradient is left exactly
    as it is (descending it already shrinks :math:`\|\theta\|`); when :math:`\langle g,\theta\rangle < 0` (plain
    descent would grow :math:`\|\theta\|`) the component of :math:`g` along :math:`\theta` is removed, so the step
    is tangent to the sphere :math:`\|\theta\| = \text{const}`. A positive multiple of :math:`\theta` is *added*
    to :math:`u`, which the minus sign of the step turns into a pull towards 0.

    The guarantee is about the gradient handed to the optimizer: it is the update direction itself for SGD without
    momentum; momentum, Adam and the optimizer's own ``weight_decay`` transform it further. Gradient clipping runs
    after this hook, on :math:`u` (a positive rescaling keeps :math:`\langle u,\theta\rangle \ge 0`).

    Details:

    * Parameters without a gradient (``.grad is None``) are left out of their group.
    * With ``exclude_no_decay`` (default), the parameters that the usual no-decay rule exempts (fewer than two
      dimensions: biases, norm gains and offsets; the rule of ``no_decay_groups`` in ``lightning_mtl._utils``) are
      left alone and take no part in their group's :math:`g` and :math:`\theta`.
    * :math:`\|\theta\| = 0`: the gradient is left alone.
    * Inner products are accumulated in at least float32 per tensor and summed in float64; the coefficient is a
      tensor, so the callback adds no host synchronisation.
    * Strategies: a single device and DDP (the gradients are already averaged over ranks, so every rank computes
      the same :math:`u`); FSDP2 / DTensor (``ModelParallelStrategy`` with ``fully_shard``): the local shard
      partial sums of :math:`\langle g,\theta\rangle` and :math:`\|\theta\|^2` are summed over the ranks that
      hold the shards (one all-reduce for all groups), then each rank rewrites its own shard. DeepSpeed and
      ``strategy="fsdp"`` (FSDP1) are refused at setup.
    * AMP: the rule is scale-equivariant (a positive loss scale multiplies :math:`u` as it multiplies :math:`g`), so
      it is right whether or not the GradScaler has unscaled ``.grad`` yet (fused optimizers unscale in their step).
      A non-finite gradient makes its group's :math:`u` non-finite, and the GradScaler skips the step as it would
      have anyway.
    * Stateless: nothing goes into the checkpoint.

    Outside Lightning (Fabric, a plain loop) call :meth:`project` with ``optimizer.param_groups`` after the backward
    and before ``optimizer.step()``.

    Args:
        per_tensor: project each tensor's gradient with its own :math:`\theta` instead of the whole group's.
        exclude_no_decay: leave the parameters with fewer than two dimensions alone (``False``: project them too).

    Example::

        >>> import lightning as L
        >>> from lightning_mtl.callbacks import ProjectedWeightDecay
        >>> trainer = L.Trainer(callbacks=[ProjectedWeightDecay()])
    """

    def __init__(self, per_tensor: bool = False, exclude_no_decay: bool = True) -> None:
        for name, value in (("per_tensor", per_tensor), ("exclude_no_decay", exclude_no_decay)):
            if not isinstance(value, bool):
                raise MisconfigurationException(
                    f"ProjectedWeightDecay({name}=...) should be True or False, got {value!r}."
                )
        self.per_tensor = per_tensor
        self.exclude_no_decay = exclude_no_decay
        self._decays: dict[int, bool] = {}
        self._owners: dict[tuple[tuple[int, ...], torch.device], Tensor] = {}  # group index per parameter, on device

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy, "ProjectedWeightDecay")
        self._decays = {}  # FSDP2 swaps the parameters for their shards after setup: classified at the first step

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        self.project(optimizer.param_groups)

    def _is_decayed(self, p: Tensor) -> bool:
        """The no-decay rule of ``no_decay_groups`` (fewer than two dimensions), cached per parameter."""
        key = id(p)
        found = self._decays.get(key)
        if found is None:
            found = bool(no_decay_groups([("", p)], 0.0, trainable_only=False)[0]["params"])
            self._decays[key] = found
        return found

    def _owner_index(self, owner: tuple[int, ...], device: torch.device) -> Tensor:
        """The group of each projected parameter as a device tensor, made once per layout (not copied every step)."""
        index = self._owners.get((owner, device))
        if index is None:
            index = self._owners[(owner, device)] = torch.tensor(owner, device=device)
        return index

    def project(self, param_groups: Iterable[Mapping[str, Any] | Sequence[Tensor]]) -> None:
        r"""Replace each group's ``.grad`` by :math:`u` in place. ``param_groups``: ``optimizer.param_groups``, or
        lists of parameters (one list per group). Under FSDP2 every rank must call it with the same groups (it
        issues one all-reduce)."""
        params: list[Tensor] = []
        owner: list[int] = []
        for i, group in enumerate(param_groups):
            members = group["params"] if isinstance(group, Mapping) else group
            for p in members:
                if p.grad is None or (self.exclude_no_decay and not self._is_decayed(p)):
                    continue
                params.append(p)
                owner.append(i)
        if not params:
            return
        grads = [local_tensor(p.grad) for p in params]  # type: ignore[arg-type]
        thetas = [local_tensor(p).detach() for p in params]
        rows = torch.stack(
            [torch.stack([_dot(g, t), _dot(t, t)]).to(grads[0].device) for g, t in zip(grads, thetas, strict=True)]
        )
        rows = reduce_sharded_rows(rows, params)  # FSDP2: sum the shards' partial sums (a no-op otherwise)
        if self.per_tensor:
            coefs = weight_decay_coefficient(rows[:, 0], rows[:, 1])
        else:
            index = self._owner_index(tuple(owner), rows.device)
            sums = rows.new_zeros(owner[-1] + 1, 2).index_add_(0, index, rows)
            coefs = weight_decay_coefficient(sums[:, 0], sums[:, 1]).index_select(0, index)
        for g, t, c in zip(grads, thetas, coefs, strict=True):
            g.add_(_step_term(c, t, g.dtype))
