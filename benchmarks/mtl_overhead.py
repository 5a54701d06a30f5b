"""Step-time overhead of the multi-task gradient engine, as ratios measured in one run.

Shared MLP 784→1024→1024→1024→512 (ReLU), K linear heads 512→10, batch 256 (``--batch``), SGD. Every configuration
runs the same model and batch; the configurations are interleaved step by step (ABCD ABCD ...) so that a noisy,
shared machine slows them alike, and the median step time of each is reported.

Configurations (plain PyTorch loops; one step = forward, backward work, optimiser step):

- ``plain``: backward of the summed loss (what a single-objective step costs).
- ``floor``: one forward + K ``torch.autograd.grad`` backward passes over all parameters, no aggregation: the least
  any exact per-task-gradient method can cost.
- ``floor+gram+write``: the floor, plus the two passes over the K task gradients that any Gramian-based weighting
  needs, with the engine's kernels, as if the backward had left the gradients in one buffer for free: the Gramian
  (reads the K rows) and the write-back into ``.grad`` (reads them again, writes ``.grad``); no copies, no weighting.
  A lower bound for parameter mode on this machine.
- ``ours-param/<w>``: ``GradientEngine`` parameter mode: K-1 ``autograd.grad`` on the shared parameters, the
  ordinary backward, the Gramian (on CPU of the K-1 rows and the total, copied in), weights, write-back.
- ``ours-repr/<w>``: representation mode: K gradients w.r.t. the 512-d features + a hook in the ordinary backward.
- ``torchjd/<w>``: ``torchjd.autojac.mtl_backward`` + ``jac_to_grad`` with torchjd's MGDA and UPGrad aggregators.

Two more tables run a Lightning Trainer (K = 4): separate fits with and without the ``MultiTaskGradient`` callback,
and one fit with the callback switched on for every other step only (steps with and without it side by side).

Usage::

    python benchmarks/mtl_overhead.py            # regenerates the table in benchmarks/README.md
    python benchmarks/mtl_overhead.py --steps 10 --no-write   # quick look
    python benchmarks/mtl_overhead.py --batch 1024 --no-write # the plain-loop table at another batch size
    python benchmarks/mtl_overhead.py --apply-only            # apply() alone: Gramian from the total vs recovery
    python benchmarks/mtl_overhead.py --device cuda           # on a GPU (its own block in benchmarks/README.md)
    python benchmarks/mtl_overhead.py --device cuda --net resnet18 --batch 128 --tasks 2,4,8 --lightning-rounds 0

``--net resnet18``: the same tables on a realistic shared network, a ResNet-18 trunk (11.2 M parameters, CIFAR
stem, 32×32×3 inputs) with K linear heads 512→10; ``--md`` writes the block into another file (e.g. a scratch
copy), ``--lightning-rounds 0`` leaves out the two Trainer tables.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from _report import write_block
from torch import nn

import lightning_mtl as mtl
from lightning_mtl.callbacks import MultiTaskGradient
from lightning_mtl.demo import StepTimer
from lightning_mtl.engine import GradientEngine
from lightning_mtl.engine._common import add_combination, gramian
from lightning_mtl.tasks import TaskLosses

README = Path(__file__).with_name("README.md")
BATCH = 256  #: the batch size of every table (the plain-loop one takes ``--batch``)


class EveryOtherStep(MultiTaskGradient):
    """:class:`MultiTaskGradient` on the even steps of a fit only (batch index 0, 2, ...); the odd steps train as if
    it were not attached. One fit then times steps with and without it side by side."""

    on = False

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.on = batch_idx % 2 == 0
        if self.on:
            super().on_train_batch_start(trainer, pl_module, batch, batch_idx)

    def on_before_backward(self, trainer, pl_module, loss):
        if self.on:
            super().on_before_backward(trainer, pl_module, loss)

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        if self.on:
            super().on_before_optimizer_step(trainer, pl_module, optimizer)


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


class BasicBlock(nn.Module):
    """ResNet's basic block: two 3×3 convolutions with batch norm, identity (or 1×1 projection) shortcut."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride, 1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, 1, 1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.skip = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.skip(x))


