r"""GAU language model: a LightningModule with an auxiliary "token after next" task, and bits-per-character.

The trunk is a :class:`~lightning_gen.gau.GAUStack`; the main head predicts token t+1 through the tied embedding,
and an auxiliary head (a small MLP, then the same tied embedding) predicts token t+2. ``training_step`` returns
``lightning_mtl.task_losses(self, {"lm": ..., "aux": ...}, shared=h)``: without a callback the model trains on the
sum; with ``MultiTaskGradient(PrimaryAuxiliary(primary="lm"))`` the shared parameters descend the main loss while,
to first order, the auxiliary loss does not rise (Su, *多任务学习漫谈(三)*, https://kexue.fm/archives/8907).
"""

from __future__ import annotations

import math
from typing import Any

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchmetrics import Metric

from lightning_gen.gau.data import ByteTokenizer, CharTokenizer, TextDataModule, make_tokenizer
from lightning_gen.gau.layer import Attention, GAUStack, Length, Norm
from lightning_mtl._utils import eval_mode, fused_ok, no_decay_groups, warmup_schedule
from lightning_mtl.tasks import task_losses

__all__ = ["BitsPerCharacter", "GAULanguageModel", "TextDataModule", "warmup_cosine"]


class BitsPerCharacter(Metric):
    r"""Mean negative log-likelihood in bits per token: :math:`\frac{1}{N\ln 2}\sum -\log p(x_t\mid x_{<t})`.

    ``update(logits, target)`` with ``logits: (..., V)`` and ``target: (...)``; entries equal to ``ignore_index``
    do not count. For a byte vocabulary this is bits per byte (= per character for ASCII text).
    """

    is_differentiable = False
    higher_is_better = False
    full_state_update = False

    def __init__(self, ignore_index: int = -100, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.ignore_index = ignore_index
        self.add_state("nll", default=torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", default=torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, logits: Tensor, target: Tensor) -> None:
        nll = F.cross_entropy(
            logits.reshape(-1, logits.shape[-1]).float(),
            target.reshape(-1),
            ignore_index=self.ignore_index,
            reduction="sum",
        )
        self.nll += nll.double()
        self.count += (target != self.ignore_index).sum()

    def compute(self) -> Tensor:
        return (self.nll / self.count.clamp_min(1) / math.log(2)).float()


def warmup_cosine(step: int, warmup: int, total: int, floor: float = 0.1) -> float:
    """Learning-rate factor: linear warm-up over ``warmup`` steps, then cosine decay to ``floor`` at ``total``.

    :func:`lightning_mtl._utils.warmup_schedule` with ``decay="cosine"``, kept under this name for the benchmarks.
    """
    return warmup_schedule(step, warmup, total, decay="cosine", floor=floor)


class GAULanguageModel(pl.LightningModule):
    r"""Causal GAU language model over bytes or characters, with an auxiliary token-after-next task.

    Args:
        vocab: ``"byte"`` (256 tokens) or the character vocabulary as a string (``TextDataModule(vocab="char").vocab``).
        dim: model width.
        depth: number of GAU layers.
        attention: ``"relu2"``, ``"softmax"`` or ``"softmax_plus"`` (see :mod:`lightning_gen.gau`).
        qk_dim: shared query/key width s.
        expansion: GAU expansion e/d.
        n_ref: ``softmax_plus`` reference length.
        length: n in relu²/n and log n: ``"visible"`` (keys a row sees) or ``"total"``.
        norm: ``"pre"`` or ``"post"`` (GAU-α).
        dropout: dropout on the embeddings and inside each GAU.
        aux: add the auxiliary head predicting token t+2 (task ``"aux"``).
        aux_weight: the auxiliary loss' weight in the dict handed to ``task_losses`` (matters only without a
            gradient-weighting callback: :class:`~lightning_mtl.PrimaryAuxiliary` is invariant to it).
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay on matrices (not on gains, offsets or the embedding).
        betas: AdamW betas.
        warmup_steps: linear warm-up steps.
        max_steps: cosine horizon (default: the Trainer's estimated number of steps).
        lr_floor: final learning rate as a fraction of ``lr``.

    Example::

        >>> import lightning as L
        >>> import lightning_mtl as mtl
        >>> from lightning_mtl.callbacks import MultiTaskGradient
        >>> model = GAULanguageModel(dim=128, depth=4)
        >>> trainer = L.Trainer(max_steps=500, callbacks=[MultiTaskGradient(mtl.PrimaryAuxiliary(primary="lm"))])
        >>> # trainer.fit(model, TextDataModule(seq_len=128)); print(model.generate("The ", 100, seed=0))
    """

    def __init__(
        self,
        vocab: str = "byte",
        dim: int = 256,
        depth: int = 4,
        attention: Attention = "softmax_plus",
        qk_dim: int = 128,
        expansion: float = 2.0,
        n_ref: int = 512,
        length: Length = "visible",
        norm: Norm = "pre",
        dropout: float = 0.0,
        aux: bool = True,
        aux_weight: float = 1.0,
        lr: float = 2e-3,
        weight_decay: float = 0.1,
        betas: tuple[float, float] = (0.9, 0.98),
        warmup_steps: int = 100,
        max_steps: int | None = None,
        lr_floor: float = 0.1,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tokenizer: ByteTokenizer | CharTokenizer = make_tokenizer(vocab)
        self.embed = nn.Embedding(self.tokenizer.size, dim)
        nn.init.normal_(self.embed.weight, std=0.02)
        self.drop = nn.Dropout(dropout)
        self.trunk = GAUStack(
            dim,
            depth,
            norm=norm,
            attention=attention,
            qk_dim=qk_dim,
            expansion=expansion,
            n_ref=n_ref,
            length=length,
            dropout=dropout,
            causal=True,
        )
        self.aux_head = nn.Sequential(nn.Linear(dim, dim), nn.SiLU(), nn.Linear(dim, dim)) if aux else None
        self.train_bpc, self.val_bpc, self.val_aux_bpc = BitsPerCharacter(), BitsPerCharacter(), BitsPerCharacter()

    # --- model -----------------------------------------------------------------------------------------------
    def features(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        """The shared features ``h: (batch, n, dim)`` (RMS-normalised trunk output) of token ids ``(batch, n)``."""
        return self.trunk(self.drop(self.embed(ids)), mask)

    def logits(self, h: Tensor) -> Tensor:
        """Next-token logits through the tied embedding."""
        return F.linear(h, self.embed.weight)

    def aux_logits(self, h: Tensor) -> Tensor:
        """Token-after-next logits: the auxiliary MLP (a residual branch), then the tied embedding."""
        if self.aux_head is None:
            raise RuntimeError("This model was built with aux=False.")
        return F.linear(F.rms_norm(h + self.aux_head(h), (h.shape[-1],)), self.embed.weight)

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        return self.logits(self.features(ids, mask))

    # --- steps -----------------------------------------------------------------------------------------------
    def _split(self, batch: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        n = batch.shape[1] - 2
        return batch[:, :n], batch[:, 1 : n + 1], batch[:, 2 : n + 2]

    def training_step(self, batch: Tensor, batch_idx: int) -> Tensor:
        x, y1, y2 = self._split(batch)
        h = self.features(x)
        logits = self.logits(h)
        losses = {"lm": F.cross_entropy(logits.flatten(0, 1), y1.flatten())}
        if self.aux_head is not None:
            aux = F.cross_entropy(self.aux_logits(h).flatten(0, 1), y2.flatten())
            losses["aux"] = aux * self.hparams.aux_weight
            self.log("train/aux_loss", aux.detach(), prog_bar=False)
        self.log("train/loss", losses["lm"].detach(), prog_bar=True)
        self.log("train/bpc", losses["lm"].detach() / math.log(2))
        return task_losses(self, losses, shared=h)

    def validation_step(self, batch: Tensor, batch_idx: int) -> None:
        x, y1, y2 = self._split(batch)
        h = self.features(x)
        self.val_bpc.update(self.logits(h), y1)
        self.log("val/bpc", self.val_bpc, prog_bar=True)
        if self.aux_head is not None:
            self.val_aux_bpc.update(self.aux_logits(h), y2)
            self.log("val/aux_bpc", self.val_aux_bpc)

    @torch.no_grad()
    def bits_per_character(self, loader: Any) -> float:
        """Bits per token of the main head over every position of every window that ``loader`` yields.

        Windows of ``n + 2`` tokens (as from :meth:`TextDataModule.eval_dataloader`) score n positions each.
        """
        metric = BitsPerCharacter().to(self.device)
        with eval_mode(self):
            for batch in loader:
                x, y1, _ = self._split(batch.to(self.device))
                metric.update(self(x), y1)
        return float(metric.compute())

    # --- optimisation ----------------------------------------------------------------------------------------
    def configure_optimizers(self) -> dict[str, Any]:
        """AdamW with warm-up and cosine decay; weight decay on the matrices only.

        Fused (one kernel per step) except under ``"16-mixed"`` (a fused optimizer unscales inside its step:
        Lightning could not clip, and ``.grad`` would hold scaled gradients for the callbacks), under ``"bf16-mixed"``
        with gradient clipping (Lightning refuses to clip a fused optimizer and raises) and for DTensor parameters:
        then the non-fused AdamW, which works everywhere (the rule: :func:`lightning_mtl._utils.fused_ok`).
        """
        hp = self.hparams
        # decay on matrices only: not on gains, offsets or the (tied) embedding; frozen parameters stay in the groups
        groups = no_decay_groups(self, hp.weight_decay, no_decay_prefixes=("embed",), trainable_only=False)
        fused = fused_ok(self._trainer, self.parameters()) or None
        optimizer = torch.optim.AdamW(groups, lr=hp.lr, betas=tuple(hp.betas), fused=fused)
        total = hp.max_steps
        if total is None:
            total = self.trainer.estimated_stepping_batches if self._trainer is not None else 10_000
            total = int(total) if math.isfinite(total) else 10_000
        warmup = hp.warmup_steps
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lambda step: warmup_schedule(step, warmup, total, decay="cosine", floor=hp.lr_floor)
        )
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def setup(self, stage: str) -> None:
        dm = getattr(self._trainer, "datamodule", None) if self._trainer is not None else None
        if isinstance(dm, TextDataModule) and dm.vocab != self.tokenizer.vocab:
            raise ValueError(
                f"The datamodule's vocabulary ({_short(dm.vocab)}) is not the model's "
                f"({_short(self.tokenizer.vocab)}). "
                "Build the model with GAULanguageModel(vocab=datamodule.vocab)."
            )

    # --- generation ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompt: str,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        *,
        seed: int | None = None,
        context: int | None = None,
    ) -> str:
        """Continue ``prompt`` by ``max_new_tokens`` sampled tokens and return prompt + continuation as text.

        Args:
            prompt: the text to continue (non-empty; its characters must be in the vocabulary).
            max_new_tokens: how many tokens to sample.
            temperature: softmax temperature; ``0`` means greedy (argmax).
            top_k: sample among the ``top_k`` most likely tokens only.
            seed: seed of a private ``torch.Generator``: the same seed gives the same text (global RNG untouched).
            context: condition on at most the last ``context`` tokens (default: everything so far).
        """
        if not prompt:
            raise ValueError("generate(prompt=...) needs a non-empty prompt.")
        if temperature < 0:
            raise ValueError(f"generate(temperature=...) must be >= 0, got {temperature}.")
        with eval_mode(self):
            ids = self.tokenizer.encode(prompt).to(self.device)[None]
            generator = torch.Generator(device=self.device)
            generator.manual_seed(int(seed) if seed is not None else int(torch.randint(2**62, ()).item()))
            for _ in range(max_new_tokens):
                window = ids if context is None else ids[:, -context:]
                logits = self(window)[:, -1].float()
                if temperature == 0:
                    nxt = logits.argmax(-1, keepdim=True)
                else:
                    logits = logits / temperature
                    if top_k is not None and top_k < logits.shape[-1]:
                        kth = logits.topk(top_k, dim=-1).values[..., -1:]
                        logits = logits.masked_fill(logits < kth, float("-inf"))
                    nxt = torch.multinomial(logits.softmax(-1), 1, generator=generator)
                ids = torch.cat([ids, nxt], dim=1)
        return self.tokenizer.decode(ids[0].cpu())


def _short(vocab: str) -> str:
    return repr(vocab) if len(vocab) < 20 else f"{len(vocab)} characters"
