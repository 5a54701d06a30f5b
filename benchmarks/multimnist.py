"""MultiMNIST as Sener & Koltun built it (*Multi-Task Learning as Multi-Objective Optimization*, NeurIPS 2018),
trained with every weighting of the library through ``MultiTaskGradient``, beside the paper's table.

Data (the authors' released loader, ``multi_task/loaders/multi_mnist_loader.py`` of
github.com/isl-org/MultiObjectiveOptimization): every MNIST image is paired with a uniformly drawn partner; the
image goes to the top-left of a 36×36 canvas (rows/cols 0-27), the partner to the bottom-right (6-33), the overlap
takes the pixel-wise maximum, and the canvas is resized to 28×28 (nearest neighbour). Tasks: the top-left digit
("left") and the bottom-right digit ("right"). Our split: 50k/10k of MNIST train for training/validation (paired
within each part), the 10k MNIST test images for the reported test set; all from a fixed data seed (``--data-seed``),
separate from the training seed.

Network (``multi_task/models/multi_lenet.py``): shared LeNet trunk conv(1→10, 5×5) - maxpool - ReLU -
conv(10→20, 5×5) - dropout2d - maxpool - ReLU - fc(320→50) - ReLU; one head per digit fc(50→50) - ReLU - dropout -
fc(50→10). Training as the first author gave it (isl-org/MultiObjectiveOptimization issue #14): SGD (momentum 0.9
in the released training script), batch 256, lr 0.05, no gradient normalisation, lr × 0.85 every 10 epochs, the
epoch with the best validation accuracy is tested. The paper trains 100 epochs; the default here is far fewer
(see ``multimnist.md``).

    python benchmarks/multimnist.py --seeds 0,1,2 --epochs 4           # all methods, writes multimnist.md
    python benchmarks/multimnist.py --seeds 0 --epochs 1 --limit-train 5 --methods sum,mgda-ub --md /tmp/m.md
    python benchmarks/multimnist.py --seeds 0 --methods sum,mgda,mgda-ub --diagnose   # gradient cosines, weights

On a GPU (``--device cuda``) the three splits live on the GPU and the batches are drawn there (no copies per
step); ``--max-minutes`` stops a run's training after that much wall time (then the best epoch so far is tested;
the row records the epochs run as ``epochs_run``).

Results are appended to ``--out`` (one JSON line per run; runs already there are skipped, so a killed run resumes)
and the table in ``multimnist.md`` is regenerated from all lines with the same configuration.
"""

from __future__ import annotations

import argparse
import functools
import json
import logging
import math
import platform
import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from _report import DATA, RUNS, write_block
from torch import Tensor, nn

import lightning_mtl as mtl
from lightning_gen.ddpm.data import load_mnist
from lightning_mtl.callbacks import MultiTaskGradient

TASKS = ("left", "right")
MD = Path(__file__).with_name("multimnist.md")
BEGIN, END = "<!-- BEGIN multimnist -->", "<!-- END multimnist -->"
DIAG_BEGIN, DIAG_END = "<!-- BEGIN multimnist-gradients -->", "<!-- END multimnist-gradients -->"
MEAN, STD = 0.1307, 0.3081  # the released loader's transforms.Normalize


# ----------------------------------------------------------------------------------------------------------------
# data


