r"""Readers for span-extraction data and the load report that every span data module keeps.

Formats (see ``shared/data/SOURCES.md`` §10-13 for the concrete files):

* **CoNLL** (CoNLL-2003: ``token POS chunk NER``, space separated): one token per line, whitespace-separated columns,
  the token first and the IOB2 tag **last**; a blank line ends a sentence; ``-DOCSTART-`` lines are skipped.
* **LitBank** (tab separated ``token L1 L2 ... Lk``): every column after the token is its own IOB2 layer (nested
  entities: L1 the innermost); a span found in several layers with one type counts once.
* **CasRel JSON** (WebNLG*, WebNLG): a JSON array of ``{"text": str, "triple_list": [[subject, relation, object],
  ...]}`` or the same records one per line (JSON lines); entities are strings, located in the text by
  :func:`~lightning_gen.span.align.find_occurrences`. ``rel2id.json`` in either shape: ``[{id: relation},
  {relation: id}]`` (CasRel, WebNLG*) or ``[{relation: id}]`` (WebNLG), or a plain ``{relation: id}``.
* **DuEE JSON lines** (events, GPLinker's format): ``{"text": str, "event_list": [{"event_type": str, "trigger": str,
  "trigger_start_index": int, "arguments": [{"role": str, "argument": str, "argument_start_index": int}, ...]},
  ...]}``. The trigger is read as the role ``"trigger"``.

Bad input is never fatal on its own: a malformed line drops its sentence, a malformed JSON record or triple drops
itself, an ``I-`` tag without its ``B-`` starts a span (the conlleval reading); each is counted in a
:class:`DataReport` with its ``file:line`` (or ``file: record N``). Only a file with nothing usable left raises
:class:`SpanFormatError`.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

__all__ = [
    "DataReport",
    "Sentence",
    "SpanFormatError",
    "read_casrel",
    "read_duee",
    "read_iob",
    "read_relations",
]

IobFormat = Literal["auto", "conll", "litbank"]
_TAG = re.compile(r"^(O|[BI]-\S+)$")

#: report keys that are problems with the data (the summary warns when any is non-zero); the others are counts
PROBLEMS = frozenset(
    {
        "malformed lines (sentence dropped)",
        "malformed records (dropped)",
        "malformed triples (dropped)",
        "malformed events (dropped)",
        "I- tags without B- (read as B-)",
        "spans of unknown types (dropped)",
        "spans lost to max_length",
        "spans without sub-words (lost)",
        "entities not in text (triple dropped)",
        "entities matched inside a word",
        "relations unknown to the training set",
        "triples lost to max_length",
        "arguments not at their offset (dropped)",
        "arguments lost to max_length",
    }
)


class SpanFormatError(ValueError):
    """A span-extraction data file with nothing usable in it (or that is not valid JSON); the message names the
    file (and line)."""


@dataclass
class DataReport:
    """Counts of what a data module read, kept, repaired and lost, per split, with the first messages that name
    ``file:line``/``file: record N``.

    Attributes:
        counts: ``{split: Counter({what: n})}``.
        messages: the first ``max_messages`` problem messages.
    """

    counts: dict[str, Counter[str]] = field(default_factory=dict)
    messages: list[str] = field(default_factory=list)
    max_messages: int = 20

    def add(self, split: str, what: str, n: int = 1, message: str | None = None) -> None:
        self.counts.setdefault(split, Counter())[what] += n
        if message is not None and len(self.messages) < self.max_messages:
            self.messages.append(message)

    def get(self, split: str, what: str) -> int:
        return self.counts.get(split, Counter())[what]

    def problems(self) -> int:
        """How many problem items (malformed, lost, unknown) were counted in all splits."""
        return sum(n for c in self.counts.values() for k, n in c.items() if k in PROBLEMS)

    def summary(self) -> str:
        lines = []
        for split, counts in self.counts.items():
            parts = [f"{k}: {v}" for k, v in counts.items() if v]
            lines.append(f"  {split}: " + "; ".join(parts))
        if self.messages:
            lines.append("  first problems:")
            lines += [f"    {m}" for m in self.messages]
        return "\n".join(lines)

    def log(self, title: str) -> None:
        """Report via ``rank_zero_warn`` if any problem was counted, else ``rank_zero_info``."""
        text = f"{title}:\n{self.summary()}"
        if self.problems():
            rank_zero_warn(text)
        else:
            rank_zero_info(text)


@dataclass
class Sentence:
    """A pre-split sentence with its gold spans ``(start, end_exclusive, type)`` in words."""

    words: list[str]
    spans: set[tuple[int, int, str]] = field(default_factory=set)


def _iob_spans(tags: list[str]) -> tuple[set[tuple[int, int, str]], int]:
    """Spans of one IOB2 column and the number of ``I-`` tags read as ``B-`` (no ``B-``/``I-`` of that type before)."""
    spans: set[tuple[int, int, str]] = set()
    repairs = 0
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        if prefix == "I" and kind == label:
            continue
        if start is not None:
            spans.add((start, i, kind))  # type: ignore[arg-type]
            start, kind = None, None
        if prefix in ("B", "I"):
            repairs += prefix == "I"
            start, kind = i, label
    return spans, repairs


def detect_iob_format(path: str | os.PathLike[str]) -> Literal["conll", "litbank"]:
    """``"litbank"`` if the first token line of the file is tab separated, else ``"conll"``."""
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip() and not line.startswith("-DOCSTART-"):
                return "litbank" if "\t" in line else "conll"
    raise SpanFormatError(f"{path}: the file has no token lines.")


def read_iob(
    path: str | os.PathLike[str],
    format: IobFormat = "auto",
    *,
    report: DataReport | None = None,
    split: str = "data",
) -> list[Sentence]:
    """Read a CoNLL (tag in the last column) or LitBank (one IOB2 layer per column) file into :class:`Sentence` s.

    A line with another number of columns than the file's first token line, or a tag that is not ``O``/``B-X``/
    ``I-X``, drops its sentence (counted in ``report`` with ``file:line``); an ``I-X`` without ``B-X`` starts a span.

    Raises:
        FileNotFoundError: no such file.
        SpanFormatError: no sentence left.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"span data file {str(path)!r} does not exist.")
    report = report if report is not None else DataReport()
    fmt = detect_iob_format(path) if format == "auto" else format
    if fmt not in ("conll", "litbank"):
        raise ValueError(f"read_iob(format=...) must be 'auto', 'conll' or 'litbank', got {format!r}.")
    sentences: list[Sentence] = []
    width: int | None = None
    words: list[str] = []
    columns: list[list[str]] = []
    bad: str | None = None

    def flush() -> None:
        nonlocal words, columns, bad
        if words and bad is not None:
            report.add(split, "malformed lines (sentence dropped)", message=bad)
        elif words:
            spans: set[tuple[int, int, str]] = set()
            for layer in columns:
                found, repairs = _iob_spans(layer)
                spans |= found
                if repairs:
                    report.add(split, "I- tags without B- (read as B-)", repairs)
            sentences.append(Sentence(words, spans))
        words, columns, bad = [], [], None

    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\n").rstrip("\r")
            if not line.strip() or line.startswith("-DOCSTART-"):
                flush()
                continue
            fields = line.split("\t") if fmt == "litbank" else line.split()
            if width is None:
                width = len(fields)
            where = f"{path}:{lineno}"
            if len(fields) != width or len(fields) < 2:
                bad = bad or f"{where}: expected {width} columns, got {len(fields)}: {line!r}"
                words.append(fields[0] if fields else "")
                continue
            tags = fields[1:] if fmt == "litbank" else [fields[-1]]
            wrong = [t for t in tags if not _TAG.match(t)]
            if wrong:
                bad = bad or f"{where}: tag {wrong[0]!r} is not O, B-TYPE or I-TYPE (IOB2)"
            if not columns:
                columns = [[] for _ in tags]
            for layer, tag in zip(columns, tags, strict=True):
                layer.append(tag)
            words.append(fields[0])
        flush()
    report.add(split, "sentences", len(sentences))
    report.add(split, "spans", sum(len(s.spans) for s in sentences))
    if not sentences:
        raise SpanFormatError(f"{path}: no usable sentence in the file ({report.summary()}).")
    return sentences


