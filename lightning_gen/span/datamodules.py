r"""Lightning data modules for the span models: entities (:class:`SpanDataModule`), relation triples
(:class:`RelationDataModule`) and events (:class:`EventDataModule`).

Each reads its files in ``setup`` with the tokenizer of the model it is trained with (or one given as
``tokenizer=``), turns the gold annotation into token-pair targets, and keeps a :class:`~lightning_gen.span.DataReport`
(``self.report``) of what it read, repaired and lost: malformed lines/records, spans and triples lost to
``max_length``, entity strings not found in their text, relations unknown to the training set, each message with
its file and 1-based line (or ``file: record N`` in a JSON array) and the words, text or triple at fault (the
convention of :mod:`lightning_gen.span.data`). The report is logged once at the end of loading (``rank_zero_warn``
when anything was lost) and counts what was read: with ``limit_train=N`` only the first N sentences or records.
Nothing of it is fatal unless a split has no usable example left.

Batches are dicts: ``input_ids``, ``attention_mask`` (padded to the longest input of the batch), per-pointer gold
pairs (lists of ``(type, i, j)`` token positions, made into dense or sparse targets by the model) and what decoding
and the metrics need (windows, encodings, texts, gold sets).
"""

from __future__ import annotations

import json
import os
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader

from lightning_gen.span.align import (
    Window,
    char_span_to_tokens,
    encode_texts,
    encode_words,
    find_occurrences,
)
from lightning_gen.span.base import collate_with_targets, pad_batch
from lightning_gen.span.data import (
    TRIGGER,
    DataReport,
    IobFormat,
    Sentence,
    SpanFormatError,
    read_casrel_records,
    read_duee_records,
    read_iob,
    read_relations,
    shorten,
)
from lightning_mtl._imports import needs_extra

__all__ = ["EventDataModule", "RelationDataModule", "SpanDataModule", "read_texts"]

Occurrence = Literal["first", "nearest"]


