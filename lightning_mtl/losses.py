r"""Generic losses as small pure-torch functions (no Lightning here).

Multi-label "softmax + cross-entropy" (Su, https://kexue.fm/archives/7359; used as the GlobalPointer / GPLinker
loss in https://kexue.fm/archives/8877 and https://kexue.fm/archives/8888):

- :func:`multilabel_crossentropy`, the dense form: scores and a 0/1 target per class;
- :func:`sparse_multilabel_crossentropy`, the sparse form: scores and the indices of the positive classes only
  (GPLinker's form, whose targets for ``n × n`` token pairs would otherwise be dense ``n²`` tensors).

Both compute in float32 (float64 stays float64) with log-sum-exp and ``-inf`` masking, so that bf16/fp16 scores
and ``torch.autocast`` are safe; the last axis holds the classes and every leading axis indexes rows.

The rest of the series, with the same conventions:

- :func:`nxm_crossentropy` and :func:`nxm_crossentropy_soft`, attempts 1 and 2 at an "n × m" multi-label
  cross-entropy (https://kexue.fm/archives/9158; the article calls both unsuccessful, attempt 1 being the one
  for hard labels);
- :func:`exact_probability` and :func:`exact_loss`, EXACT's expected accuracy under Gaussian noise
  (https://kexue.fm/archives/9098, arXiv 2205.09615), by adaptive Gauss–Hermite quadrature of a 1-D integral.

Model-specific losses live with their models: the CoSENT loss is :mod:`lightning_gen.cosent.loss`.
"""

from __future__ import annotations

import functools
import math
from typing import Literal

import torch
from torch import Tensor

from lightning_mtl import _device
from lightning_mtl._imports import moved

__all__: list[str] = [
    "exact_loss",
    "exact_probability",
    "multilabel_crossentropy",
    "nxm_crossentropy",
    "nxm_crossentropy_soft",
    "sparse_multilabel_crossentropy",
]

#: ``-inf`` as a Python float: ``masked_fill``/``where`` take it as a scalar, with no tensor built (or copied to the
#: device) per call.
_NEG_INF = float("-inf")

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


def _pair_scores_error(scores: Tensor, fn: str, advice: str) -> ValueError:
    """The error for GlobalPointer scores ``(B, T, n, n)`` not flattened to ``(B, T, n²)`` (``advice`` may name
    ``{flat}``, the flattened shape)."""
    n = scores.shape[-1]
    return ValueError(
        f"{fn}: expected scores of shape (..., C) with the classes on the last axis, got {tuple(scores.shape)}: the "
        "shape of unflattened GlobalPointer span scores (batch, types, n, n), whose classes are the n·n token pairs "
        "of each (batch, type). " + advice.format(flat=(*scores.shape[:-2], n * n))
    )


def _is_pair_scores(scores: Tensor) -> bool:
    """``(..., n, n)`` with 4 or more axes: what a GlobalPointer head returns, ``(B, T, n, n)``."""
    return scores.ndim >= 4 and scores.shape[-1] == scores.shape[-2]


def _compute_dtype(scores: Tensor) -> Tensor:
    """float16/bfloat16 scores go to float32; float32 and float64 stay as they are."""
    return scores.float() if scores.dtype in (torch.float16, torch.bfloat16) else scores


def _reduce(loss: Tensor, reduction: str) -> Tensor:
    if reduction == "none":
        return loss
    return loss.sum() if reduction == "sum" else loss.mean()


def _logsumexp_with_zero(x: Tensor) -> Tensor:
    r"""log(1 + Σ_k e^{x_k}) over the last axis: log-sum-exp with a 0 logit appended (``-inf`` entries drop out).

    As :math:`M + \operatorname{log1p}(\operatorname{expm1}(-M) + \sum_k e^{x_k - M})` with
    :math:`M = \max(0, \max_k x_k)` (a constant: the value does not depend on it): accurate to the last digits
    relative to the result also when it is tiny (:math:`M = 0`, ``log1p`` of a small sum; ``log`` of ``1 + sum``
    would keep only its absolute error, 1e-7 in float32), and finite, with zero gradients, for a row of ``-inf``.
    """
    if x.shape[-1] == 0:
        return x.new_zeros(x.shape[:-1])
    top = x.detach().amax(dim=-1, keepdim=True).clamp_min(0.0)
    total = torch.exp(x - top).sum(dim=-1) + torch.expm1(-top.squeeze(-1))
    return top.squeeze(-1) + torch.log1p(total)