def _load_json_records(path: Path, report: DataReport, split: str) -> list[tuple[str, Any]]:
    """``(where, record)`` pairs from a JSON array or a JSON-lines file; bad lines are counted, not fatal."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpanFormatError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}).") from None
        return [(f"{path}: record {i}", r) for i, r in enumerate(data)]
    out = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            out.append((f"{path}:{lineno}", json.loads(line)))
        except json.JSONDecodeError as err:
            report.add(split, "malformed records (dropped)", message=f"{path}:{lineno}: not valid JSON ({err.msg})")
    return out


def read_casrel(
    path: str | os.PathLike[str], *, report: DataReport | None = None, split: str = "data"
) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Read CasRel relation data: ``(text, triples)`` per record, triples deduplicated (in order).

    A record that is not an object with a string ``"text"`` and a list ``"triple_list"`` is dropped; a triple that
    is not three strings is dropped; both are counted with ``file: record N`` (or ``file:line`` for JSON lines).

    Raises:
        FileNotFoundError: no such file.
        SpanFormatError: invalid JSON array, or no record left.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"relation data file {str(path)!r} does not exist.")
    report = report if report is not None else DataReport()
    out = []
    for where, record in _load_json_records(path, report, split):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            report.add(split, "malformed records (dropped)", message=f"{where}: not an object with a string 'text'")
            continue
        triples = record.get("triple_list", record.get("triples"))
        if not isinstance(triples, list):
            report.add(split, "malformed records (dropped)", message=f"{where}: 'triple_list' is not a list")
            continue
        kept: list[tuple[str, str, str]] = []
        for t in triples:
            if not (isinstance(t, (list, tuple)) and len(t) == 3 and all(isinstance(x, str) and x for x in t)):
                report.add(split, "malformed triples (dropped)", message=f"{where}: triple {t!r} is not 3 strings")
                continue
            triple = (t[0], t[1], t[2])
            if triple in kept:
                report.add(split, "duplicate triples (removed)")
                continue
            kept.append(triple)
        out.append((record["text"], kept))
    report.add(split, "texts", len(out))
    report.add(split, "triples", sum(len(t) for _, t in out))
    if not out:
        raise SpanFormatError(f"{path}: no usable record in the file.")
    return out


def read_relations(path: str | os.PathLike[str]) -> list[str]:
    """The relations of a ``rel2id.json``, in id order (either CasRel shape, or a plain ``{relation: id}``)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise SpanFormatError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}).") from None
    dicts = data if isinstance(data, list) else [data]
    rel2id: dict[str, int] = {}
    for d in dicts:
        if not isinstance(d, dict):
            continue
        for k, v in d.items():
            if isinstance(v, int) and not isinstance(v, bool):
                rel2id[str(k)] = v  # {relation: id}
            elif isinstance(v, str) and str(k).lstrip("-").isdigit():
                rel2id.setdefault(v, int(k))  # {id: relation}
    if not rel2id:
        raise SpanFormatError(
            f"{path}: no relation found; expected [{{id: relation}}, {{relation: id}}], [{{relation: id}}] or "
            "{relation: id}."
        )
    return sorted(rel2id, key=lambda r: (rel2id[r], r))


