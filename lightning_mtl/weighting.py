r"""Task weightings: the K×K Gramian of the task gradients in, K weights out.

Every gradient-level method of the multi-task articles needs the task gradients :math:`g_1..g_K` only through
their Gramian :math:`G_{ij} = \langle g_i, g_j\rangle` and returns an update that is a weighted sum
:math:`u = \sum_k w_k g_k`. A :class:`Weighting` is the small module that maps ``G`` to ``w``; the engine
(:mod:`lightning_mtl.engine`) computes ``G`` and applies ``w``.

This module is pure torch: no Lightning, no ``.item()``, no host round trip. Solvers work in float64 on ``G``'s
device with fixed-size tensor programs, so they cost the same on every step and never wait for the GPU.

Tasks are ordered as in the loss dict handed to :func:`lightning_mtl.task_losses`.
"""

from __future__ import annotations

import importlib
import itertools
import warnings
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

import torch
from torch import Tensor, nn

from lightning_mtl import _device

__all__ = [
    "MGDA",
    "GradNormalize",
    "Mean",
    "PCGrad",
    "PrimaryAuxiliary",
    "Sum",
    "Weighting",
    "as_weighting",
    "min_norm_weights",
]

#: Largest number of tasks for which the exact (support-enumeration) solver is used by ``method="auto"``.
EXACT_MAX_TASKS = 8

#: Active-set solver: a task joins the support when its KKT condition is violated by more than
#: ``ACTIVE_SET_RTOL * w'Gw`` plus a round-off margin of ``ACTIVE_SET_ATOL * (|G| w)_i``; the returned point is then
#: within about ``2 * ACTIVE_SET_RTOL`` (relative) of the minimum.
ACTIVE_SET_RTOL = 1e-10
ACTIVE_SET_ATOL = 1e-13
#: Active-set solver: ridge ``ACTIVE_SET_RIDGE * diag(G)`` added to the restricted KKT systems, so that a support of
#: affinely dependent gradients (duplicate tasks, more tasks than gradient dimensions) still has a unique solution.
ACTIVE_SET_RIDGE = 1e-13
#: Active-set solver: it takes ``min(max_iter, K + ACTIVE_SET_EXTRA_STEPS)`` steps (a fixed count, so that the loop
#: never waits on the device). Random Gramians need at most about 25 for K ≤ 50. Nearly singular ones (gradient
#: spectra spread over 16 orders of magnitude) can need up to about 1.6K; after K + 10 steps MGDA is then within
#: about 1e-9 of max_i |g_i|^2 of the minimum.
ACTIVE_SET_EXTRA_STEPS = 10


class Weighting(nn.Module):
    r"""Base class: ``forward(G) -> w`` for a K×K Gramian ``G`` and K weights ``w``.

    Subclasses implement :meth:`weights`. :meth:`forward` guards it: a Gramian with a NaN or inf entry, or one
    that is not symmetric, never yields NaN weights; the weights fall back to :class:`Mean`
    (``1/K`` each) for that call and a warning is issued once (on CPU at once; on an accelerator when
    :meth:`report_fallbacks` is called, which the callback does at its logging interval, so no step waits
    for the device). ``fallbacks`` counts such calls.

    Weightings that refer to tasks by name (e.g. :class:`PrimaryAuxiliary`) learn the names through
    :meth:`bind`, which the engine calls once the first step has shown them.
    """

    fallbacks: Tensor

    def __init__(self) -> None:
        super().__init__()
        self.tasks: tuple[str, ...] | None = None
        self.register_buffer("fallbacks", torch.zeros((), dtype=torch.long), persistent=False)
        self._fallbacks_reported = 0

    def bind(self, tasks: Sequence[str]) -> None:
        """Tell the weighting the task names, in Gramian order. Raises if a name it needs is missing."""
        self.tasks = tuple(tasks)

    def weights(self, gramian: Tensor) -> Tensor:
        """Map a finite, symmetric K×K Gramian (float64) to K weights."""
        raise NotImplementedError

    def forward(self, gramian: Tensor) -> Tensor:
        if gramian.ndim != 2 or gramian.shape[0] != gramian.shape[1] or gramian.shape[0] == 0:
            raise ValueError(f"Expected a non-empty square K×K Gramian, got shape {tuple(gramian.shape)}.")
        if self.tasks is not None and len(self.tasks) != gramian.shape[0]:
            raise ValueError(
                f"{type(self).__name__} is bound to {len(self.tasks)} tasks {self.tasks}, "
                f"but the Gramian is {gramian.shape[0]}×{gramian.shape[0]}."
            )
        g = gramian.detach().to(torch.float64)
        k = g.shape[0]
        finite = torch.isfinite(g).all()
        g = torch.where(finite, g, torch.zeros_like(g))
        scale = g.abs().amax().clamp_min(torch.finfo(torch.float64).tiny)
        symmetric = ((g - g.mT).abs().amax() <= 1e-4 * scale) & finite
        g = 0.5 * (g + g.mT)
        w = self.weights(g).to(torch.float64)
        ok = symmetric & torch.isfinite(w).all()
        mean = torch.full_like(w, 1.0 / k)
        self._note_fallback(~ok)
        return torch.where(ok, w, mean)

    def _note_fallback(self, bad: Tensor) -> None:
        if self.fallbacks.device != bad.device:
            self.fallbacks = self.fallbacks.to(bad.device)
        self.fallbacks += bad.long()
        if _device.on_host(bad):  # no device to wait for: tell the user now
            self.report_fallbacks()

    def report_fallbacks(self) -> int:
        """Warn once if any call fell back to :class:`Mean`; returns the number of fallbacks so far.

        This reads a device counter, so it synchronises with an accelerator: call it at a logging interval,
        not every step.
        """
        n = int(self.fallbacks)
        if n > self._fallbacks_reported and self._fallbacks_reported == 0:
            warnings.warn(
                f"{type(self).__name__}: the Gramian of the task gradients was not finite or not symmetric "
                f"({n} time(s) so far); those steps used equal weights 1/K instead. Under fp16 this is "
                "expected now and then (the GradScaler then skips the step); otherwise a task loss or "
                "gradient has become NaN/inf.",
                RuntimeWarning,
                stacklevel=2,
            )
        self._fallbacks_reported = max(self._fallbacks_reported, n)
        return n

    def extra_repr(self) -> str:
        return f"tasks={self.tasks}" if self.tasks is not None else ""


