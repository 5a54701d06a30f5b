r"""Loss-level combinations of several task losses (MTL(1)): used inside ``training_step``, no callback needed.

Su, *多任务学习漫谈(一): 以损失之名*, https://kexue.fm/archives/8870 (2022). Each scalariser maps the dict of
task losses to one scalar. :meth:`Scalarizer.terms` gives the per-task terms whose sum has the same gradient, so the
result can also be handed to :func:`lightning_mtl.task_losses` (for logging, or to combine with a gradient
callback)::

    losses = {"a": la, "b": lb}
    return mtl.task_losses(self, self.normalizer.terms(losses))   # or: return self.normalizer(losses)

Keep the scalariser as an attribute of the LightningModule so its state (initial losses, learnable log-variances)
is saved in checkpoints and moved to the right device.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "GeneralizedMean",
    "InitialLossNormalization",
    "PriorLossNormalization",
    "RealTimeNormalization",
    "Scalarizer",
    "UncertaintyWeighting",
    "classification_prior",
    "regression_prior",
]


def _check(losses: Mapping[str, Tensor]) -> None:
    if not losses:
        raise ValueError("Expected a non-empty dict {task name: scalar loss}.")
    for name, value in losses.items():
        if not isinstance(value, Tensor) or value.numel() != 1:
            raise ValueError(f"The loss of task {name!r} must be a scalar tensor.")


class Scalarizer(nn.Module):
    """Base class: ``forward(losses) -> scalar`` and ``terms(losses) -> {task: term}`` with the same gradient."""

    def terms(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        raise NotImplementedError

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        return torch.stack(list(self.terms(losses).values())).sum()


class InitialLossNormalization(Scalarizer):
    r""":math:`\mathcal L = \sum_k \mathcal L_k / \mathcal L_k^{(\text{init})}`: divide by the initial loss.

    Homogeneous of degree 0 in each :math:`\mathcal L_k`, hence invariant to rescaling a task ("de-dimensionalise",
    MTL(1)); not invariant to shifting one. The initial loss is the mean over the first ``warmup_steps`` training
    calls (in training mode only), or given up front (``initial={"a": math.log(10)}`` for 10-class CE).
    It is kept in the module's state, so checkpoints resume with it.
    """

    def __init__(self, warmup_steps: int = 1, initial: Mapping[str, float] | None = None, eps: float = 1e-12) -> None:
        super().__init__()
        if warmup_steps < 1:
            raise ValueError(f"warmup_steps must be >= 1, got {warmup_steps}.")
        self.warmup_steps = warmup_steps
        self.eps = eps
        # running sums of the first losses; a given initial value counts as warmup_steps observations of it
        self._sums: dict[str, Tensor] = {k: torch.tensor(float(v) * warmup_steps) for k, v in (initial or {}).items()}
        self._count = warmup_steps if initial else 0

    @property
    def initial(self) -> dict[str, Tensor]:
        """The initial losses (the running mean while still warming up)."""
        n = max(min(self._count, self.warmup_steps), 1)
        return {k: v / n for k, v in self._sums.items()}

    def terms(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        _check(losses)
        if self._count < self.warmup_steps and self.training:
            for k, v in losses.items():
                self._sums[k] = (
                    self._sums.get(k, v.new_zeros((), dtype=torch.float32)).to(v.device) + v.detach().float()
                )
            self._count += 1
        for k, v in losses.items():  # given or loaded on the host: moved to the losses' device once, not every step
            if k in self._sums and self._sums[k].device != v.device:
                self._sums[k] = self._sums[k].to(v.device)
        if not self._sums:
            raise RuntimeError("InitialLossNormalization has no initial losses yet: call it in training mode first.")
        initial = self.initial
        out = {}
        for k, v in losses.items():
            if k not in initial:
                raise KeyError(
                    f"InitialLossNormalization: task {k!r} was not seen at the start (known: {list(initial)})."
                )
            out[k] = v / (initial[k].to(v.device, v.dtype) + self.eps)
        return out

    def get_extra_state(self) -> dict:
        return {"sums": {k: v.cpu() for k, v in self._sums.items()}, "count": self._count}

    def set_extra_state(self, state: dict) -> None:
        self._sums = dict(state["sums"])
        self._count = int(state["count"])


class PriorLossNormalization(Scalarizer):
    r""":math:`\mathcal L = \sum_k \mathcal L_k / \mathcal L_k^{(\text{prior})}`: divide by the loss of the best
    input-independent prediction (MTL(1)).

    Classification: the entropy of the class frequencies, :func:`classification_prior`; regression:
    :math:`\mathbb E\|y-\mu\|^2`, :func:`regression_prior`.
    """

    def __init__(self, priors: Mapping[str, float]) -> None:
        super().__init__()
        if not priors:
            raise ValueError(
                "PriorLossNormalization needs a prior loss per task, e.g. {'cls': classification_prior(counts)}."
            )
        for k, v in priors.items():
            if not v > 0 or not math.isfinite(v):
                raise ValueError(f"The prior loss of task {k!r} must be positive and finite, got {v}.")
        self.priors = {k: float(v) for k, v in priors.items()}

    def terms(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        _check(losses)
        missing = set(losses) - set(self.priors)
        if missing:
            raise KeyError(f"PriorLossNormalization: no prior for task(s) {sorted(missing)}.")
        return {k: v / self.priors[k] for k, v in losses.items()}


def classification_prior(class_counts: Sequence[float] | Tensor) -> float:
    r"""Cross-entropy of predicting the class frequencies :math:`p`: :math:`H = -\sum_k p_k \log p_k`."""
    c = torch.as_tensor(class_counts, dtype=torch.float64)
    if c.ndim != 1 or (c < 0).any() or c.sum() <= 0:
        raise ValueError("class_counts must be a 1-D sequence of non-negative counts with a positive sum.")
    p = c / c.sum()
    p = p[p > 0]
    return float(-(p * p.log()).sum())


def regression_prior(targets: Tensor) -> float:
    r"""Squared error of predicting the mean: :math:`\mathbb E\|y - \mu\|^2` (rows are samples)."""
    y = torch.as_tensor(targets, dtype=torch.float64)
    y = y.reshape(y.shape[0], -1)
    return float((y - y.mean(0)).square().sum(1).mean())


class RealTimeNormalization(Scalarizer):
    r""":math:`\mathcal L = \sum_k \mathcal L_k / \mathrm{sg}(\mathcal L_k)`, whose gradient is
    :math:`\sum_k \nabla\mathcal L_k/\mathcal L_k = \nabla \sum_k \log \mathcal L_k` (MTL(1)): the direction of the
    geometric mean. Losses must be positive. ``forward`` returns :math:`\sum_k \log\mathcal L_k` (same gradient,
    an informative value); ``terms`` the ratios (each equal to 1 in value).
    """

    def __init__(self, eps: float = 1e-12) -> None:
        super().__init__()
        self.eps = eps

    def terms(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        _check(losses)
        return {k: v / (v.detach() + self.eps) for k, v in losses.items()}

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        _check(losses)
        return torch.stack([(v + self.eps).log() for v in losses.values()]).sum()


class GeneralizedMean(Scalarizer):
    r""":math:`\mathcal L(\gamma) = \big(\frac1K\sum_k \mathcal L_k^\gamma\big)^{1/\gamma}` (MTL(1)).

    :math:`\gamma = 1`: the mean; :math:`\gamma \to 0`: the geometric mean (same direction as real-time
    normalisation); large :math:`\gamma`: towards the max (the worst task dominates). Losses must be positive.
    ``terms`` returns :math:`\mathrm{sg}(\partial\mathcal L/\partial\mathcal L_k)\,\mathcal L_k`, whose sum has
    the same gradient.
    """

    def __init__(self, gamma: float = 0.0, eps: float = 1e-12) -> None:
        super().__init__()
        if not math.isfinite(gamma):
            raise ValueError(f"gamma must be finite, got {gamma}.")
        self.gamma = float(gamma)
        self.eps = eps

    def forward(self, losses: Mapping[str, Tensor]) -> Tensor:
        _check(losses)
        x = torch.stack(list(losses.values())).clamp_min(self.eps)
        if self.gamma == 0.0:
            return x.log().mean().exp()
        return x.pow(self.gamma).mean().pow(1.0 / self.gamma)

    def terms(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        names = list(losses)
        x = torch.stack([losses[k].detach() for k in names]).requires_grad_(True)
        with torch.enable_grad():
            (grad,) = torch.autograd.grad(self.forward(dict(zip(names, x, strict=True))), x)
        return {k: grad[i] * losses[k] for i, k in enumerate(names)}


class UncertaintyWeighting(Scalarizer):
    r"""Homoscedastic-uncertainty weighting (Kendall, Gal & Cipolla, CVPR 2018; not in the articles):

    .. math:: \mathcal L = \sum_k \tfrac12 e^{-s_k}\mathcal L_k + \tfrac12 s_k,
              \qquad s_k = \log\sigma_k^2 \text{ learned}

    The :math:`s_k` are parameters of this module: keep it inside the LightningModule so ``configure_optimizers``
    sees them (``self.parameters()``). At the optimum :math:`e^{s_k} = \mathcal L_k`, i.e. each task is divided
    by its own running loss, like real-time normalisation with a lag.
    """

    def __init__(self, tasks: Sequence[str], init_log_var: float = 0.0) -> None:
        super().__init__()
        if not tasks or len(set(tasks)) != len(tasks):
            raise ValueError(f"UncertaintyWeighting needs distinct task names, got {list(tasks)}.")
        self.tasks = list(tasks)
        self.log_var = nn.Parameter(torch.full((len(tasks),), float(init_log_var)))

    def terms(self, losses: Mapping[str, Tensor]) -> dict[str, Tensor]:
        _check(losses)
        if set(losses) != set(self.tasks):
            raise KeyError(f"UncertaintyWeighting was built for tasks {self.tasks}, got {list(losses)}.")
        out = {}
        for i, k in enumerate(self.tasks):
            s = self.log_var[i]
            out[k] = 0.5 * torch.exp(-s) * losses[k] + 0.5 * s
        return out