#: the role under which :func:`read_duee` files the trigger of an event
TRIGGER = "trigger"


def read_duee(
    path: str | os.PathLike[str], *, report: DataReport | None = None, split: str = "data"
) -> list[tuple[str, list[tuple[str, list[tuple[str, str, int]]]]]]:
    """Read DuEE-style event data: ``(text, events)`` per record, each event ``(event_type, [(role, argument,
    char_start), ...])`` with the trigger as role ``"trigger"``. Malformed records/events are dropped and counted;
    an argument whose string is not at its offset is dropped and counted."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"event data file {str(path)!r} does not exist.")
    report = report if report is not None else DataReport()
    out = []
    for where, record in _load_json_records(path, report, split):
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            report.add(split, "malformed records (dropped)", message=f"{where}: not an object with a string 'text'")
            continue
        text = record["text"]
        events = []
        for e in record.get("event_list", []) or []:
            try:
                args = [(TRIGGER, str(e["trigger"]), int(e["trigger_start_index"]))]
                args += [(str(a["role"]), str(a["argument"]), int(a["argument_start_index"])) for a in e["arguments"]]
                etype = str(e["event_type"])
            except (KeyError, TypeError, ValueError):
                report.add(split, "malformed events (dropped)", message=f"{where}: event {e!r} lacks fields")
                continue
            good = []
            for role, arg, start in args:
                if not arg or text[start : start + len(arg)] != arg:
                    report.add(
                        split,
                        "arguments not at their offset (dropped)",
                        message=f"{where}: {role} {arg!r} is not at character {start}",
                    )
                    continue
                good.append((role, arg, start))
            events.append((etype, good))
        out.append((text, events))
    report.add(split, "texts", len(out))
    report.add(split, "events", sum(len(e) for _, e in out))
    if not out:
        raise SpanFormatError(f"{path}: no usable record in the file.")
    return out
