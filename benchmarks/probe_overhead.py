"""Step-time overhead of the training probes at their default interval (every 50 optimizer steps).

One process, configurations interleaved: each round fits a fresh Trainer for ``--steps + 10`` steps per
configuration (the order rotates every round), and times a window of exactly ``--steps`` optimizer steps after 10
warm-up steps, so the window holds ``--steps / 50`` probe steps: the default rate. Reported per configuration: the
median over rounds of the mean step time in the window, as process CPU time (one torch thread, data loading in the
main process: all the work is this process's, and CPU time barely depends on what the other jobs of a shared machine
do) and as wall time; the median of the per-round ratios to the plain run of the same round (paired); and the CPU
time spent inside the probes' own hooks as a share of the step, with the cost of one probe step in plain steps.

Run (about 2-3 minutes on 2 shared CPU cores)::

    python benchmarks/probe_overhead.py --update-md benchmarks/probes.md
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import lightning.pytorch as pl
import torch
from _report import write_block
from lightning.pytorch.callbacks import Callback
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.callbacks import GradientMagnitudeProbe, ResidualProbe

WARMUP = 10


class Block(nn.Module):
    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, 2 * width)
        self.fc2 = nn.Linear(2 * width, width)

    def forward(self, x: Tensor) -> Tensor:
        return x + self.fc2(torch.relu(self.fc1(self.norm(x))))


class Stack(pl.LightningModule):
    def __init__(self, width: int, depth: int) -> None:
        super().__init__()
        self.inp = nn.Linear(32, width)
        self.blocks = nn.ModuleList([Block(width) for _ in range(depth)])
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for b in self.blocks:
            h = b(h)
        return self.head(h)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        loss = nn.functional.cross_entropy(self(x), y)
        self.log("loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-3)


class Window(Callback):
    """Times optimizer steps WARMUP+1 .. WARMUP+steps (put it last: its batch-end hook runs after the probes')."""

    def __init__(self, steps: int) -> None:
        self.steps = steps
        self.start = self.stop = self.cpu_start = self.cpu_stop = 0.0

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == WARMUP:
            self.start, self.cpu_start = time.perf_counter(), time.process_time()

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        if trainer.global_step == WARMUP + self.steps:
            self.stop, self.cpu_stop = time.perf_counter(), time.process_time()


def self_timed(probe: Callback, window: Window, box: dict[str, float]) -> Callback:
    """Wrap the probe's hooks to add the time spent inside them (within the timed window) to ``box``."""
    hooks = ("on_train_batch_start", "on_before_optimizer_step", "on_train_batch_end")
    for name in hooks:
        original = getattr(probe, name)

        def timed(*args: Any, _original: Callable[..., Any] = original, **kwargs: Any) -> Any:
            t0 = time.process_time()
            out = _original(*args, **kwargs)
            if window.start and not window.stop:
                box["seconds"] += time.process_time() - t0
            return out

        setattr(probe, name, timed)
    return probe


def make_probes(config: str) -> list[Callback]:
    return {
        "none": [],
        "GradientMagnitudeProbe": [GradientMagnitudeProbe()],
        "ResidualProbe": [ResidualProbe()],
        "both": [GradientMagnitudeProbe(), ResidualProbe()],
    }[config]


def chunk(config: str, args: argparse.Namespace, loader: DataLoader) -> tuple[float, float, float]:
    """One fit; per step in the window: (wall seconds, CPU seconds, CPU seconds inside the probe hooks)."""
    torch.manual_seed(0)
    window = Window(args.steps)
    box = {"seconds": 0.0}
    probes = [self_timed(p, window, box) for p in make_probes(config)]
    trainer = pl.Trainer(
        max_steps=WARMUP + args.steps + 1,  # the fit's last step, which the probes always record, is not timed
        callbacks=[*probes, window],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=args.out_dir,
    )
    trainer.fit(Stack(args.width, args.depth), loader)
    steps = args.steps
    return (window.stop - window.start) / steps, (window.cpu_stop - window.cpu_start) / steps, box["seconds"] / steps


def update_markdown(path: str, text: str, command: str) -> None:
    write_block(path, "<!-- probe_overhead:start -->", "<!-- probe_overhead:end -->", f"Command: `{command}`\n\n{text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--steps", type=int, default=100, help="timed steps per fit (a multiple of 50)")
    parser.add_argument("--width", type=int, default=128)
    parser.add_argument("--depth", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out-dir", default="runs/probe_overhead")
    parser.add_argument("--update-md", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n = (WARMUP + args.steps) * args.batch_size
    g = torch.Generator().manual_seed(0)
    loader = DataLoader(
        TensorDataset(torch.randn(n, 32, generator=g), torch.randint(0, 10, (n,), generator=g)),
        batch_size=args.batch_size,
    )
    configs = ["none", "GradientMagnitudeProbe", "ResidualProbe", "both"]
    wall: dict[str, list[float]] = {c: [] for c in configs}
    cpu: dict[str, list[float]] = {c: [] for c in configs}
    inside: dict[str, list[float]] = {c: [] for c in configs}
    t0 = time.perf_counter()
    chunk("none", args, loader)  # warm-up fit (imports, allocator)
    for r in range(args.rounds):
        order = configs[r % len(configs) :] + configs[: r % len(configs)]
        for c in order:
            w, u, h = chunk(c, args, loader)
            wall[c].append(w)
            cpu[c].append(u)
            inside[c].append(h)
        print(
            f"round {r + 1}/{args.rounds}: "
            + ", ".join(f"{c} {1e3 * wall[c][-1]:.2f} ms wall / {1e3 * cpu[c][-1]:.2f} ms CPU" for c in configs),
            flush=True,
        )

    def paired(series: dict[str, list[float]], c: str) -> float:
        return statistics.median(a / b for a, b in zip(series[c], series["none"], strict=True))

    base = statistics.median(cpu["none"])
    lines = [
        "| configuration | CPU time / step (ms, median) | CPU ratio to none (paired median) "
        "| wall time / step (ms, median) | wall ratio to none (paired median) | CPU inside probe hooks / step "
        "| one probe step costs (plain steps) |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in configs:
        share = statistics.median(inside[c]) / base
        lines.append(
            f"| {c} | {1e3 * statistics.median(cpu[c]):.2f} | {paired(cpu, c):.3f} | "
            f"{1e3 * statistics.median(wall[c]):.2f} | {paired(wall, c):.3f} | {100 * share:.2f}% | "
            f"{share * 50:.2f} |"
        )
    text = "\n".join(lines)
    text += (
        f"\n\nModel: {args.depth} pre-LN residual MLP blocks of width {args.width} (hidden {2 * args.width}), batch "
        f"{args.batch_size}, AdamW, {args.threads} thread(s); {args.rounds} rounds × {args.steps} timed steps per "
        f"configuration, interleaved; total {time.perf_counter() - t0:.0f} s."
    )
    print(text)
    if args.update_md:
        argv = " ".join(
            f"--{k.replace('_', '-')} {v}"
            for k, v in vars(args).items()
            if k not in ("update_md", "out_dir") and v != parser.get_default(k)
        )
        update_markdown(args.update_md, text, f"python benchmarks/probe_overhead.py {argv}".strip())


if __name__ == "__main__":
    main()
