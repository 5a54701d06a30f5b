r"""Word / character spans <-> sub-word token spans, through a fast tokenizer (``word_ids`` and ``offset_mapping``).

Two alignments, one per kind of input:

* **pre-split words** (NER: CoNLL-2003, LitBank): :func:`encode_words` tokenizes each sentence with
  ``is_split_into_words=True`` and cuts sentences longer than ``max_length`` sub-words into overlapping
  :class:`Window` s of whole words. A word span ``[start, end)`` maps to the token span from the first sub-word of
  its first word to the last sub-word of its last word (:meth:`Window.token_span`); a token span maps back to the
  words that own its two ends (:meth:`Window.word_span`). A span that no window contains whole (a span longer than a
  window, or crossing the cut between two windows beyond their overlap, or made only of words that the tokenizer
  turns into no sub-word) cannot be trained or predicted: the callers count it, never drop it silently.
* **raw text** (relations, events, and every model's ``predict``): :func:`encode_texts` tokenizes with
  ``return_offsets_mapping``; a character span maps to the tokens that overlap it (:func:`char_span_to_tokens`) and a
  token span back to characters snapped to whole words (:meth:`TextEncoding.char_span`: from the start of the word
  owning its first token to the end of the word owning its last token, the words being the tokenizer's pre-tokenized
  words, so a predicted span never starts or ends inside a word). :func:`encode_texts` truncates at ``max_length``
  (the training data: a span past the last kept token is counted by the callers); :func:`encode_text_windows` cuts
  a long text into overlapping windows of whole words instead (prediction), with offsets in the whole text.

:func:`find_occurrences` locates an entity string in its text (the matching rule of
:class:`~lightning_gen.span.RelationDataModule`).
"""

from __future__ import annotations

import re
from bisect import bisect_right
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "TextEncoding",
    "Window",
    "char_span_to_tokens",
    "encode_text_windows",
    "encode_texts",
    "encode_words",
    "find_occurrences",
    "token_span_to_text",
]


