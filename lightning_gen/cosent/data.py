"""Sentence-pair data for CoSENT: readers for local files and Hugging Face ``datasets``, the dataset type, and the
datamodule that makes each dataset a task (:class:`SentencePairDataModule`).

Local formats (see ``shared/data/SOURCES.md`` for the concrete files):

* **TSV with a header** (STS-B as packaged by sentence-transformers: ``... score sentence1 sentence2``; SNLI:
  ``sentence1 sentence2 label``): the columns are found by name, ``sentence1``/``sentence2`` and
  ``score``/``label``/``similarity``/``gold_label``. Read with ``csv.QUOTE_NONE`` (sentences contain ``"``).
* **Headerless** ``s1 \\t s2 \\t label`` (the Chinese ``.data`` files of bojone/CoSENT: STS-B zh, ATEC, BQ, LCQMC,
  PAWS-X). A file is taken as headerless when its first line has three fields and the third parses as a label.

Labels are numbers (STS scores, 0/1) or NLI words, mapped by :data:`~lightning_gen.cosent.loss.NLI_LABELS` to
contradiction 0 < neutral 1 < entailment 2. A malformed line raises :class:`DataFormatError` naming ``file:line``; an
empty file is an error; the only lines dropped are blank lines and NLI pairs without a gold label (``-``), and their
number is logged.
"""

from __future__ import annotations

import csv
import logging
import math
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities import CombinedLoader
from torch.utils.data import DataLoader, Dataset

from lightning_gen.cosent.loss import NLI_LABELS
from lightning_mtl._imports import needs_extra

__all__ = [
    "DataFormatError",
    "SentencePairDataModule",
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
    :data:`~lightning_gen.cosent.loss.NLI_LABELS` (the HF SNLI ids run the other way: 0 = entailment); ids below 0
    (no gold label) are dropped and counted.

    Examples: ``hf:sentence-transformers/stsb:train``, ``hf:nyu-mll/glue@stsb:validation``,
    ``hf:stanfordnlp/snli:train``.
    """
    body = spec.removeprefix("hf:")
    dataset_name, sep, split = body.rpartition(":")
    if not sep or not dataset_name or not split:
        raise ValueError(f"Hugging Face dataset spec {spec!r} must look like 'hf:NAME[@CONFIG]:SPLIT'.")
    dataset_name, _, config = dataset_name.partition("@")
    with needs_extra(f"reading the Hugging Face dataset {spec!r}"):
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


class SentencePairDataModule(pl.LightningDataModule):
    """Sentence-pair datasets as CoSENT tasks: one training batch per dataset per step.

    Args:
        train: task name -> source, a local file (STS-B TSV, SNLI TSV, headerless ``s1\\ts2\\tlabel``) or
            ``hf:NAME[@CONFIG]:SPLIT`` for Hugging Face ``datasets``.
        val: dataset name -> source for validation (Spearman per name). May name datasets that are not trained on.
        holdout: task name -> number of training pairs to hold out (seeded) as that task's validation set, for
            data that has no separate dev split (e.g. SNLI dev used for training).
        batch_size: pairs per batch, one value or one per task.
        mode: how the training loaders of several tasks are combined (Lightning ``CombinedLoader``):
            ``"max_size_cycle"`` (an epoch is the longest task; shorter ones restart), ``"min_size"``,
            ``"max_size"``.
        num_workers: DataLoader workers.
        seed: seed of the holdout split.

    Example::

        SentencePairDataModule(train={"stsb": "stsb_en/sts-train.tsv", "snli": "snli/snli_1.0_dev.tsv"},
                               val={"stsb": "stsb_en/sts-dev.tsv"}, holdout={"snli": 2000})
    """

    def __init__(
        self,
        train: dict[str, str] | None = None,
        val: dict[str, str] | None = None,
        holdout: dict[str, int] | None = None,
        batch_size: int | dict[str, int] = 32,
        mode: Literal["max_size_cycle", "min_size", "max_size"] = "max_size_cycle",
        num_workers: int = 0,
        seed: int = 0,
    ) -> None:
        super().__init__()
        self.train_sources = dict(train or {})
        self.val_sources = dict(val or {})
        self.holdout = dict(holdout or {})
        for name in self.holdout:
            if name not in self.train_sources:
                raise ValueError(f"SentencePairDataModule(holdout=...) names {name!r}, which is not in train.")
            if name in self.val_sources:
                raise ValueError(f"SentencePairDataModule: {name!r} has both a val source and a holdout.")
        if isinstance(batch_size, dict):
            missing = set(self.train_sources) - set(batch_size)
            if missing:
                raise ValueError(f"SentencePairDataModule(batch_size=...) has no batch size for {sorted(missing)}.")
        self.batch_size = batch_size
        self.mode = mode
        self.num_workers = num_workers
        self.seed = seed
        self.train_sets: dict[str, SentencePairs] = {}
        self.val_sets: dict[str, SentencePairs] = {}

    def _bs(self, name: str) -> int:
        return self.batch_size[name] if isinstance(self.batch_size, dict) else self.batch_size

    def setup(self, stage: str | None = None) -> None:
        if self.train_sets or self.val_sets:
            return
        for name, src in self.train_sources.items():
            data = load_pairs(src, name=name)
            if name in self.holdout:
                data, held = data.split(self.holdout[name], self.seed)
                self.val_sets[name] = held
            self.train_sets[name] = data
        for name, src in self.val_sources.items():
            self.val_sets[name] = load_pairs(src, name=name)

    def _loader(self, data: SentencePairs, name: str, shuffle: bool) -> DataLoader:
        return DataLoader(
            data,
            batch_size=self._bs(name) if shuffle else max(self._bs(name), 64),
            shuffle=shuffle,
            num_workers=self.num_workers,
            collate_fn=partial(collate_pairs, task=name),
        )

    def train_dataloader(self) -> CombinedLoader:
        if not self.train_sets:
            raise ValueError("SentencePairDataModule has no training data: pass train={name: path, ...}.")
        return CombinedLoader({n: self._loader(d, n, True) for n, d in self.train_sets.items()}, mode=self.mode)

    def val_dataloader(self) -> CombinedLoader | list:
        if not self.val_sets:
            return []
        return CombinedLoader({n: self._loader(d, n, False) for n, d in self.val_sets.items()}, mode="sequential")

    test_dataloader = val_dataloader
