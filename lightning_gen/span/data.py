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
:class:`DataReport`. Only a file with nothing usable left, or a file of the wrong format (JSON given to
:func:`read_iob`, token columns given to :func:`read_casrel`/:func:`read_duee`), raises :class:`SpanFormatError`.

**Where**: every message, of the readers and of the data modules, starts with the place in the file, 1-based:
``file:LINE`` for line-based files (CoNLL, LitBank, JSON lines; for a span, the line of its first word) and
``file: record N`` for a JSON array, followed by what is wrong and the text, words or triple at fault (texts cut
to 80 characters). ``limit=N`` reads the first N usable sentences or records only, and the counts are of what was
read.
"""

from __future__ import annotations

import json
import os
import re
from collections import Counter
from collections.abc import Iterator
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


def shorten(text: str, width: int = 80) -> str:
    """``repr`` of ``text``, cut to ``width`` characters with ``...`` (for the messages of a report)."""
    return repr(text if len(text) <= width else text[: width - 3] + "...")


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
    """A pre-split sentence with its gold spans ``(start, end_exclusive, type)`` in words.

    ``path`` and ``line`` say where :func:`read_iob` found it (the file and the 1-based line of its first word, so
    word ``k`` is on line ``line + k``); empty and 0 for a sentence made by hand. They take no part in ``==``.
    """

    words: list[str]
    spans: set[tuple[int, int, str]] = field(default_factory=set)
    path: str = field(default="", compare=False)
    line: int = field(default=0, compare=False)

    def where(self, word: int = 0, fallback: str = "data") -> str:
        """``file:LINE`` of word ``word`` (``fallback`` for a sentence not read from a file)."""
        return f"{self.path}:{self.line + word}" if self.path else fallback


def _iob_spans(tags: list[str]) -> tuple[set[tuple[int, int, str]], list[int]]:
    """Spans of one IOB2 column and the positions of the ``I-`` tags read as ``B-`` (no ``B-``/``I-`` of that type
    before)."""
    spans: set[tuple[int, int, str]] = set()
    repairs: list[int] = []
    start, kind = None, None
    for i, tag in enumerate([*tags, "O"]):
        prefix, _, label = tag.partition("-")
        if prefix == "I" and kind == label:
            continue
        if start is not None:
            spans.add((start, i, kind))  # type: ignore[arg-type]
            start, kind = None, None
        if prefix in ("B", "I"):
            if prefix == "I":
                repairs.append(i)
            start, kind = i, label
    return spans, repairs


def _json_kind(line: str) -> str | None:
    """``"JSON lines"`` or ``"a JSON array"`` if a file's first non-blank line looks like JSON, else ``None``."""
    s = line.strip()
    if s[:1] not in ("{", "["):
        return None
    try:
        value = json.loads(s)
    except json.JSONDecodeError:  # the start of a JSON value spread over lines, or a token column "[" / "{"
        if s in ("[", "{") or s.startswith(("[{", '["', '{"', "[[")):
            return "a JSON array" if s[0] == "[" else "JSON"
        return None
    if isinstance(value, dict):
        return "JSON lines"
    return "a JSON array" if isinstance(value, list) else None


def _refuse_json(path: Path, lineno: int, line: str) -> None:
    kind = _json_kind(line)
    if kind is not None:
        raise SpanFormatError(
            f"{path}:{lineno}: this looks like {kind}, not a CoNLL or LitBank file (one token per line, then its "
            f"IOB2 tag column(s)): {shorten(line)}. read_iob and SpanDataModule read only those; relation triples in "
            "CasRel JSON go to read_casrel / RelationDataModule, events in DuEE JSON to read_duee / EventDataModule."
        )