def read_texts(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    r"""Raw texts to predict on, one item per text: ``{"text": str, "record": {"line": n, ...}}``.

    Two layouts, told apart by the file: **JSON lines** (a ``.jsonl``/``.json`` file, or one whose first non-blank
    line starts with ``{``): one object per line with a string ``"text"``; its other fields are kept in ``record``
    (ids, metadata) and blank lines are skipped. **Plain text**: one text per line, every line a text (a blank line is
    an empty text, so outputs stay aligned with input lines). ``line`` is the 1-based line number.

    Raises:
        SpanFormatError: a JSON line that does not parse or has no string ``"text"``, named by ``file:line``.

    Example::

        >>> import os, tempfile
        >>> path = os.path.join(tempfile.mkdtemp(), "texts.txt")
        >>> _ = open(path, "w").write("EU rejects German call.\nPeter Blackburn\n")
        >>> [item["text"] for item in read_texts(path)]
        ['EU rejects German call.', 'Peter Blackburn']
    """
    name = str(path)
    content = Path(path).read_text(encoding="utf-8-sig")
    lines = [line.removesuffix("\r") for line in content.removesuffix("\n").split("\n")] if content else []
    first = next((line.strip() for line in lines if line.strip()), "")
    if first.startswith("[") and name.endswith(".json"):
        raise SpanFormatError(f'{name}: a JSON array; write one object per line (JSON lines: {{"text": ...}}).')
    if not (name.endswith((".jsonl", ".json")) or first.startswith("{")):
        return [{"text": line, "record": {"line": n}} for n, line in enumerate(lines, 1)]
    items = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise SpanFormatError(
                f'{name}:{n}: not a JSON object ({err.msg}); expected one {{"text": ...}} per line, or a plain text '
                "file with one text per line."
            ) from None
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            raise SpanFormatError(f'{name}:{n}: expected a JSON object with a string "text", got {line[:60]!r}.')
        text = record.pop("text")
        items.append({"text": text, "record": {"line": n, **record}})
    return items


def _collate_texts(items: list[dict[str, Any]]) -> dict[str, Any]:
    return {"text": [it["text"] for it in items], "record": [it["record"] for it in items]}


class _Base(pl.LightningDataModule):
    """Tokenizer and settings from the attached model unless given; loaders; the load-once guard."""

    name = "span data"
    #: raw texts for ``trainer.predict`` (:func:`read_texts`); set by the subclasses' ``predict_file``
    predict_file: str | None = None

    def __init__(
        self,
        train: str | None,
        val: str | None,
        batch_size: int,
        max_length: int | None,
        limit_train: int | None,
        limit_val: int | None,
        num_workers: int,
        tokenizer: Any,
    ) -> None:
        super().__init__()
        if batch_size < 1 or (max_length is not None and max_length < 4):
            raise ValueError(f"{type(self).__name__}: need batch_size >= 1 and max_length >= 4 (or None).")
        self.train_path, self.val_path = train, val
        self.batch_size, self.max_length = batch_size, max_length
        self.limit_train, self.limit_val = limit_train, limit_val
        self.num_workers = num_workers
        self.tokenizer = tokenizer
        self.report = DataReport()
        self.datasets: dict[str, list[dict[str, Any]]] = {}
        #: the model's pointer layout (key -> (types, sparse)), set at ``fit`` start: the loaders then build the loss
        #: targets, so that they reach the device with the batch instead of being made in the training step
        self.pointer_targets: dict[str, tuple[int, bool]] = {}
        self._loaded = False

    def _model(self) -> Any:
        trainer = getattr(self, "trainer", None)
        return trainer.lightning_module if trainer is not None else None

    def _setting(self, name: str, default: Any = None) -> Any:
        own = getattr(self, name)
        if own is not None:
            return own
        model = self._model()
        value = getattr(model, name, None) if model is not None else None
        return default if value is None else value

    def _get_tokenizer(self) -> Any:
        tok = self.tokenizer
        if tok is None:
            model = self._model()
            tok = getattr(model, "tokenizer", None)
        if tok is None:
            raise ValueError(
                f"{type(self).__name__}: no tokenizer; attach the data module to a Trainer with a span model, or pass "
                "tokenizer= (a path, a hub name or a fast tokenizer)."
            )
        if isinstance(tok, (str, os.PathLike)):
            with needs_extra(f"{type(self).__name__}(tokenizer={str(tok)!r})"):
                from transformers import AutoTokenizer

            tok = AutoTokenizer.from_pretrained(str(tok))
        self._tok = tok
        return tok

    def _splits(self) -> list[tuple[str, str, int | None]]:
        splits = (("train", self.train_path, self.limit_train), ("val", self.val_path, self.limit_val))
        return [(split, path, limit) for split, path, limit in splits if path]

    def setup(self, stage: str | None = None) -> None:
        if stage == "predict":  # only the texts to predict on: no training data, no tokenizer needed here
            self._load_predict()
            return
        if self._loaded:
            return
        self._load()
        self._loaded = True
        for split, items in self.datasets.items():
            if not items:
                summary = self.report.summary()
                raise SpanFormatError(f"{type(self).__name__}: no usable {split} example left.\n{summary}")
        self.report.log(f"{type(self).__name__}: loaded")

    def _load(self) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def _loader(self, split: str, shuffle: bool) -> DataLoader:
        items = self.datasets.get(split)
        if not items:
            raise ValueError(f"{type(self).__name__}: no {split} data (pass {split}=PATH).")
        return DataLoader(
            items,  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            pin_memory=torch.cuda.is_available(),  # batches (the loss targets too) then reach a GPU asynchronously
            collate_fn=partial(
                collate_with_targets,
                collate=type(self).collate,
                pad_id=self._tok.pad_token_id or 0,
                targets=self.pointer_targets,  # the dict itself: the model fills it in at fit start
            ),
        )

    def _load_predict(self) -> list[dict[str, Any]]:
        if "predict" not in self.datasets:
            if not self.predict_file:
                raise ValueError(
                    f"{type(self).__name__}: no predict data; pass predict_file=PATH (one text per line, or JSON lines "
                    'with a "text" field), e.g. `lightning-mtl predict ... --data.predict_file texts.txt`.'
                )
            self.datasets["predict"] = read_texts(self.predict_file)
        return self.datasets["predict"]

    def predict_dataloader(self) -> DataLoader:
        """The texts of ``predict_file`` in order, batches of ``{"text": [...], "record": [...]}`` (the models'
        ``predict_step`` tokenizes and windows them)."""
        return DataLoader(
            self._load_predict(),  # type: ignore[arg-type]
            batch_size=self.batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=_collate_texts,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", shuffle=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False)

    @staticmethod
    def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:  # pragma: no cover - abstract
        raise NotImplementedError


class SpanDataModule(_Base):
    r"""Entity spans (flat or nested) from CoNLL or LitBank files, for :class:`~lightning_gen.span.SpanExtractor`.

    Each sentence is tokenized with ``is_split_into_words=True``; a sentence longer than ``max_length`` sub-words is cut
    into windows of whole words overlapping by ``window_overlap`` words (or, with ``truncate=True``, only its first
    window is kept). Every gold span that no window contains whole is counted (``spans lost to max_length``) and stays
    in the gold set used for validation, so the reported recall pays for it.

    Args:
        train: training file (CoNLL ``train.txt`` or LitBank ``train.data``).
        val: validation file.
        format: ``"auto"`` (tab separated = LitBank, else CoNLL), ``"conll"`` or ``"litbank"``.
        labels: the span types; default: the model's, else the sorted types of the training file. Spans of other
            types are dropped and counted.
        batch_size: sentences per batch (a batch holds all windows of its sentences).
        max_length: sub-words per window, special tokens included; default: the model's.
        window_overlap: words shared by consecutive windows; default: the model's.
        truncate: keep only the first window of a long sentence; default: the model's.
        limit_train, limit_val: read only the first N sentences (quick runs).
        num_workers: DataLoader workers.
        tokenizer: a fast tokenizer or its path; default: the model's.
        predict_file: raw texts for ``trainer.predict`` / ``lightning-mtl predict`` (:func:`read_texts`: one text
            per line, or JSON lines with ``"text"``); the model's ``predict_step`` returns character offsets.

    Attributes:
        report: the :class:`~lightning_gen.span.DataReport` of the last load.
        labels: the span types in use (after ``setup``).
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        format: IobFormat = "auto",
        labels: list[str] | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        window_overlap: int | None = None,
        truncate: bool | None = None,
        limit_train: int | None = None,
        limit_val: int | None = None,
        num_workers: int = 0,
        tokenizer: Any = None,
        predict_file: str | None = None,
    ) -> None:
        super().__init__(train, val, batch_size, max_length, limit_train, limit_val, num_workers, tokenizer)
        self.predict_file = predict_file
        self.format = format
        self.labels = list(labels) if labels is not None else None
        self.window_overlap = window_overlap
        self.truncate = truncate

    def _load(self) -> None:
        tok = self._get_tokenizer()
        max_length = self._setting("max_length", 128)
        overlap = self._setting("window_overlap", 8)
        truncate = bool(self._setting("truncate", False))
        raw: dict[str, list[Sentence]] = {}
        for split, path, limit in self._splits():
            raw[split] = read_iob(path, self.format, report=self.report, split=split, limit=limit)
        labels = self._setting("labels")
        if labels is None:
            source = raw.get("train") or raw.get("val") or []
            labels = sorted({t for s in source for _, _, t in s.spans})
        self.labels = list(labels)
        index = {t: k for k, t in enumerate(self.labels)}
        for split, sentences in raw.items():
            self.datasets[split] = self._encode(split, sentences, index, tok, max_length, overlap, truncate)

    def _encode(
        self,
        split: str,
        sentences: list[Sentence],
        index: dict[str, int],
        tok: Any,
        max_length: int,
        overlap: int,
        truncate: bool,
    ) -> list[dict[str, Any]]:
        windows_of = encode_words(tok, [s.words for s in sentences], max_length, overlap=overlap, truncate=truncate)
        items = []
        for number, (sentence, windows) in enumerate(zip(sentences, windows_of, strict=True), start=1):

            def where(word: int, sentence: Sentence = sentence, number: int = number) -> str:
                return sentence.where(word, fallback=f"{split}: sentence {number}")

            def words(start: int, end: int, sentence: Sentence = sentence) -> str:
                return f"{' '.join(sentence.words[start:end])!r} (words {start}-{end - 1} of {len(sentence.words)})"

            known = {sp for sp in sentence.spans if sp[2] in index}
            for start, end, label in sorted(sentence.spans - known):
                self.report.add(
                    split,
                    "spans of unknown types (dropped)",
                    message=f"{where(start)}: span {words(start, end)} of type {label!r}, not one of the labels in use",
                )
            targets: list[list[tuple[int, int, int]]] = [[] for _ in windows]
            for start, end, label in sorted(known):
                hit = False
                for w, window in enumerate(windows):
                    tokens = window.token_span(start, end)
                    if tokens is not None:
                        targets[w].append((index[label], *tokens))
                        hit = True
                if not hit:
                    empty = set(range(start, end)) <= windows[0].empty_words
                    what = "spans without sub-words (lost)" if empty else "spans lost to max_length"
                    self.report.add(split, what, message=f"{where(start)}: {what}: span {words(start, end)}")
            self.report.add(split, "windows", len(windows))
            if len(windows) > 1 or windows[0].truncated:
                self.report.add(split, "sentences over max_length (windowed or truncated)")
            items.append({"windows": windows, "targets": targets, "gold": known})
        return items

    @staticmethod
    def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
        """One batch: every window of the sentences, padded (``windows``, ``sentence`` map window -> sentence)."""
        windows: list[Window] = [w for it in items for w in it["windows"]]
        targets = [t for it in items for t in it["targets"]]
        sentence = [k for k, it in enumerate(items) for _ in it["windows"]]
        input_ids, attention_mask, span_mask = pad_batch(
            [w.input_ids for w in windows], [[x is not None for x in w.word_ids] for w in windows], pad_id
        )
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "span_mask": span_mask,
            "targets": targets,
            "windows": windows,
            "sentence": sentence,
            "gold": [it["gold"] for it in items],
        }


class _TextBase(_Base):
    """Raw texts, tokenized with offsets and truncated to ``max_length``."""

    @staticmethod
    def collate(items: list[dict[str, Any]], pad_id: int) -> dict[str, Any]:
        """One batch: padded ids, the per-pointer gold pairs and the texts/encodings/gold sets for decoding."""
        encodings = [it["encoding"] for it in items]
        input_ids, attention_mask, span_mask = pad_batch(
            [e.input_ids for e in encodings], [[not s for s in e.special] for e in encodings], pad_id
        )
        batch: dict[str, Any] = {"input_ids": input_ids, "attention_mask": attention_mask, "span_mask": span_mask}
        for key in items[0]:
            if key != "input_ids":
                batch[key] = [it[key] for it in items]
        return batch


class RelationDataModule(_TextBase):
    r"""Relation triples in the CasRel JSON format (WebNLG*, WebNLG), for
    :class:`~lightning_gen.span.RelationExtractor`.

    **Matching rule** (entities are strings, not offsets): an entity is located by
    :func:`~lightning_gen.span.align.find_occurrences`, i.e. its whole-word occurrences in the text (bounded by the
    text's ends or whitespace), or, if there is none, its occurrences inside words (counted as ``entities matched
    inside a word``). When a string occurs several times, ``occurrence="first"`` takes the first occurrence of
    subject and of object (CasRel's and GPLinker's reference rule), ``"nearest"`` the pair of occurrences closest to
    each other. A subject equal to its object is one span serving both roles. A triple whose entity is not in the
    text, or lies beyond ``max_length``, is counted and left out of the targets, but stays in the gold set of its
    sentence for validation; duplicated triples are removed.

    Args:
        train, val: CasRel JSON (array or JSON lines).
        rel2id: a ``rel2id.json`` (either shape); it orders the relations.
        relations: the relation set; default: the model's, else those that occur in the training file (in
            ``rel2id`` order if given, else sorted). Training triples of other relations are dropped, validation
            ones counted as ``relations unknown to the training set``.
        match: the metric setting, ``"partial"`` (last word, WebNLG*) or ``"exact"`` (WebNLG); default: the model's,
            else ``"partial"`` when every training entity is a single word (the partial-match data), else ``"exact"``.
        occurrence: ``"first"`` or ``"nearest"`` (see above).
        batch_size, max_length, limit_train, limit_val, num_workers, tokenizer, predict_file: as
            :class:`SpanDataModule`.

    Attributes:
        report: the :class:`~lightning_gen.span.DataReport` of the last load.
        relations: the relation set in use; ``match``: the metric setting (after ``setup``).
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        rel2id: str | None = None,
        relations: list[str] | None = None,
        match: Literal["partial", "exact"] | None = None,
        occurrence: Occurrence = "first",
        batch_size: int = 32,
        max_length: int | None = None,
        limit_train: int | None = None,
        limit_val: int | None = None,
        num_workers: int = 0,
        tokenizer: Any = None,
        predict_file: str | None = None,
    ) -> None:
        super().__init__(train, val, batch_size, max_length, limit_train, limit_val, num_workers, tokenizer)
        self.predict_file = predict_file
        if match not in (None, "partial", "exact") or occurrence not in ("first", "nearest"):
            raise ValueError(
                f"RelationDataModule: match must be 'partial', 'exact' or None and occurrence 'first' or 'nearest', "
                f"got {match!r}, {occurrence!r}."
            )
        self.rel2id, self.match, self.occurrence = rel2id, match, occurrence
        self.relations = list(relations) if relations is not None else None

    def _load(self) -> None:
        tok = self._get_tokenizer()
        max_length = self._setting("max_length", 128)
        raw = {
            split: read_casrel_records(p, report=self.report, split=split, limit=lim)
            for split, p, lim in self._splits()
        }
        relations = self._setting("relations")
        if relations is None:
            seen = {r for _, _, triples in raw.get("train", raw.get("val", [])) for _, r, _ in triples}
            if self.rel2id:
                order = read_relations(self.rel2id)
                unseen = [r for r in order if r not in seen]
                if unseen:
                    self.report.add("train", "rel2id relations never seen in train", len(unseen))
                relations = [r for r in order if r in seen] + sorted(seen - set(order))
            else:
                relations = sorted(seen)
        self.relations = list(relations)
        if self._setting("match") is None:
            source = raw.get("train", raw.get("val", []))
            entities = [e for _, _, triples in source for s, _, o in triples for e in (s, o)]
            self.match = "partial" if entities and all(len(e.split()) == 1 for e in entities) else "exact"
        else:
            self.match = self._setting("match")
        index = {r: k for k, r in enumerate(self.relations)}
        for split, records in raw.items():
            encodings = encode_texts(tok, [text for _, text, _ in records], max_length)
            self.datasets[split] = [
                self._item(split, where, text, triples, enc, index)
                for (where, text, triples), enc in zip(records, encodings, strict=True)
            ]

    def _item(
        self, split: str, where: str, text: str, triples: list, enc: Any, index: dict[str, int]
    ) -> dict[str, Any]:
        entity: set[tuple[int, int, int]] = set()
        head: set[tuple[int, int, int]] = set()
        tail: set[tuple[int, int, int]] = set()
        for s, r, o in triples:
            if s == o:
                self.report.add(split, "subject equals object")
            if r not in index:
                self.report.add(
                    split,
                    "relations unknown to the training set",
                    message=f"{where}: relation {r!r} of triple {(s, r, o)!r} is not one of the relations in use "
                    f"(text {shorten(text)})",
                )
                continue
            spans = []
            for role, e in (("subject", s), ("object", o)):
                starts, whole = find_occurrences(e, text)
                if not starts:
                    self.report.add(
                        split,
                        "entities not in text (triple dropped)",
                        message=f"{where}: {role} {e!r} of triple {(s, r, o)!r} is not in the text {shorten(text)}",
                    )
                    break
                if not whole:
                    self.report.add(split, "entities matched inside a word")
                if len(starts) > 1:
                    self.report.add(split, "entities with several occurrences")
                spans.append([(c, c + len(e)) for c in starts])
            if len(spans) < 2:
                continue
            if self.occurrence == "first":
                (sc, oc) = spans[0][0], spans[1][0]
            else:
                sc, oc = min(((a, b) for a in spans[0] for b in spans[1]), key=lambda p: (abs(p[0][0] - p[1][0]), p))
            st, ot = char_span_to_tokens(enc, *sc), char_span_to_tokens(enc, *oc)
            if st is None or ot is None:
                self.report.add(
                    split,
                    "triples lost to max_length",
                    message=f"{where}: triple {(s, r, o)!r} lies past max_length tokens of the text {shorten(text)}",
                )
                continue
            entity |= {(0, *st), (1, *ot)}
            head.add((index[r], st[0], ot[0]))
            tail.add((index[r], st[1], ot[1]))
        return {
            "text": text,
            "encoding": enc,
            "entity": sorted(entity),
            "head": sorted(head),
            "tail": sorted(tail),
            "gold": set(triples),
        }