class Mean(Weighting):
    r"""Equal weights :math:`w_k = 1/K`: the update is the mean task gradient."""

    def weights(self, gramian: Tensor) -> Tensor:
        k = gramian.shape[0]
        return torch.full((k,), 1.0 / k, dtype=gramian.dtype, device=gramian.device)


class Sum(Weighting):
    r"""Unit weights :math:`w_k = 1`: the update is the gradient of :math:`\sum_k \mathcal L_k`."""

    def weights(self, gramian: Tensor) -> Tensor:
        return torch.ones(gramian.shape[0], dtype=gramian.dtype, device=gramian.device)


class GradNormalize(Weighting):
    r"""Gradient normalisation, the "ideal target" of MTL(1).

    .. math::  u = c \sum_k \frac{g_k}{\|g_k\|},\qquad w_k = \frac{c}{\sqrt{G_{kk}}}

    Su, *多任务学习漫谈(一): 以损失之名*, https://kexue.fm/archives/8870 (2022): replacing each loss by
    :math:`\mathcal L_k / \mathrm{sg}(\|\nabla\mathcal L_k\|)` makes the update invariant to scaling
    (:math:`\mathcal L_k \to a\mathcal L_k`) and shifting (:math:`\mathcal L_k \to \mathcal L_k + b`) any task.
    For two tasks the direction has a non-negative inner product with both gradients
    (*多任务学习漫谈(二)*, https://kexue.fm/archives/8896), so it is Pareto-stationary-seeking.

    Args:
        scale: ``"unit"`` (the article, :math:`c = 1`): every step has the size of a sum of unit vectors,
            whatever the loss magnitudes. ``"mean"``: :math:`c = \frac1K\sum_j\|g_j\|`, the same direction with
            the overall size of the gradients kept, so the update is equivariant to a common scale of all
            losses (the learning rate keeps its usual meaning and the size still decays as training converges).

    A task whose gradient is exactly zero gets weight 0.
    """

    def __init__(self, scale: str = "unit") -> None:
        super().__init__()
        if scale not in ("unit", "mean"):
            raise ValueError(f"GradNormalize(scale=...) must be 'unit' or 'mean', got {scale!r}.")
        self.scale = scale

    def weights(self, gramian: Tensor) -> Tensor:
        norms = gramian.diagonal().clamp_min(0).sqrt()
        positive = norms > 0
        inv = torch.where(positive, 1.0 / torch.where(positive, norms, torch.ones_like(norms)), 0.0)
        if self.scale == "mean":
            inv = inv * norms.mean()
        return inv

    def extra_repr(self) -> str:
        return f"scale={self.scale!r}"


class MGDA(Weighting):
    r"""Multiple-gradient descent: the min-norm point of the convex hull of the task gradients.

    .. math::  w = \arg\min_{w \in \Delta^K} w^\top G w,\qquad u = \sum_k w_k g_k

    Su, *多任务学习漫谈(二): 行梯度之事*, https://kexue.fm/archives/8896 (2022), after Sener & Koltun,
    *Multi-Task Learning as Multi-Objective Optimization* (NeurIPS 2018, arXiv:1810.04650). The solution is the
    dual of :math:`\max_u \min_i\langle g_i,u\rangle - \frac12\|u\|^2`, so
    :math:`\langle g_i, u\rangle \ge \|u\|^2` for every task: no task's loss rises to first order, and
    :math:`u = 0` exactly at a Pareto-stationary point.

    Args:
        method: ``"auto"`` (closed form for K = 2, exact support enumeration for K ≤ 8, the active-set solver
            beyond), ``"closed_form"`` (K = 2 only), ``"exact"``, ``"active_set"`` (exact up to a relative
            1e-10 for any K, see :func:`min_norm_weights`) or ``"frank_wolfe"`` (the article's iteration; an
            approximation).
        max_iter: the most iterations of an iterative solver: Frank-Wolfe takes exactly ``max_iter`` steps, the
            active-set solver ``min(max_iter, K + 10)`` (one (K+1)×(K+1) solve each; it usually converges in under
            25). The count is fixed so that the loop never waits on the device to test convergence.

    Closed form for two tasks (the triangle's altitude): :math:`w_1 = \mathrm{clip}\big(
    \frac{G_{22}-G_{12}}{G_{11}+G_{22}-2G_{12}}, 0, 1\big)`, :math:`w_2 = 1-w_1`.
    """

    def __init__(self, method: str = "auto", max_iter: int = 100) -> None:
        super().__init__()
        _check_method(method, "MGDA")
        if max_iter < 1:
            raise ValueError(f"MGDA(max_iter=...) must be >= 1, got {max_iter}.")
        self.method = method
        self.max_iter = max_iter

    def weights(self, gramian: Tensor) -> Tensor:
        k = gramian.shape[0]
        method = _resolve_method(self.method, k)
        if method == "closed_form":
            if k == 1:
                return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
            if k != 2:
                raise ValueError(f"MGDA(method='closed_form') needs exactly 2 tasks, got {k}.")
            return _mgda_two(gramian)
        return min_norm_weights(gramian, range(k), method=method, max_iter=self.max_iter)

    def extra_repr(self) -> str:
        return f"method={self.method!r}, max_iter={self.max_iter}"