def compose(left: Tensor, right: Tensor) -> Tensor:
    """Two ``(N, 28, 28)`` uint8 batches -> ``(N, 28, 28)`` uint8 MultiMNIST images, as the released loader does.

    ``left`` on rows/cols 0-27 and ``right`` on 6-33 of a 36×36 canvas, maximum where they overlap, then
    ``scipy.misc.imresize(canvas, (28, 28), interp="nearest")``: a min-max byte rescale of each canvas and PIL's
    nearest-neighbour sampling (source pixel ``floor((i + 0.5) * 36 / 28)``).
    """
    if left.shape != right.shape or left.ndim != 3 or left.shape[-2:] != (28, 28):
        raise ValueError(f"compose expects two (N, 28, 28) batches, got {tuple(left.shape)} and {tuple(right.shape)}.")
    canvas = torch.zeros(*left.shape[:-2], 36, 36, dtype=torch.uint8)
    canvas[..., :28, :28] = left
    canvas[..., 6:34, 6:34] = torch.maximum(canvas[..., 6:34, 6:34], right)
    src = (torch.arange(28) * 2 + 1) * 36 // 56  # floor((i + 0.5) * 36 / 28)
    small = canvas.index_select(-2, src).index_select(-1, src)  # sampling commutes with the pixel-wise rescale
    lo = canvas.amin(dim=(-2, -1), keepdim=True)
    hi = canvas.amax(dim=(-2, -1), keepdim=True)
    todo = ((lo != 0) | (hi != 255)).flatten()  # the byte rescale is the identity on a 0..255 canvas (most)
    if todo.any():
        lo, hi, part = lo[todo].float(), hi[todo].float(), small[todo].float()
        part = ((part - lo) * (255.0 / (hi - lo).clamp_min(1.0))).clamp(0, 255).add(0.5).floor()
        small[todo] = part.to(torch.uint8)
    return small


def make_multimnist(images: Tensor, labels: Tensor, generator: torch.Generator) -> tuple[Tensor, Tensor, Tensor]:
    """Pair each image with a uniformly drawn partner (the loader's ``np.random.permutation(length)[:1]``).

    Returns images ``(N, 1, 28, 28)`` uint8, the left labels (the images' own) and the right labels (the partners').
    """
    partner = torch.randint(len(images), (len(images),), generator=generator)
    return compose(images, images[partner]).unsqueeze(1), labels.clone(), labels[partner]


@dataclass
class Splits:
    train: tuple[Tensor, Tensor, Tensor]
    val: tuple[Tensor, Tensor, Tensor]
    test: tuple[Tensor, Tensor, Tensor]


@functools.lru_cache(maxsize=2)
def build_splits(root: str | Path = DATA / "mnist", data_seed: int = 0, n_val: int = 10_000) -> Splits:
    """MultiMNIST train/val from MNIST train (split first, then paired within each part), test from MNIST t10k.

    Deterministic given ``data_seed``; independent of the global RNG and of the training seed. Kept in memory
    (the last two calls): the runs only read the tensors.
    """
    g = torch.Generator().manual_seed(data_seed)
    xs, ys = load_mnist(root, "train")
    perm = torch.randperm(len(xs), generator=g)
    tr, va = perm[n_val:], perm[:n_val]
    train = make_multimnist(xs[tr], ys[tr], g)
    val = make_multimnist(xs[va], ys[va], g)
    xt, yt = load_mnist(root, "test")
    return Splits(train, val, make_multimnist(xt, yt, g))


class Batches:
    """Mini-batches of a few tensors, reshuffled from the global RNG at every epoch (seeded by ``seed_everything``)."""

    def __init__(self, tensors: Sequence[Tensor], batch_size: int, shuffle: bool) -> None:
        self.tensors, self.batch_size, self.shuffle = tuple(tensors), batch_size, shuffle

    def __len__(self) -> int:
        return math.ceil(len(self.tensors[0]) / self.batch_size)

    def __iter__(self) -> Iterator[tuple[Tensor, ...]]:
        n = len(self.tensors[0])
        device = self.tensors[0].device
        order = torch.randperm(n, device=device) if self.shuffle else torch.arange(n, device=device)
        for i in range(0, n, self.batch_size):
            idx = order[i : i + self.batch_size]
            yield tuple(t[idx] for t in self.tensors)


# ----------------------------------------------------------------------------------------------------------------
# model


