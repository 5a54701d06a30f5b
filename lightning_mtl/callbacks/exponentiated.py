r"""
Exponentiated step-size callback
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Per-coordinate (or per-tensor) learning-rate multipliers learned by exponentiated gradient (Su,
https://kexue.fm/archives/8968). The math is in :func:`exponentiated_multiplier_update`;
:class:`ExponentiatedStepSize` keeps the state and rescales ``.grad`` in ``on_before_optimizer_step``.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_mtl._dtensor import is_dtensor, local_tensor
from lightning_mtl.callbacks._base import InstanceCallback
from lightning_mtl.callbacks.projected_decay import check_strategy
from lightning_mtl.probes.stats import reduce_sharded_rows

__all__ = ["ExponentiatedStepSize", "exponentiated_multiplier_update"]


def _grow(nu: Tensor, correlation: Tensor, gamma: float, clamp: tuple[float, float] | None) -> Tensor:
    r""":math:`\nu \odot \exp(\gamma c)`, clamped to ``clamp``."""
    out = nu * torch.exp(gamma * correlation)
    return out if clamp is None else out.clamp(clamp[0], clamp[1])


def exponentiated_multiplier_update(
    nu: Tensor,
    g_prev: Tensor,
    g: Tensor,
    gamma: float,
    *,
    per_layer: bool = False,
    clamp: tuple[float, float] | None = None,
) -> Tensor:
    r"""One exponentiated-gradient step of the learning-rate multipliers:
    :math:`\nu_{t+1} = \nu_t \odot \exp(\gamma\, g_{t-1} \odot g_t)` (Su,
    https://kexue.fm/archives/8968), with ``g_prev`` :math:`= g_{t-1}` and ``g`` :math:`= g_t`.

    With ``per_layer`` ``nu`` is one number for the whole tensor and the update uses the inner product:
    :math:`\nu_{t+1} = \nu_t \exp(\gamma \langle g_{t-1}, g_t\rangle)`. With ``clamp=(lo, hi)`` the result is
    clamped to :math:`[lo, hi]`. Returns a new tensor (``g`` is used in ``g_prev``'s dtype).
    """
    g = g.to(g_prev.dtype)
    correlation = torch.dot(g_prev.reshape(-1), g.reshape(-1)) if per_layer else g_prev * g
    return _grow(nu, correlation, gamma, clamp)


def _state_dtype(p: Tensor) -> torch.dtype:
    """float32, or the parameter's dtype when it is wider (float64)."""
    return torch.promote_types(local_tensor(p).dtype, torch.float32)


class ExponentiatedStepSize(InstanceCallback, example_args="gamma=0.1, clamp=(0.1, 10.0)"):
    r"""Per-coordinate learning-rate multipliers :math:`\nu` learned by exponentiated gradient (Su,
    https://kexue.fm/archives/8968), applied to the gradient so that it composes with any optimizer.

    The article's rule, for the gradient :math:`g_t` of optimizer step :math:`t = 0, 1, \dots`:

    .. math::

        \nu_{t+1} = \nu_t \odot \exp(\gamma\, g_{t-1} \odot g_t), \qquad
        \theta_{t+1} = \theta_t - \eta\, \nu_{t+1} \odot g_t,

    with :math:`\nu_0 = 1` and :math:`g_{-1} = 0`, so :math:`\nu_{t+1} = \exp(\gamma \sum_{k \le t} g_{k-1} \odot
    g_k)`: coordinates whose consecutive gradients agree in sign get a larger step, those that flip get a smaller
    one. It comes from :math:`\nabla_{\nu_t}\mathcal L = -\eta\, g_{t-1} \odot g_t` and exponentiated gradient on
    :math:`\nu` (:math:`\gamma\eta` merged into :math:`\gamma`).

    **Ordering** (the article's, as written above): at step :math:`t` the callback first updates
    :math:`\nu_t \to \nu_{t+1}` with the current gradient :math:`g_t`, then applies the *updated* multiplier to
    that same gradient, ``grad`` :math:`\leftarrow \nu_{t+1} \odot g_t`, and stores :math:`g_t` (the raw gradient,
    before the multiplication) as the next step's :math:`g_{t-1}`. The optimizer then steps on the rewritten
    ``.grad``: with SGD this is the article's update with :math:`\eta` the optimizer's learning rate; with momentum
    or Adam, :math:`\nu` rescales the gradient they receive. On the first step :math:`\nu_1 = \nu_0 = 1`.

    With only ``gamma`` given it is exactly that rule. Options:

    * ``per_layer``: one multiplier per parameter tensor,
      :math:`\nu_{t+1} = \nu_t \exp(\gamma \langle g_{t-1}, g_t\rangle)` (inner product over the whole tensor).
    * ``clamp=(lo, hi)``: :math:`\nu` is clamped to :math:`[lo, hi]` after every update (without it a large
      :math:`\gamma` can drive :math:`\nu` to 0 or to infinity).
    * ``warmup_steps=W``: :math:`\nu` stays 1 during the first :math:`W` steps; the gradients of those steps are
      still recorded, so the first update (at step :math:`W`) is :math:`\exp(\gamma\, g_{W-1} \odot g_W)`.

    Step :math:`t` counts, per parameter, the optimizer steps in which the parameter had a gradient and that were
    not skipped; a parameter whose ``.grad`` is ``None`` is left out of the step (its state does not change).

    **The gradient it sees.** ``on_before_optimizer_step`` runs once per optimizer step, so:

    * DDP: after the all-reduce; every rank computes the same :math:`\nu`.
    * Gradient accumulation: :math:`g_t` is the gradient accumulated over the cycle's micro-batches; one update
      per optimizer step.
    * AMP with a GradScaler (``precision="16-mixed"``): Lightning unscales ``.grad`` before this hook, so
      :math:`\nu` is computed from unscaled gradients. If the scaler found an inf/NaN gradient (it will skip the
      step), the callback leaves ``.grad``, :math:`\nu`, :math:`g_{t-1}` and :math:`t` untouched. Fused optimizers
      unscale inside their step: then the callback divides by the loss scale itself and checks finiteness itself
      (one synchronisation). Without a scaler nothing is checked.
    * Gradient clipping runs after this hook, on the rescaled gradient.
    * FSDP2 (``ModelParallelStrategy`` with ``fully_shard``, DTensor gradients): each rank updates the multipliers
      of its local shards; with ``per_layer`` the shards' partial inner products are all-reduced first.
      DeepSpeed and ``strategy="fsdp"`` (FSDP1) are refused at setup.

    **State.** :math:`\nu`, :math:`g_{t-1}` (tensors like the parameters, in float32, or float64 for float64
    parameters; :math:`\nu` is a scalar per tensor with ``per_layer``) and the step counts go into the checkpoint,
    keyed by parameter name, and a resumed run continues bit for bit like an uninterrupted one. Under FSDP2 the
    checkpoint holds the full tensors (gathered from the shards) and each rank takes its shard back on resume.
    A new fit without a checkpoint starts again from :math:`\nu = 1`. The memory cost is two extra copies of the
    parameters (one with ``per_layer``).

    **Not implemented:** the full algorithm of the paper the article discusses (`arXiv:2202.00145 <https://arxiv.org/abs/2202.00145>`__:
    per-coordinate gains and a global scale on a "funnelled" momentum SGD); only the article's simplified rule is
    provided.

    Outside Lightning (Fabric, a plain loop) call :meth:`apply` after the backward and before
    ``optimizer.step()``.

    Args:
        gamma: the step size :math:`\gamma \ge 0` of the exponentiated gradient on :math:`\nu` (it scales with the
            square of the gradient: try values that make :math:`\gamma\, g^2` small). ``0`` leaves training exactly
            as without the callback.
        per_layer: one multiplier per parameter tensor instead of one per coordinate.
        clamp: ``(lo, hi)`` with :math:`0 < lo \le 1 \le hi` (the range must contain the initial multiplier 1).
        warmup_steps: number of optimizer steps during which :math:`\nu` stays 1.

    Example::

        >>> import lightning as L
        >>> from lightning_mtl.callbacks import ExponentiatedStepSize
        >>> trainer = L.Trainer(callbacks=[ExponentiatedStepSize(gamma=0.1, clamp=(0.1, 10.0))])
    """

    def __init__(
        self,
        gamma: float,
        per_layer: bool = False,
        clamp: tuple[float, float] | None = None,
        warmup_steps: int = 0,
    ) -> None:
        if isinstance(gamma, bool) or not isinstance(gamma, (int, float)) or not math.isfinite(gamma):
            raise MisconfigurationException(
                f"ExponentiatedStepSize(gamma=...) should be a finite number, got {gamma!r}."
            )
        if gamma < 0:
            raise MisconfigurationException(
                f"ExponentiatedStepSize(gamma={gamma}) should be >= 0: a negative gamma would shrink the step where "
                "consecutive gradients agree and grow it where they flip sign. Use gamma > 0 (0 leaves training "
                "unchanged)."
            )
        if not isinstance(per_layer, bool):
            raise MisconfigurationException(
                f"ExponentiatedStepSize(per_layer=...) should be True or False, got {per_layer!r}."
            )
        self.clamp = _check_clamp(clamp)
        if isinstance(warmup_steps, bool) or not isinstance(warmup_steps, int):
            raise MisconfigurationException(
                f"ExponentiatedStepSize(warmup_steps=...) should be an integer, got {warmup_steps!r}."
            )
        if warmup_steps < 0:
            raise MisconfigurationException(
                f"ExponentiatedStepSize(warmup_steps={warmup_steps}) should be >= 0: the number of optimizer steps "
                "during which the multipliers stay 1 (0: from the first step)."
            )
        self.gamma = float(gamma)
        self.per_layer = per_layer
        self.warmup_steps = warmup_steps
        self._nu: dict[str, Tensor] = {}
        self._prev: dict[str, Tensor] = {}
        self._steps: dict[str, int] = {}
        self._params: dict[str, Tensor] = {}
        self._names: dict[int, str] = {}
        self._warned: set[str] = set()
        self._loaded: set[str] = set()

    # --- read-only views ----------------------------------------------------------------------------------------
    @property
    def multipliers(self) -> dict[str, Tensor]:
        r"""The current :math:`\nu` by parameter name (local shards under FSDP2; scalars with ``per_layer``)."""
        return dict(self._nu)

    @property
    def steps(self) -> dict[str, int]:
        """The number of steps :math:`t` each parameter has taken with the callback, by parameter name (under a
        GradScaler the counts live on the device, so reading them waits for it)."""
        return {n: int(s) for n, s in self._steps.items()}

    # --- Lightning hooks ----------------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        check_strategy(trainer.strategy, "ExponentiatedStepSize")
        self._reset()  # a checkpoint, if any, is loaded after setup

    def _reset(self) -> None:
        self._nu, self._prev, self._steps, self._params, self._names = {}, {}, {}, {}, {}
        self._loaded = set()

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if not params:
            return
        grad_scale: Tensor | None = None
        skip: Tensor | None = None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        if scaler is not None and scaler.is_enabled():
            from torch.amp.grad_scaler import OptState

            state = scaler._per_optimizer_states[id(optimizer)]
            device = local_tensor(params[0].grad).device  # type: ignore[arg-type]
            if state["stage"] is OptState.UNSCALED:  # Lightning unscaled .grad before this hook
                found = [v.to(device) for v in state["found_inf_per_device"].values()]
                skip = torch.stack(found).sum() > 0 if found else None
            else:  # a fused optimizer unscales inside its step: .grad still carries the loss scale
                skip = _any_non_finite(params)
                grad_scale = scaler._scale
        self.apply(self._named(pl_module, params), grad_scale=grad_scale, skip=skip)

    def _named(self, pl_module: pl.LightningModule, params: Sequence[Tensor]) -> list[tuple[str, Tensor]]:
        """``(name, parameter)`` of the optimizer's parameters, named as in ``pl_module.named_parameters()``."""
        out = []
        for p in params:
            name = self._names.get(id(p))
            if name is None:  # first step, or parameters swapped (FSDP2 shards, unfrozen layers): look again
                self._names = {id(q): n for n, q in pl_module.named_parameters()}
                name = self._names.get(id(p))
            if name is None:
                key = f"{tuple(p.shape)}@{id(p)}"
                if key not in self._warned:
                    self._warned.add(key)
                    rank_zero_warn(
                        f"ExponentiatedStepSize: an optimizer parameter of shape {tuple(p.shape)} is not a parameter "
                        f"of {type(pl_module).__name__}; its gradient is left alone (the state is keyed by name)."
                    )
                continue
            out.append((name, p))
        return out

    # --- the update ---------------------------------------------------------------------------------------------
    def apply(
        self,
        named_parameters: Iterable[tuple[str, Tensor]],
        *,
        grad_scale: Tensor | float | None = None,
        skip: Tensor | None = None,
    ) -> None:
        r"""One optimizer step: update :math:`\nu` from each parameter's ``.grad`` and rewrite ``.grad`` in place
        as :math:`\nu \odot` ``.grad`` (parameters without a gradient are skipped).

        Call it after the backward (after ``scaler.unscale_(optimizer)`` under AMP) and before
        ``optimizer.step()``, with the parameters' names (``module.named_parameters()``). ``grad_scale``: the factor
        ``.grad`` still carries (the loss scale, when it is not unscaled yet); :math:`\nu` is computed from
        ``.grad / grad_scale``. ``skip``: a boolean 0-d tensor, true for a step that the GradScaler will skip
        (inf/NaN gradients): the state (:math:`\nu`, :math:`g_{t-1}`, the step count) is then left as it was. It is
        applied on the device (``torch.where``), so no step waits for the GPU to say whether it is skipped. Under
        FSDP2 with ``per_layer`` every rank must call it with the same parameters (it issues one all-reduce).
        """
        inv_scale: Tensor | float | None = None
        if grad_scale is not None:
            inv_scale = grad_scale.double().reciprocal().float() if isinstance(grad_scale, Tensor) else 1.0 / grad_scale
        entries = []
        for name, p in named_parameters:
            if p.grad is None:
                continue
            grad = local_tensor(p.grad)
            _, prev = self._slot(name, p, grad)
            g = grad.to(prev.dtype)  # the same tensor when the dtypes agree: copied into prev before grad changes
            if inv_scale is not None:
                g = g * inv_scale
            entries.append((name, p, grad, g))
        if not entries:
            return
        warm = max(self.warmup_steps, 1)
        correlations: dict[str, Tensor] = {}
        if self.per_layer:  # every parameter's <g_{t-1}, g_t>, in one all-reduce under FSDP2
            dots = torch.stack([torch.dot(self._prev[n].reshape(-1), g.reshape(-1)) for n, _, _, g in entries])
            dots = reduce_sharded_rows(dots.unsqueeze(1), [p for _, p, _, _ in entries]).squeeze(1)
            correlations = {e[0]: d for e, d in zip(entries, dots, strict=True)}
        for name, _, grad, g in entries:
            nu, prev, steps = self._nu[name], self._prev[name], self._steps[name]
            if isinstance(steps, int) and skip is None:  # the count is known on the host: no masked update needed
                if steps >= warm:
                    nu = self._nu[name] = _grow(
                        nu, correlations[name] if self.per_layer else prev * g, self.gamma, self.clamp
                    )
                prev.copy_(g)
                self._steps[name] = steps + 1
            else:  # whether the step moves (warm-up over, step not skipped) is decided on the device
                steps = self._device_steps(name, grad.device)
                keep = steps < warm if skip is None else (steps < warm) | skip
                grown = _grow(nu, correlations[name] if self.per_layer else prev * g, self.gamma, self.clamp)
                nu = self._nu[name] = torch.where(keep, nu, grown)
                prev.copy_(g if skip is None else torch.where(skip, prev, g))
                steps.add_(1 if skip is None else (~skip).long())
            grad.mul_(nu)

    def _device_steps(self, name: str, device: torch.device) -> Tensor:
        """The step count of ``name`` as a 0-d tensor on ``device`` (from now on counted there)."""
        steps = self._steps[name]
        if not isinstance(steps, Tensor):
            steps = self._steps[name] = torch.full((), steps, dtype=torch.long, device=device)
        return steps

    def _slot(self, name: str, p: Tensor, grad: Tensor) -> tuple[Tensor, Tensor]:
        r"""The :math:`(\nu, g_{t-1})` of a parameter: created at its first gradient, or taken from a loaded
        checkpoint onto the gradient's device (and, under FSDP2, cut to this rank's shard)."""
        self._params[name] = p
        nu, prev = self._nu.get(name), self._prev.get(name)
        if nu is None or prev is None:
            dtype = _state_dtype(p)
            nu = grad.new_ones((), dtype=dtype) if self.per_layer else torch.ones_like(grad, dtype=dtype)
            prev = torch.zeros_like(grad, dtype=dtype)
            self._nu[name], self._prev[name], self._steps[name] = nu, prev, 0
            return nu, prev
        if name in self._loaded:  # from a checkpoint: onto the gradient's device, and this rank's shard
            self._loaded.discard(name)
            prev = self._localize(name, p, prev, grad)
            nu = nu.to(device=grad.device, dtype=prev.dtype) if self.per_layer else self._localize(name, p, nu, grad)
            self._nu[name], self._prev[name] = nu, prev
            self._steps.setdefault(name, 0)
        return nu, prev

    def _localize(self, name: str, p: Tensor, full: Tensor, grad: Tensor) -> Tensor:
        dtype = _state_dtype(p)
        if is_dtensor(p) and full.shape == p.shape:
            from torch.distributed.tensor import distribute_tensor

            mesh, placements = p.device_mesh, p.placements  # type: ignore[attr-defined]
            full = full.to(device=grad.device, dtype=dtype)
            return distribute_tensor(full, mesh, placements, src_data_rank=None).to_local()  # no communication
        if full.shape == grad.shape:
            return full.to(device=grad.device, dtype=dtype)
        raise ValueError(
            f"ExponentiatedStepSize: the checkpoint's state for {name!r} has shape {tuple(full.shape)}, but the "
            f"parameter's gradient has shape {tuple(grad.shape)}. Resume with the model the checkpoint was saved "
            "from, or train without ckpt_path to start from nu = 1."
        )

    # --- checkpointing ------------------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        """:math:`\\nu`, :math:`g_{t-1}` and the step counts by parameter name (on the CPU; under FSDP2 the full
        tensors, gathered from the shards: every rank must call it, as Lightning does)."""
        return {
            "per_layer": self.per_layer,
            "nu": {n: self._export(n, t) for n, t in self._nu.items()},
            "prev": {n: self._export(n, t) for n, t in self._prev.items()},
            "steps": {n: int(s) for n, s in self._steps.items()},  # a checkpoint may read the device
        }

    def _export(self, name: str, t: Tensor) -> Tensor:
        p = self._params.get(name)
        if p is not None and is_dtensor(p) and t.ndim > 0:  # every rank gathers, even one whose shard is whole
            from torch.distributed.tensor import DTensor

            t = DTensor.from_local(
                t,
                p.device_mesh,  # type: ignore[attr-defined]
                p.placements,  # type: ignore[attr-defined]
                shape=p.shape,
                stride=p.stride(),
            ).full_tensor()
        return t.detach().to("cpu", copy=True)

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        per_layer = state_dict.get("per_layer", self.per_layer)
        if per_layer != self.per_layer:
            raise ValueError(
                f"ExponentiatedStepSize: the checkpoint was saved with per_layer={per_layer}, this callback has "
                f"per_layer={self.per_layer}. Resume with the same setting, or train without ckpt_path."
            )
        self._nu = dict(state_dict["nu"])
        self._prev = dict(state_dict["prev"])
        self._steps = {n: int(s) for n, s in state_dict["steps"].items()}
        self._loaded = set(self._nu) & set(self._prev)


def _check_clamp(clamp: Any) -> tuple[float, float] | None:
    if clamp is None:
        return None
    if isinstance(clamp, (str, bytes)) or not isinstance(clamp, Sequence) or len(clamp) != 2:
        raise MisconfigurationException(
            f"ExponentiatedStepSize(clamp=...) should be a pair (lo, hi) or None, got {clamp!r}."
        )
    lo, hi = clamp
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) or math.isnan(v) for v in (lo, hi)):
        raise MisconfigurationException(f"ExponentiatedStepSize(clamp=(lo, hi)) needs two numbers, got {clamp!r}.")
    if lo <= 0:
        raise MisconfigurationException(
            f"ExponentiatedStepSize(clamp=({lo}, {hi})): lo should be > 0; a multiplier of 0 stops the parameter and "
            "a multiplicative update can never move it again. Use e.g. clamp=(0.1, 10.0)."
        )
    if lo > hi:
        raise MisconfigurationException(
            f"ExponentiatedStepSize(clamp=({lo}, {hi})): lo should be <= hi; swap them (clamp=({hi}, {lo}))."
        )
    if not lo <= 1 <= hi:
        raise MisconfigurationException(
            f"ExponentiatedStepSize(clamp=({lo}, {hi})) should contain 1, the initial multiplier (and the value during "
            "warm-up). To scale every step, change the optimizer's learning rate instead."
        )
    return float(lo), float(hi)


def _any_non_finite(params: Sequence[Tensor]) -> Tensor:
    """Whether any gradient has an inf/NaN (summed over the shards under FSDP2), as a 0-d bool tensor on the device."""
    bad = torch.stack([(~torch.isfinite(local_tensor(p.grad))).sum().double() for p in params])  # type: ignore[arg-type]
    return reduce_sharded_rows(bad.unsqueeze(1), params).sum() > 0