class PrimaryAuxiliary(Weighting):
    r"""Descend the primary task(s) as steeply as possible while no auxiliary loss rises (to first order).

    .. math::  \max_u \langle u, g_0\rangle - \tfrac12\|u\|^2 \ \text{ s.t. } \langle u, g_i\rangle \ge 0
               \iff \min_{\lambda \ge 0} \tfrac12\big\|g_0 + \textstyle\sum_i \lambda_i g_i\big\|^2,
               \quad u = g_0 + \sum_i \lambda_i g_i

    Su, *多任务学习漫谈(三): 分主次之序*, https://kexue.fm/archives/8907 (2022). One auxiliary has the closed
    form :math:`\lambda = \mathrm{relu}(-\langle g_0, g_1\rangle)/\|g_1\|^2`: a conflicting primary gradient is
    projected onto the normal plane of :math:`g_1`, a non-conflicting one is left unchanged. Several auxiliaries
    use the exact solution for K ≤ 8 and the active-set solver beyond it (``method="iterative"`` is the article's
    coordinate re-fit: re-solve one :math:`\lambda_\tau` by the one-auxiliary rule, swept over all auxiliaries; see
    :func:`min_norm_weights`).
    Several primaries (the article's "mixed case") take MGDA weights :math:`\alpha \in \Delta` among themselves:
    :math:`\min_{\alpha\in\Delta,\lambda\ge0}\|\sum\alpha_p g_p + \sum\lambda_i g_i\|^2`.

    Auxiliary gradients act only as constraints: they are never summed in where they do not conflict.

    Args:
        primary: the primary task(s), by name (as in the loss dict) or by index.
        method: ``"auto"``, ``"closed_form"`` (one primary, one auxiliary), ``"exact"``, ``"active_set"`` or
            ``"iterative"`` (the article's coordinate re-fit, with Frank-Wolfe steps among several primaries).
        max_iter: the most iterations of an iterative solver (``"iterative"``: exactly ``max_iter``;
            ``"active_set"``: ``min(max_iter, K + 10)``).
    """

    def __init__(self, primary: str | int | Sequence[str | int], method: str = "auto", max_iter: int = 100) -> None:
        super().__init__()
        prim = [primary] if isinstance(primary, (str, int)) else list(primary)
        if not prim:
            raise ValueError("PrimaryAuxiliary(primary=...) needs at least one primary task.")
        for p in prim:
            if not isinstance(p, (str, int)) or isinstance(p, bool):
                raise TypeError(f"PrimaryAuxiliary(primary=...) takes task names or indices, got {p!r}.")
        if len(set(prim)) != len(prim):
            raise ValueError(f"PrimaryAuxiliary(primary=...) lists a task twice: {prim}.")
        _check_method(method, "PrimaryAuxiliary")
        if max_iter < 1:
            raise ValueError(f"PrimaryAuxiliary(max_iter=...) must be >= 1, got {max_iter}.")
        self.primary = prim
        self.method = method
        self.max_iter = max_iter
        self._index: tuple[int, ...] | None = None if any(isinstance(p, str) for p in prim) else tuple(prim)

    def bind(self, tasks: Sequence[str]) -> None:
        tasks = tuple(tasks)
        index = []
        for p in self.primary:
            if isinstance(p, str):
                if p not in tasks:
                    raise ValueError(
                        f"PrimaryAuxiliary: primary task {p!r} is not among the tasks {list(tasks)}. "
                        "Use a key of the dict passed to task_losses(...), or an index."
                    )
                index.append(tasks.index(p))
            else:
                if not -len(tasks) <= p < len(tasks):
                    raise ValueError(f"PrimaryAuxiliary: primary index {p} is out of range for {len(tasks)} tasks.")
                index.append(p % len(tasks))
        if len(set(index)) != len(index):
            raise ValueError(f"PrimaryAuxiliary: primary={self.primary} names the same task twice.")
        super().bind(tasks)
        self._index = tuple(index)

    def primary_index(self, k: int) -> tuple[int, ...]:
        if self._index is None:
            raise RuntimeError(
                f"PrimaryAuxiliary(primary={self.primary}) refers to tasks by name; call .bind(task_names) first "
                "(the engine does this on the first step)."
            )
        for i in self._index:
            if not -k <= i < k:
                raise ValueError(f"PrimaryAuxiliary: primary index {i} is out of range for {k} tasks.")
        return tuple(sorted(i % k for i in self._index))

    def weights(self, gramian: Tensor) -> Tensor:
        k = gramian.shape[0]
        prim = self.primary_index(k)
        method = _resolve_method(self.method, k, one_primary=len(prim) == 1)
        if method == "closed_form":
            if k == 1:
                return torch.ones(1, dtype=gramian.dtype, device=gramian.device)
            if k != 2 or len(prim) != 1:
                raise ValueError(
                    "PrimaryAuxiliary(method='closed_form') needs one primary and one auxiliary task, "
                    f"got {len(prim)} primary of {k} tasks."
                )
            return _primary_aux_two(gramian, prim[0])
        return min_norm_weights(gramian, prim, method=method, max_iter=self.max_iter)

    def extra_repr(self) -> str:
        return f"primary={self.primary!r}, method={self.method!r}"