class MultiLeNet(L.LightningModule):
    """The authors' MultiLeNet: a shared LeNet trunk and one two-layer head per task.

    ``tasks`` chooses the heads (one task = the single-task baseline, the same network with one head);
    ``uncertainty=True`` weights the losses with learned log-variances (Kendall et al.) before handing them over.
    The authors' dropout multiplies by a Bernoulli(0.5) mask without rescaling and draws one channel mask per batch;
    here it is the standard inverted dropout (``nn.Dropout2d``/``nn.Dropout``, p = 0.5).
    """

    def __init__(
        self,
        tasks: Sequence[str] = TASKS,
        lr: float = 0.05,
        momentum: float = 0.9,
        decay: float = 0.85,
        decay_every: int = 10,
        uncertainty: bool = False,
    ) -> None:
        super().__init__()
        self.tasks = tuple(tasks)
        self.lr, self.momentum, self.decay, self.decay_every = lr, momentum, decay, decay_every
        self.trunk = nn.Sequential(
            nn.Conv2d(1, 10, 5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Conv2d(10, 20, 5),
            nn.Dropout2d(0.5),
            nn.MaxPool2d(2),
            nn.ReLU(),
            nn.Flatten(),
            nn.Linear(320, 50),
            nn.ReLU(),
        )
        self.heads = nn.ModuleDict(
            {t: nn.Sequential(nn.Linear(50, 50), nn.ReLU(), nn.Dropout(0.5), nn.Linear(50, 10)) for t in self.tasks}
        )
        self.uncertainty = mtl.UncertaintyWeighting(list(self.tasks)) if uncertainty else None
        self.best_score, self.best_epoch, self.best_state = -1.0, -1, None
        self._correct: dict[str, int] = {}
        self._seen = 0

    def features(self, x: Tensor) -> Tensor:
        return self.trunk((x.float() / 255.0 - MEAN) / STD)

    def training_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> Tensor:
        x, labels = batch[0], dict(zip(TASKS, batch[1:]))
        z = self.features(x)
        losses = {t: F.cross_entropy(self.heads[t](z), labels[t]) for t in self.tasks}
        if self.uncertainty is not None:
            losses = self.uncertainty.terms(losses)
        return mtl.task_losses(self, losses, shared=z)

    def on_validation_epoch_start(self) -> None:
        self._correct, self._seen = dict.fromkeys(self.tasks, 0), 0

    def validation_step(self, batch: tuple[Tensor, Tensor, Tensor], batch_idx: int) -> None:
        correct = count_correct(self, batch)
        for t in self.tasks:
            self._correct[t] += correct[t]
        self._seen += len(batch[0])

    def on_validation_epoch_end(self) -> None:
        if self.trainer.sanity_checking or not self._seen:
            return
        score = sum(self._correct.values()) / (self._seen * len(self.tasks))
        if score > self.best_score:  # keep the best epoch's weights in memory (no checkpoint files)
            self.best_score, self.best_epoch = score, self.current_epoch
            self.best_state = {k: v.detach().clone() for k, v in self.state_dict().items()}

    def configure_optimizers(self):
        opt = torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)
        # the released script: at the start of epoch e (from 0), lr *= 0.85 when (e + 1) % 10 == 0
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda e: self.decay ** ((e + 1) // self.decay_every))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "epoch"}}


@torch.no_grad()
def count_correct(model: MultiLeNet, batch: Sequence[Tensor]) -> dict[str, int]:
    z = model.features(batch[0])
    labels = dict(zip(TASKS, batch[1:]))
    return {t: int((model.heads[t](z).argmax(1) == labels[t]).sum()) for t in model.tasks}


@torch.no_grad()
def accuracy(model: MultiLeNet, split: Sequence[Tensor], batch_size: int = 1000, limit: int | None = None) -> dict:
    model.eval()
    n = len(split[0]) if limit is None else min(limit, len(split[0]))
    correct = dict.fromkeys(model.tasks, 0)
    for i in range(0, n, batch_size):
        got = count_correct(model, [t[i : min(i + batch_size, n)] for t in split])
        for t in model.tasks:
            correct[t] += got[t]
    return {t: correct[t] / n for t in model.tasks}


class GradientStats(L.Callback):
    """Per epoch: what ``MultiTaskGradient`` saw at every step (cosine of the two task gradients, share of steps
    where they conflict, the left task's weight, the ratio of the gradient norms), from its ``last_step``."""

    def __init__(self, gradient: MultiTaskGradient) -> None:
        self.gradient = gradient
        self.epochs: list[dict] = []
        self._steps: list[tuple[float, float, float]] = []

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._steps = []

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args) -> None:
        s = self.gradient.last_step
        if s is not None:
            cos, w, norms = s.cosines[0, 1].item(), s.weights.tolist(), s.norms.tolist()
            self._steps.append((cos, w[0] / max(sum(w), 1e-12), norms[0] / max(norms[1], 1e-12)))

    def on_train_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        cos, w_left, ratio = zip(*self._steps)
        self.epochs.append(
            {
                "epoch": trainer.current_epoch + 1,
                "steps": len(cos),
                "cos": round(statistics.fmean(cos), 4),
                "conflict": round(sum(c < 0 for c in cos) / len(cos), 4),
                "w_left": round(statistics.fmean(w_left), 4),
                "w_left_sd": round(statistics.pstdev(w_left), 4),
                "norm_ratio": round(statistics.median(ratio), 4),
            }
        )