def check_fast(tokenizer: Any) -> None:
    """Raise unless ``tokenizer`` is a fast (Rust ``tokenizers``) tokenizer: word ids and offsets need it."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"span extraction needs a fast tokenizer (word_ids and offset_mapping), got {type(tokenizer).__name__}; "
            "load it with AutoTokenizer.from_pretrained(..., use_fast=True)."
        )


@dataclass
class Window:
    """One encoder input: the sub-words of words ``first_word .. last_word - 1`` of a sentence, with special tokens.

    Attributes:
        input_ids: token ids, special tokens included.
        word_ids: for each token the index of its word *in the whole sentence*, ``None`` for special tokens.
        first_word: the first word of the window.
        last_word: one past the last word of the window.
        truncated: the last word lost sub-words to ``max_length`` (a single word longer than a window).
        empty_words: the words of the whole sentence that the tokenizer turns into no sub-word.
    """

    input_ids: list[int]
    word_ids: list[int | None]
    first_word: int
    last_word: int
    truncated: bool = False
    empty_words: frozenset[int] = frozenset()
    _first: dict[int, int] = field(default_factory=dict, repr=False)
    _last: dict[int, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        for t, w in enumerate(self.word_ids):
            if w is not None:
                self._first.setdefault(w, t)
                self._last[w] = t

    def token_span(self, start: int, end: int) -> tuple[int, int] | None:
        """The token span ``(i, j)`` (both inclusive) of the word span ``[start, end)``, or ``None`` when the span is
        not inside this window or none of its words has a sub-word here."""
        if start < self.first_word or end > self.last_word or end <= start:
            return None
        firsts = [self._first[w] for w in range(start, end) if w in self._first]
        if not firsts:
            return None
        lasts = [self._last[w] for w in range(start, end) if w in self._last]
        return min(firsts), max(lasts)

    def word_span(self, i: int, j: int) -> tuple[int, int] | None:
        """The word span ``[start, end)`` whose ends own tokens ``i`` and ``j`` (a sub-word stands for its whole
        word), or ``None`` if either is a special token or padding, or ``i > j`` in words."""
        if not (0 <= i < len(self.word_ids) and 0 <= j < len(self.word_ids)):
            return None
        a, b = self.word_ids[i], self.word_ids[j]
        if a is None or b is None or a > b:
            return None
        return a, b + 1


def _window_end(pieces: Sequence[int], start: int, budget: int) -> tuple[int, bool]:
    """The end of the window that starts at word ``start``: as many whole words (``pieces[w]`` sub-words each) as fit
    in ``budget``, at least one; ``True`` when that one word alone is longer than a window."""
    used, end, n = 0, start, len(pieces)
    while end < n and used + pieces[end] <= budget:
        used += pieces[end]
        end += 1
    return max(end, min(start + 1, n)), end == start and start < n


def _window_budget(fn: str, tokenizer: Any, max_length: int, overlap: int) -> int:
    """Sub-words a window holds besides the special tokens; checks the tokenizer and the arguments."""
    check_fast(tokenizer)
    if overlap < 0:
        raise ValueError(f"{fn}: overlap must be >= 0, got {overlap}.")
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    if budget < 1:
        raise ValueError(f"{fn}: max_length={max_length} leaves no room for a sub-word.")
    return budget


def encode_words(
    tokenizer: Any,
    sentences: Sequence[Sequence[str]],
    max_length: int,
    *,
    overlap: int = 8,
    truncate: bool = False,
) -> list[list[Window]]:
    """Tokenize pre-split sentences and cut the long ones into windows of whole words.

    A sentence whose sub-words fit in ``max_length`` (special tokens included) is one window. A longer one is cut
    greedily: each window takes as many whole words as fit, and the next one starts ``overlap`` words before the end of
    the previous one (so a span of up to ``overlap`` words across a cut lies whole in the next window). With
    ``truncate`` only the first window is kept. A single word with more sub-words than fit is truncated
    (:attr:`Window.truncated`).

    Returns:
        For each sentence its windows, in order (at least one, possibly without any word for an empty sentence).

    Example::

        >>> windows = encode_words(tokenizer, [["EU", "rejects", "German", "call"]], max_length=128)
        >>> windows[0][0].token_span(2, 3)  # "German": tokens (i, j), inclusive
    """
    budget = _window_budget("encode_words", tokenizer, max_length, overlap)
    sentences = [list(s) for s in sentences]
    counts = tokenizer(sentences, is_split_into_words=True, add_special_tokens=False) if sentences else None
    plans: list[list[tuple[int, int]]] = []
    pieces_of: list[list[int]] = []
    for k, words in enumerate(sentences):
        pieces = [0] * len(words)
        for w in counts.word_ids(k):  # type: ignore[union-attr]
            if w is not None:
                pieces[w] += 1
        pieces_of.append(pieces)
        plan: list[tuple[int, int]] = []
        start, n = 0, len(words)
        while True:
            end, _ = _window_end(pieces, start, budget)  # one over-long word: its own (truncated) window
            plan.append((start, end))
            if end >= n or truncate:
                break
            start = max(start + 1, end - overlap)
        plans.append(plan)
    flat = [(k, a, b) for k, plan in enumerate(plans) for a, b in plan]
    chunks = [sentences[k][a:b] for k, a, b in flat]
    enc = tokenizer(chunks, is_split_into_words=True, truncation=True, max_length=max_length) if chunks else None
    out: list[list[Window]] = [[] for _ in sentences]
    for m, (k, a, b) in enumerate(flat):
        word_ids = [None if w is None else w + a for w in enc.word_ids(m)]  # type: ignore[union-attr]
        kept = sum(1 for w in word_ids if w is not None)
        truncated = kept < sum(pieces_of[k][a:b])
        empty = frozenset(w for w, c in enumerate(pieces_of[k]) if c == 0)
        out[k].append(Window(list(enc["input_ids"][m]), word_ids, a, b, truncated, empty))  # type: ignore[index]
    return out


@dataclass
class TextEncoding:
    """A tokenized text, or one window of it, with character offsets in the whole text.

    Attributes:
        input_ids: token ids, special tokens included.
        offsets: character ``(start, end)`` of each token in the whole text (``(0, 0)`` for special tokens).
        special: True for special tokens.
        kept_chars: the end of the last kept token (text beyond it was truncated away or is in a later window).
        word_ids: per token, the index of its word in the whole text (``None`` for special tokens); the words are the
            tokenizer's pre-tokenized words (BERT: runs of letters/digits and single punctuation marks).
        words: character ``(start, end)`` of every word of the whole text, by word index.
        cut: a word longer than a window lost sub-words here (it cannot be represented whole).
    """

    input_ids: list[int]
    offsets: list[tuple[int, int]]
    special: list[bool]
    kept_chars: int
    word_ids: list[int | None] = field(default_factory=list)
    words: Sequence[tuple[int, int]] = ()
    cut: bool = False

    def char_span(self, i: int, j: int) -> tuple[int, int] | None:
        """Characters ``[start, end)`` of the token span ``i .. j`` (inclusive) snapped to whole words: from the start
        of the word owning token ``i`` to the end of the word owning token ``j``; ``None`` for a special or padding
        token or when ``i``'s word comes after ``j``'s. Without word information, the tokens' own offsets."""
        n = len(self.offsets)
        if not (0 <= i <= j < n) or self.special[i] or self.special[j]:
            return None
        if self.word_ids and self.words:
            a, b = self.word_ids[i], self.word_ids[j]
            if a is None or b is None or a > b:
                return None
            return self.words[a][0], self.words[b][1]
        return self.offsets[i][0], self.offsets[j][1]