def detect_iob_format(path: str | os.PathLike[str]) -> Literal["conll", "litbank"]:
    """``"litbank"`` if the first token line of the file is tab separated, else ``"conll"``.

    Raises:
        SpanFormatError: the file has no token line, or looks like JSON.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip() and not line.startswith("-DOCSTART-"):
                _refuse_json(Path(path), lineno, line)
                return "litbank" if "\t" in line else "conll"
    raise SpanFormatError(f"{path}: the file has no token lines.")


def read_iob(
    path: str | os.PathLike[str],
    format: IobFormat = "auto",
    *,
    report: DataReport | None = None,
    split: str = "data",
    limit: int | None = None,
) -> list[Sentence]:
    """Read a CoNLL (tag in the last column) or LitBank (one IOB2 layer per column) file into :class:`Sentence` s.

    A line with another number of columns than the file's first token line, a line without a tag column, or a tag
    that is not ``O``/``B-X``/``I-X``, drops its sentence (counted in ``report`` with ``file:LINE`` and the line);
    an ``I-X`` without ``B-X`` starts a span (counted, with ``file:LINE``). ``limit``: stop after that many
    sentences (the report counts what was read).

    Raises:
        FileNotFoundError: no such file.
        SpanFormatError: no sentence left, no line with a tag column, or the file looks like JSON (named as such,
            with the reader to use instead).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"span data file {str(path)!r} does not exist.")
    report = report if report is not None else DataReport()
    fmt = detect_iob_format(path) if format == "auto" else format
    if fmt not in ("conll", "litbank"):
        raise ValueError(f"read_iob(format=...) must be 'auto', 'conll' or 'litbank', got {format!r}.")
    if limit is not None and limit < 1:
        raise ValueError(f"read_iob: limit must be a positive number of sentences or None, got {limit!r}.")
    sentences: list[Sentence] = []
    width: int | None = None
    words: list[str] = []
    columns: list[list[str]] = []
    bad: str | None = None
    first_line = 0
    seen_token_line = False

    def flush() -> None:
        nonlocal words, columns, bad
        if words and bad is not None:
            report.add(split, "malformed lines (sentence dropped)", message=bad)
        elif words:
            spans: set[tuple[int, int, str]] = set()
            for layer in columns:
                found, repairs = _iob_spans(layer)
                spans |= found
                for k in repairs:
                    label = layer[k][2:]
                    report.add(
                        split,
                        "I- tags without B- (read as B-)",
                        message=f"{path}:{first_line + k}: {layer[k]!r} without B-{label} before it, read as "
                        f"B-{label} (word {words[k]!r})",
                    )
            sentences.append(Sentence(words, spans, path=str(path), line=first_line))
        words, columns, bad = [], [], None

    with path.open(encoding="utf-8") as f:
        for lineno, raw in enumerate(f, start=1):
            line = raw.rstrip("\n").rstrip("\r")
            if not line.strip() or line.startswith("-DOCSTART-"):
                flush()
                if limit is not None and len(sentences) >= limit:
                    break
                continue
            if not seen_token_line:
                _refuse_json(path, lineno, line)
                seen_token_line = True
            if not words:
                first_line = lineno
            fields = line.split("\t") if fmt == "litbank" else line.split()
            where = f"{path}:{lineno}"
            if len(fields) < 2:
                bad = bad or f"{where}: a token line needs the token and its tag column(s), got 1 column: {line!r}"
                words.append(fields[0] if fields else "")
                continue
            if width is None:
                width = len(fields)
            if len(fields) != width:
                bad = bad or (
                    f"{where}: expected {width} columns (as the file's first token line), got {len(fields)}: {line!r}"
                )
                words.append(fields[0])
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
    sentences = sentences[:limit]
    report.add(split, "sentences", len(sentences))
    report.add(split, "spans", sum(len(s.spans) for s in sentences))
    if not sentences and width is None:
        raise SpanFormatError(
            f"{path}: no line has a token and a tag column: not a CoNLL or LitBank file (one token per line, then its "
            "IOB2 tag column(s))."
        )
    if not sentences:
        raise SpanFormatError(f"{path}: no usable sentence in the file ({report.summary()}).")
    return sentences


def _json_records(path: Path, report: DataReport, split: str, reader: str) -> Iterator[tuple[str, Any]]:
    """``(where, record)`` pairs from a JSON array (``file: record N``) or a JSON-lines file (``file:LINE``), both
    1-based; bad lines are counted, not fatal. A file of token columns (CoNLL, LitBank) is refused as such."""
    text = path.read_text(encoding="utf-8")
    if text.lstrip().startswith("["):
        try:
            data = json.loads(text)
        except json.JSONDecodeError as err:
            raise SpanFormatError(f"{path}:{err.lineno}:{err.colno}: not valid JSON ({err.msg}).") from None
        for i, record in enumerate(data, start=1):
            yield f"{path}: record {i}", record
        return
    first = True
    for lineno, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            if first and not line.lstrip().startswith(("{", "[")) and len(line.split()) >= 2:
                raise SpanFormatError(
                    f"{path}:{lineno}: this looks like a file of token columns (CoNLL, LitBank), not JSON: "
                    f"{shorten(line)}. {reader} reads a JSON array or JSON lines; entity data in CoNLL or LitBank "
                    "columns goes to read_iob / SpanDataModule."
                ) from None
            report.add(
                split,
                "malformed records (dropped)",
                message=f"{path}:{lineno}: not valid JSON ({err.msg}): {shorten(line)}",
            )
            first = False
            continue
        first = False
        yield f"{path}:{lineno}", record


def _check_limit(fn: str, limit: int | None) -> None:
    if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int) or limit < 1):
        raise ValueError(f"{fn}: limit must be a positive number of records or None, got {limit!r}.")