class PCGrad(Weighting):
    r"""Projecting conflicting gradients (Yu et al., *Gradient Surgery for Multi-Task Learning*, NeurIPS 2020).

    Each task gradient is, in a random order of the others, projected onto the normal plane of every gradient it
    conflicts with: :math:`g_i \leftarrow g_i - \frac{\langle g_i, g_j\rangle}{\|g_j\|^2} g_j` when
    :math:`\langle g_i, g_j\rangle < 0`; the update is the sum of the projected gradients. Each projected
    gradient stays a linear combination :math:`c_i^\top g` of the originals, so the whole method runs on the
    Gramian: :math:`\langle c_i^\top g, g_j\rangle = (c_i^\top G)_j` and :math:`w = \sum_i c_i`. It is the usual
    baseline, not a method of the articles.

    Args:
        seed: seed of the permutations; the generator state is part of ``state_dict`` so a resumed run draws
            the same orders as an uninterrupted one.
    """

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        self.seed = seed
        self._generator: torch.Generator | None = None  # made on the Gramian's device at the first call
        self._pending_state: dict | None = None  # a loaded state, applied when the generator is made

    def _generator_on(self, device: torch.device) -> torch.Generator:
        if self._generator is None or self._generator.device != _generator_device(device):
            gen = torch.Generator(device=device).manual_seed(self.seed)
            state, self._pending_state = self._pending_state, None
            if state is not None and state.get("device", "cpu") is not None:  # None: saved before the first draw
                if state.get("device", "cpu") == device.type:
                    gen.set_state(state["generator"])
                else:
                    warnings.warn(
                        f"PCGrad: the checkpoint's random state was drawn on {state.get('device', 'cpu')}, this run "
                        f"draws on {device.type}; the random orders start again from seed={self.seed}.",
                        RuntimeWarning,
                        stacklevel=3,
                    )
            self._generator = gen
        return self._generator

    def weights(self, gramian: Tensor) -> Tensor:
        k = gramian.shape[0]
        dev, dt = gramian.device, gramian.dtype
        # one random order of the tasks per task, drawn on the Gramian's device (no copy from the host): the ranks of
        # k uniform numbers are a uniform permutation
        order = torch.rand(k, k, generator=self._generator_on(dev), device=dev, dtype=torch.float32).argsort(dim=1)
        coef = torch.eye(k, dtype=dt, device=dev)
        diag = gramian.diagonal()
        rows = torch.arange(k, device=dev)
        for s in range(k):
            j = order[:, s]
            dots = (coef @ gramian)[rows, j]  # <g_i', g_j> for each i
            gjj = diag[j]
            conflict = (dots < 0) & (j != rows) & (gjj > 0)
            step = torch.where(conflict, dots / torch.where(gjj > 0, gjj, torch.ones_like(gjj)), 0.0)
            coef = coef - step[:, None] * (j[:, None] == rows).to(dt)
        return coef.sum(0)

    def get_extra_state(self) -> dict:
        if self._generator is None:  # nothing drawn yet: a resumed run starts from the seed, on any device
            return self._pending_state or {"generator": None, "device": None}
        return {"generator": self._generator.get_state(), "device": self._generator.device.type}

    def set_extra_state(self, state: dict) -> None:
        self._generator = None
        self._pending_state = dict(state)

    def extra_repr(self) -> str:
        return f"seed={self.seed}"


def _generator_device(device: torch.device) -> torch.device:
    """The device a ``torch.Generator(device=device)`` reports (``cuda`` with its index: the current one if none)."""
    if device.type == "cuda" and device.index is None:
        return torch.device("cuda", torch.cuda.current_device())
    return device


class _External(Weighting):
    """Adapter for a third-party weighting module (e.g. a torchjd ``Weighting``) that maps G to w."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def weights(self, gramian: Tensor) -> Tensor:
        return self.module(gramian).to(device=gramian.device, dtype=gramian.dtype)


#: torchjd weightings of the Jacobian (``Weighting[Matrix]``) that read only its number of rows, so they give the
#: same weights when handed the K×K Gramian.
_TORCHJD_SHAPE_ONLY = ("MeanWeighting", "SumWeighting", "ConstantWeighting", "RandomWeighting")


def _torchjd_class(cls: type, name: str) -> bool:
    """Whether ``cls`` derives from the torchjd class ``name``, found by name so torchjd need not be installed."""
    return any(c.__name__ == name and c.__module__.startswith("torchjd") for c in cls.__mro__)


def _torchjd_needs_jacobian(weighting: nn.Module) -> bool:
    """Whether a torchjd weighting reads the Jacobian itself (a ``Weighting[Matrix]`` such as ``ExcessMTLWeighting``,
    or a weighting composed with a function of the Jacobian, e.g. ``UPGrad().weighting``); such a weighting computes
    nonsense when handed the Gramian."""
    cls = type(weighting)
    if _torchjd_class(cls, "_Composition"):
        return True
    if _torchjd_class(cls, "_MatrixWeighting"):
        return cls.__name__ not in _TORCHJD_SHAPE_ONLY
    inner = getattr(weighting, "weighting", None)  # a wrapper such as CRMOGMWeighting(inner)
    return isinstance(inner, nn.Module) and _torchjd_needs_jacobian(inner)


def _torchjd_weighting_name(aggregator: type) -> str | None:
    """The name of the torchjd ``Weighting`` of the Gramian that gives ``aggregator``'s weights, if there is one."""
    name = f"{aggregator.__name__}Weighting"
    candidate = getattr(importlib.import_module("torchjd.aggregation"), name, None)
    if isinstance(candidate, type) and _torchjd_class(candidate, "_GramianWeighting"):
        return name
    return None


