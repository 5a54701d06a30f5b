r"""Set-matching precision, recall and F1: entities per type (:class:`SpanF1`) and relation triples
(:class:`TripleF1`, partial or exact match).

Both are micro-averaged over the predictions and gold items of every sentence (deduplicated per sentence):
:math:`P = \frac{TP}{\#pred}`, :math:`R = \frac{TP}{\#gold}`, :math:`F_1 = \frac{2TP}{\#pred + \#gold}` (0 where
a denominator is 0), the standard entity-level (conlleval) and triple-level (CasRel, GPLinker) scores. The counts are
``torchmetrics`` states summed across processes, so the numbers are global under DDP.
"""

from __future__ import annotations

from collections.abc import Hashable, Iterable, Sequence
from typing import Literal

import torch
from torch import Tensor
from torchmetrics import Metric

__all__ = ["SpanF1", "TripleF1", "prf"]

Match = Literal["partial", "exact"]


def prf(tp: float, n_pred: float, n_gold: float) -> tuple[float, float, float]:
    """``(precision, recall, f1)`` from counts, 0 where a denominator is 0.

    Example::

        >>> prf(3, 4, 6)
        (0.75, 0.5, 0.6)
    """
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_gold if n_gold else 0.0
    f = 2 * tp / (n_pred + n_gold) if n_pred + n_gold else 0.0
    return p, r, f


def _ratio(a: Tensor, b: Tensor) -> Tensor:
    return torch.where(b > 0, a.double() / b.clamp_min(1).double(), torch.zeros_like(a, dtype=torch.float64)).float()


class SpanF1(Metric):
    r"""Entity-level precision, recall and F1, per type and micro-averaged over types.

    ``update(preds, gold)`` takes, per sentence, the predicted and the gold spans ``(start, end, type)``; a span is
    correct iff its start, end and type all match. :meth:`compute` returns ``{"precision", "recall", "f1"}`` (micro)
    and ``{"precision/TYPE", "recall/TYPE", "f1/TYPE"}`` for every type, as float tensors.

    Args:
        labels: the span types; spans of other types raise ``KeyError``.

    Example::

        >>> metric = SpanF1(["LOC", "PER"])
        >>> metric.update([[(0, 1, "PER"), (3, 4, "LOC")]], [[(0, 1, "PER"), (3, 5, "LOC")]])
        >>> {k: round(float(v), 2) for k, v in metric.compute().items()}["f1/PER"]
        1.0
    """

    full_state_update = False

    def __init__(self, labels: Sequence[str]) -> None:
        super().__init__()
        self.labels = list(labels)
        self._index = {t: i for i, t in enumerate(self.labels)}
        n = len(self.labels)
        for name in ("tp", "n_pred", "n_gold"):
            self.add_state(name, default=torch.zeros(n, dtype=torch.long), dist_reduce_fx="sum")

    def update(  # type: ignore[override]
        self,
        preds: Iterable[Iterable[tuple[int, int, str]]],
        gold: Iterable[Iterable[tuple[int, int, str]]],
    ) -> None:
        n = len(self.labels)
        tp, n_pred, n_gold = [0] * n, [0] * n, [0] * n
        for p, g in zip(preds, gold, strict=True):
            p, g = set(p), set(g)
            for _, _, t in p:
                n_pred[self._index[t]] += 1
            for _, _, t in g:
                n_gold[self._index[t]] += 1
            for _, _, t in p & g:
                tp[self._index[t]] += 1
        for name, values in (("tp", tp), ("n_pred", n_pred), ("n_gold", n_gold)):
            state = getattr(self, name)
            state += torch.tensor(values, dtype=torch.long, device=state.device)

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        tp, n_pred, n_gold = self.tp, self.n_pred, self.n_gold
        out = _scores(tp.sum(), n_pred.sum(), n_gold.sum(), "")
        for k, label in enumerate(self.labels):
            out.update(_scores(tp[k], n_pred[k], n_gold[k], f"/{label}"))
        return out


def _scores(tp: Tensor, n_pred: Tensor, n_gold: Tensor, suffix: str) -> dict[str, Tensor]:
    return {
        f"precision{suffix}": _ratio(tp, n_pred),
        f"recall{suffix}": _ratio(tp, n_gold),
        f"f1{suffix}": _ratio(2 * tp, n_pred + n_gold),
    }


class TripleF1(Metric):
    r"""Triple-level precision, recall and F1 of relation extraction, in one of the two usual settings:

    * ``"partial"`` (WebNLG*, NYT* of CasRel): subject and object are compared by their **last word** only, as the
      partial-match data annotate only the last word of each entity;
    * ``"exact"`` (WebNLG, NYT of ETL-span): the whole subject and object strings must match.

    The relation always has to match. Triples are deduplicated per sentence after this normalisation.
    ``update(preds, gold)`` takes, per sentence, an iterable of ``(subject, relation, object)`` strings;
    :meth:`compute` returns ``{"precision", "recall", "f1"}``. Any hashable tuples work with ``"exact"`` (the event
    arguments of :class:`~lightning_gen.span.EventExtractor` use it).

    Example::

        >>> metric = TripleF1("partial")
        >>> metric.update([{("Alan Bean", "birthPlace", "Texas")}], [{("Bean", "birthPlace", "Texas")}])
        >>> float(metric.compute()["f1"])
        1.0
    """

    full_state_update = False

    def __init__(self, match: Match = "exact") -> None:
        super().__init__()
        if match not in ("partial", "exact"):
            raise ValueError(f"TripleF1(match=...) must be 'partial' or 'exact', got {match!r}.")
        self.match: Match = match
        for name in ("tp", "n_pred", "n_gold"):
            self.add_state(name, default=torch.zeros((), dtype=torch.long), dist_reduce_fx="sum")

    def normalize(self, triple: tuple[Hashable, ...]) -> tuple[Hashable, ...]:
        """The triple as compared: ``(last word of subject, relation, last word of object)`` for ``"partial"``."""
        if self.match == "exact":
            return tuple(triple)
        s, r, o = triple
        return (_last_word(s), r, _last_word(o))

    def update(  # type: ignore[override]
        self, preds: Iterable[Iterable[tuple[Hashable, ...]]], gold: Iterable[Iterable[tuple[Hashable, ...]]]
    ) -> None:
        tp = n_pred = n_gold = 0
        for p, g in zip(preds, gold, strict=True):
            p = {self.normalize(t) for t in p}
            g = {self.normalize(t) for t in g}
            tp, n_pred, n_gold = tp + len(p & g), n_pred + len(p), n_gold + len(g)
        self.tp += tp
        self.n_pred += n_pred
        self.n_gold += n_gold

    def compute(self) -> dict[str, Tensor]:  # type: ignore[override]
        return _scores(self.tp, self.n_pred, self.n_gold, "")


def _last_word(entity: Hashable) -> Hashable:
    if isinstance(entity, str):
        words = entity.split()
        return words[-1] if words else entity
    return entity
