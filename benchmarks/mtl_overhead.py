"""Step-time overhead of the multi-task gradient engine, as ratios measured in one run.

Shared MLP 784→1024→1024→1024→512 (ReLU), K linear heads 512→10, batch 256, SGD. Every configuration runs the
same model and batch; the configurations are interleaved step by step (ABCD ABCD ...) so that a noisy, shared
machine slows them alike, and the median step time of each is reported.

Configurations (plain PyTorch loops; one step = forward, backward work, optimiser step):

- ``plain``: backward of the summed loss (what a single-objective step costs).
- ``floor``: one forward + K ``torch.autograd.grad`` backward passes over all parameters, no aggregation: the least
  any exact per-task-gradient method can cost.
- ``ours-param/<w>``: ``GradientEngine`` parameter mode: K-1 ``autograd.grad`` on the shared parameters, the
  ordinary backward, recovery of the last task by subtraction, Gramian, weights, write-back.
- ``ours-repr/<w>``: representation mode: K gradients w.r.t. the 512-d features + a hook in the ordinary backward.
- ``torchjd/<w>``: ``torchjd.autojac.mtl_backward`` + ``jac_to_grad`` with torchjd's MGDA and UPGrad aggregators.

A second table runs a Lightning Trainer with and without the ``MultiTaskGradient`` callback (K = 4).

Usage::

    python benchmarks/mtl_overhead.py            # regenerates the table in benchmarks/README.md
    python benchmarks/mtl_overhead.py --steps 10 --no-write   # quick look
    python benchmarks/mtl_overhead.py --apply-only            # apply() alone: Gramian from the total vs recovery
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import write_block
from torch import nn

import lightning_mtl as mtl
from lightning_mtl.engine import GradientEngine
from lightning_mtl.tasks import TaskLosses

README = Path(__file__).with_name("README.md")


class Net(nn.Module):
    def __init__(self, k: int) -> None:
        super().__init__()
        dims = [784, 1024, 1024, 1024, 512]
        layers: list[nn.Module] = []
        for a, b in itertools.pairwise(dims):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(512, 10) for _ in range(k))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        z = self.trunk(x)
        return z, [h(z) for h in self.heads]

    def losses(self, x: torch.Tensor, y: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        z, outs = self(x)
        return {f"t{i}": F.cross_entropy(o, y[:, i]) for i, o in enumerate(outs)}, z


def make_steps(k: int) -> dict[str, Callable[[], None]]:
    torch.manual_seed(0)
    x = torch.randn(256, 784)
    y = torch.randint(0, 10, (256, k))
    steps: dict[str, Callable[[], None]] = {}

    def fresh() -> tuple[Net, torch.optim.Optimizer]:
        torch.manual_seed(0)
        net = Net(k)
        return net, torch.optim.SGD(net.parameters(), lr=1e-3)

    net_p, opt_p = fresh()

    def plain() -> None:
        losses, _ = net_p.losses(x, y)
        opt_p.zero_grad()
        torch.stack(list(losses.values())).sum().backward()
        opt_p.step()

    steps["plain"] = plain

    net_f, opt_f = fresh()
    params_f = list(net_f.parameters())

    def floor() -> None:
        losses, _ = net_f.losses(x, y)
        opt_f.zero_grad()
        for i, loss in enumerate(losses.values()):
            grads = torch.autograd.grad(loss, params_f, retain_graph=i < k - 1, allow_unused=True)
        for p, g in zip(params_f, grads):
            p.grad = g
        opt_f.step()

    steps["floor"] = floor

    def ours(weighting: mtl.Weighting, mode: str) -> Callable[[], None]:
        net, opt = fresh()
        engine = GradientEngine(weighting, mode)  # type: ignore[arg-type]

        def step() -> None:
            losses, z = net.losses(x, y)
            total = torch.stack(list(losses.values())).sum()
            opt.zero_grad()
            engine.capture(TaskLosses(losses, z, total), net)
            total.backward()
            engine.apply()
            opt.step()

        return step

    steps["ours-param/MGDA"] = ours(mtl.MGDA(), "parameter")
    steps["ours-param/GradNormalize"] = ours(mtl.GradNormalize(), "parameter")
    steps["ours-repr/MGDA"] = ours(mtl.MGDA(), "representation")

    try:
        from torchjd.aggregation import MGDA as JDMGDA
        from torchjd.aggregation import UPGrad
        from torchjd.autojac import jac_to_grad, mtl_backward
    except ImportError:  # the bench extra is not installed
        return steps

    def torchjd_step(aggregator) -> Callable[[], None]:
        net, opt = fresh()
        shared = list(net.trunk.parameters())

        def step() -> None:
            losses, z = net.losses(x, y)
            opt.zero_grad()
            mtl_backward(list(losses.values()), features=z)
            jac_to_grad(shared, aggregator)
            opt.step()

        return step

    steps["torchjd/MGDA"] = torchjd_step(JDMGDA())
    steps["torchjd/UPGrad"] = torchjd_step(UPGrad())
    return steps


def measure(steps: dict[str, Callable[[], None]], n: int, warmup: int = 3) -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + n):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def apply_paths(k: int, steps: int) -> dict[str, float]:
    """Median time of ``GradientEngine.apply`` alone (parameter mode, MGDA), interleaved: the last task read off the
    total gradient (the CPU/fp32 path) and recovered by subtraction (the path elsewhere, forced here)."""
    torch.manual_seed(0)
    x, y = torch.randn(256, 784), torch.randint(0, 10, (256, k))
    net = Net(k)
    engines = {"Gramian from the total": GradientEngine(mtl.MGDA()), "g_K recovered": GradientEngine(mtl.MGDA())}
    times: dict[str, list[float]] = {name: [] for name in engines}
    for i in range(steps + 3):
        for name, engine in engines.items():
            losses, z = net.losses(x, y)
            total = torch.stack(list(losses.values())).sum()
            net.zero_grad()
            engine.capture(TaskLosses(losses, z, total), net)
            total.backward()
            if name == "g_K recovered" and engine.strategy is not None:
                engine.strategy._total_ok = False  # type: ignore[attr-defined]
            t0 = time.perf_counter()
            engine.apply()
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def lightning_overhead(k: int, rounds: int, steps_per_round: int) -> dict[str, float]:
    import lightning as L

    from lightning_mtl.callbacks import MultiTaskGradient
    from lightning_mtl.demo import StepTimer

    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net(k)

        def training_step(self, batch, batch_idx):
            losses, z = self.net.losses(*batch)
            return mtl.task_losses(self, losses, shared=z)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    torch.manual_seed(0)
    data = torch.utils.data.TensorDataset(
        torch.randn(256 * steps_per_round, 784), torch.randint(0, 10, (256 * steps_per_round, k))
    )
    configs = {
        "Trainer, no callback": lambda: [],
        "Trainer + MultiTaskGradient(MGDA)": lambda: [MultiTaskGradient(mtl.MGDA(), validate=False)],
        "Trainer + MultiTaskGradient(MGDA, representation)": lambda: [
            MultiTaskGradient(mtl.MGDA(), mode="representation", validate=False)
        ],
    }
    times: dict[str, list[float]] = {c: [] for c in configs}
    for _ in range(rounds):
        for name, cbs in configs.items():
            timer = StepTimer()
            trainer = L.Trainer(
                max_epochs=1,
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_progress_bar=False,
                enable_model_summary=False,
                callbacks=[timer, *cbs()],
            )
            trainer.fit(Module(), torch.utils.data.DataLoader(data, batch_size=256))
            times[name] += timer.times[2:]
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="measured steps per configuration")
    parser.add_argument("--tasks", default="2,4")
    parser.add_argument("--lightning-rounds", type=int, default=3)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--apply-only", action="store_true", help="time apply() alone, the two last-task paths")
    args = parser.parse_args()
    if args.apply_only:
        for k in (int(s) for s in args.tasks.split(",")):
            for name, ms in apply_paths(k, args.steps).items():
                print(f"K={k} apply, {name}: {ms:.2f} ms", flush=True)
        return

    lines = [
        f"Median step time over {args.steps} interleaved steps, {torch.get_num_threads()} CPU threads, "
        f"torch {torch.__version__}. Ratios are within one run.",
        "",
        "| K | configuration | ms / step | vs plain | vs floor |",
        "|---|---|---|---|---|",
    ]
    for k in (int(s) for s in args.tasks.split(",")):
        result = measure(make_steps(k), args.steps)
        for name, ms in result.items():
            lines.append(f"| {k} | {name} | {ms:.1f} | {ms / result['plain']:.2f}× | {ms / result['floor']:.2f}× |")
            print(lines[-1], flush=True)
    lk = lightning_overhead(4, args.lightning_rounds, 20)
    base = lk["Trainer, no callback"]
    lines += [
        "",
        f"Inside a Lightning Trainer (K = 4, median over {args.lightning_rounds} interleaved fits of 20 steps):",
        "",
        "| configuration | ms / step | vs no callback |",
        "|---|---|---|",
    ]
    for name, ms in lk.items():
        lines.append(f"| {name} | {ms:.1f} | {ms / base:.2f}× |")
        print(lines[-1], flush=True)
    table = "\n".join(lines)
    if not args.no_write:
        write_block(README, "<!-- BEGIN mtl_overhead -->", "<!-- END mtl_overhead -->", table, default="# Benchmarks\n")
        print(f"wrote {README}")


if __name__ == "__main__":
    main()