def _from_torchjd_aggregator(aggregator: nn.Module) -> Weighting:
    """The Gramian weighting behind a torchjd ``Aggregator`` (which maps the K×n Jacobian to an update vector).

    A ``GramianWeightedAggregator`` (``UPGrad``, ``MGDA``, ``DualProj``, ``IMTLG``, ...) computes its weights from the
    Gramian with its ``gramian_weighting``; that module is used, so ``as_weighting(UPGrad())`` gives the weights of
    ``as_weighting(UPGradWeighting())``. A ``WeightedAggregator`` whose ``weighting`` reads only the number of rows
    (``Mean``, ``Sum``, ``Constant``, ``Random``) is used the same way. Any other aggregator needs the Jacobian
    itself and is refused.
    """
    cls = type(aggregator)
    name = cls.__name__
    if _torchjd_class(cls, "GramianWeightedAggregator"):
        gramian_weighting = aggregator.gramian_weighting
        if isinstance(gramian_weighting, nn.Module) and not _torchjd_needs_jacobian(gramian_weighting):
            return _External(gramian_weighting)
    if _torchjd_class(cls, "WeightedAggregator"):
        weighting = aggregator.weighting
        if isinstance(weighting, nn.Module) and not _torchjd_needs_jacobian(weighting):
            return _External(weighting)
    hint = _torchjd_weighting_name(cls)
    if hint is not None:
        advice = f"pass torchjd.aggregation.{hint}() instead of {name}()."
    elif _torchjd_class(cls, "WeightedAggregator"):
        advice = (
            f"{name}'s weighting ({type(aggregator.weighting).__name__}) reads the Jacobian itself, not its Gramian, "
            "so it cannot be used here; pass a Weighting of the Gramian (e.g. torchjd.aggregation.UPGradWeighting() "
            "or lightning_mtl.MGDA())."
        )
    else:
        advice = (
            f"{name} does not combine the task gradients with weights, so it has no Gramian-based form; pass a "
            "Weighting of the Gramian (e.g. torchjd.aggregation.UPGradWeighting() or lightning_mtl.MGDA())."
        )
    raise TypeError(
        f"as_weighting got the torchjd Aggregator {name}(), which maps the K×n Jacobian to an update vector; a "
        f"weighting maps the K×K Gramian to K weights. {advice}"
    )


def as_weighting(obj: Weighting | nn.Module) -> Weighting:
    """Return ``obj`` as a :class:`Weighting`; wrap another ``nn.Module`` mapping a K×K Gramian to K weights.

    Any torchjd ``Weighting`` of the Gramian (``torchjd.aggregation.UPGradWeighting()``, ...) is accepted this way.
    A torchjd ``Aggregator`` (``UPGrad()``, ``MGDA()``, ...; it maps the Jacobian, not the Gramian) is replaced by
    its own Gramian weighting, so ``as_weighting(UPGrad())`` equals ``as_weighting(UPGradWeighting())``; an
    aggregator or weighting that needs the Jacobian itself (``ConFIG``, ``ExcessMTLWeighting``, ...) raises a
    ``TypeError`` that says what to pass instead. So does a class passed instead of an instance.
    """
    if isinstance(obj, type) and issubclass(obj, nn.Module):
        raise TypeError(
            f"Expected a weighting instance, got the class {obj.__name__}: pass an instance, e.g. `{obj.__name__}()`."
        )
    if isinstance(obj, Weighting):
        return obj
    if isinstance(obj, nn.Module):
        cls = type(obj)
        if _torchjd_class(cls, "Aggregator"):
            return _from_torchjd_aggregator(obj)
        if _torchjd_class(cls, "Weighting") and _torchjd_needs_jacobian(obj):
            raise TypeError(
                f"as_weighting got the torchjd weighting {cls.__name__}, which reads the K×n Jacobian itself, not "
                "its K×K Gramian, so it cannot be used here; pass a Weighting of the Gramian (e.g. "
                "torchjd.aggregation.UPGradWeighting() or lightning_mtl.MGDA())."
            )
        return _External(obj)
    raise TypeError(
        f"Expected a lightning_mtl Weighting (Mean, Sum, GradNormalize, MGDA, PrimaryAuxiliary, PCGrad) or an "
        f"nn.Module mapping a K×K Gramian to K weights (e.g. a torchjd Weighting), got {type(obj).__name__}."
    )


# --------------------------------------------------------------------------------------------------------------
# solvers


def _check_method(method: str, who: str) -> None:
    allowed = ("auto", "closed_form", "exact", "active_set", "frank_wolfe", "iterative")
    if method not in allowed:
        raise ValueError(f"{who}(method=...) must be one of {allowed}, got {method!r}.")