def multilabel_crossentropy(
    scores: Tensor, targets: Tensor, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    r"""Multi-label categorical cross-entropy ("softmax + CE" for multi-label; https://kexue.fm/archives/7359).

    For each row (every leading index of ``scores``), with :math:`\Omega_{pos}` the positive classes and
    :math:`\Omega_{neg}` the negative ones,

    .. math::

        \ell = \log\Big(1 + \sum_{j\in\Omega_{neg}} e^{s_j}\Big) + \log\Big(1 + \sum_{i\in\Omega_{pos}} e^{-s_i}\Big)

    (https://kexue.fm/archives/9158; the GlobalPointer loss of https://kexue.fm/archives/8877 and
    https://kexue.fm/archives/8888). The 1 is a zero logit: a class is predicted positive iff its score is > 0.
    For one class (m = 2 in the terms of archives/9158) it is binary cross-entropy with logits:
    :math:`\log(1+e^{-s})` for a positive, :math:`\log(1+e^{s})` for a negative.

    Computed in float32 (float64 input stays float64) as two log-sum-exps over the scores with ``-inf`` in place of
    the classes that do not take part, so bf16/fp16 scores and ``torch.autocast`` cannot overflow; a row without
    any valid class gives exactly 0 and zero gradients.

    Args:
        scores: logits ``(..., C)``, any real values (no sigmoid/softmax in front). A GlobalPointer head's
            ``(B, T, n, n)`` goes in as ``scores.flatten(-2)``, rows ``(B, T)`` of ``n²`` pair classes; scores of
            4 or more axes whose last two are equal are refused as unflattened pair scores.
        targets: ``(..., C)``, the same shape as ``scores``; a bool tensor, or 0/1 numbers (a class is positive
            where ``targets > 0.5``).
        mask: optional bool (or 0/1) tensor broadcastable to ``scores`` that marks the valid classes; a class where
            it is False/0 counts neither as positive nor as negative (e.g. padded token pairs).
        reduction: ``"none"`` (one value per row, shape ``scores.shape[:-1]``), ``"sum"`` or ``"mean"`` over all rows.

    Returns:
        The loss in float32 (float64 for float64 scores).

    Raises:
        ValueError: ``scores`` not floating point, 0-d, or ``(..., n, n)`` with 4 or more axes (unflattened
            GlobalPointer scores), ``targets`` of another shape, ``mask`` not broadcastable to ``scores``, or an
            unknown ``reduction``.

    Example::

        >>> scores = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -2.0, -1.0]])
        >>> targets = torch.tensor([[1, 0, 1], [0, 0, 0]])
        >>> multilabel_crossentropy(scores, targets, reduction="none")
        tensor([0.8682, 0.4402])
    """
    _check_reduction(reduction)
    _check_scores(scores, "multilabel_crossentropy")
    if _is_pair_scores(scores):  # read as B·T·n rows of n classes, it would be another loss, and no error
        raise _pair_scores_error(
            scores,
            "multilabel_crossentropy",
            "Pass scores.flatten(-2) and targets.flatten(-2), shape {flat}. If the last axis really is the class "
            "axis, merge the leading axes first: scores.flatten(0, -2) and targets.flatten(0, -2), reduction='none', "
            "then .view(scores.shape[:-1]).",
        )
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
    neg_part = _logsumexp_with_zero(s.masked_fill(~negative, _NEG_INF))
    pos_part = _logsumexp_with_zero(s.neg().masked_fill(~positive, _NEG_INF))
    return _reduce(neg_part + pos_part, reduction)


def sparse_multilabel_crossentropy(
    scores: Tensor, positive_index: Tensor, mask_zero: bool = True, reduction: str = "mean"
) -> Tensor:
    r"""Sparse multi-label categorical cross-entropy: the loss of :func:`multilabel_crossentropy`
    (https://kexue.fm/archives/7359) from the indices of the positive classes only (its sparse version in GPLinker,
    https://kexue.fm/archives/8888).

    With :math:`P` the positive classes of a row and :math:`\mathcal A` all its classes (:math:`\mathcal A=P\cup N`),
    the article writes the loss as

    .. math::

        \ell = \log\Big(1 + \sum_{i\in P} e^{-s_i}\Big) + a + \log\big(1 - e^{\,b-a}\big),\qquad
        a = \log\Big(1 + \sum_{i\in\mathcal A} e^{s_i}\Big),\quad b = \log\sum_{i\in P} e^{s_i},

    since :math:`a + \log(1-e^{b-a}) = \log(e^a - e^b) = \log(1+\sum_{N}e^{s_j})`, the negative part of the dense
    loss. That form is not used here: it cancels. When a positive scores :math:`m` above
    :math:`\log(1+\sum_N e^{s})`, :math:`1-e^{b-a}\approx e^{-m}` is the difference of two nearly equal numbers,
    and :math:`b-a` has lost it to rounding long before (in float32, :math:`a` carries about 7 digits): on a row of
    48 negatives at −2 (dense negative part 2.0144) the article's form gives 2.0016 at :math:`m = 10`, 2.0974 at
    :math:`m = 12` and −0.1037 at :math:`m = 14` in float32, and past :math:`m\approx 16` its clip of
    :math:`1-e^{b-a}` to ``1e-7`` (bert4keras ``sparse_multilabel_categorical_crossentropy``, Keras'
    ``K.epsilon()``) makes it grow with :math:`m` in any dtype, with a gradient pushing the positive back down
    (``benchmarks/sparse_loss_error.py``, ``benchmarks/sparse_loss.md``). Instead the positive indices are
    scattered into a bool mask of the row and the negative part is the log-sum-exp over its complement, as in the
    dense form: as accurate as the dense form (relative 1e-7 in float32, also under bf16 autocast) for any margin,
    at the cost of one bool and one score-sized temporary per call, the dense form's cost; what the sparse form
    saves is the dense ``n²`` target tensors in the data pipeline.

    With ``mask_zero=True`` index 0 is padding, as in the article: a row's positive list is padded with 0 to a
    common length, and class 0 takes part in nothing (neither positive nor negative, so ``scores[..., 0]`` is
    ignored; with GlobalPointer scores flattened to ``n·n`` pairs, class 0 is the pair ``([CLS], [CLS])``).
    Equal to the dense loss with ``mask`` False at class 0 (``mask_zero=True``) or without mask (``False``), for
    every margin and mask pattern; a repeated index counts once, as one target does in the dense form.

    Computed in float32 (float64 stays float64) with ``-inf`` masking, so bf16/fp16 and ``torch.autocast`` are safe;
    a row with no positive gives :math:`a` and finite gradients. No host-device synchronisation.

    Args:
        scores: logits ``(..., C)``.
        positive_index: integer tensor ``(..., K)`` with the leading shape of ``scores``: the positive classes of
            each row, each in ``[0, C)`` (out-of-range indices raise in ``torch.gather``); padded with 0 when
            ``mask_zero``. For GlobalPointer scores ``(B, T, n, n)``, the pair ``(i, j)`` is class ``i·n + j`` of
            ``scores.flatten(-2)``.
        mask_zero: treat index 0 as padding (and class 0 as unused).
        reduction: ``"none"`` (shape ``scores.shape[:-1]``), ``"sum"`` or ``"mean"`` over all rows.

    Returns:
        The loss in float32 (float64 for float64 scores).

    Raises:
        ValueError: ``scores`` not floating point or 0-d, ``positive_index`` not an integer tensor with the leading
            shape of ``scores`` (with a message of its own for unflattened GlobalPointer scores ``(B, T, n, n)``
            and an index ``(B, T, K)``), or an unknown ``reduction``.

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
    unflattened = positive_index.ndim == scores.ndim - 1 and positive_index.shape[:-1] == scores.shape[:-2]
    if unflattened and _is_pair_scores(scores):
        raise _pair_scores_error(
            scores,
            "sparse_multilabel_crossentropy",
            f"Pass scores.flatten(-2), shape {{flat}}, whose class i·n + j is the pair (i, j), with positive_index of "
            f"shape {tuple(positive_index.shape)} listing those class numbers.",
        )
    if positive_index.ndim != scores.ndim or positive_index.shape[:-1] != scores.shape[:-1]:
        raise ValueError(
            f"sparse_multilabel_crossentropy: positive_index of shape {tuple(positive_index.shape)} must be "
            f"(*{tuple(scores.shape[:-1])}, K) to match scores of shape {tuple(scores.shape)}: one row of K "
            "positive class indices per row of scores (pad with 0 and mask_zero=True when rows differ)."
        )
    s = _compute_dtype(scores)
    index = positive_index.long()
    k = index.shape[-1]
    # a padded slot, or an index that repeats an earlier slot of its row, is not a positive of its own
    earlier = torch.ones(k, k, dtype=torch.bool, device=s.device).tril(-1)  # slot j < slot i
    dropped = ((index.unsqueeze(-1) == index.unsqueeze(-2)) & earlier).any(-1)
    if mask_zero:
        dropped = dropped | (index == 0)
    pos_part = _logsumexp_with_zero(s.gather(-1, index).neg().masked_fill(dropped, _NEG_INF))
    # the negatives: every class but the positives (and class 0 with mask_zero), no cancellation
    excluded = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, index, True)
    if mask_zero:
        excluded[..., 0].fill_(True)  # a fill on the view: no scalar tensor built on the host
    neg_part = _logsumexp_with_zero(s.masked_fill(excluded, _NEG_INF))
    return _reduce(pos_part + neg_part, reduction)


# --------------------------------------------------------------------------------------------------------------------
# "n × m" classification: the two attempts of https://kexue.fm/archives/9158
# --------------------------------------------------------------------------------------------------------------------


def _logsumexp_others(s: Tensor) -> Tensor:
    r"""Leave-one-out log-sum-exp over the last axis: :math:`\log\sum_{k\ne j} e^{s_k}` for every :math:`j`, in O(m).

    Exact, without the cancellation of :math:`\log(\sum_k e^{s_k} - e^{s_j})`: for the largest class it is a
    log-sum-exp over the others; for every other class the largest term (``e^0 = 1`` after the shift) stays in the
    sum, so the difference is at least 1 and loses no digits. Needs at least 2 classes and finite scores.
    """
    top = s.argmax(dim=-1, keepdim=True)
    is_top = torch.zeros_like(s, dtype=torch.bool).scatter_(-1, top, True)
    rest = torch.logsumexp(s.masked_fill(is_top, _NEG_INF), dim=-1, keepdim=True)  # the top class's others
    shift = s.gather(-1, top).detach()  # the result does not depend on the shift: no gradient through it
    e = torch.exp(s - shift)
    total = e.sum(dim=-1, keepdim=True)
    others = shift + torch.log(total - torch.where(is_top, torch.zeros_like(e), e))
    return torch.where(is_top, rest, others)


def _nxm_log_weights(scores: Tensor, targets: Tensor, mask: Tensor | None, fn: str) -> tuple[Tensor, Tensor]:
    """Scores in the compute dtype and :math:`\\log t_{i,j}` (``-inf`` where ``t`` is 0 or the position is masked)."""
    _check_scores(scores, fn)
    if scores.ndim < 2 or scores.shape[-1] < 2:
        raise ValueError(
            f"{fn}: scores must be (..., n, m) logits, n positions with m >= 2 classes each, got shape "
            f"{tuple(scores.shape)}."
        )
    positions = scores.shape[:-1]
    is_tensor = isinstance(targets, Tensor)
    integer = is_tensor and not (targets.is_floating_point() or targets.is_complex() or targets.dtype == torch.bool)
    hard = integer and targets.shape == positions
    soft = is_tensor and targets.is_floating_point() and targets.shape == scores.shape
    if not (hard or soft):
        got = f"{targets.dtype} of shape {tuple(targets.shape)}" if is_tensor else type(targets).__name__
        raise ValueError(
            f"{fn}: targets must be class indices, an integer tensor of shape {tuple(positions)} (one class per "
            f"position), or label distributions, a floating-point tensor of the shape of scores {tuple(scores.shape)}; "
            f"got {got}."
        )
    s = _compute_dtype(scores)
    valid = None
    if mask is not None:
        mask = torch.as_tensor(mask, device=scores.device)
        try:
            shape = torch.broadcast_shapes(mask.shape, positions)
        except RuntimeError:
            shape = None
        if shape != positions:
            raise ValueError(
                f"{fn}: mask of shape {tuple(mask.shape)} does not broadcast to the positions {tuple(positions)} "
                f"(scores of shape {tuple(scores.shape)} without the class axis); give one True/False per position."
            )
        valid = (mask if mask.dtype == torch.bool else mask > 0.5).expand(positions)
    if hard:
        index = targets.long()
        if valid is not None:  # a masked position may hold anything (e.g. -100): keep the scatter in range
            index = torch.where(valid, index, torch.zeros_like(index))
        log_t = torch.full_like(s, float("-inf")).scatter(-1, index.unsqueeze(-1), 0.0)
    else:
        t = targets.to(s.dtype)
        positive = t > 0
        log_t = torch.log(torch.where(positive, t, torch.ones_like(t))).masked_fill(~positive, _NEG_INF)
    if valid is not None:
        log_t = log_t.masked_fill(~valid.unsqueeze(-1), _NEG_INF)
    return s, log_t


def _sum_of_class_terms(x: Tensor) -> Tensor:
    r""":math:`\sum_j \log(1 + \sum_i e^{x_{i,j}})` for ``x`` of shape ``(..., n, m)``, giving ``(...)``."""
    return _logsumexp_with_zero(x.transpose(-1, -2)).sum(dim=-1)


def nxm_crossentropy(scores: Tensor, targets: Tensor, mask: Tensor | None = None, reduction: str = "mean") -> Tensor:
    r"""The "n × m" multi-label cross-entropy, attempt 1 of https://kexue.fm/archives/9158.

    ``n`` sub-problems (positions, samples) of one row each pick one of ``m`` classes; instead of averaging ``n``
    softmax cross-entropies, the row's loss puts the sum over the positions inside a log, one log per class, as the
    multi-label cross-entropy of :func:`multilabel_crossentropy` does for ``n`` binary problems. With logits
    :math:`s_{i,j}` and labels :math:`t_{i,j}` (position :math:`i=1..n`, class :math:`j=1..m`), the first-order
    truncation of the summed softmax cross-entropy is

    .. math::

        \ell = \sum_{j=1}^{m} \log\Big(1 + \sum_{i=1}^{n}\sum_{k\ne j} t_{i,j}\, e^{-s_{i,j}+s_{i,k}}\Big).

    For hard labels (:math:`t_{i,j}=1` iff :math:`j=y_i`) the term of class :math:`j` gathers the positions labelled
    :math:`j`, each with :math:`\sum_{k\ne j} e^{s_{i,k}-s_{i,j}}`, the quantity a softmax cross-entropy
    :math:`\log(1+\sum_{k\ne y}e^{s_k-s_y})` takes the log of per position; the log outside the sum over positions
    balances the classes (each contributes about the log of its number of errors, not their count).

    At ``m = 2`` it is :func:`multilabel_crossentropy` with the positions as the classes, scores
    :math:`s_{i,1}-s_{i,0}` and positive classes the positions labelled 1 (the article: "both reduce to
    multi-label CE at m = 2").

    **Verdict of the article** (the title calls the generalisation "unsuccessful"): this form is fine for hard
    labels, but for soft labels the stationarity condition :math:`\partial\ell/\partial s=0` has no closed-form
    solution, so it is not known what the model learns from them ("failure 1"). Soft labels are accepted and
    computed by the formula above, but :func:`nxm_crossentropy_soft` is the attempt with a known optimum. Use this
    one for hard labels.

    Computed in float32 (float64 stays float64) with log-sum-exps and ``-inf`` masking (the leave-one-out
    :math:`\log\sum_{k\ne j}e^{s_{i,k}}` is exact, without cancellation), so bf16/fp16 scores and ``torch.autocast``
    are safe; scores must be finite.

    Args:
        scores: logits ``(..., n, m)``: every leading index is a row of ``n`` positions with ``m >= 2`` classes.
        targets: class indices, an integer tensor ``(..., n)`` with values in ``[0, m)`` where ``mask`` is True
            (out-of-range indices raise in ``torch.scatter``); or label weights :math:`t_{i,j}\ge0`, a floating
            tensor of the shape of ``scores`` (rows of a distribution; zero and negative weights drop out).
        mask: optional bool (or 0/1) tensor broadcastable to ``(..., n)``: the valid positions; a masked position
            takes part in nothing and its target may be any value (e.g. ``-100``).
        reduction: ``"none"`` (one value per row, shape ``scores.shape[:-2]``), ``"sum"`` or ``"mean"`` over rows.

    Returns:
        The loss in float32 (float64 for float64 scores).

    Raises:
        ValueError: ``scores`` not floating point or not ``(..., n, m)`` with ``m >= 2``, ``targets`` neither
            ``(..., n)`` integers nor floats of the shape of ``scores``, ``mask`` not broadcastable to ``(..., n)``,
            or an unknown ``reduction``.
    """
    _check_reduction(reduction)
    s, log_t = _nxm_log_weights(scores, targets, mask, "nxm_crossentropy")
    margins = _logsumexp_others(s) - s  # log Σ_{k≠j} e^{s_ik - s_ij}
    return _reduce(_sum_of_class_terms(log_t + margins), reduction)


def nxm_crossentropy_soft(
    scores: Tensor, targets: Tensor, mask: Tensor | None = None, reduction: str = "mean"
) -> Tensor:
    r"""The "n × m" multi-label cross-entropy, attempt 2 of https://kexue.fm/archives/9158: the
    form built so that soft labels have a known optimum.

    Starting from :math:`\ell=\sum_j\log(1+\sum_i t_{i,j}e^{-f(s_{i,j})})` and asking that
    :math:`t=\mathrm{softmax}(f(s))` be stationary forces :math:`\sum_j f(s_{i,j})` to be constant, so
    :math:`f(s_{i,j}) = s_{i,j}-\bar s_i` with :math:`\bar s_i=\frac1m\sum_j s_{i,j}`:

    .. math::

        \ell = \sum_{j=1}^{m} \log\Big(1 + \sum_{i=1}^{n} t_{i,j}\, e^{-s_{i,j}+\bar s_i}\Big).

    **Optimum**: for label distributions :math:`t_{i,\cdot}`, the scores with :math:`\mathrm{softmax}(s_{i,\cdot})
    = t_{i,\cdot}` (i.e. :math:`s_{i,j}=\log t_{i,j}+c_i`) make the gradient zero: every
    :math:`t_{i,j}e^{-s_{i,j}+\bar s_i}` then equals :math:`e^{\bar s_i}/\sum_k e^{s_{i,k}}` whatever :math:`j`,
    and the :math:`-1` and :math:`+1/m` parts of :math:`\partial(-s_{i,j}+\bar s_i)/\partial s_{i,b}` cancel over
    :math:`j`. The loss is convex in :math:`s` (a sum of log-sum-exps of affine maps), so this is the global minimum,
    unique up to the per-position shifts :math:`c_i` when every :math:`t_{i,j}>0`.

    At ``m = 2``, :math:`-s_{i,1}+\bar s_i = -(s_{i,1}-s_{i,0})/2`: it is :func:`multilabel_crossentropy` with the
    positions as the classes, scores :math:`(s_{i,1}-s_{i,0})/2` and positive classes the positions labelled 1.

    **Verdict of the article**: right in theory, but it fails in practice with hard labels: the loss is about 0 as
    soon as :math:`s_{i,y_i}\gg\bar s_i`, even when :math:`s_{i,y_i}` is not the largest score of its position,
    so it does not train the argmax. The article's conclusion: use attempt 1 (:func:`nxm_crossentropy`) for hard
    labels; a soft-label generalisation that also works in practice stays unsolved.

    Computed in float32 (float64 stays float64) with log-sum-exps and ``-inf`` masking, so bf16/fp16 scores and
    ``torch.autocast`` are safe.

    Args:
        scores: logits ``(..., n, m)``, ``m >= 2``.
        targets: label distributions :math:`t_{i,j}\ge 0`, floating point, the shape of ``scores`` (zero weights
            drop out; the optimum above holds for rows that sum to 1); or class indices, an integer tensor
            ``(..., n)`` (one-hot labels, for which the verdict above applies).
        mask: optional bool (or 0/1) tensor broadcastable to ``(..., n)``: the valid positions.
        reduction: ``"none"`` (shape ``scores.shape[:-2]``), ``"sum"`` or ``"mean"`` over rows.

    Returns:
        The loss in float32 (float64 for float64 scores).

    Raises:
        ValueError: as :func:`nxm_crossentropy`.
    """
    _check_reduction(reduction)
    s, log_t = _nxm_log_weights(scores, targets, mask, "nxm_crossentropy_soft")
    return _reduce(_sum_of_class_terms(log_t - s + s.mean(dim=-1, keepdim=True)), reduction)


# --------------------------------------------------------------------------------------------------------------------
# EXACT: the expected accuracy of a classifier with Gaussian noise (https://kexue.fm/archives/9098)
# --------------------------------------------------------------------------------------------------------------------

#: Default number of Gauss–Hermite nodes of :func:`exact_probability` / :func:`exact_loss`.
EXACT_NUM_NODES = 32
#: Newton steps that place the nodes on the integrand's peak (a change of variables: any centre is exact).
_EXACT_NEWTON_STEPS = 20
_LOG_SQRT_2PI = 0.5 * math.log(2 * math.pi)


@functools.lru_cache(maxsize=16)
def _gauss_hermite(num_nodes: int) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Nodes :math:`x_k` and :math:`\\log w_k + x_k^2` of the Gauss–Hermite rule (weight :math:`e^{-x^2}`), float64."""
    import numpy as np

    x, w = np.polynomial.hermite.hermgauss(num_nodes)
    with np.errstate(divide="ignore"):  # a weight that underflows to 0 drops out as -inf
        return tuple(x.tolist()), tuple((np.log(w) + x * x).tolist())


@functools.lru_cache(maxsize=16)
def _gauss_hermite_on(num_nodes: int, dtype: torch.dtype, device: torch.device) -> tuple[Tensor, Tensor]:
    """:func:`_gauss_hermite` as tensors on ``device``, made once (not copied from the host at every call)."""
    nodes, log_weights = _gauss_hermite(num_nodes)
    return torch.tensor(nodes, dtype=dtype, device=device), torch.tensor(log_weights, dtype=dtype, device=device)


def _exact_inputs(
    mu: Tensor, sigma: Tensor | float, target: Tensor, num_nodes: int, fn: str
) -> tuple[Tensor, Tensor, Tensor]:
    """Validated ``(mu, sigma, target)``: mu in the compute dtype, sigma of shape ``mu.shape[:-1]``, target long."""
    if not isinstance(mu, Tensor) or not mu.is_floating_point() or mu.ndim == 0:
        got = (f"{mu.dtype} of shape {tuple(mu.shape)}") if isinstance(mu, Tensor) else type(mu).__name__
        raise ValueError(f"{fn}: mu must be a floating-point tensor (..., C) of class scores, got {got}.")
    rows = mu.shape[:-1]
    m = _compute_dtype(mu)
    if isinstance(sigma, bool) or not isinstance(sigma, (Tensor, int, float)):
        raise ValueError(f"{fn}: sigma must be a tensor or a positive number, got {type(sigma).__name__}.")
    if isinstance(sigma, Tensor):
        if not sigma.is_floating_point():
            raise ValueError(f"{fn}: sigma must be floating point, got {sigma.dtype}.")
        sig = sigma.to(device=mu.device, dtype=m.dtype)
    else:  # a Python number: straight to the compute dtype (no float32 rounding on the way to float64)
        sig = torch.full((), float(sigma), dtype=m.dtype, device=mu.device)  # a fill, no host-to-device copy
    if sig.shape == (*rows, 1) and sig.shape != rows:
        sig = sig.squeeze(-1)
    elif sig.ndim != 0 and sig.shape != rows:
        raise ValueError(
            f"{fn}: sigma of shape {tuple(sig.shape)} does not match mu of shape {tuple(mu.shape)}: give one scale "
            f"per row, shape {tuple(rows)} or {(*rows, 1)}, or a single number."
        )
    if _device.on_host(sig):
        if not bool((sig > 0).all()):
            raise ValueError(
                f"{fn}: sigma must be > 0 everywhere (the scale σ(x) of the Gaussian noise; produce it with e.g. "
                f"softplus(raw) + 1e-3), got min {sig.min().item():.4g} (or NaN)."
            )
    else:  # on an accelerator the check would stall the device: a sigma <= 0 makes its row's loss NaN instead
        sig = torch.where(sig > 0, sig, float("nan"))
    is_tensor = isinstance(target, Tensor)
    if not is_tensor or target.is_floating_point() or target.is_complex() or target.dtype == torch.bool:
        got = target.dtype if is_tensor else type(target).__name__
        raise ValueError(f"{fn}: target must be an integer tensor of class indices, got {got}.")
    if target.shape != rows:
        raise ValueError(
            f"{fn}: target of shape {tuple(target.shape)} must have the shape of mu without its class axis, "
            f"{tuple(rows)} (mu has shape {tuple(mu.shape)})."
        )
    if isinstance(num_nodes, bool) or not isinstance(num_nodes, int) or num_nodes < 1:
        raise ValueError(f"{fn}: num_nodes must be a positive int (Gauss–Hermite nodes), got {num_nodes!r}.")
    return m, sig.expand(rows), target.long()


def _exact_log_probability(m: Tensor, sig: Tensor, target: Tensor, num_nodes: int) -> Tensor:
    r""":math:`\log p` per row by adaptive Gauss–Hermite quadrature of the 1-D integral (see exact_probability)."""
    z = m / sig.unsqueeze(-1)
    index = target.unsqueeze(-1)
    d = z.gather(-1, index) - z  # (..., C): the margins (mu_y - mu_i) / sigma; d_y = 0 is left out below
    is_target = torch.zeros_like(d, dtype=torch.bool).scatter_(-1, index, True)
    zero = torch.zeros((), dtype=d.dtype, device=d.device)
    with torch.no_grad():  # centre c and width τ of the nodes: the integral is the same for any of them
        d0 = d.detach()
        centre = torch.zeros_like(d0[..., :1])
        for step in range(_EXACT_NEWTON_STEPS + 1):
            u = d0 + centre
            mills = math.sqrt(2 / math.pi) / torch.special.erfcx(-u / math.sqrt(2))  # φ(u)/Φ(u), stable
            mills = torch.where(is_target, zero, mills)
            curvature = 1 + torch.where(is_target, zero, (mills * (mills + u)).clamp(0, 1)).sum(-1, keepdim=True)
            if step == _EXACT_NEWTON_STEPS:
                break
            centre = centre + (mills.sum(-1, keepdim=True) - centre) / curvature  # Newton step on g'(c) = 0
        width = curvature.rsqrt() * math.sqrt(2)
    x, log_w = _gauss_hermite_on(num_nodes, d.dtype, d.device)
    u = centre + width * x  # (..., K)
    log_cdf = torch.special.log_ndtr(d.unsqueeze(-2) + u.unsqueeze(-1))  # (..., K, C)
    log_cdf = torch.where(is_target.unsqueeze(-2), zero, log_cdf)
    log_integrand = -0.5 * u * u - _LOG_SQRT_2PI + log_cdf.sum(-1)
    return torch.log(width).squeeze(-1) + torch.logsumexp(log_w + log_integrand, dim=-1)


def exact_probability(
    mu: Tensor, sigma: Tensor | float, target: Tensor, num_nodes: int = EXACT_NUM_NODES, log: bool = False
) -> Tensor:
    r"""EXACT's probability that the noisy classifier is right (https://kexue.fm/archives/9098,
    `arXiv:2205.09615 <https://arxiv.org/abs/2205.09615>`__), differentiable in ``mu`` and ``sigma``.

    .. math::

        p(y\mid x) = P\Big(y = \arg\max_i\ \frac{\mu_i(x)}{\sigma(x)} + \varepsilon_i\Big),\qquad
        \varepsilon\sim\mathcal N(0, I).

    Conditioning on :math:`\varepsilon_y=u` makes the events :math:`\varepsilon_i<d_i+u` independent, with the
    margins :math:`d_i=(\mu_y-\mu_i)/\sigma`, so the :math:`(C-1)`-dimensional orthant probability is the 1-D
    integral

    .. math::

        p = \int_{-\infty}^{\infty}\varphi(u)\prod_{i\ne y}\Phi(d_i+u)\,du .

    **Estimator.** The article does not describe the paper's; its reference code (tinkoff-ai/exact,
    ``EXACTLoss(sample_size=16)``) estimates the same orthant probability, of
    :math:`\mathcal N(d, I+\mathbf 1\mathbf 1^\top)`, with Genz's Monte-Carlo algorithm, 16 samples by default.
    Here the integral above is computed by Gauss–Hermite quadrature with ``num_nodes`` nodes (32 by default),
    deterministic (no Monte-Carlo variance): the nodes are centred on the peak :math:`c` of the log-integrand
    (20 Newton steps) and scaled by its curvature there, :math:`u = c + \sqrt{2}\,\tau x_k` (adaptive Gauss–Hermite;
    any :math:`c,\tau` give the same integral, only the quadrature error changes, and no gradient flows through
    them). The error is the quadrature error only; measured against adaptive 1-D integration in float64 (random
    margins, :math:`C` from 2 to 1000), with the default 32 nodes it is below :math:`10^{-8}` absolute for
    :math:`C\le 10`, about :math:`2\cdot 10^{-6}` for :math:`C` = 100 to 1000, and :math:`4\cdot 10^{-5}` in the
    worst case found (:math:`C=1000`, every margin 5, :math:`p\approx 0.95`: a sharp edge in the integrand); with 64
    nodes below :math:`4\cdot 10^{-6}` there, and it keeps falling fast as ``num_nodes`` grows. As the nodes follow
    the peak, :math:`\log p` keeps that accuracy relative to :math:`p` when :math:`p` is tiny (e.g. :math:`10^{-94}`
    for :math:`C=3`, :math:`10^{-15}` for :math:`C=1000`). In float32, :math:`\log p` has a floor of about
    :math:`10^{-5}` (relative, at :math:`C=1000`). Being an estimate, :math:`p` may exceed 1 by that error. The
    cost is
    :math:`O(KC)` per row for :math:`K` = ``num_nodes`` (memory too, for the backward pass).

    Args:
        mu: class scores :math:`\mu(x)`, floating point ``(..., C)``.
        sigma: :math:`\sigma(x) > 0`, one per row: shape ``(...)``, ``(..., 1)``, or a single number. Checked on
            CPU (a ``ValueError``); on an accelerator, where the check would stall the device, a row whose sigma is
            not positive gets a NaN instead.
        target: the true classes, integer ``(...)`` in ``[0, C)`` (out-of-range indices raise in ``torch.gather``).
        num_nodes: Gauss–Hermite nodes.
        log: return :math:`\log p` (computed in log space: accurate when :math:`p` underflows).

    Returns:
        :math:`p` (or :math:`\log p`) per row, shape ``(...)``, float32 (float64 for float64 ``mu``).

    Raises:
        ValueError: see :func:`exact_loss`.
    """
    m, sig, index = _exact_inputs(mu, sigma, target, num_nodes, "exact_probability")
    log_p = _exact_log_probability(m, sig, index, num_nodes)
    return log_p if log else torch.exp(log_p)


def exact_loss(
    mu: Tensor,
    sigma: Tensor | float,
    target: Tensor,
    form: Literal["prob", "log"] = "prob",
    num_nodes: int = EXACT_NUM_NODES,
    reduction: str = "mean",
) -> Tensor:
    r"""The EXACT loss (https://kexue.fm/archives/9098 on
    `arXiv:2205.09615 <https://arxiv.org/abs/2205.09615>`__): minus the expected
    accuracy of the classifier with Gaussian noise, :math:`-\mathbb E_{(x,y)}[p(y\mid x)]` (``form="prob"``), or
    the paper's other form :math:`-\log\mathbb E_{(x,y)}[p(y\mid x)]` (``form="log"``), with :math:`p` from
    :func:`exact_probability` (its docstring states the estimator, Gauss–Hermite quadrature, and its error).

    ``form="prob"``: the loss of a row is :math:`-p`; ``reduction="mean"`` gives :math:`-\mathbb E[p]` over the rows
    (``1 + loss`` is the expected error rate that the paper's code returns). ``form="log"``: with
    ``reduction="mean"`` the expectation is over the rows and the log is taken after it,
    :math:`-\log(\frac1N\sum_r p_r)` (computed in log space); ``reduction="none"`` gives :math:`-\log p` per row,
    whose mean is :math:`\mathbb E[-\log p]`, a different loss (cross-entropy-like); ``"sum"`` is rejected, as a
    sum of probabilities has no log form in the paper.

    **Verdict of the article**: Su's reimplementation on NLP tasks fell clearly short of softmax +
    cross-entropy, and the :math:`-\log\mathbb E[p]` form was even worse (no numbers given). Near convergence
    :math:`\mathbb E[-\log p]\approx 1-\mathbb E[p]`, so cross-entropy also optimises the smoothed accuracy, and
    does it better since :math:`-\log p\to\infty` on misclassified samples while :math:`1-p\le 1`. The paper's toy
    example where cross-entropy loses accuracy omits a temperature; EXACT has one built in (:math:`\sigma`).

    Args:
        mu: class scores ``(..., C)``.
        sigma: the noise scale :math:`\sigma(x)>0`, shape ``(...)``, ``(..., 1)`` or a number.
        target: integer classes ``(...)``.
        form: ``"prob"`` (:math:`-p`) or ``"log"`` (:math:`-\log` of the mean :math:`p`).
        num_nodes: Gauss–Hermite nodes of :func:`exact_probability`.
        reduction: ``"none"`` (per row), ``"mean"``, or ``"sum"`` (``form="prob"`` only).

    Returns:
        The loss in float32 (float64 for float64 ``mu``).

    Raises:
        ValueError: ``mu`` not a floating-point tensor with a class axis; ``sigma`` not positive (or NaN), or of a
            shape other than ``(...)``, ``(..., 1)`` or a number; ``target`` not integer or not of shape ``(...)``;
            ``num_nodes`` not a positive int; an unknown ``form`` or ``reduction``; ``form="log"`` with
            ``reduction="sum"``.
    """
    _check_reduction(reduction)
    if form not in ("prob", "log"):
        raise ValueError(f"exact_loss: form must be 'prob' (-E[p]) or 'log' (-log E[p]), got {form!r}.")
    if form == "log" and reduction == "sum":
        raise ValueError(
            "exact_loss: form='log' is -log of the mean probability over the rows: use reduction='mean', or "
            "reduction='none' for -log p per row (reduction='sum' is for form='prob')."
        )
    m, sig, index = _exact_inputs(mu, sigma, target, num_nodes, "exact_loss")
    log_p = _exact_log_probability(m, sig, index, num_nodes)
    if form == "prob":
        return _reduce(-torch.exp(log_p), reduction)
    if reduction == "none":
        return -log_p
    return math.log(max(log_p.numel(), 1)) - torch.logsumexp(log_p.reshape(-1), dim=0)


# lightning_mtl.losses.cosent_loss & co. moved with the CoSENT model; the old path works for one release.
__getattr__ = moved("lightning_mtl.losses", "lightning_gen.cosent")
