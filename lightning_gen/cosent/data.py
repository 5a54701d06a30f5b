"""Sentence-pair data for CoSENT: readers for local files and Hugging Face ``datasets``, and the dataset type.

Local formats (see ``shared/data/SOURCES.md`` for the concrete files):

* **TSV with a header** (STS-B as packaged by sentence-transformers: ``... score sentence1 sentence2``; SNLI:
  ``sentence1 sentence2 label``): the columns are found by name, ``sentence1``/``sentence2`` and
  ``score``/``label``/``similarity``/``gold_label``. Read with ``csv.QUOTE_NONE`` (sentences contain ``"``).
* **Headerless** ``s1 \\t s2 \\t label`` (the Chinese ``.data`` files of bojone/CoSENT: STS-B zh, ATEC, BQ,
  LCQMC, PAWS-X). A file is taken as headerless when its first line has three fields and the third parses as a
  label.

Labels are numbers (STS scores, 0/1) or NLI words, mapped by :data:`lightning_mtl.losses.NLI_LABELS` to
contradiction 0 < neutral 1 < entailment 2. A malformed line raises :class:`DataFormatError` naming
``file:line``; an empty file is an error; the only lines dropped are blank lines and NLI pairs without a gold
label (``-``), and their number is logged.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from lightning_gen.cosent.loss import NLI_LABELS

__all__ = [
    "DataFormatError",
    "SentencePairs",
    "collate_pairs",
    "load_pairs",
    "read_hf_pairs",
    "read_pair_file",
]

log = logging.getLogger(__name__)

_S1 = ("sentence1", "sentence_1", "s1", "premise", "text1", "sentence_a")
_S2 = ("sentence2", "sentence_2", "s2", "hypothesis", "text2", "sentence_b")
_LABEL = ("score", "label", "similarity", "gold_label", "similarity_score")
_NO_GOLD = ("-", "")


class DataFormatError(ValueError):
    """A data file that cannot be read as sentence pairs; the message names ``file:line``."""


@dataclass
class SentencePairs(Dataset):
    """Sentence pairs with ordered labels; item ``i`` is ``(sentence1[i], sentence2[i], labels[i])``."""

    sentence1: list[str]
    sentence2: list[str]
    labels: list[float]
    name: str = ""

    def __post_init__(self) -> None:
        if not (len(self.sentence1) == len(self.sentence2) == len(self.labels)):
            raise ValueError("SentencePairs: sentence1, sentence2 and labels must have one length.")

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int) -> tuple[str, str, float]:
        return self.sentence1[i], self.sentence2[i], self.labels[i]

    def split(self, n_holdout: int, seed: int = 0) -> tuple[SentencePairs, SentencePairs]:
        """A seeded random ``(rest, holdout)`` split with ``n_holdout`` pairs in the holdout."""
        if not 0 < n_holdout < len(self):
            raise ValueError(f"split: n_holdout must be in (0, {len(self)}), got {n_holdout}.")
        perm = torch.randperm(len(self), generator=torch.Generator().manual_seed(seed)).tolist()
        return self.subset(sorted(perm[n_holdout:])), self.subset(sorted(perm[:n_holdout]))

    def subset(self, index: Sequence[int]) -> SentencePairs:
        return SentencePairs(
            [self.sentence1[i] for i in index],
            [self.sentence2[i] for i in index],
            [self.labels[i] for i in index],
            self.name,
        )


def collate_pairs(items: list[tuple[str, str, float]], task: str = "") -> dict[str, Any]:
    """``{"sentence1": [...], "sentence2": [...], "labels": float32 tensor, "task": name}``."""
    s1, s2, y = zip(*items, strict=True)
    return {
        "sentence1": list(s1),
        "sentence2": list(s2),
        "labels": torch.tensor(y, dtype=torch.float32),
        "task": task,
    }


def _parse_label(text: str, where: str) -> float:
    t = text.strip()
    word = NLI_LABELS.get(t.lower())
    if word is not None:
        return float(word)
    try:
        value = float(t)
    except ValueError:
        raise DataFormatError(f"{where}: label {text!r} is neither a number nor one of {sorted(NLI_LABELS)}.") from None
    if not math.isfinite(value):
        raise DataFormatError(f"{where}: label {text!r} is not finite.")
    return value


def _is_label(text: str) -> bool:
    try:
        _parse_label(text, "")
    except DataFormatError:
        return False
    return True


def read_pair_file(path: str | os.PathLike[str], *, name: str | None = None) -> SentencePairs:
    """Read a local sentence-pair file (TSV with a header, or headerless ``s1\\ts2\\tlabel``).

    Raises:
        FileNotFoundError: no such file.
        DataFormatError: empty file, missing columns, a line with the wrong number of fields, or a bad label;
            the message gives ``file:line``.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Sentence-pair file {str(path)!r} does not exist.")
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if not rows or all(not any(field.strip() for field in row) for row in rows):
        raise DataFormatError(f"{path}: the file is empty.")

    first = rows[0]
    header = [h.strip().lower() for h in first]
    headerless = len(first) == 3 and _is_label(first[2]) and not set(header) & set(_S1 + _LABEL)
    if headerless:
        i1, i2, il, start, width = 0, 1, 2, 0, 3
    else:

        def find(names: tuple[str, ...], what: str) -> int:
            for n in names:
                if n in header:
                    return header.index(n)
            raise DataFormatError(
                f"{path}:1: header {first!r} has no {what} column (one of {list(names)}); a headerless file "
                "must have three tab-separated fields: sentence1, sentence2, label."
            )

        i1, i2, il = find(_S1, "first-sentence"), find(_S2, "second-sentence"), find(_LABEL, "label")
        start, width = 1, len(first)

    s1: list[str] = []
    s2: list[str] = []
    labels: list[float] = []
    dropped: Counter[str] = Counter()
    for lineno, row in enumerate(rows[start:], start=start + 1):
        where = f"{path}:{lineno}"
        if not any(field.strip() for field in row):
            dropped["blank line"] += 1
            continue
        if len(row) != width:
            raise DataFormatError(f"{where}: expected {width} tab-separated fields, got {len(row)}: {row!r}")
        if row[il].strip() in _NO_GOLD:
            dropped["no gold label ('-')"] += 1
            continue
        labels.append(_parse_label(row[il], where))
        s1.append(row[i1])
        s2.append(row[i2])
    _report(str(path), len(labels), dropped)
    if not labels:
        n = sum(dropped.values())
        raise DataFormatError(f"{path}: no sentence pairs in the file ({n} lines dropped).")
    return SentencePairs(s1, s2, labels, name or path.stem)