# ----------------------------------------------------------------------------------------------------------------
# methods


@dataclass(frozen=True)
class Method:
    label: str  # the table's method column
    mode: str  # "parameter", "representation", or "-" (no callback)
    tasks: tuple[str, ...] = TASKS
    weighting: Callable[[int], nn.Module] | None = None  # seed -> weighting, used through MultiTaskGradient
    uncertainty: bool = False


def _upgrad(seed: int) -> nn.Module:
    from torchjd.aggregation import UPGrad

    return mtl.as_weighting(UPGrad())  # the plug-in route: a torchjd aggregator replaced by its Gramian weighting


METHODS: dict[str, Method] = {
    "single-left": Method("single task (left)", "-", tasks=("left",)),
    "single-right": Method("single task (right)", "-", tasks=("right",)),
    "plain-sum": Method("sum of losses, no callback", "-"),
    "sum": Method("Sum", "parameter", weighting=lambda s: mtl.Sum()),
    "mean": Method("Mean", "parameter", weighting=lambda s: mtl.Mean()),
    "gradnorm": Method("GradNormalize", "parameter", weighting=lambda s: mtl.GradNormalize()),
    "mgda": Method("MGDA", "parameter", weighting=lambda s: mtl.MGDA()),
    "mgda-ub": Method("MGDA (MGDA-UB)", "representation", weighting=lambda s: mtl.MGDA()),
    "pa-left": Method("PrimaryAuxiliary(left)", "parameter", weighting=lambda s: mtl.PrimaryAuxiliary("left")),
    "pa-right": Method("PrimaryAuxiliary(right)", "parameter", weighting=lambda s: mtl.PrimaryAuxiliary("right")),
    "pcgrad": Method("PCGrad", "parameter", weighting=lambda s: mtl.PCGrad(seed=s)),
    "uncertainty": Method("UncertaintyWeighting", "-", uncertainty=True),
    "upgrad": Method("torchjd UPGrad (as_weighting)", "parameter", weighting=_upgrad),
}


