"""What the span models' raw-text API returns: :class:`Entity` and :class:`Relation`, named tuples with character
offsets into the input text and a score, and their JSON form (:func:`to_json`)."""

from __future__ import annotations

from typing import Any, NamedTuple

__all__ = ["Entity", "Relation", "to_json"]


class Entity(NamedTuple):
    """A span of a text: characters ``[start, end)`` (so ``text == texts[i][start:end]``), its type and score.

    ``score`` is the sigmoid of the span's score: above ``sigmoid(threshold)`` (0.5 at the default threshold 0) for
    every returned span, monotone in the model's confidence, not calibrated. For a relation's subject and object,
    ``label`` is ``"subject"`` or ``"object"``.

    Example::

        >>> e = Entity(0, 2, "ORG", "EU", 0.93)
        >>> e.start, e.end, e.label
        (0, 2, 'ORG')
    """

    start: int
    end: int
    label: str
    text: str
    score: float


class Relation(NamedTuple):
    """A triple ``(subject, relation, object)`` of a text, its two entities with their character spans.

    ``score`` is the sigmoid of the smallest of the four GPLinker scores (subject span, object span, head-head and
    tail-tail links): above ``sigmoid(threshold)`` (0.5 at threshold 0) for every returned triple, since a triple is
    kept iff all four are above the threshold.

    Example::

        >>> s, o = Entity(5, 9, "subject", "Bean", 0.9), Entity(32, 37, "object", "Texas", 0.8)
        >>> r = Relation(s, "birthPlace", o, 0.7)
        >>> (r.subject.text, r.relation, r.object.text)
        ('Bean', 'birthPlace', 'Texas')
    """

    subject: Entity
    relation: str
    object: Entity
    score: float


def to_json(item: Entity | Relation) -> dict[str, Any]:
    """A JSON-ready dict: an entity's fields, or a relation's with its subject and object as entity dicts.

    Example::

        >>> to_json(Entity(0, 2, "ORG", "EU", 0.93))
        {'start': 0, 'end': 2, 'label': 'ORG', 'text': 'EU', 'score': 0.93}
    """
    if isinstance(item, Relation):
        return {
            "subject": to_json(item.subject),
            "relation": item.relation,
            "object": to_json(item.object),
            "score": item.score,
        }
    return item._asdict()