def _word_chars(offsets: Sequence[tuple[int, int]], word_ids: Sequence[int | None]) -> list[tuple[int, int]]:
    """Character span of every word, from the first to the last non-empty token it owns (a word without one: an empty
    span at the end of the word before it)."""
    first: dict[int, int] = {}
    last: dict[int, int] = {}
    for (s, e), w in zip(offsets, word_ids, strict=True):
        if w is not None and e > s:
            first.setdefault(w, s)
            last[w] = e
    out: list[tuple[int, int]] = []
    prev = 0
    for w in range(max((w for w in word_ids if w is not None), default=-1) + 1):
        if w in first:
            prev = last[w]
            out.append((first[w], prev))
        else:
            out.append((prev, prev))
    return out


def encode_texts(tokenizer: Any, texts: Sequence[str], max_length: int) -> list[TextEncoding]:
    """Tokenize raw texts with character offsets and words, truncated to ``max_length`` tokens (special tokens
    included)."""
    check_fast(tokenizer)
    if not texts:
        return []
    enc = tokenizer(
        list(texts),
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    out = []
    for k, (ids, offsets, special) in enumerate(
        zip(enc["input_ids"], enc["offset_mapping"], enc["special_tokens_mask"], strict=True)
    ):
        offsets = [tuple(o) for o in offsets]
        special = [bool(s) for s in special]
        word_ids = [None if sp else w for w, sp in zip(enc.word_ids(k), special, strict=True)]
        ends = [e for (s, e), sp in zip(offsets, special, strict=True) if not sp and e > s]
        out.append(
            TextEncoding(list(ids), offsets, special, max(ends, default=0), word_ids, _word_chars(offsets, word_ids))
        )
    return out


def encode_text_windows(
    tokenizer: Any, texts: Sequence[str], max_length: int, *, overlap: int = 8
) -> list[list[TextEncoding]]:
    """Tokenize raw texts and cut the long ones into overlapping windows of whole words (no truncation).

    The words are the tokenizer's pre-tokenized words of the whole text. A text whose sub-words fit in ``max_length``
    (special tokens included) is one window; a longer one is cut as :func:`encode_words` cuts a sentence: each window
    takes as many whole words as fit, the next starts ``overlap`` words before the end of the previous one, so a span
    of up to ``overlap`` words across a cut lies whole in the next window. A single word with more sub-words than fit
    is cut (:attr:`TextEncoding.cut`: its end cannot be predicted). Offsets, ``word_ids`` and ``words`` refer to the
    whole text, so spans found in two windows are equal.

    Returns:
        For each text its windows, in order (at least one).

    Example::

        >>> windows = encode_text_windows(tokenizer, ["EU rejects German call ."], max_length=128)
        >>> windows[0][0].char_span(3, 3)  # token 3 is "german": characters (11, 17)
    """
    budget = _window_budget("encode_text_windows", tokenizer, max_length, overlap)
    texts = list(texts)
    if not texts:
        return []
    full = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    plans: list[tuple[int, int, int, bool]] = []  # (text, first word, end word, cut)
    words_of: list[list[tuple[int, int]]] = []
    for k in range(len(texts)):
        offsets = [tuple(o) for o in full["offset_mapping"][k]]
        word_ids = full.word_ids(k)
        words = _word_chars(offsets, word_ids)
        words_of.append(words)
        pieces = [0] * len(words)
        for w in word_ids:
            if w is not None:
                pieces[w] += 1
        start, n = 0, len(words)
        while True:
            end, cut = _window_end(pieces, start, budget)  # one word longer than a window: its own (cut) window
            plans.append((k, start, end, cut))
            if end >= n:
                break
            start = max(start + 1, end - overlap)
    # each window: the text from the end of the word before it (a leading space matters to byte-level BPE) to the
    # end of its last word, tokenized with special tokens; offsets shifted back into the whole text
    spans = []
    for k, a, b, _ in plans:
        words = words_of[k]
        lo = words[a - 1][1] if a > 0 else 0
        hi = words[b - 1][1] if b > 0 else len(texts[k])
        spans.append((lo, hi))
    enc = tokenizer(
        [texts[k][lo:hi] for (k, *_), (lo, hi) in zip(plans, spans, strict=True)],
        truncation=True,
        max_length=max_length,
        return_offsets_mapping=True,
        return_special_tokens_mask=True,
    )
    out: list[list[TextEncoding]] = [[] for _ in texts]
    for m, ((k, a, b, cut), (lo, _)) in enumerate(zip(plans, spans, strict=True)):
        words = words_of[k]
        starts = [s for s, _ in words]
        special = [bool(x) for x in enc["special_tokens_mask"][m]]
        offsets, word_ids = [], []
        for (s, e), sp in zip(enc["offset_mapping"][m], special, strict=True):
            if sp:
                offsets.append((0, 0))
                word_ids.append(None)
                continue
            s, e = s + lo, e + lo
            offsets.append((s, e))
            w = min(max(bisect_right(starts, s) - 1, a), max(b - 1, a))  # the word holding the token's first char
            word_ids.append(w)
        ends = [e for (s, e), sp in zip(offsets, special, strict=True) if not sp and e > s]
        kept = max(ends, default=lo)
        cut = cut or (b > a and kept < words[b - 1][1])
        out[k].append(TextEncoding(list(enc["input_ids"][m]), offsets, special, kept, word_ids, words, cut))
    return out


def char_span_to_tokens(encoding: TextEncoding, start: int, end: int) -> tuple[int, int] | None:
    """The tokens ``(i, j)`` (inclusive) that overlap characters ``[start, end)``, or ``None`` if none does or the
    span reaches past the truncated end of the text."""
    if end <= start or end > encoding.kept_chars:
        return None
    hit = [
        t
        for t, ((s, e), sp) in enumerate(zip(encoding.offsets, encoding.special, strict=True))
        if not sp and e > s and s < end and e > start
    ]
    return (hit[0], hit[-1]) if hit else None


def token_span_to_text(encoding: TextEncoding, text: str, i: int, j: int) -> str | None:
    """The text of tokens ``i .. j`` snapped to whole words (:meth:`TextEncoding.char_span`), or ``None`` for a
    special/padding token."""
    span = encoding.char_span(i, j)
    return None if span is None else text[span[0] : span[1]]


def find_occurrences(entity: str, text: str) -> tuple[list[int], bool]:
    """Character starts of ``entity`` in ``text``, and whether they are whole-word matches.

    Matching rule: the occurrences that start and end at word boundaries (the text's start/end or a whitespace
    character on each side) if there are any; otherwise every occurrence as a plain substring (``False`` as the second
    value, so callers can count them); ``([], True)`` if the string does not occur at all.

    Example::

        >>> find_occurrences("12", "Apollo 12 , born 1912")
        ([7], True)
    """
    if not entity:
        return [], True
    starts = [m.start() for m in re.finditer(f"(?={re.escape(entity)})", text)]
    whole = [
        s
        for s in starts
        if (s == 0 or text[s - 1].isspace()) and (s + len(entity) == len(text) or text[s + len(entity)].isspace())
    ]
    return (whole, True) if whole else (starts, not starts)
