"""Span extraction with GlobalPointer heads (Su, https://kexue.fm/archives/8877) and GPLinker
(https://kexue.fm/archives/8888 relations, https://kexue.fm/archives/8926 events): the entity model
(:class:`SpanExtractor`), the relation model (:class:`RelationExtractor`), the event model (:class:`EventExtractor`),
their data modules and readers (CoNLL, LitBank, CasRel JSON, DuEE JSON, raw texts to predict on), the metrics, the
event decoding by clique search, what the raw-text API returns (:class:`Entity`, :class:`Relation`) and two callbacks
(:class:`SavePretrained`, :class:`SpanPredictionWriter`). The heads and losses are generic and live in
:mod:`lightning_mtl.heads` and :mod:`lightning_mtl.losses`.

Names are imported lazily: the models need ``transformers`` (extra ``nlp``).
"""

from __future__ import annotations

from lightning_mtl._imports import lazy_exports

_EXPORTS = {
    "clique_search": "events",
    "SpanExtractor": "model",
    "RelationExtractor": "relations",
    "decode_relations": "relations",
    "EventExtractor": "event_model",
    "SpanDataModule": "datamodules",
    "RelationDataModule": "datamodules",
    "EventDataModule": "datamodules",
    "SpanF1": "metrics",
    "TripleF1": "metrics",
    "DataReport": "data",
    "Sentence": "data",
    "SpanFormatError": "data",
    "read_iob": "data",
    "read_casrel": "data",
    "read_relations": "data",
    "read_duee": "data",
    "Window": "align",
    "encode_words": "align",
    "find_occurrences": "align",
    "TextEncoding": "align",
    "encode_text_windows": "align",
    "Entity": "outputs",
    "Relation": "outputs",
    "to_json": "outputs",
    "read_texts": "datamodules",
    "SavePretrained": "callbacks",
    "SpanPredictionWriter": "callbacks",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
