r"""EventExtractor: GPLinker joint event extraction (Su, https://kexue.fm/archives/8926).

* Arguments: every ``(event type, role)`` is one span class of an Efficient GlobalPointer (a nested-NER head), the
  trigger being one more role (``"trigger"``).
* Argument graph: two 1-type pointers, head–head and tail–tail, on the upper triangle (undirected): two arguments
  are linked ("in one event") iff both scores are > 0.
* Events: for each event type, the maximal cliques of its arguments' graph, found by
  :func:`~lightning_gen.span.clique_search`; an event without a trigger is dropped (as the reference code does).

Losses: the sparse multi-label cross-entropy of each pointer (summed over types, averaged over the batch), handed
to :func:`lightning_mtl.task_losses` as the tasks ``argument``, ``head`` and ``tail``.

No public English event corpus is available offline here: the model is tested on small data that the tests write
in the DuEE format (:func:`~lightning_gen.span.read_duee`), which is GPLinker's.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_gen.span.align import TextEncoding, encode_texts, token_span_to_text
from lightning_gen.span.base import (
    Head,
    PointerModule,
    check_args,
    check_label_list,
    check_texts,
    labels_from_json,
    make_head,
    pad_batch,
    pointer_loss,
    target_of,
)
from lightning_gen.span.data import TRIGGER
from lightning_gen.span.events import clique_search
from lightning_gen.span.metrics import TripleF1
from lightning_mtl._utils import eval_mode
from lightning_mtl.tasks import task_losses

__all__ = ["EventExtractor"]

Event = tuple[str, frozenset[tuple[str, str]]]


class EventExtractor(PointerModule):
    r"""GPLinker event extraction (https://kexue.fm/archives/8926) on a Hugging Face encoder.

    Args:
        labels: the ``(event type, role)`` classes, triggers as role ``"trigger"``. ``None``: from the data module
            at ``setup``.
        model_name_or_path: the encoder (fast tokenizer). Default: the bundled all-MiniLM-L6-v2.
        head: ``"efficient_global_pointer"`` (the article's choice for events) or ``"global_pointer"``.
        head_size, lr, head_lr, weight_decay, warmup_ratio, max_length, threshold: as
            :class:`~lightning_gen.span.RelationExtractor`.
        max_arguments: at most this many (highest-scored) arguments per text enter the graph (a guard for
            untrained models).

    Validation logs argument-level ``val/precision``, ``val/recall``, ``val/f1`` (on ``(event type, role,
    argument)``) and event-level ``val/event_f1`` (type and every ``(role, argument)`` equal).

    Example::

        model = EventExtractor()
        L.Trainer(max_epochs=10).fit(model, EventDataModule(train="train.json", val="dev.json"))
        model.extract(["Troops attacked the town on Monday ."])
        # [{('Attack', frozenset({('trigger', 'attacked'), ('attacker', 'Troops'), ('target', 'the town')}))}]
    """

    _POINTERS: ClassVar[dict[str, str]] = {"argument": "argument_head", "head": "head_head", "tail": "tail_head"}
    _EXPORT = (
        "labels",
        "head",
        "head_size",
        "lr",
        "head_lr",
        "weight_decay",
        "warmup_ratio",
        "max_length",
        "threshold",
        "max_arguments",
    )

    def __init__(
        self,
        labels: list[tuple[str, str]] | None = None,
        model_name_or_path: str | None = None,
        head: Head = "efficient_global_pointer",
        head_size: int = 64,
        lr: float = 2e-5,
        head_lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        max_length: int = 128,
        threshold: float = 0.0,
        max_arguments: int = 256,
    ) -> None:
        super().__init__()
        check_args("EventExtractor", head, lr, head_lr, warmup_ratio, max_length)
        labels = labels_from_json(check_label_list("EventExtractor", "labels", labels))
        self.save_hyperparameters()
        self._init_encoder(model_name_or_path)
        self._check_max_length("EventExtractor", max_length)
        self.labels: list[tuple[str, str]] | None = None
        self.max_length, self.threshold, self.max_arguments = max_length, threshold, max_arguments
        self.metric, self.event_metric = TripleF1("exact"), TripleF1("exact")
        if labels is not None:
            self._build([tuple(x) for x in labels])

    def _build(self, labels: list[tuple[str, str]]) -> None:
        if not labels or len(set(labels)) != len(labels):
            raise ValueError(f"EventExtractor: the (event type, role) classes must be distinct and non-empty: {labels}")
        self.labels = labels
        self.hparams["labels"] = [list(x) for x in labels]
        h, d = self.hparams, self.hidden_size
        self.argument_head = make_head(h.head, d, len(labels), h.head_size, rope=True, tril_mask=True)
        self.head_head = make_head(h.head, d, 1, h.head_size, rope=False, tril_mask=True)
        self.tail_head = make_head(h.head, d, 1, h.head_size, rope=False, tril_mask=True)

    def _ready(self) -> bool:
        return self.labels is not None

    def setup(self, stage: str) -> None:
        if self.labels is None:
            labels = getattr(getattr(self.trainer, "datamodule", None), "labels", None)
            if not labels:
                raise ValueError("EventExtractor(labels=None) needs an EventDataModule (or labels=[...]).")
            self._build([tuple(x) for x in labels])

    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, span_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(argument (B, C, n, n), head (B, 1, n, n), tail (B, 1, n, n), hidden (B, n, D))``; pairs outside
        ``span_mask`` (default: ``attention_mask``) are masked."""
        hidden = self.encode(input_ids, attention_mask)
        mask = attention_mask if span_mask is None else span_mask
        heads = (self.argument_head, self.head_head, self.tail_head)
        return (*(h(hidden, mask) for h in heads), hidden)  # type: ignore[return-value]

    def _losses(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
        out = self(batch["input_ids"], batch["attention_mask"], batch["span_mask"])
        names = ("argument", "head", "tail")
        scores = zip(names, out, strict=False)
        losses = {k: pointer_loss(s, target_of(batch, k), sparse=True, per_type="sum") for k, s in scores}
        return losses, out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses, out = self._losses(batch)
        total = task_losses(self, losses, shared=out[3])
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=len(batch["text"]))
        return total

    def _decode_one(self, argument: Tensor, head: Tensor, tail: Tensor, enc: TextEncoding, text: str) -> set[Event]:
        assert self.labels is not None
        n = len(enc.input_ids)
        ok = torch.tensor([not s for s in enc.special], device=argument.device)
        scores = argument[:, :n, :n].masked_fill(~(ok[:, None] & ok[None, :]), float("-inf"))
        idx = (scores > self.threshold).nonzero()
        if idx.shape[0] > self.max_arguments:
            idx = idx[scores[idx[:, 0], idx[:, 1], idx[:, 2]].topk(self.max_arguments).indices]
        if not idx.shape[0]:
            return set()
        c, h, t = idx[:, 0], idx[:, 1], idx[:, 2]
        linked = (head[0][torch.minimum(h[:, None], h[None]), torch.maximum(h[:, None], h[None])] > self.threshold) & (
            tail[0][torch.minimum(t[:, None], t[None]), torch.maximum(t[:, None], t[None])] > self.threshold
        )
        argus = list(zip(c.tolist(), h.tolist(), t.tolist(), strict=True))
        edges = linked.nonzero().tolist()
        events: set[Event] = set()
        for etype in {self.labels[k][0] for k, _, _ in argus}:
            nodes = [a for a, (k, _, _) in enumerate(argus) if self.labels[k][0] == etype]
            chosen = set(nodes)
            sub = [(u, v) for u, v in edges if u < v and u in chosen and v in chosen]
            for clique in clique_search(nodes, sub):
                roles = set()
                for a in clique:
                    k, i, j = argus[a]
                    span = token_span_to_text(enc, text, i, j)
                    if span is not None:
                        roles.add((self.labels[k][1], span))
                if any(role == TRIGGER for role, _ in roles):
                    events.add((etype, frozenset(roles)))
        return events

    def _decode(self, out: tuple[Tensor, ...], encodings: Sequence[TextEncoding], texts: Sequence[str]) -> list:
        argument, head, tail = (x.float() for x in out[:3])
        return [
            self._decode_one(argument[b], head[b], tail[b], enc, text)
            for b, (enc, text) in enumerate(zip(encodings, texts, strict=True))
        ]

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses, out = self._losses(batch)
        self.log("val/loss", sum(losses.values()), batch_size=len(batch["text"]))
        events = self._decode(out, batch["encoding"], batch["text"])
        self.event_metric.update(events, batch["gold_events"])
        self.metric.update([{(t, r, a) for t, roles in ev for r, a in roles} for ev in events], batch["gold_arguments"])

    def on_validation_epoch_end(self) -> None:
        values = {f"val/{k}": v for k, v in self.metric.compute().items()}
        values["val/event_f1"] = self.event_metric.compute()["f1"]
        self.metric.reset()
        self.event_metric.reset()
        self.log_dict(values, prog_bar=True, add_dataloader_idx=False)

    @torch.no_grad()
    def extract(self, texts: Sequence[str], batch_size: int = 32) -> list[set[Event]]:
        """Events of each text: a set of ``(event_type, frozenset({(role, argument), ...}))``, the arguments as they
        appear in the text, snapped to whole words. Texts are truncated to ``max_length`` tokens (with a warning).

        Raises:
            TypeError: ``texts`` is one string (wrap it in a list), or an item is not a string.
        """
        if self.labels is None:
            raise RuntimeError("EventExtractor.extract: the label set is not known yet; train or load first.")
        texts = check_texts("EventExtractor.extract", texts)
        results: list[set[Event]] = []
        truncated = 0
        with eval_mode(self):
            for start in range(0, len(texts), batch_size):
                chunk = list(texts[start : start + batch_size])
                encodings = encode_texts(self.tokenizer, chunk, self.max_length)
                truncated += sum(1 for e, t in zip(encodings, chunk, strict=True) if e.kept_chars < len(t.rstrip()))
                inputs = pad_batch(
                    [e.input_ids for e in encodings],
                    [[not s for s in e.special] for e in encodings],
                    self.tokenizer.pad_token_id or 0,
                )
                results += self._decode(self(*(x.to(self.device) for x in inputs)), encodings, chunk)
        if truncated:
            rank_zero_warn(
                f"EventExtractor.extract: {truncated} text(s) longer than max_length={self.max_length} tokens were "
                "truncated: no argument is found in the lost part.",
                category=UserWarning,
            )
        return results

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """``trainer.predict`` on a data module's predict data (``predict_file=``): per text its input fields and
        ``"events"``, each ``{"type", "arguments": [{"role", "text"}, ...]}`` (argument strings, as :meth:`extract`;
        texts are truncated to ``max_length`` tokens)."""
        texts = check_texts("EventExtractor.predict_step", batch["text"])
        events = self.extract(texts, batch_size=max(1, len(texts)))
        return [
            {
                **record,
                "text": text,
                "events": [
                    {"type": etype, "arguments": [{"role": r, "text": a} for r, a in sorted(roles)]}
                    for etype, roles in sorted(found, key=lambda ev: (ev[0], sorted(ev[1])))
                ],
            }
            for record, text, found in zip(batch["record"], texts, events, strict=True)
        ]
