"""What the last optimiser step's weighting saw and chose: :class:`StepSummary` (read by the callbacks' logging and
by the probes)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["StepSummary", "summarize_step"]


@dataclass(frozen=True)
class StepSummary:
    """What the last optimiser step's weighting saw and chose (read-only; detached tensors on the Gramian's device).

    Attributes:
        tasks: the task names, in the Gramian's order.
        gramian: :math:`G_{ij} = \\langle g_i, g_j\\rangle`, K×K float64, unscaled (global under DDP/FSDP2).
        weights: the weights :math:`w` the weighting returned (K).
        norms: :math:`\\|g_k\\| = \\sqrt{G_{kk}}` (K).
        cosines: :math:`G_{ij} / (\\|g_i\\|\\|g_j\\|)`, 0 where a norm is 0 (K×K).
    """

    tasks: tuple[str, ...]
    gramian: Tensor
    weights: Tensor
    norms: Tensor
    cosines: Tensor


def summarize_step(tasks: Sequence[str], gramian: Tensor, weights: Tensor) -> StepSummary:
    """The :class:`StepSummary` of a Gramian and its weights: norms :math:`\\sqrt{G_{kk}}` and cosines."""
    gram = gramian.detach()
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(torch.finfo(gram.dtype).tiny), torch.zeros_like(gram))
    return StepSummary(tuple(tasks), gram, weights.detach(), norms, cos)