def _resolve_method(method: str, k: int, one_primary: bool = True) -> str:
    if method == "auto":
        if k <= 2 and one_primary:
            return "closed_form"
        return "exact" if k <= EXACT_MAX_TASKS else "active_set"
    return "iterative" if method == "frank_wolfe" else method


def _mgda_two(gramian: Tensor) -> Tensor:
    g11, g22, g12 = gramian[0, 0], gramian[1, 1], gramian[0, 1]
    denom = g11 + g22 - 2 * g12
    w1 = torch.where(denom > 0, (g22 - g12) / torch.where(denom > 0, denom, torch.ones_like(denom)), 0.5)
    w1 = w1.clamp(0, 1)
    return torch.stack([w1, 1 - w1])


def _primary_aux_two(gramian: Tensor, primary: int) -> Tensor:
    aux = 1 - primary
    gaa = gramian[aux, aux]
    lam = torch.where(
        gaa > 0, torch.relu(-gramian[primary, aux]) / torch.where(gaa > 0, gaa, torch.ones_like(gaa)), 0.0
    )
    one = torch.ones_like(lam)
    return torch.stack([one, lam] if primary == 0 else [lam, one])


def min_norm_weights(
    gramian: Tensor, primary: Sequence[int] | range, method: str = "exact", max_iter: int = 100
) -> Tensor:
    r"""Solve :math:`\min_x x^\top G x` s.t. :math:`x_P \in \Delta` (primaries sum to 1, non-negative) and
    :math:`x_A \ge 0` (the other tasks, auxiliaries, only non-negative).

    With every task primary this is MGDA's min-norm point of the convex hull; with one primary it is the
    primary/auxiliary problem of MTL(3) (:math:`x_0 = 1`, :math:`\lambda = x_A`).

    ``method="exact"`` enumerates the supports: for each non-empty set of primaries and any set of auxiliaries it
    solves the KKT system restricted to that support (one batched ``solve``), keeps the non-negative solutions and
    returns the one of least :math:`x^\top G x`. The optimum lies on some support whose system is regular (if a
    support's system is singular, the same objective is reached on a smaller one), so this is exact up to
    round-off, and the result is always feasible. Cost: :math:`2^K` systems of size K+1; meant for K ≤ 8-10.

    ``method="active_set"``: a primal active-set method, Wolfe's nearest-point algorithm (P. Wolfe, *Finding the
    nearest point in a polytope*, Math. Programming 11, 1976) with several tasks entering at once. With
    :math:`\nu = x^\top G x` the KKT conditions are

    .. math::  (Gx)_i - \nu\,[i \in P] \ \ge 0 \text{ for all } i, \qquad = 0 \text{ where } x_i > 0,

    (for MGDA, :math:`\langle g_i, u\rangle \ge \|u\|^2` with equality on the support: Sener & Koltun 2018;
    Su, https://kexue.fm/archives/8896). Starting from the primary vertex of least norm, each step (1) adds to
    the support S the tasks that violate their condition (all at first; fewer, down to Wolfe's one, after steps
    that made no progress), (2) solves the equality-constrained problem on S (one (K+1)×(K+1) ``solve``) and (3)
    moves towards its solution z as far as :math:`x \ge 0` allows, dropping the tasks that reach 0. The objective
    never rises, and with one task joining at a time no support recurs (Wolfe), so it ends, exact up to a relative
    1e-10, in a few steps: under 25 on random Gramians up to K = 50, more on nearly singular ones (see
    ``ACTIVE_SET_EXTRA_STEPS``). See :func:`_active_set`.

    ``method="iterative"``: Frank-Wolfe on the primaries (:math:`\tau=\arg\min_{i\in P}(Gx)_i`, exact line search
    towards :math:`e_\tau`) alternated with a sweep of the article's one-auxiliary re-fit over every auxiliary:
    :math:`x_\tau \leftarrow \mathrm{relu}(-\langle r, g_\tau\rangle)/G_{\tau\tau}` with :math:`r` the update
    without :math:`\tau`'s term. The article re-fits only :math:`\tau=\arg\min_i\langle g_i,u\rangle`; that
    choice can stall on an auxiliary whose coefficient overshot (its inner product is then positive and it is never
    picked again), while the cyclic sweep is projected coordinate descent and converges. An approximation.

    Every method runs a fixed number of steps (``max_iter`` for ``"iterative"``, ``min(max_iter, K + 10)`` for
    ``"active_set"``): no device synchronisation.
    """
    g = gramian.to(torch.float64)
    prim = tuple(sorted(set(int(i) for i in primary)))
    if not prim:
        raise ValueError("min_norm_weights needs at least one primary (simplex) coordinate.")
    if max_iter < 1:
        raise ValueError(f"min_norm_weights(max_iter=...) must be >= 1, got {max_iter}.")
    if method == "exact":
        return _exact(g, prim)
    if method == "active_set":
        return _active_set(g, prim, min(max_iter, g.shape[0] + ACTIVE_SET_EXTRA_STEPS))
    if method == "iterative":
        return _iterative(g, prim, max_iter)
    raise ValueError(f"min_norm_weights(method=...) must be 'exact', 'active_set' or 'iterative', got {method!r}.")


