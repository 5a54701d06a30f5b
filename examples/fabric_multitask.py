"""Multi-task gradients in a Fabric training loop, on one or several devices.

    fabric run --accelerator cpu --devices 2 examples/fabric_multitask.py     # 2 processes (gloo)
    python examples/fabric_multitask.py                                       # 1 process

Fabric calls no optimiser hooks, so the loop drives the engine itself: ``engine.backward`` computes what the
ordinary backward cannot (per-task gradients or the representation Gramian) and then runs ``fabric.backward``;
``engine.apply`` writes the weighted gradient before ``optimizer.step()``. Under DDP every rank ends each step with
the same parameters; the script checks that at the end and says so. (A script launched by ``fabric run`` must not
call ``fabric.launch()``.)
"""

from __future__ import annotations

import argparse
import os
import sys

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import lightning_mtl as mtl
from lightning_mtl.engine import GradientEngine

WEIGHTINGS = {
    "mean": mtl.Mean,
    "gradnorm": mtl.GradNormalize,
    "mgda": mtl.MGDA,
    "primary": lambda: mtl.PrimaryAuxiliary("a"),
    "pcgrad": mtl.PCGrad,
}


class Net(nn.Module):
    """A shared trunk and two regression heads; ``forward`` returns the features and both predictions."""

    def __init__(self, dim: int = 16, hidden: int = 64) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(dim, hidden), nn.Tanh(), nn.Linear(hidden, hidden), nn.Tanh())
        self.a = nn.Linear(hidden, 1)
        self.b = nn.Linear(hidden, 1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        z = self.trunk(x)
        return z, self.a(z).squeeze(-1), self.b(z).squeeze(-1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weighting", choices=sorted(WEIGHTINGS), default="mgda")
    parser.add_argument("--mode", choices=["parameter", "representation"], default="parameter")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()

    fabric = L.Fabric()  # accelerator, devices and strategy come from `fabric run` (or default to one device)
    fabric.seed_everything(0)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.steps * args.batch_size * fabric.world_size, 16, generator=g)
    w = torch.randn(16, 2, generator=g)
    w[:, 1] = -0.8 * w[:, 0] + 0.6 * w[:, 1]  # conflicting tasks
    y = torch.tanh(x @ w)
    loader = fabric.setup_dataloaders(DataLoader(TensorDataset(x, y), batch_size=args.batch_size, shuffle=False))

    model = Net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    model, optimizer = fabric.setup(model, optimizer)
    engine = GradientEngine(WEIGHTINGS[args.weighting](), args.mode)

    for step, (xb, yb) in enumerate(loader):
        z, pa, pb = model(xb)
        losses = {"a": F.mse_loss(pa, yb[:, 0]), "b": F.mse_loss(pb, yb[:, 1])}
        optimizer.zero_grad()
        total = engine.backward(losses, module=model, shared=z, backward=fabric.backward)
        engine.apply()
        optimizer.step()
        if step % 10 == 0 or step == args.steps - 1:
            weights = ", ".join(f"{t}={float(v):.3f}" for t, v in zip(engine.tasks, engine.last_weights))
            fabric.print(f"step {step:3d}  loss {float(total):.4f}  weights {weights}")

    flat = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = fabric.all_gather(flat).reshape(fabric.world_size, -1)
    identical = bool((gathered == gathered[0]).all())
    if identical:
        fabric.print(f"identical parameters on all {fabric.world_size} ranks")
    else:
        fabric.print(f"parameters DIFFER between ranks (max |diff| {float((gathered - gathered[0]).abs().max()):.3g})")
    # leave together: a rank that exits while another still talks to the store (hosted by rank 0) aborts it
    fabric.barrier()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    return 0 if identical else 1


if __name__ == "__main__":
    code = main()
    # Every rank has finished and left the process group together. Leave without the interpreter's teardown: there the
    # DDP reducer drops the last reference to the gloo group, whose destructor joins its worker threads while holding
    # the GIL, and a worker still retiring the final barrier (which holds the all_gather's Python tensors) waits for
    # the GIL: a deadlock seen in one of four full test runs, under `fabric run` (torch 2.13, CPU, gloo).
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
