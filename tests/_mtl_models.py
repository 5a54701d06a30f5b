"""Tiny multi-task models and helpers shared by the engine/callback tests."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_mtl as mtl


class TwoHeads(L.LightningModule):
    """A shared trunk, K linear regression heads; returns task_losses(...)."""

    def __init__(self, k: int = 2, dim: int = 6, hidden: int = 8, lr: float = 0.1, optimizer: str = "sgd") -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.heads = nn.ModuleList(nn.Linear(hidden, 1) for _ in range(k))
        self.lr = lr
        self.optimizer = optimizer
        self.names = [f"t{i}" for i in range(k)]
        self.loss_scale = [1.0] * k  # multiply task losses (to make tasks unbalanced)
        self.return_plain = False

    def forward(self, x):
        z = self.trunk(x)
        return z, [h(z).squeeze(-1) for h in self.heads]

    def task_dict(self, batch):
        x, y = batch
        z, outs = self(x)
        losses = {n: s * F.mse_loss(o, y[:, i]) for i, (n, o, s) in enumerate(zip(self.names, outs, self.loss_scale))}
        return losses, z

    def training_step(self, batch, batch_idx):
        losses, z = self.task_dict(batch)
        if self.return_plain:
            return sum(losses.values())
        return mtl.task_losses(self, losses, shared=z)

    def configure_optimizers(self):
        if self.optimizer == "adam":
            return torch.optim.Adam(self.parameters(), lr=self.lr)
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def make_data(n: int = 32, dim: int = 6, k: int = 2, seed: int = 0, dtype=torch.float32) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, dim, generator=g, dtype=dtype)
    w = torch.randn(dim, k, generator=g, dtype=dtype)
    w[:, 1:] = -0.8 * w[:, :1] + 0.6 * w[:, 1:]  # make tasks conflict
    y = torch.tanh(x @ w) + 0.1 * torch.randn(n, k, generator=g, dtype=dtype)
    return TensorDataset(x, y)


def loader(ds: TensorDataset, batch_size: int = 8) -> DataLoader:
    return DataLoader(ds, batch_size=batch_size, shuffle=False)


def trainer(**kw) -> L.Trainer:
    defaults = dict(
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        max_epochs=1,
        deterministic=True,
    )
    defaults.update(kw)
    return L.Trainer(**defaults)


class GradRecorder(L.Callback):
    """Put after MultiTaskGradient: stores the .grad it leaves, and the batch, at every optimiser step."""

    def __init__(self) -> None:
        self.grads: list[dict[str, torch.Tensor]] = []
        self.params_before: list[dict[str, torch.Tensor]] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.grads.append({n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None})
        self.params_before.append({n: p.detach().clone() for n, p in pl_module.named_parameters()})


def per_task_grads(module: TwoHeads, batch, params: list[nn.Parameter]) -> torch.Tensor:
    """Brute force: one full backward per task, flattened [K, P]."""
    losses, _ = module.task_dict(batch)
    rows = []
    for loss in losses.values():
        grads = torch.autograd.grad(loss, params, allow_unused=True, retain_graph=True)
        rows.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)]))
    return torch.stack(rows)