@lru_cache(maxsize=64)
def _supports(k: int, prim: tuple[int, ...]) -> tuple[tuple[bool, ...], ...]:
    aux = [i for i in range(k) if i not in prim]
    out = []
    for r in range(1, len(prim) + 1):
        for ps in itertools.combinations(prim, r):
            for ra in range(len(aux) + 1):
                for asub in itertools.combinations(aux, ra):
                    s = set(ps) | set(asub)
                    out.append(tuple(i in s for i in range(k)))
    return tuple(out)


def _kkt_candidates(g: Tensor, p: Tensor, m: Tensor) -> tuple[Tensor, Tensor]:
    """Solve the KKT system of ``min x'Gx, sum_P x = 1`` restricted to each support ``m[s]`` ([S, K] bool).

    Returns the candidates ``x`` ([S, K], clamped to x >= 0 and renormalised over the primaries ``p``) and their
    objective, ``inf`` where the system is singular or its solution is not feasible.
    """
    return _solve_supports(g, _KKTFrame.of(m.to(g.dtype), p))


class _KKTFrame(NamedTuple):
    """What the KKT systems of a set of supports share whatever G is (built once per support set by :func:`_exact`).

    Rows i in the support read :math:`(Gx)_i - \nu p_i = 0` with :math:`x_j = 0` off the support, the other rows
    :math:`x_i = 0`, and the last row :math:`p^\top x = 1`: the system is ``frame + pad(G * mask)``.
    """

    p: Tensor  # [K] the primary indicator
    mf: Tensor  # [S, K] the supports, 0/1
    mask: Tensor  # [S, K, K] 1 where row and column are in the support
    frame: Tensor  # [S, K+1, K+1] 1 on the diagonal of the rows off the support; the border -p / p on the support
    rhs: Tensor  # [K+1] e_K

    @classmethod
    def of(cls, mf: Tensor, p: Tensor) -> _KKTFrame:
        n, k = mf.shape
        frame = torch.zeros(n, k + 1, k + 1, dtype=mf.dtype, device=mf.device)
        frame[:, :k, :k] = torch.diag_embed(1 - mf)
        frame[:, :k, k] = -p * mf
        frame[:, k, :k] = p * mf
        rhs = torch.eye(k + 1, dtype=mf.dtype, device=mf.device)[k]
        return cls(p, mf, mf[:, :, None] * mf[:, None, :], frame, rhs)


def _solve_supports(g: Tensor, f: _KKTFrame) -> tuple[Tensor, Tensor]:
    """:func:`_kkt_candidates` with the G-independent parts given."""
    k = g.shape[0]
    sol, info = torch.linalg.solve_ex(f.frame + torch.nn.functional.pad(g * f.mask, (0, 1, 0, 1)), f.rhs)
    x = sol[:, :k] * f.mf
    scale = x.abs().amax(dim=1).clamp_min(1.0)
    feasible = (info == 0) & x.isfinite().all(dim=1) & (x >= -1e-9 * scale[:, None]).all(dim=1)
    x = torch.where(feasible[:, None], x, 0.0).clamp_min(0)
    x = x / (x @ f.p).clamp_min(torch.finfo(g.dtype).tiny)[:, None]
    obj = ((x @ g) * x).sum(dim=1)
    obj = torch.where(feasible & obj.isfinite(), obj, float("inf"))
    return x, obj


def _primary_mask(k: int, prim: tuple[int, ...], like: Tensor) -> Tensor:
    """The indicator of the primaries, [K], in ``like``'s dtype and on its device (built by a comparison on the
    device: no index list copied from the host)."""
    return _indicator(k, prim, like.device).to(like.dtype)


def _indicator(n: int, members: tuple[int, ...], device: torch.device) -> Tensor:
    """``[i in members for i in range(n)]`` as a bool tensor made on ``device`` by kernels with Python scalars."""
    idx = torch.arange(n, device=device)
    out = torch.zeros(n, dtype=torch.bool, device=device)
    for i in members:
        out |= idx == i
    return out