class ResNet18(Net):
    """A ResNet-18 trunk (CIFAR stem: one 3×3 convolution, no max-pool; 11.2 M parameters) and K heads 512→10."""

    def __init__(self, k: int) -> None:
        nn.Module.__init__(self)
        layers: list[nn.Module] = [nn.Conv2d(3, 64, 3, 1, 1, bias=False), nn.BatchNorm2d(64), nn.ReLU(inplace=True)]
        cin = 64
        for cout, stride in ((64, 1), (128, 2), (256, 2), (512, 2)):
            layers += [BasicBlock(cin, cout, stride), BasicBlock(cout, cout, 1)]
            cin = cout
        layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten()]
        self.trunk = nn.Sequential(*layers)
        self.heads = nn.ModuleList(nn.Linear(512, 10) for _ in range(k))


#: the shared networks: class and the shape of one input
NETS: dict[str, tuple[type[Net], tuple[int, ...]]] = {"mlp": (Net, (784,)), "resnet18": (ResNet18, (3, 32, 32))}


def make_steps(k: int, device: str = "cpu", batch: int = BATCH, net: str = "mlp") -> dict[str, Callable[[], None]]:
    net_cls, shape = NETS[net]
    torch.manual_seed(0)
    x = torch.randn(batch, *shape, device=device)
    y = torch.randint(0, 10, (batch, k), device=device)
    steps: dict[str, Callable[[], None]] = {}

    def fresh() -> tuple[Net, torch.optim.Optimizer]:
        torch.manual_seed(0)
        net = net_cls(k).to(device)
        return net, torch.optim.SGD(net.parameters(), lr=1e-3)

    net_p, opt_p = fresh()

    def plain() -> None:
        losses, _ = net_p.losses(x, y)
        opt_p.zero_grad()
        torch.stack(list(losses.values())).sum().backward()
        opt_p.step()

    steps["plain"] = plain

    def k_backward_passes(net: Net, params: list[nn.Parameter]) -> None:
        """One forward and K ``autograd.grad`` passes over ``params``; the last task's gradient left in ``.grad``."""
        losses, _ = net.losses(x, y)
        for i, loss in enumerate(losses.values()):
            grads = torch.autograd.grad(loss, params, retain_graph=i < k - 1, allow_unused=True)
        for p, g in zip(params, grads):
            p.grad = g

    net_f, opt_f = fresh()
    params_f = list(net_f.parameters())

    def floor() -> None:
        opt_f.zero_grad()
        k_backward_passes(net_f, params_f)
        opt_f.step()

    steps["floor"] = floor

    net_b, opt_b = fresh()
    params_b, shared_b = list(net_b.parameters()), list(net_b.trunk.parameters())
    rows = torch.randn(k, sum(p.numel() for p in shared_b), device=device)  # the K task gradients, laid out for free
    combination = torch.full((1, k - 1), 1.0 / k, device=device)

    def bound() -> None:
        opt_b.zero_grad()
        k_backward_passes(net_b, params_b)
        gramian(rows)
        add_combination(1.0 / k, combination, rows[:-1], shared_b)
        opt_b.step()

    steps["floor+gram+write"] = bound

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


def _on_gpu(device: str) -> bool:
    return torch.device(device).type == "cuda"


def _sync(device: str) -> None:
    """Wait for the accelerator, so that a wall-clock interval covers the work queued in it."""
    if _on_gpu(device):
        torch.cuda.synchronize(device)


def measure(steps: dict[str, Callable[[], None]], n: int, warmup: int = 3, device: str = "cpu") -> dict[str, float]:
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i in range(warmup + n):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            if i >= warmup:
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def apply_paths(k: int, steps: int, device: str = "cpu") -> dict[str, float]:
    """Median time of ``GradientEngine.apply`` alone (parameter mode, MGDA), interleaved: the last task read off the
    total gradient (the CPU/fp32 path) and recovered by subtraction (the path elsewhere, forced here). On a GPU both
    run the recovery path."""
    torch.manual_seed(0)
    x, y = torch.randn(BATCH, 784, device=device), torch.randint(0, 10, (BATCH, k), device=device)
    net = Net(k).to(device)
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
            _sync(device)
            t0 = time.perf_counter()
            engine.apply()
            _sync(device)
            if i >= 3:
                times[name].append(time.perf_counter() - t0)
    return {name: 1e3 * statistics.median(ts) for name, ts in times.items()}


