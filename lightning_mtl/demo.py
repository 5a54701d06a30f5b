"""The main job: ``lightning-mtl demo``.

Three multi-task problems built from scikit-learn's digits (they ship with scikit-learn, nothing is downloaded):

``overlap``
    A MultiMNIST-like problem: two 8×8 digits on an 8×12 canvas, the right one shifted by 4 columns so that they
    overlap in the middle (pixel-wise max). Tasks ``left`` and ``right``: classify each digit; one shared MLP trunk,
    one head per task. PrimaryAuxiliary takes ``left`` as the primary task.
``scales``
    The ``overlap`` problem with the ``left`` loss in other units: multiplied by ``10**3``. MTL(1)
    (https://kexue.fm/archives/8870) argues that a weighting should not care about a task's units: ``Sum`` lets the
    large-scale task own the shared trunk (an optimiser such as Adam normalises the *sum*, not each task), while
    ``GradNormalize`` is scale-invariant and ``MGDA`` looks for a direction that lowers every task.
``noisy``
    The noisy-label case of MTL(3) (https://kexue.fm/archives/8907): the primary task ``noisy`` is cross-entropy on
    training labels of which ``noise`` are replaced by random labels; the auxiliary task ``clean`` is cross-entropy on
    a small clean set. One network, one head: the tasks differ by data, not by parameters.

Each problem is trained with Sum, GradNormalize, MGDA and PrimaryAuxiliary (parameter mode), with the same seed,
data and budget; the job shows one progress bar for all runs, prints per-task test accuracy and the median
training-step time relative to Sum, and saves a PNG.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import statistics
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import lightning_mtl as mtl
from lightning_mtl.callbacks import MultiTaskGradient

__all__ = ["DigitsMultiTask", "NoisyDigits", "OverlapDigits", "main", "run_demo"]


def _digits(seed: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_test = len(y) // 3
    test, train = perm[:n_test], perm[n_test:]
    return x[train], y[train], x[test], y[test]


def overlap_pairs(x: Tensor, y: Tensor, n: int, seed: int, shift: int = 4) -> tuple[Tensor, Tensor]:
    """``n`` random pairs of digits, the second shifted right by ``shift`` columns, merged by max: (n, 8, 8+shift)."""
    g = torch.Generator().manual_seed(seed)
    i = torch.randint(len(y), (n,), generator=g)
    j = torch.randint(len(y), (n,), generator=g)
    canvas = torch.zeros(n, 8, 8 + shift)
    canvas[:, :, :8] = x[i]
    canvas[:, :, shift:] = torch.maximum(canvas[:, :, shift:], x[j])
    return canvas.flatten(1), torch.stack([y[i], y[j]], dim=1)


class _DigitsData(L.LightningDataModule):
    """Shared loaders: seeded shuffled training batches, the whole test set for validation and test."""

    train_set: Dataset
    test_set: Dataset

    def train_dataloader(self) -> DataLoader:
        g = torch.Generator().manual_seed(self.hparams.seed)
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, generator=g, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=512)

    test_dataloader = val_dataloader


class OverlapDigits(_DigitsData):
    """Two overlapping digits per image; batches are ``(x, y)`` with ``y[:, 0]`` left and ``y[:, 1]`` right labels."""

    tasks = ("left", "right")

    def __init__(self, n_train: int = 4000, n_test: int = 2000, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.in_dim = 8 * 12

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        xtr, ytr, xte, yte = _digits(hp.seed)
        self.train_set = TensorDataset(*overlap_pairs(xtr, ytr, hp.n_train, hp.seed + 1))
        self.test_set = TensorDataset(*overlap_pairs(xte, yte, hp.n_test, hp.seed + 2))


class _NoisyPairs(Dataset):
    """Each item: a noisy-label sample and a clean sample (the small clean set is cycled)."""

    def __init__(self, x: Tensor, y_noisy: Tensor, x_clean: Tensor, y_clean: Tensor) -> None:
        self.x, self.y, self.xc, self.yc = x, y_noisy, x_clean, y_clean

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> dict[str, tuple[Tensor, Tensor]]:
        c = i % len(self.yc)
        return {"noisy": (self.x[i], self.y[i]), "clean": (self.xc[c], self.yc[c])}


class NoisyDigits(_DigitsData):
    """Digits with a fraction ``noise`` of the training labels replaced at random, plus ``n_clean`` clean samples.

    Batches are ``{"noisy": (x, y), "clean": (x, y)}``; the test set has clean labels.
    """

    tasks = ("noisy", "clean")

    def __init__(self, noise: float = 0.6, n_clean: int = 60, batch_size: int = 64, seed: int = 0) -> None:
        super().__init__()
        if not 0.0 <= noise < 1.0:
            raise ValueError(f"noise must be in [0, 1), got {noise}.")
        self.save_hyperparameters()
        self.in_dim = 8 * 8

    def setup(self, stage: str | None = None) -> None:
        hp = self.hparams
        xtr, ytr, xte, yte = _digits(hp.seed)
        g = torch.Generator().manual_seed(hp.seed + 3)
        perm = torch.randperm(len(ytr), generator=g)
        clean, rest = perm[: hp.n_clean], perm[hp.n_clean :]
        y_noisy = ytr[rest].clone()
        flip = torch.rand(len(rest), generator=g) < hp.noise
        y_noisy[flip] = torch.randint(10, (int(flip.sum()),), generator=g)
        self.train_set = _NoisyPairs(xtr[rest].flatten(1), y_noisy, xtr[clean].flatten(1), ytr[clean])
        self.test_set = TensorDataset(xte.flatten(1), yte)


class DigitsMultiTask(L.LightningModule):
    """A shared MLP trunk and a linear head per task (or one head for all tasks: ``shared_head=True``).

    Batches are ``(x, y)`` with one label column per task (tasks share the input), or ``{task: (x, y)}`` (tasks have
    their own inputs). ``training_step`` returns :func:`lightning_mtl.task_losses`.
    """

    def __init__(
        self,
        tasks: list[str] | tuple[str, ...] = ("left", "right"),
        in_dim: int = 96,
        hidden: int = 256,
        shared_head: bool = False,
        lr: float = 1e-3,
        loss_scales: dict[str, float] | None = None,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tasks = list(tasks)
        unknown = set(loss_scales or {}) - set(self.tasks)
        if unknown:
            raise ValueError(f"loss_scales names unknown tasks {sorted(unknown)}; the tasks are {self.tasks}.")
        self.loss_scales = {t: float((loss_scales or {}).get(t, 1.0)) for t in self.tasks}
        self.trunk = nn.Sequential(nn.Linear(in_dim, hidden), nn.ReLU(), nn.Linear(hidden, hidden // 2), nn.ReLU())
        n_heads = 1 if shared_head else len(self.tasks)
        self.heads = nn.ModuleList(nn.Linear(hidden // 2, 10) for _ in range(n_heads))

    def head(self, task: str) -> nn.Module:
        return self.heads[0] if self.hparams.shared_head else self.heads[self.tasks.index(task)]

    def training_step(self, batch, batch_idx: int) -> Tensor:
        if isinstance(batch, dict):
            losses = {t: self._scaled(t, self.head(t)(self.trunk(x)), y) for t, (x, y) in batch.items()}
            return mtl.task_losses(self, losses)
        x, y = batch
        z = self.trunk(x)
        losses = {t: self._scaled(t, self.head(t)(z), y[:, i]) for i, t in enumerate(self.tasks)}
        return mtl.task_losses(self, losses, shared=z)

    def _scaled(self, task: str, logits: Tensor, y: Tensor) -> Tensor:
        loss = F.cross_entropy(logits, y)
        scale = self.loss_scales[task]
        return loss if scale == 1.0 else scale * loss

    def validation_step(self, batch, batch_idx: int) -> None:
        x, y = batch
        z = self.trunk(x)
        if y.ndim == 1:  # one clean label per image (the noisy problem): the one classifier's accuracy
            self.log("test_acc/digit", (self.heads[0](z).argmax(-1) == y).float().mean(), prog_bar=True)
            return
        for i, t in enumerate(self.tasks):
            self.log(f"test_acc/{t}", (self.head(t)(z).argmax(-1) == y[:, i]).float().mean(), prog_bar=True)

    test_step = validation_step

    def configure_optimizers(self) -> torch.optim.Optimizer:
        """The plain (not fused) Adam, at every precision and with or without clipping: it can always be clipped
        (Lightning refuses to clip a fused one under ``"16-mixed"`` / ``"bf16-mixed"``) and leaves unscaled
        gradients in ``.grad`` for the probes. The demo's MLP gains nothing from a fused kernel, and its published
        numbers were measured with this Adam, so it does not follow :func:`lightning_mtl._utils.fused_ok`."""
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class StepTimer(L.Callback):
    """Wall time of each training step (forward, backward, gradient rewrite, optimiser step)."""

    def __init__(self) -> None:
        self.times: list[float] = []
        self._t0 = 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self._t0 = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.times.append(time.perf_counter() - self._t0)


@dataclass
class Result:
    problem: str
    method: str
    accuracy: dict[str, float]
    step_ms: float


def methods(primary: str) -> dict[str, Callable[[], MultiTaskGradient | None]]:
    return {
        "Sum": lambda: None,
        "GradNormalize": lambda: MultiTaskGradient(mtl.GradNormalize(scale="mean")),
        "MGDA": lambda: MultiTaskGradient(mtl.MGDA()),
        "PrimaryAuxiliary": lambda: MultiTaskGradient(mtl.PrimaryAuxiliary(primary)),
    }


PROBLEMS = ("overlap", "scales", "noisy")
#: the factor on the ``left`` loss in the ``scales`` problem (its "units")
SCALE = 1e3


def _problem(problem: str, seed: int) -> tuple[Callable[[], L.LightningDataModule], dict, str]:
    """Data factory, model arguments and primary task of one problem."""
    if problem in ("overlap", "scales"):
        scales = {"left": SCALE} if problem == "scales" else None
        kw = dict(tasks=OverlapDigits.tasks, in_dim=96, shared_head=False, loss_scales=scales)
        return (lambda: OverlapDigits(seed=seed)), kw, "left"
    if problem == "noisy":
        return (lambda: NoisyDigits(seed=seed)), dict(tasks=NoisyDigits.tasks, in_dim=64, shared_head=True), "noisy"
    raise ValueError(f"Unknown problem {problem!r}; choose from {', '.join(map(repr, PROBLEMS))}.")


class _Bar(L.Callback):
    """Advances the demo's one progress bar by one step per training batch."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.bar.update(1)