def read_hf_pairs(spec: str, *, name: str | None = None) -> SentencePairs:
    """Read a Hugging Face ``datasets`` split: ``hf:NAME[@CONFIG]:SPLIT`` (needs network or the HF cache).

    Columns are found by name as for local files. A ``ClassLabel`` with NLI names is mapped to
    :data:`~lightning_mtl.losses.NLI_LABELS` (the HF SNLI ids run the other way: 0 = entailment); ids below 0
    (no gold label) are dropped and counted.

    Examples: ``hf:sentence-transformers/stsb:train``, ``hf:nyu-mll/glue@stsb:validation``,
    ``hf:stanfordnlp/snli:train``.
    """
    body = spec.removeprefix("hf:")
    dataset_name, sep, split = body.rpartition(":")
    if not sep or not dataset_name or not split:
        raise ValueError(f"Hugging Face dataset spec {spec!r} must look like 'hf:NAME[@CONFIG]:SPLIT'.")
    dataset_name, _, config = dataset_name.partition("@")
    import datasets

    ds = datasets.load_dataset(dataset_name, config or None, split=split)
    cols = {c.lower(): c for c in ds.column_names}

    def find(names: tuple[str, ...], what: str) -> str:
        for n in names:
            if n in cols:
                return cols[n]
        raise DataFormatError(f"{spec}: no {what} column (one of {list(names)}) in {ds.column_names}.")

    c1, c2, cl = find(_S1, "first-sentence"), find(_S2, "second-sentence"), find(_LABEL, "label")
    feature = ds.features[cl]
    names = getattr(feature, "names", None)
    remap = None
    if names and all(n.lower() in NLI_LABELS for n in names):
        remap = [NLI_LABELS[n.lower()] for n in names]
    s1: list[str] = []
    s2: list[str] = []
    labels: list[float] = []
    dropped: Counter[str] = Counter()
    for k, (a, b, y) in enumerate(zip(ds[c1], ds[c2], ds[cl], strict=True)):
        if y is None or (remap is not None and y < 0):
            dropped["no gold label"] += 1
            continue
        if isinstance(y, str):
            if y.strip() in _NO_GOLD:
                dropped["no gold label"] += 1
                continue
            value = _parse_label(y, f"{spec}[{k}]")
        else:
            value = float(remap[y] if remap is not None else y)
        s1.append(a)
        s2.append(b)
        labels.append(value)
    _report(spec, len(labels), dropped)
    if not labels:
        raise DataFormatError(f"{spec}: no sentence pairs.")
    return SentencePairs(s1, s2, labels, name or dataset_name)


def load_pairs(spec: str | os.PathLike[str], *, name: str | None = None) -> SentencePairs:
    """A local file path, or ``hf:NAME[@CONFIG]:SPLIT`` for Hugging Face ``datasets``."""
    if isinstance(spec, str) and spec.startswith("hf:"):
        return read_hf_pairs(spec, name=name)
    return read_pair_file(spec, name=name)


def _report(source: str, kept: int, dropped: Counter[str]) -> None:
    if dropped:
        detail = ", ".join(f"{n} {why}" for why, n in dropped.items())
        log.warning("%s: read %d pairs, dropped %d lines (%s).", source, kept, sum(dropped.values()), detail)
    else:
        log.info("%s: read %d pairs.", source, kept)
