r"""Loss functions as small pure-torch functions (no Lightning here).

CoSENT (Su Jianlin, https://kexue.fm/archives/8847): a ranking loss on the cosine of sentence pairs. For pairs
:math:`(u_i, v_i)` with cosines :math:`c_i = \cos(u_i, v_i)` and ordered labels :math:`y_i`,

.. math::

    \mathcal L = \log\Big(1 + \sum_{y_i > y_j} e^{\lambda (c_j - c_i)}\Big), \qquad \lambda = 20,

i.e. every pair labelled more similar than another must get the larger cosine. The labels only need an order:
STS scores, binary (1 > 0), NLI (entailment > neutral > contradiction, :data:`NLI_LABELS`). Pairs with equal
labels (ties) contribute nothing. The unit is a *pair*: there are no in-batch negatives.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["NLI_LABELS", "cosent_loss", "cosent_loss_from_embeddings", "pairwise_cosine"]

#: NLI labels as CoSENT orderings (larger = more similar), as in bojone/CoSENT ``cosent_nli.py``.
NLI_LABELS: dict[str, int] = {"contradiction": 0, "neutral": 1, "entailment": 2}


def pairwise_cosine(a: Tensor, b: Tensor, eps: float = 1e-8) -> Tensor:
    r"""Row-wise :math:`\cos(a_i, b_i)` of two ``(B, D)`` tensors, computed in fp32 (also under autocast)."""
    if a.shape != b.shape or a.dim() != 2:
        raise ValueError(
            f"pairwise_cosine expects two (B, D) tensors of one shape, got {tuple(a.shape)} and {tuple(b.shape)}."
        )
    with torch.autocast(device_type=a.device.type, enabled=False):
        return F.cosine_similarity(a.float(), b.float(), dim=-1, eps=eps)


def cosent_loss(cos: Tensor, labels: Tensor, scale: float = 20.0) -> Tensor:
    r"""CoSENT loss :math:`\log(1 + \sum_{y_i > y_j} e^{\lambda(c_j - c_i)})` of one batch of pairs.

    From https://kexue.fm/archives/8847. Computed as a masked ``logsumexp`` over the :math:`B \times B`
    matrix :math:`d_{ji} = \lambda(c_j - c_i)`, with the pairs that are not ordered (:math:`y_i \le y_j`, ties
    included) set to :math:`-\infty` and a leading 0 for the "1 +". Everything runs in fp32 (or fp64 if the
    input is fp64) with autocast disabled: the reference code's ``d - (1 - mask) * 1e12`` overflows to ``inf`` in half
    precision and ``0 * inf`` is NaN, whereas ``-inf`` entries of a logsumexp get exactly zero weight and zero
    gradient. A batch without any ordered pair gives 0 (and a zero gradient).

    Args:
        cos: ``(B,)`` cosines (any float dtype; any similarity in [-1, 1] works).
        labels: ``(B,)`` labels whose order says which pair is more similar: STS scores, 0/1, NLI 0/1/2.
        scale: :math:`\lambda`; the article uses 20. Forgetting it (λ = 1) makes the loss stall.

    Returns:
        A scalar tensor, fp32 (fp64 for fp64 input).
    """
    if cos.dim() != 1 or labels.shape != cos.shape:
        raise ValueError(
            f"cosent_loss expects cos and labels of shape (B,), got {tuple(cos.shape)} and {tuple(labels.shape)}."
        )
    with torch.autocast(device_type=cos.device.type, enabled=False):
        s = cos.double() if cos.dtype == torch.float64 else cos.float()
        s = s * scale
        if labels.dtype == torch.bool:
            labels = labels.to(torch.int8)
        # diff[j, i] = λ(c_j - c_i), kept where y_j < y_i (pair i must rank above pair j)
        diff = s[:, None] - s[None, :]
        ordered = labels[:, None] < labels[None, :]
        diff = diff.masked_fill(~ordered, float("-inf"))
        return torch.logsumexp(torch.cat([s.new_zeros(1), diff.reshape(-1)]), dim=0)


def cosent_loss_from_embeddings(a: Tensor, b: Tensor, labels: Tensor, scale: float = 20.0) -> Tensor:
    """:func:`cosent_loss` of the row-wise cosines of two ``(B, D)`` embedding batches."""
    return cosent_loss(pairwise_cosine(a, b), labels, scale)