def read_casrel_records(
    path: str | os.PathLike[str], *, report: DataReport | None = None, split: str = "data", limit: int | None = None
) -> list[tuple[str, str, list[tuple[str, str, str]]]]:
    """:func:`read_casrel` with the place of each record: ``(where, text, triples)``, ``where`` being ``file:LINE``
    (JSON lines) or ``file: record N`` (JSON array), 1-based."""
    _check_limit("read_casrel", limit)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"relation data file {str(path)!r} does not exist.")
    report = report if report is not None else DataReport()
    out = []
    for where, record in _json_records(path, report, split, "read_casrel"):
        if limit is not None and len(out) >= limit:
            break
        if not isinstance(record, dict) or not isinstance(record.get("text"), str):
            report.add(split, "malformed records (dropped)", message=f"{where}: not an object with a string 'text'")
            continue
        triples = record.get("triple_list", record.get("triples"))
        if not isinstance(triples, list):
            report.add(
                split,
                "malformed records (dropped)",
                message=f"{where}: 'triple_list' is not a list (text {shorten(record['text'])})",
            )
            continue
        kept: list[tuple[str, str, str]] = []
        for t in triples:
            if not (isinstance(t, (list, tuple)) and len(t) == 3 and all(isinstance(x, str) and x for x in t)):
                report.add(
                    split,
                    "malformed triples (dropped)",
                    message=f"{where}: triple {t!r} is not 3 non-empty strings (text {shorten(record['text'])})",
                )
                continue
            triple = (t[0], t[1], t[2])
            if triple in kept:
                report.add(split, "duplicate triples (removed)")
                continue
            kept.append(triple)
        out.append((where, record["text"], kept))
    report.add(split, "texts", len(out))
    report.add(split, "triples", sum(len(t) for _, _, t in out))
    if not out:
        raise SpanFormatError(f"{path}: no usable record in the file.")
    return out


def read_casrel(
    path: str | os.PathLike[str], *, report: DataReport | None = None, split: str = "data", limit: int | None = None
) -> list[tuple[str, list[tuple[str, str, str]]]]:
    """Read CasRel relation data: ``(text, triples)`` per record, triples deduplicated (in order).

    A record that is not an object with a string ``"text"`` and a list ``"triple_list"`` is dropped; a triple that
    is not three strings is dropped; both are counted with ``file: record N`` (JSON array) or ``file:LINE`` (JSON
    lines), 1-based, and the triple and text at fault. ``limit``: stop after that many usable records (the report
    counts what was read). ``read_casrel_records`` gives the place of each record too.

    Raises:
        FileNotFoundError: no such file.
        SpanFormatError: invalid JSON array, a file of token columns (CoNLL, LitBank: named as such), or no record
            left.
    """
    return [(text, triples) for _, text, triples in read_casrel_records(path, report=report, split=split, limit=limit)]


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


def read_duee_records(
    path: str | os.PathLike[str], *, report: DataReport | None = None, split: str = "data", limit: int | None = None
) -> list[tuple[str, str, list[tuple[str, list[tuple[str, str, int]]]]]]:
    """:func:`read_duee` with the place of each record: ``(where, text, events)``, ``where`` being ``file:LINE``
    (JSON lines) or ``file: record N`` (JSON array), 1-based."""
    _check_limit("read_duee", limit)
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"event data file {str(path)!r} does not exist.")
    report = report if report is not None else DataReport()
    out = []
    for where, record in _json_records(path, report, split, "read_duee"):
        if limit is not None and len(out) >= limit:
            break
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
                report.add(
                    split,
                    "malformed events (dropped)",
                    message=f"{where}: event {shorten(repr(e))} lacks fields (text {shorten(text)})",
                )
                continue
            good = []
            for role, arg, start in args:
                if not arg or text[start : start + len(arg)] != arg:
                    report.add(
                        split,
                        "arguments not at their offset (dropped)",
                        message=f"{where}: {role} {arg!r} is not at character {start} of the text {shorten(text)}",
                    )
                    continue
                good.append((role, arg, start))
            events.append((etype, good))
        out.append((where, text, events))
    report.add(split, "texts", len(out))
    report.add(split, "events", sum(len(e) for _, _, e in out))
    if not out:
        raise SpanFormatError(f"{path}: no usable record in the file.")
    return out


def read_duee(
    path: str | os.PathLike[str], *, report: DataReport | None = None, split: str = "data", limit: int | None = None
) -> list[tuple[str, list[tuple[str, list[tuple[str, str, int]]]]]]:
    """Read DuEE-style event data: ``(text, events)`` per record, each event ``(event_type, [(role, argument,
    char_start), ...])`` with the trigger as role ``"trigger"``. Malformed records/events are dropped and counted;
    an argument whose string is not at its offset is dropped and counted; each with ``file:LINE`` or ``file: record
    N`` (1-based) and the text at fault. ``limit``: stop after that many usable records (the report counts what was
    read). ``read_duee_records`` gives the place of each record too.

    Raises:
        FileNotFoundError: no such file.
        SpanFormatError: invalid JSON array, a file of token columns (named as such), or no record left.
    """
    return [(text, events) for _, text, events in read_duee_records(path, report=report, split=split, limit=limit)]
