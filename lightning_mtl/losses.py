r"""Generic losses as small pure-torch functions (no Lightning here).

Multi-label "softmax + cross-entropy" (Su, https://kexue.fm/archives/7359; used as the GlobalPointer / GPLinker
loss in https://kexue.fm/archives/8877 and https://kexue.fm/archives/8888, METHODS.md §8-§10):

- :func:`multilabel_crossentropy`, the dense form: scores and a 0/1 target per class;
- :func:`sparse_multilabel_crossentropy`, the sparse form: scores and the indices of the positive classes only
  (GPLinker's form, whose targets for ``n × n`` token pairs would otherwise be dense ``n²`` tensors).

Both compute in float32 (float64 stays float64) with log-sum-exp and ``-inf`` masking, so that bf16/fp16 scores
and ``torch.autocast`` are safe; the last axis holds the classes and every leading axis indexes rows.

Model-specific losses live with their models: the CoSENT loss is :mod:`lightning_gen.cosent.loss`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_mtl._imports import moved

__all__: list[str] = ["multilabel_crossentropy", "sparse_multilabel_crossentropy"]

#: ``K.epsilon()`` of Keras, the floor of ``1 - e^(b - a)`` in bert4keras' sparse loss (https://kexue.fm/archives/8888).
SPARSE_EPSILON = 1e-7

_REDUCTIONS = ("none", "mean", "sum")


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of 'none', 'mean' or 'sum', got {reduction!r}.")


def _check_scores(scores: Tensor, fn: str) -> None:
    if not isinstance(scores, Tensor) or not scores.is_floating_point():
        kind = scores.dtype if isinstance(scores, Tensor) else type(scores).__name__
        raise ValueError(f"{fn}: scores must be a floating-point tensor of logits, got {kind}.")
    if scores.ndim == 0:
        raise ValueError(f"{fn}: scores must have a class axis (the last one), got a 0-d tensor.")


def _compute_dtype(scores: Tensor) -> Tensor:
    """float16/bfloat16 scores go to float32; float32 and float64 stay as they are."""
    return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def _logsumexp_with_zero(x: Tensor) -> Tensor:
    """log(1 + Σ_k e^{x_k}) over the last axis: log-sum-exp with a 0 logit appended (``-inf`` entries drop out)."""
    return torch.logsumexp(torch.cat([x, x.new_zeros((*x.shape[:-1], 1))], dim=-1), dim=-1)


def multilabel_crossentropy(
    scores: Tensor, targets: Tensor, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    r"""Multi-label categorical cross-entropy ("softmax + CE" for multi-label; https://kexue.fm/archives/7359).

    For each row (every leading index of ``scores``), with :math:`\Omega_{pos}` the positive classes and
    :math:`\Omega_{neg}` the negative ones,

    .. math::

        \ell = \log\Big(1 + \sum_{j\in\Omega_{neg}} e^{s_j}\Big) + \log\Big(1 + \sum_{i\in\Omega_{pos}} e^{-s_i}\Big)

    (METHODS.md §8, https://kexue.fm/archives/9158; the GlobalPointer loss of https://kexue.fm/archives/8877 and
    https://kexue.fm/archives/8888). The 1 is a zero logit: a class is predicted positive iff its score is > 0.
    For one class (m = 2 in the terms of archives/9158) it is binary cross-entropy with logits:
    :math:`\log(1+e^{-s})` for a positive, :math:`\log(1+e^{s})` for a negative.

    Computed in float32 (float64 input stays float64) as two log-sum-exps over the scores with ``-inf`` in place of
    the classes that do not take part, so bf16/fp16 scores and ``torch.autocast`` cannot overflow; a row without
    any valid class gives exactly 0 and zero gradients.

    Args:
        scores: logits ``(..., C)``, any real values (no sigmoid/softmax in front).
        targets: ``(..., C)``, the same shape as ``scores``; a bool tensor, or 0/1 numbers (a class is positive
            where ``targets > 0.5``).
        mask: optional bool (or 0/1) tensor broadcastable to ``scores`` that marks the valid classes; a class where
            it is False/0 counts neither as positive nor as negative (e.g. padded token pairs).
        reduction: ``"none"`` (one value per row, shape ``scores.shape[:-1]``), ``"sum"`` or ``"mean"`` over all rows.

    Returns:
        The loss in float32 (float64 for float64 scores).

    Raises:
        ValueError: ``scores`` not floating point or 0-d, ``targets`` of another shape, ``mask`` not broadcastable
            to ``scores``, or an unknown ``reduction``.

    Example::

        >>> scores = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -2.0, -1.0]])
        >>> targets = torch.tensor([[1, 0, 1], [0, 0, 0]])
        >>> multilabel_crossentropy(scores, targets, reduction="none")
        tensor([0.8682, 0.4402])
    """
    _check_reduction(reduction)
    _check_scores(scores, "multilabel_crossentropy")
    if not isinstance(targets, Tensor) or targets.shape != scores.shape:
        got = tuple(targets.shape) if isinstance(targets, Tensor) else type(targets).__name__
        raise ValueError(
            f"multilabel_crossentropy: targets must have the shape of scores {tuple(scores.shape)}, got {got}; "
            "pass one 0/1 (or bool) target per class, or use sparse_multilabel_crossentropy for positive indices."
        )
    positive = targets if targets.dtype == torch.bool else targets > 0.5
    negative = ~positive
    if mask is not None:
        mask = torch.as_tensor(mask, device=scores.device)
        try:
            shape = torch.broadcast_shapes(mask.shape, scores.shape)
        except RuntimeError:
            shape = None
        if shape != scores.shape:
            raise ValueError(
                f"multilabel_crossentropy: mask of shape {tuple(mask.shape)} does not broadcast to the shape of "
                f"scores {tuple(scores.shape)}; give it that shape or one that broadcasts to it (e.g. (C,))."
            )
        valid = mask if mask.dtype == torch.bool else mask > 0.5
        positive = positive & valid
        negative = negative & valid
    s = _compute_dtype(scores)
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    neg_part = _logsumexp_with_zero(torch.where(negative, s, neg_inf))
    pos_part = _logsumexp_with_zero(torch.where(positive, -s, neg_inf))
    return _reduce(neg_part + pos_part, reduction)


def sparse_multilabel_crossentropy(
    scores: Tensor, positive_index: Tensor, mask_zero: bool = True, reduction: str = "mean"
) -> Tensor:
    r"""Sparse multi-label categorical cross-entropy: the loss of :func:`multilabel_crossentropy` from the indices of
    the positive classes only (GPLinker, https://kexue.fm/archives/8888, METHODS.md §10).

    With :math:`P` the positive classes of a row and :math:`\mathcal A` all its classes (:math:`\mathcal A=P\cup N`),

    .. math::

        \ell = \log\Big(1 + \sum_{i\in P} e^{-s_i}\Big) + a + \log\big(1 - e^{\,b-a}\big),\qquad
        a = \log\Big(1 + \sum_{i\in\mathcal A} e^{s_i}\Big),\quad b = \log\sum_{i\in P} e^{s_i},

    since :math:`a + \log(1-e^{b-a}) = \log(e^a - e^b) = \log(1+\sum_{N}e^{s_j})`, the negative part of the dense
    loss, without ever building the negatives. As in the article's code (bert4keras
    ``sparse_multilabel_categorical_crossentropy``), :math:`1-e^{b-a}` is clipped to ``[1e-7, 1]`` (Keras'
    ``K.epsilon()``, :data:`SPARSE_EPSILON`) before the log; it is evaluated as ``-expm1(b - a)``, the same
    quantity with less rounding. So when the positives hold almost all the mass (:math:`e^a-e^b` below
    ``1e-7·e^a``) the negative part is floored at :math:`a+\log 10^{-7}` rather than exact; as :math:`a` is at
    least the largest positive score, a positive scored more than about 16 (:math:`-\log 10^{-7}`) above
    :math:`\log(1+\sum_N e^{s})` then gets a loss and a gradient pushing it back down, which the dense loss
    does not do (the reference behaves the same; the two agree below that margin).

    With ``mask_zero=True`` index 0 is padding, as in the article: a row's positive list is padded with 0 to a
    common length, and class 0 takes part in nothing (neither positive nor negative, so ``scores[..., 0]`` is
    ignored; with GlobalPointer scores flattened to ``n·n`` pairs, class 0 is the pair ``([CLS], [CLS])``).
    Equal to the dense loss with ``mask`` False at class 0 (``mask_zero=True``) or without mask (``False``),
    provided a row's positive indices are distinct: a repeated index is counted twice (not checked, to avoid a
    device sync).

    Computed in float32 (float64 stays float64) with ``-inf`` masking, so bf16/fp16 and ``torch.autocast`` are safe;
    a row with no positive gives :math:`a` and finite gradients.

    Args:
        scores: logits ``(..., C)``.
        positive_index: integer tensor ``(..., K)`` with the leading shape of ``scores``: the positive classes of
            each row, each in ``[0, C)`` (out-of-range indices raise in ``torch.gather``); padded with 0 when
            ``mask_zero``.
        mask_zero: treat index 0 as padding (and class 0 as unused).
        reduction: ``"none"`` (shape ``scores.shape[:-1]``), ``"sum"`` or ``"mean"`` over all rows.

    Returns:
        The loss in float32 (float64 for float64 scores).

    Raises:
        ValueError: ``scores`` not floating point or 0-d, ``positive_index`` not an integer tensor with the leading
            shape of ``scores``, or an unknown ``reduction``.

    Example::

        >>> scores = torch.tensor([[0.0, 2.0, -1.0, 0.5], [0.0, -3.0, -2.0, -1.0]])
        >>> positive_index = torch.tensor([[1, 3], [0, 0]])  # row 1: no positive (0 is padding)
        >>> sparse_multilabel_crossentropy(scores, positive_index, reduction="none")
        tensor([0.8682, 0.4402])
    """
    _check_reduction(reduction)
    _check_scores(scores, "sparse_multilabel_crossentropy")
    if not isinstance(positive_index, Tensor) or positive_index.is_floating_point() or positive_index.is_complex():
        kind = positive_index.dtype if isinstance(positive_index, Tensor) else type(positive_index).__name__
        raise ValueError(
            f"sparse_multilabel_crossentropy: positive_index must be an integer tensor of class indices, got {kind}; "
            "for 0/1 targets per class use multilabel_crossentropy."
        )
    if positive_index.dtype == torch.bool:
        raise ValueError(
            "sparse_multilabel_crossentropy: positive_index is a bool tensor; it must hold class indices "
            "(for a bool target per class use multilabel_crossentropy)."
        )
    if positive_index.ndim != scores.ndim or positive_index.shape[:-1] != scores.shape[:-1]:
        raise ValueError(
            f"sparse_multilabel_crossentropy: positive_index of shape {tuple(positive_index.shape)} must be "
            f"(*{tuple(scores.shape[:-1])}, K) to match scores of shape {tuple(scores.shape)}: one row of K "
            "positive class indices per row of scores (pad with 0 and mask_zero=True when rows differ)."
        )
    s = _compute_dtype(scores)
    index = positive_index.long()
    neg_inf = torch.tensor(float("-inf"), dtype=s.dtype, device=s.device)
    gathered = s.gather(-1, index)  # (..., K)
    if mask_zero:
        padded = index == 0
        every = torch.cat([torch.full_like(s[..., :1], float("-inf")), s[..., 1:]], dim=-1)
    else:
        padded = torch.zeros_like(index, dtype=torch.bool)
        every = s
    pos_part = _logsumexp_with_zero(torch.where(padded, neg_inf, -gathered))
    a = _logsumexp_with_zero(every)
    b = torch.logsumexp(torch.where(padded, neg_inf, gathered), dim=-1)  # -inf for a row without positives
    neg_part = a + torch.log(torch.clamp(-torch.expm1(b - a), SPARSE_EPSILON, 1.0))
    return _reduce(pos_part + neg_part, reduction)


# lightning_mtl.losses.cosent_loss & co. moved with the CoSENT model; the old path works for one release.
__getattr__ = moved("lightning_mtl.losses", "lightning_gen.cosent")