@lru_cache(maxsize=32)
def _exact_frame(k: int, prim: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> _KKTFrame:
    """Every support of :func:`_exact` and their KKT frame, built once per (K, primaries, dtype, device)."""
    mf = torch.tensor(_supports(k, prim), dtype=dtype, device=device)
    return _KKTFrame.of(mf, _primary_mask(k, prim, mf))


def _exact(g: Tensor, prim: tuple[int, ...]) -> Tensor:
    x, obj = _solve_supports(g, _exact_frame(g.shape[0], prim, g.dtype, g.device))
    return x.index_select(0, obj.argmin().view(1)).squeeze(0)  # a device-side gather: no index read on the host


def _iterative(g: Tensor, prim: tuple[int, ...], max_iter: int) -> Tensor:
    k = g.shape[0]
    dev, dt = g.device, g.dtype
    is_p = _indicator(k, prim, dev)
    x = is_p.to(dt) / len(prim)
    diag = g.diagonal()
    inf = torch.full((), float("inf"), dtype=dt, device=dev)
    idx = torch.arange(k, device=dev)
    aux = [i for i in range(k) if i not in prim]
    unit = torch.eye(k, dtype=dt, device=dev)
    for _ in range(max_iter):
        if len(prim) > 1:  # Frank-Wolfe step among the primaries
            gx = g @ x
            tau = torch.where(is_p, gx, inf).argmin()
            d = (idx == tau).to(dt) * is_p - torch.where(is_p, x, 0.0)
            dgd = d @ g @ d
            gamma = torch.where(dgd > 0, -(d @ gx) / torch.where(dgd > 0, dgd, torch.ones_like(dgd)), 0.0).clamp(0, 1)
            x = x + gamma * d
        for tau in aux:  # the article's one-auxiliary re-fit, applied to every auxiliary in turn
            gtt = diag[tau]
            r_dot = g[tau] @ x - x[tau] * gtt  # <r, g_tau> with tau's own term removed
            new = torch.where(gtt > 0, torch.relu(-r_dot) / torch.where(gtt > 0, gtt, torch.ones_like(gtt)), 0.0)
            x = x + (new - x[tau]) * unit[tau]
    # polish: solve the KKT system on the support the iterations found; keep it if it is feasible and better
    p = _primary_mask(k, prim, g)
    cand, obj = _kkt_candidates(g, p, (x > 0)[None])
    return torch.where(obj[0] < x @ g @ x, cand[0], x)


def _active_set(g: Tensor, prim: tuple[int, ...], steps: int) -> Tensor:
    r"""Primal active-set (Wolfe) solver of :func:`min_norm_weights`, ``steps`` fixed steps, no host round trip.

    State: a feasible ``x`` and its support ``s``. One step:

    1. violation :math:`v_i = (Gx)_i - \nu p_i` (:math:`\nu = x^\top G x`, :math:`p` the primary indicator);
       if the previous step reached its target, the tasks off the support with
       :math:`v_i < -(\epsilon_r \nu + \epsilon_a (|G|x)_i)` join ``s``: all of them at first; after j steps that
       made no progress (a task that joined came out negative) only the :math:`\lfloor K/2^j \rfloor` most
       violated, down to the most violated one, Wolfe's rule, which cannot cycle;
    2. target: :math:`\min z^\top (G + \rho\,\mathrm{diag}\,G) z` s.t. :math:`p^\top z = 1`, :math:`z_i = 0`
       off ``s``, i.e. the system :math:`\begin{bmatrix} G_{ss} & -p_s \\ p_s^\top & 0 \end{bmatrix}
       \begin{bmatrix} z_s \\ \nu \end{bmatrix} = e`, solved as one masked (K+1)×(K+1) system;
    3. ratio test: :math:`\theta = \min\big(1, \min_{z_i < 0} x_i/(x_i - z_i)\big)`,
       :math:`x \leftarrow x + \theta (z - x)`; the tasks that reach 0 leave ``s``.

    The tiny ridge :math:`\rho` keeps the restricted system regular when the support's gradients are affinely
    dependent. Once no task joins, :math:`(Gx)_i \ge \nu p_i - \epsilon_i` for all i, and the objective is
    within :math:`2\max_i(\nu p_i - (Gx)_i)^+` of the minimum (for MGDA; weak duality on the simplex).
    """
    k = g.shape[0]
    n = k + 1  # every vector has one more entry, k, for the multiplier nu: it stays in the support, never joins/drops
    dev, dt = g.device, g.dtype
    p = _indicator(n, prim, dev).to(dt)
    kkt = torch.zeros(n, n, dtype=dt, device=dev)
    kkt[:k, :k] = g + torch.diag(ACTIVE_SET_RIDGE * g.diagonal().clamp_min(0))
    kkt[:, k] = -p
    kkt[k, :] = p
    eye = torch.eye(n, dtype=dt, device=dev)
    rhs = eye[k]
    # one product gives Gx and G_tol x: v_i = (Gx)_i - nu p_i + eps_r nu + eps_a (|G|x)_i = (G_tol x)_i - nu p_tol_i
    stacked = torch.zeros(2, n, n, dtype=dt, device=dev)
    stacked[0, :k, :k] = g
    stacked[1, :k, :k] = g + ACTIVE_SET_ATOL * g.abs()
    stacked = stacked.reshape(2 * n, n)
    p_tol = p - ACTIVE_SET_RTOL
    idx = torch.arange(n, device=dev)
    task = idx < k
    inf = torch.full((n,), float("inf"), dtype=dt, device=dev)
    zero = torch.zeros((), dtype=dt, device=dev)
    norms = torch.cat([g.diagonal(), inf[:1]])
    s = (idx == torch.where(p > 0, norms, inf).argmin()) | ~task  # the primary vertex of least norm
    x = (s & task).to(dt)
    full = torch.ones((), dtype=torch.bool, device=dev)  # the last step reached its target: x is optimal on s
    # at most k >> halvings tasks join per step (at least the most violated); one more halving after a stalled step
    halvings = torch.zeros((), dtype=torch.long, device=dev)
    max_halvings = k.bit_length()
    for _ in range(steps):
        gx, gtx = (stacked @ x).view(2, n)
        v = torch.where(s, inf, gtx - (x @ gx) * p_tol)
        rank = (v[None, :] < v[:, None]).sum(1)  # 0 for the most violated
        s = s | ((v < 0) & ((rank << halvings) < k) & full)
        sol, _ = torch.linalg.solve_ex(torch.where(s[:, None] & s, kkt, eye), rhs)
        z = torch.where(sol.isfinite().all(), sol, x)  # a failed solve leaves x as it is
        neg = (z < 0) & task
        ratio = torch.where(neg, x / (x - z), inf)
        theta = ratio.amin().clamp(max=1.0)
        drop = neg & (ratio <= theta)
        x = torch.where(drop, zero, torch.lerp(x, z, theta))
        s = s & ~drop
        full = theta >= 1
        halvings = (halvings + (theta <= 0)).clamp(max=max_halvings)
    w = x[:k].clamp_min(0)
    return w / (w @ p[:k])