def _lightning_module(k: int) -> type:
    class Module(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = Net(k)

        def training_step(self, batch, batch_idx):
            losses, z = self.net.losses(*batch)
            return mtl.task_losses(self, losses, shared=z)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=1e-3)

    return Module


class _Synchronize(L.Callback):
    """Waits for the accelerator at the start and end of each step; placed before the step timer, so that the
    timer's interval covers the work the step queued."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        _sync(str(pl_module.device))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        _sync(str(pl_module.device))


def _trainer_data(k: int, steps: int) -> torch.utils.data.TensorDataset:
    """``steps`` batches of :data:`BATCH` random inputs with K labels each (seeded)."""
    torch.manual_seed(0)
    return torch.utils.data.TensorDataset(torch.randn(BATCH * steps, 784), torch.randint(0, 10, (BATCH * steps, k)))


def _fit(module, data, callbacks: list, device: str = "cpu") -> None:
    on_gpu = _on_gpu(device)
    trainer = L.Trainer(
        max_epochs=1,
        accelerator="gpu" if on_gpu else "cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[_Synchronize(), *callbacks] if on_gpu else callbacks,
    )
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=BATCH))


def lightning_overhead(
    k: int, rounds: int, steps_per_round: int, device: str = "cpu"
) -> dict[str, tuple[float, list[float]]]:
    """Per configuration: the median step time over all rounds, and its ratio to the Trainer without the callback
    in each round (the fits of one round run back to back, so a slow drift of the machine cancels in the ratio)."""
    module_cls = _lightning_module(k)
    data = _trainer_data(k, steps_per_round)
    configs = {
        "Trainer, no callback": lambda: [],
        "Trainer + MultiTaskGradient(MGDA)": lambda: [MultiTaskGradient(mtl.MGDA(), validate=False)],
        "Trainer + MultiTaskGradient(MGDA, representation)": lambda: [
            MultiTaskGradient(mtl.MGDA(), mode="representation", validate=False)
        ],
    }
    times: dict[str, list[float]] = {c: [] for c in configs}
    ratios: dict[str, list[float]] = {c: [] for c in configs}
    for _ in range(rounds):
        medians: dict[str, float] = {}
        for name, cbs in configs.items():
            timer = StepTimer()
            _fit(module_cls(), data, [timer, *cbs()], device)
            times[name] += timer.times[2:]
            medians[name] = statistics.median(timer.times[2:])
        for name, ms in medians.items():
            ratios[name].append(ms / medians["Trainer, no callback"])
    return {name: (1e3 * statistics.median(ts), ratios[name]) for name, ts in times.items()}


def lightning_alternating(
    k: int, rounds: int, steps: int, device: str = "cpu"
) -> dict[str, tuple[float, float, list[float]]]:
    """The callback switched on for the even steps of one fit only, so that steps with and without it alternate in
    the same Trainer, process and memory state. Per configuration: the median step time with and without it, and
    the ratio of the two medians in each round (one fit of ``steps`` steps)."""
    module_cls = _lightning_module(k)
    data = _trainer_data(k, steps)
    configs = {"MultiTaskGradient(MGDA)": "parameter", "MultiTaskGradient(MGDA, representation)": "representation"}
    out: dict[str, tuple[list[float], list[float], list[float]]] = {c: ([], [], []) for c in configs}
    for _ in range(rounds):
        for name, mode in configs.items():
            timer = StepTimer()
            _fit(module_cls(), data, [timer, EveryOtherStep(mtl.MGDA(), mode=mode, validate=False)], device)
            on, off = timer.times[2::2], timer.times[3::2]
            out[name][0].extend(on)
            out[name][1].extend(off)
            out[name][2].append(statistics.median(on) / statistics.median(off))
    return {
        name: (1e3 * statistics.median(on), 1e3 * statistics.median(off), ratios)
        for name, (on, off, ratios) in out.items()
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30, help="measured steps per configuration")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured steps per configuration first")
    parser.add_argument("--tasks", default="2,4")
    parser.add_argument("--batch", type=int, default=BATCH, help="batch size of the plain-loop table")
    parser.add_argument("--lightning-rounds", type=int, default=8)
    parser.add_argument("--no-write", action="store_true")
    parser.add_argument("--apply-only", action="store_true", help="time apply() alone, the two last-task paths")
    parser.add_argument(
        "--device", default="cpu", help="cpu or cuda; a CUDA run writes its own block (mtl_overhead_cuda)"
    )
    parser.add_argument("--net", choices=sorted(NETS), default="mlp", help="the shared network of the plain-loop table")
    parser.add_argument("--md", type=Path, default=README, help="the markdown file that receives the block")
    args = parser.parse_args()
    device = args.device
    if args.apply_only:
        for k in (int(s) for s in args.tasks.split(",")):
            for name, ms in apply_paths(k, args.steps, device).items():
                print(f"K={k} apply, {name}: {ms:.2f} ms", flush=True)
        return

    on_gpu = _on_gpu(device)
    where = torch.cuda.get_device_name(device) if on_gpu else f"{torch.get_num_threads()} CPU threads"
    shared = "a ResNet-18 trunk (32×32×3 inputs)" if args.net == "resnet18" else "the MLP"
    lines = [
        f"Median step time over {args.steps} interleaved steps (after {args.warmup} unmeasured), {shared}, "
        f"batch {args.batch}, {where}, torch "
        f"{torch.__version__}. Ratios are within one run.",
        "",
        "| K | configuration | ms / step | vs plain | vs floor |",
        "|---|---|---|---|---|",
    ]
    for k in (int(s) for s in args.tasks.split(",")):
        result = measure(make_steps(k, device, args.batch, args.net), args.steps, args.warmup, device)
        for name, ms in result.items():
            lines.append(f"| {k} | {name} | {ms:.1f} | {ms / result['plain']:.2f}× | {ms / result['floor']:.2f}× |")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    if args.lightning_rounds > 0:
        table += "\n" + lightning_tables(args.lightning_rounds, device)
    if not args.no_write:
        tag = "mtl_overhead_cuda" if on_gpu else "mtl_overhead"
        tag += "" if args.net == "mlp" else f"_{args.net}"
        write_block(args.md, f"<!-- BEGIN {tag} -->", f"<!-- END {tag} -->", table, default="# Benchmarks\n")
        print(f"wrote {args.md}")


def lightning_tables(rounds: int, device: str) -> str:
    """The two Trainer tables (K = 4, the MLP): separate fits, and the callback on every other step of one fit."""
    lines: list[str] = []
    lk = lightning_overhead(4, rounds, 20, device)
    lines += [
        "",
        f"Inside a Lightning Trainer (K = 4, {rounds} rounds of one fit of 20 steps per configuration; "
        "ms / step: the median over all rounds; vs no callback: the median, and the range, of the ratio of the "
        "fit's median step to that of the fit without the callback in the same round):",
        "",
        "| configuration | ms / step | vs no callback | range over rounds |",
        "|---|---|---|---|",
    ]
    for name, (ms, ratios) in lk.items():
        lines.append(f"| {name} | {ms:.1f} | {statistics.median(ratios):.2f}× | {min(ratios):.2f}-{max(ratios):.2f}× |")
        print(lines[-1], flush=True)
    alt = lightning_alternating(4, max(1, rounds // 2), 40, device)
    lines += [
        "",
        f"The callback on every other step of one fit (K = 4, {max(1, rounds // 2)} fits of 40 steps per "
        "configuration; with / without: median step time; ratio: the median, and the range, over the fits of the "
        "ratio of the two medians):",
        "",
        "| configuration | with (ms) | without (ms) | ratio | range over fits |",
        "|---|---|---|---|---|",
    ]
    for name, (on, off, ratios) in alt.items():
        lines.append(
            f"| {name} | {on:.1f} | {off:.1f} | {statistics.median(ratios):.2f}× | "
            f"{min(ratios):.2f}-{max(ratios):.2f}× |"
        )
        print(lines[-1], flush=True)
    return "\n".join(lines)


if __name__ == "__main__":
    main()