class EventDataModule(_TextBase):
    r"""Events in the DuEE JSON format (GPLinker's), for :class:`~lightning_gen.span.EventExtractor`.

    Every ``(event type, role)`` is one span class, the trigger being the role ``"trigger"``; within one event every
    pair of arguments is linked (head–head and tail–tail, upper triangle). Events without a trigger are dropped (as
    the reference code does) and counted; arguments beyond ``max_length`` are counted.

    Args:
        train, val: DuEE JSON lines (or a JSON array).
        labels: the ``(event type, role)`` classes; default: the model's, else those of the training file, sorted.
        batch_size, max_length, limit_train, limit_val, num_workers, tokenizer, predict_file: as
            :class:`SpanDataModule`.

    Attributes:
        report: the :class:`~lightning_gen.span.DataReport` of the last load.
        labels: the classes in use (after ``setup``).
    """

    def __init__(
        self,
        train: str | None = None,
        val: str | None = None,
        labels: list[tuple[str, str]] | None = None,
        batch_size: int = 32,
        max_length: int | None = None,
        limit_train: int | None = None,
        limit_val: int | None = None,
        num_workers: int = 0,
        tokenizer: Any = None,
        predict_file: str | None = None,
    ) -> None:
        super().__init__(train, val, batch_size, max_length, limit_train, limit_val, num_workers, tokenizer)
        self.predict_file = predict_file
        self.labels = [tuple(x) for x in labels] if labels is not None else None

    def _load(self) -> None:
        tok = self._get_tokenizer()
        max_length = self._setting("max_length", 128)
        raw = {
            split: read_duee_records(p, report=self.report, split=split, limit=lim) for split, p, lim in self._splits()
        }
        labels = self._setting("labels")
        if labels is None:
            source = raw.get("train", raw.get("val", []))
            labels = sorted({(t, role) for _, _, events in source for t, args in events for role, _, _ in args})
        self.labels = [tuple(x) for x in labels]
        index = {x: k for k, x in enumerate(self.labels)}
        for split, records in raw.items():
            encodings = encode_texts(tok, [text for _, text, _ in records], max_length)
            self.datasets[split] = [
                self._item(split, where, text, events, enc, index)
                for (where, text, events), enc in zip(records, encodings, strict=True)
            ]

    def _item(self, split: str, where: str, text: str, events: list, enc: Any, index: dict) -> dict[str, Any]:
        argument: set[tuple[int, int, int]] = set()
        head: set[tuple[int, int, int]] = set()
        tail: set[tuple[int, int, int]] = set()
        gold_events = set()
        for etype, args in events:
            if not any(role == TRIGGER for role, _, _ in args):
                self.report.add(
                    split,
                    "events without a trigger (dropped)",
                    message=f"{where}: event {etype!r} has no trigger left (text {shorten(text)})",
                )
                continue
            gold_events.add((etype, frozenset((role, arg) for role, arg, _ in args)))
            spans = []
            for role, arg, start in args:
                if (etype, role) not in index:
                    self.report.add(
                        split,
                        "arguments of unknown (type, role) (dropped)",
                        message=f"{where}: {role} {arg!r} of event {etype!r}: ({etype!r}, {role!r}) is not one of the "
                        f"labels in use (text {shorten(text)})",
                    )
                    continue
                tokens = char_span_to_tokens(enc, start, start + len(arg))
                if tokens is None:
                    self.report.add(
                        split,
                        "arguments lost to max_length",
                        message=f"{where}: {role} {arg!r} of event {etype!r} at character {start} lies past "
                        f"max_length tokens of the text {shorten(text)}",
                    )
                    continue
                argument.add((index[(etype, role)], *tokens))
                spans.append(tokens)
            for a, (h1, t1) in enumerate(spans):
                for h2, t2 in spans[a + 1 :]:
                    head.add((0, min(h1, h2), max(h1, h2)))
                    tail.add((0, min(t1, t2), max(t1, t2)))
        return {
            "text": text,
            "encoding": enc,
            "argument": sorted(argument),
            "head": sorted(head),
            "tail": sorted(tail),
            "gold_events": gold_events,
            "gold_arguments": {(t, role, arg) for t, roles in gold_events for role, arg in roles},
        }