@contextlib.contextmanager
def _quiet_lightning() -> Iterator[None]:
    """No banner, tips, "fit stopped" lines or warnings from the Trainers of the demo's runs."""
    logger = logging.getLogger("lightning.pytorch")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logger.setLevel(level)


def run_demo(
    epochs: int = 8,
    seed: int = 0,
    progress: bool = True,
    problems: tuple[str, ...] = PROBLEMS,
    only: tuple[str, ...] | None = None,
    limit_train_batches: int | float = 1.0,
) -> list[Result]:
    """Train every (problem, method) pair; return the results (also printed and plotted by :func:`main`).

    ``only`` restricts the methods (names as in the table); ``limit_train_batches`` is passed to the Trainer.
    With ``progress``, one bar counts the training steps of all runs; Lightning's own output is silenced.
    """
    runs = []
    for problem in problems:
        make_data, model_kw, primary = _problem(problem, seed)
        runs += [(problem, name, make_cb, make_data, model_kw) for name, make_cb in methods(primary).items()]
    runs = [r for r in runs if only is None or r[1] in only]
    total = 0
    for problem in dict.fromkeys(r[0] for r in runs):
        data = next(r[3] for r in runs if r[0] == problem)()
        data.setup("fit")
        n = len(data.train_dataloader())
        n = min(n, int(limit_train_batches)) if limit_train_batches > 1 else int(n * limit_train_batches)
        total += epochs * n * sum(r[0] == problem for r in runs)
    from tqdm.auto import tqdm

    bar = tqdm(total=total, desc="lightning-mtl demo", unit="step", disable=not progress, leave=True)
    results = []
    with bar, _quiet_lightning():
        for problem, name, make_cb, make_data, model_kw in runs:
            bar.set_postfix_str(f"{problem}: {name}")
            L.seed_everything(seed, verbose=False)
            data, model, timer = make_data(), DigitsMultiTask(**model_kw), StepTimer()
            callbacks = [timer, _Bar(bar)] + ([cb] if (cb := make_cb()) is not None else [])
            trainer = L.Trainer(
                max_epochs=epochs,
                accelerator="cpu",
                devices=1,
                logger=False,
                enable_checkpointing=False,
                enable_model_summary=False,
                enable_progress_bar=False,
                callbacks=callbacks,
                num_sanity_val_steps=0,
                check_val_every_n_epoch=epochs,
                limit_train_batches=limit_train_batches,
            )
            trainer.fit(model, data)
            metrics = trainer.test(model, data, verbose=False)[0]
            acc = {k.split("/", 1)[1]: float(v) for k, v in metrics.items() if k.startswith("test_acc/")}
            skip = min(5, len(timer.times) // 2)  # the first steps include warm-up
            results.append(Result(problem, name, acc, 1e3 * statistics.median(timer.times[skip:])))
    return results


def format_table(results: list[Result]) -> str:
    lines = ["| problem | method | test accuracy per task | step time vs Sum |", "|---|---|---|---|"]
    base = {r.problem: r.step_ms for r in results if r.method == "Sum"}
    for r in results:
        acc = ", ".join(f"{t} {100 * a:.1f}%" for t, a in r.accuracy.items())
        lines.append(f"| {r.problem} | {r.method} | {acc} | {r.step_ms / base[r.problem]:.2f}× ({r.step_ms:.1f} ms) |")
    return "\n".join(lines)


def plot(results: list[Result], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    problems = list(dict.fromkeys(r.problem for r in results))
    fig, axes = plt.subplots(1, len(problems), figsize=(5.5 * len(problems), 3.8), squeeze=False)
    for ax, problem in zip(axes[0], problems, strict=True):
        rows = [r for r in results if r.problem == problem]
        tasks = list(rows[0].accuracy)
        width = 0.8 / len(tasks)
        for i, task in enumerate(tasks):
            xs = [j + i * width for j in range(len(rows))]
            ax.bar(xs, [100 * r.accuracy[task] for r in rows], width=width, label=task)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], [r.method for r in rows], rotation=15)
        lo = min(100 * a for r in rows for a in r.accuracy.values())
        ax.set_ylim(max(0, lo - 10), 100)
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(problem)
        ax.legend(loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="lightning-mtl demo", description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output-dir", default="lightning-mtl-demo")
    parser.add_argument("--problems", default=",".join(PROBLEMS), help="comma-separated: " + ", ".join(PROBLEMS))
    parser.add_argument("--limit-train-batches", type=float, default=1.0, help="fraction (<=1) or number of batches")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    limit = args.limit_train_batches
    results = run_demo(
        args.epochs,
        args.seed,
        not args.no_progress,
        tuple(args.problems.split(",")),
        limit_train_batches=int(limit) if limit > 1 else limit,
    )
    table = format_table(results)
    (out / "results.md").write_text(table + "\n")
    plot(results, out / "accuracy.png")
    print("\n" + table)
    print(f"\nsaved {out / 'accuracy.png'} and {out / 'results.md'} ({time.perf_counter() - t0:.0f} s in all)")