def run_one(
    key: str,
    seed: int,
    splits: Splits,
    *,
    epochs: int,
    batch_size: int = 256,
    lr: float = 0.05,
    limit_train: int | float | None = None,
    limit_eval: int | None = None,
    data_seed: int = 0,
    diagnose: bool = False,
    device: str = "cpu",
    max_minutes: float | None = None,
) -> dict:
    """Train one method with one seed; test the epoch with the best validation accuracy (mean over its tasks)."""
    method = METHODS[key]
    start = time.perf_counter()
    L.seed_everything(seed, verbose=False)
    model = MultiLeNet(method.tasks, lr=lr, uncertainty=method.uncertainty)
    callbacks = [] if method.weighting is None else [MultiTaskGradient(method.weighting(seed), mode=method.mode)]
    stats = GradientStats(callbacks[0]) if diagnose and callbacks else None
    if stats is not None:
        callbacks.append(stats)
    on_gpu = torch.device(device).type == "cuda"
    trainer = L.Trainer(
        accelerator="gpu" if on_gpu else "cpu",
        devices=1,
        max_epochs=epochs,
        max_time=None if max_minutes is None else {"minutes": max_minutes},
        callbacks=callbacks,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        num_sanity_val_steps=0,
        limit_train_batches=limit_train,
        limit_val_batches=None if limit_eval is None else max(1, limit_eval // 1000),
        deterministic=not on_gpu,  # the GPU's pooling and scatter kernels have no deterministic version
    )
    if on_gpu:
        splits = Splits(*(tuple(t.to(device) for t in part) for part in splits))
    train = Batches(splits.train, batch_size, shuffle=True)
    val = Batches(splits.val, 1000, shuffle=False)
    trainer.fit(model, train, val)
    model.load_state_dict(model.best_state)
    model.to(splits.test[0].device)  # Lightning's teardown moved it back to the CPU
    test = accuracy(model, splits.test, limit=limit_eval)
    row = {
        "method": f"diagnose:{key}" if stats is not None else key,
        "seed": seed,
        "epochs": epochs,
        "batch_size": batch_size,
        "lr": lr,
        "limit_train": limit_train,
        "limit_eval": limit_eval,
        "data_seed": data_seed,
        "best_epoch": model.best_epoch,
        "epochs_run": trainer.current_epoch,
        "val": round(model.best_score, 5),
        **{t: round(test.get(t, float("nan")), 5) for t in TASKS},
        "wall_s": round(time.perf_counter() - start, 2),
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "device": torch.cuda.get_device_name(device) if on_gpu else "cpu",
    }
    if stats is not None:
        row["gradient_stats"] = stats.epochs
    if method.uncertainty:
        row["log_var"] = [round(v, 4) for v in model.uncertainty.log_var.tolist()]
    return {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()}


# ----------------------------------------------------------------------------------------------------------------
# report

#: Sener & Koltun (NeurIPS 2018), the MultiMNIST table (test accuracy %, top-left / bottom-right digit), with the
#: row of ours that corresponds to each. AS RECALLED, NOT VERIFIED against the paper in this session (no copy of
#: the table could be read here); see multimnist.md.
PAPER = [
    ("Single task", 97.23, 95.90, "single-left / single-right"),
    ("Uniform scaling", 96.46, 94.99, "plain-sum, sum, mean"),
    ("Kendall et al. 2018", 96.47, 95.29, "uncertainty"),
    ("GradNorm", 96.27, 94.84, "none (GradNormalize is a different method)"),
    ("MGDA-UB (the paper's method)", 97.26, 95.90, "mgda-ub"),
]


def _cell(values: list[float]) -> str:
    if not values:
        return "—"
    mean = 100 * statistics.fmean(values)
    sd = 100 * statistics.stdev(values) if len(values) > 1 else float("nan")
    return f"{mean:.2f} ± {sd:.2f}" if not math.isnan(sd) else f"{mean:.2f}"


def summarize(rows: list[dict]) -> dict[str, dict]:
    """Per method: the seeds, the test accuracies per task, the mean wall time."""
    out: dict[str, dict] = {}
    for key in METHODS:
        mine = [r for r in rows if r["method"] == key]
        if not mine:
            continue
        out[key] = {
            "seeds": sorted(r["seed"] for r in mine),
            **{t: [r[t] for r in mine if r.get(t) is not None] for t in TASKS},
            "wall_s": statistics.fmean(r["wall_s"] for r in mine),
            "best_epoch": [r["best_epoch"] + 1 for r in mine],
        }
    return out


def report(rows: list[dict], config: dict) -> str:
    s = summarize(rows)
    seeds = sorted({r["seed"] for r in rows})
    threads = "/".join(str(t) for t in sorted({r["threads"] for r in rows}))
    gpus = sorted({r["device"] for r in rows if r.get("device", "cpu") != "cpu"})
    where = f"one {', '.join(gpus)}, the runs in parallel" if gpus else "a shared 2-core CPU, noisy"
    cut = sorted({r["epochs_run"] for r in rows if r.get("epochs_run", config["epochs"]) < config["epochs"]})
    lines = [
        f"{config['epochs']} epochs, batch {config['batch_size']}, SGD lr {config['lr']} momentum 0.9"
        + (f", {config['limit_train']} training batches per epoch" if config.get("limit_train") else "")
        + f"; seeds {', '.join(map(str, seeds))}; torch {torch.__version__}, {threads} thread(s) per run. "
        "Test accuracy (%) of the epoch with the best validation accuracy, mean ± sd over the seeds; wall time of "
        f"one run (fit + test) on {where}."
        + (f" Some runs stopped at their time limit, after {', '.join(map(str, cut))} epochs." if cut else ""),
        "",
        "| method | mode | left acc | right acc | mean of both | epoch chosen | wall s / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for key, agg in s.items():
        m = METHODS[key]
        both = [(a + b) / 2 for a, b in zip(agg["left"], agg["right"])] if len(m.tasks) == 2 else []
        lines.append(
            f"| {m.label} | {m.mode} | {_cell(agg['left'])} | {_cell(agg['right'])} | {_cell(both)} | "
            f"{'/'.join(map(str, agg['best_epoch']))} | {agg['wall_s']:.0f} |"
        )
    lines += [
        "",
        "Beside the paper (Sener & Koltun 2018, MultiMNIST table; **paper numbers as recalled, unverified**; 100 "
        "epochs, the authors' own runs):",
        "",
        "| paper row | paper left | paper right | our counterpart | our left | our right |",
        "|---|---|---|---|---|---|",
    ]
    for name, left, right, ours in PAPER:
        keys = [k for k in ours.replace("/", ",").replace(" ", "").split(",") if k in s]
        if name == "Single task":
            ol = _cell(s["single-left"]["left"]) if "single-left" in s else "—"
            orr = _cell(s["single-right"]["right"]) if "single-right" in s else "—"
            lines.append(f"| {name} | {left:.2f} | {right:.2f} | single task | {ol} | {orr} |")
            continue
        if not keys:
            lines.append(f"| {name} | {left:.2f} | {right:.2f} | {ours} | — | — |")
        for k in keys:
            lines.append(
                f"| {name} | {left:.2f} | {right:.2f} | {METHODS[k].label} ({METHODS[k].mode}) | "
                f"{_cell(s[k]['left'])} | {_cell(s[k]['right'])} |"
            )
    return "\n".join(lines)


def diagnose_report(rows: list[dict]) -> str:
    lines = [
        "What `MultiTaskGradient` saw at each step of one run (seed 0), averaged per epoch: the cosine of the two "
        "task gradients (parameter mode: of the shared parameters; representation mode: of dL/dz, the whole batch "
        "flattened), the share of steps where they conflict (cosine < 0), the left task's share of the weights "
        "w_left / (w_left + w_right) (its sd over the steps; 0.5 throughout for Sum) and the median ratio "
        "‖g_left‖ / ‖g_right‖.",
        "",
        "| run | mode | epoch | mean cos | steps in conflict | left weight share (sd) | ‖g_left‖/‖g_right‖ |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        m = METHODS[r["method"].removeprefix("diagnose:")]
        for e in r["gradient_stats"]:
            lines.append(
                f"| {m.label} | {m.mode} | {e['epoch']} | {e['cos']:.3f} | {100 * e['conflict']:.1f} % | "
                f"{e['w_left']:.3f} ({e['w_left_sd']:.3f}) | {e['norm_ratio']:.3f} |"
            )
    return "\n".join(lines)


def read_rows(path: Path, config: dict) -> list[dict]:
    if not path.exists():
        return []
    rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return [r for r in rows if all(r.get(k) == v for k, v in config.items())]


def write_report(rows: list[dict], config: dict, md: Path = MD) -> None:
    runs = [r for r in rows if not r["method"].startswith("diagnose:")]
    diag = [r for r in rows if r["method"].startswith("diagnose:")]
    default = "# MultiMNIST (Sener & Koltun 2018) side by side\n"
    if runs:
        write_block(md, BEGIN, END, report(runs, config), default=default)
    if diag:
        write_block(md, DIAG_BEGIN, DIAG_END, diagnose_report(diag), default=default)


def main(argv: Sequence[str] | None = None) -> None:
    """Run the benchmark; the process-wide thread count and Lightning's log level are restored afterwards."""
    lightning_log = logging.getLogger("lightning.pytorch")
    threads, level = torch.get_num_threads(), lightning_log.level
    try:
        _main(argv)
    finally:
        torch.set_num_threads(threads)
        lightning_log.setLevel(level)


def _main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--mnist", default=str(DATA / "mnist"))
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--epochs", type=int, default=4)
    p.add_argument("--methods", default="all", help=f"comma-separated, of: {', '.join(METHODS)}")
    p.add_argument("--limit-train", type=float, default=None, help="training batches per epoch (int) or fraction")
    p.add_argument("--limit-eval", type=int, default=None, help="validation/test images used (quick checks)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--data-seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", default="cpu", help="cpu or cuda (the data then lives on the GPU)")
    p.add_argument("--max-minutes", type=float, default=None, help="stop each run's training after this long")
    p.add_argument("--out", default=str(RUNS / "multimnist" / "results.jsonl"))
    p.add_argument("--md", default=str(MD), help="markdown file whose marked block receives the table")
    p.add_argument(
        "--diagnose",
        action="store_true",
        help="instead: one run (first seed) of each callback method in --methods, recording the task gradients' "
        "cosine, MGDA weights and norm ratio per epoch (a second table)",
    )
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)  # no "GPU available" banner per run
    methods = list(METHODS) if args.methods == "all" else args.methods.split(",")
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        p.error(f"unknown methods {unknown}; choose from {list(METHODS)}")
    limit = args.limit_train
    if limit is not None and limit >= 1:
        limit = int(limit)
    config = {
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "limit_train": limit,
        "limit_eval": args.limit_eval,
        "data_seed": args.data_seed,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    done = {(r["method"], r["seed"]) for r in read_rows(out, config)}
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.diagnose:
        methods = [m for m in methods if METHODS[m].weighting is not None]
        todo = [(seeds[0], key) for key in methods if (f"diagnose:{key}", seeds[0]) not in done]
    else:
        todo = [(seed, key) for seed in seeds for key in methods if (key, seed) not in done]
    splits = build_splits(args.mnist, args.data_seed) if todo else None
    for seed, key in todo:
        row = run_one(
            key,
            seed,
            splits,
            epochs=args.epochs,
            batch_size=args.batch_size,
            lr=args.lr,
            limit_train=limit,
            limit_eval=args.limit_eval,
            data_seed=args.data_seed,
            diagnose=args.diagnose,
            device=args.device,
            max_minutes=args.max_minutes,
        )
        print(json.dumps(row), flush=True)
        with out.open("a") as f:
            f.write(json.dumps(row) + "\n")
    write_report(read_rows(out, config), config, Path(args.md))


if __name__ == "__main__":
    main()
