r"""Increment explosion, seen through the probes: a deep stack with and without residual scaling.

Su (https://kexue.fm/archives/8994) and DeepNet (Wang et al., https://arxiv.org/abs/2203.00555; Su's reading
https://kexue.fm/archives/8978) argue that the change of the model in one optimizer step grows with depth unless the
residual branches are scaled down. This script trains the same deep stack of FFN blocks
:math:`F(x) = W_2\,\mathrm{ReLU}(W_1 x)` on scikit-learn's digits (8×8 images, 10 classes; ships with scikit-learn)
in five variants and measures, with :class:`~lightning_mtl.callbacks.ResidualProbe` and
:class:`~lightning_mtl.callbacks.GradientMagnitudeProbe` at every step:

========== =============================================== =====================================================
variant    block                                           notes
========== =============================================== =====================================================
plain      :math:`y = F(x)`                                no residual; He/LeCun init keeps the forward stable
res        :math:`y = x + F(x)`                            :math:`\varepsilon = 1`
res_scaled :math:`y = x + F(x)/\sqrt{M}`                   :math:`\varepsilon = 1/\sqrt{M}` (Su)
postln     :math:`y = \mathrm{LN}(x + F(x))`               Post-LN, DeepNet's baseline
deepnorm   :math:`y = \mathrm{LN}(\alpha x + F(x))`        :math:`\alpha = (2N)^{1/4}`, init of :math:`W_{1,2}`
                                                           × :math:`\beta = (8N)^{-1/4}` (DeepNet, encoder-only)
========== =============================================== =====================================================

:math:`M` is the number of blocks (sublayers); DeepNet counts :math:`N` layers of 2 sublayers, so here
:math:`N = M/2`. Reported per variant and depth: the model update :math:`\|F(x;\theta_t) - F(x;\theta_0)\|` of the
output on a fixed probe batch after the first step and after ``--steps`` steps (DeepNet's figure), the relative update
of the last block's output, the observed loss change of the first step beside :math:`\langle g,\Delta\theta\rangle`
and the article's prediction (:math:`-\eta\|g\|_1` for Adam, :math:`-\eta\|g\|_2^2` for SGD), and the final loss.

Run (small default, ~1 minute on 2 CPU cores)::

    python examples/deepnet_probe.py

The full reproduction (48 blocks; a few minutes)::

    python examples/deepnet_probe.py --depths 6 12 24 48 --steps 100 --update-md benchmarks/probes.md
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

import lightning.pytorch as pl
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_mtl.callbacks import GradientMagnitudeProbe, ResidualProbe

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))  # the table writer of the benchmarks
from _report import write_block

VARIANTS = ("plain", "res", "res_scaled", "postln", "deepnorm")


class FFNBlock(nn.Module):
    """One sublayer of the stack in the given variant (see the module docstring)."""

    def __init__(self, width: int, variant: str, blocks: int) -> None:
        super().__init__()
        self.variant = variant
        self.fc1 = nn.Linear(width, width)
        self.fc2 = nn.Linear(width, width)
        nn.init.kaiming_normal_(self.fc1.weight, nonlinearity="relu")  # He: keeps E|ReLU(W1 x)|^2 = E|x|^2
        nn.init.normal_(self.fc2.weight, std=1 / math.sqrt(width))  # LeCun for the linear output
        nn.init.zeros_(self.fc1.bias)
        nn.init.zeros_(self.fc2.bias)
        self.alpha, self.eps = 1.0, 1.0
        if variant == "res_scaled":
            self.eps = 1 / math.sqrt(blocks)
        if variant == "deepnorm":
            layers = blocks / 2  # DeepNet's N counts layers of 2 sublayers
            self.alpha = (2 * layers) ** 0.25
            beta = (8 * layers) ** -0.25
            with torch.no_grad():
                self.fc1.weight.mul_(beta)
                self.fc2.weight.mul_(beta)
        self.norm = nn.LayerNorm(width) if variant in ("postln", "deepnorm") else nn.Identity()

    def branch(self, x: Tensor) -> Tensor:
        return self.fc2(torch.relu(self.fc1(x)))

    def forward(self, x: Tensor) -> Tensor:
        if self.variant == "plain":
            return self.branch(x)
        return self.norm(self.alpha * x + self.eps * self.branch(x))


class DeepStack(pl.LightningModule):
    def __init__(self, variant: str, blocks: int, width: int, lr: float, optimizer: str) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.inp = nn.Linear(64, width)
        self.blocks = nn.ModuleList([FFNBlock(width, variant, blocks) for _ in range(blocks)])
        self.head = nn.Linear(width, 10)

    def forward(self, x: Tensor) -> Tensor:
        h = self.inp(x)
        for block in self.blocks:
            h = block(h)
        return self.head(h)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return nn.functional.cross_entropy(self(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        if self.hparams.optimizer == "sgd":
            return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


def digits_loader(batch_size: int) -> DataLoader:
    x, y = load_digits(return_X_y=True)
    x = torch.tensor(x, dtype=torch.float32)
    x = (x - x.mean(0)) / (x.std(0) + 1e-6)
    ds = TensorDataset(x, torch.tensor(y))
    return DataLoader(ds, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(0))


def run(variant: str, blocks: int, args: argparse.Namespace) -> dict[str, float]:
    pl.seed_everything(0, verbose=False)
    model = DeepStack(variant, blocks, args.width, args.lr, args.optimizer)
    rp = ResidualProbe(every_n_steps=1, probe_size=args.probe_size, plot=False)
    gp = GradientMagnitudeProbe(every_n_steps=1, layers="all", plot=False)
    trainer = pl.Trainer(
        max_steps=args.steps,
        callbacks=[rp, gp],
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
        default_root_dir=args.out_dir,
    )
    trainer.fit(model, digits_loader(args.batch_size))
    last = rp.block_names[-1]
    first_step = gp.history[0]
    r = {
        "output_norm_0": rp.history[0]["output_norm"],
        "update_1": rp.history[1]["model_update"],
        "rel_update_1": rp.history[1]["model_update/relative"],
        "update_T": rp.history[-1]["model_update"],
        "block_update_T": rp.history[-1][f"block_update/{last}"],
        "branch_ratio_0": sum(rp.history[0][f"branch_ratio/{b}"] for b in rp.block_names) / len(rp.block_names),
        "dl_obs_1": first_step.get("loss_change/observed", math.nan),
        "dl_lin_1": first_step["loss_change/linear"],
        "dl_pred_1": first_step["loss_change/predicted"],
        "grad_norm_1": first_step["grad_norm/total"],
        "loss_T": float(trainer.callback_metrics.get("train_loss", math.nan)),
        "curve": [h["model_update"] for h in rp.history],
    }
    with torch.no_grad():
        x, y = next(iter(digits_loader(512)))
        r["loss_T"] = float(nn.functional.cross_entropy(model(x), y))
    return r


def fmt(v: float) -> str:
    if not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if 1e-3 <= abs(v) < 1e4 or v == 0 else f"{v:.2e}"


def table(results: dict[tuple[str, int], dict[str, float]], args: argparse.Namespace) -> str:
    pred = "−η‖g‖₁" if args.optimizer == "adam" else "−η‖g‖²"
    head = (
        f"| variant | blocks M | ‖F(x;θ₀)‖ | model update step 1 | relative | model update step {args.steps} | "
        f"last block rel. update step {args.steps} | mean branch ratio at init | ΔL obs. step 1 | ⟨g,Δθ⟩ step 1 | "
        f"{pred} step 1 | ‖g‖ step 1 | loss step {args.steps} |"
    )
    lines = [head, "|" + "|".join(["---"] * 13) + "|"]
    for (variant, blocks), r in results.items():
        cells = [variant, str(blocks)] + [
            fmt(r[k])
            for k in (
                "output_norm_0", "update_1", "rel_update_1", "update_T", "block_update_T", "branch_ratio_0",
                "dl_obs_1", "dl_lin_1", "dl_pred_1", "grad_norm_1", "loss_T",
            )
        ]  # fmt: skip
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(results: dict[tuple[str, int], dict[str, float]], path: str) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 4))
    FigureCanvasAgg(fig)
    left, right = fig.subplots(1, 2)
    depths = sorted({m for _, m in results})
    for variant in VARIANTS:
        ys = [results[(variant, m)]["update_1"] for m in depths if (variant, m) in results]
        if ys:
            right.plot(depths[: len(ys)], ys, marker="o", label=variant)
        if (variant, depths[-1]) in results:
            curve = results[(variant, depths[-1])]["curve"]
            left.plot(range(len(curve)), curve, label=variant)
    left.set(
        xlabel="step", ylabel="‖F(x;θ_t) − F(x;θ_0)‖", title=f"model update, M = {depths[-1]} blocks", yscale="log"
    )
    right.set(
        xlabel="blocks M", ylabel="model update after one step", title="one-step model update vs depth", yscale="log"
    )
    left.legend(fontsize="small")
    right.legend(fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def update_markdown(path: str, text: str, command: str) -> None:
    write_block(path, "<!-- deepnet_probe:start -->", "<!-- deepnet_probe:end -->", f"Command: `{command}`\n\n{text}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depths", type=int, nargs="+", default=[4, 16], help="numbers of blocks M")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--width", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--probe-size", type=int, default=64)
    parser.add_argument("--optimizer", choices=("adam", "sgd"), default="adam")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the model is tiny: 1 is fastest)")
    parser.add_argument("--out-dir", default="runs/deepnet_probe")
    parser.add_argument("--update-md", default=None, help="replace the deepnet_probe section of this markdown file")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    os.makedirs(args.out_dir, exist_ok=True)
    results: dict[tuple[str, int], dict[str, float]] = {}
    t0 = time.perf_counter()
    for blocks in args.depths:
        for variant in args.variants:
            results[(variant, blocks)] = run(variant, blocks, args)
            r = results[(variant, blocks)]
            print(
                f"{variant:>10} M={blocks:<3} update@1={fmt(r['update_1'])} update@{args.steps}={fmt(r['update_T'])} "
                f"dL_obs@1={fmt(r['dl_obs_1'])} loss={fmt(r['loss_T'])}  ({time.perf_counter() - t0:.0f}s)",
                flush=True,
            )
    text = table(results, args)
    print(text)
    png = os.path.join(args.out_dir, "deepnet_probe.png")
    plot(results, png)
    print(f"figure: {png}")
    if args.update_md:
        argv = " ".join(
            f"--{k.replace('_', '-')} {' '.join(map(str, v)) if isinstance(v, list) else v}"
            for k, v in vars(args).items()
            if k not in ("update_md", "out_dir", "threads") and v != parser.get_default(k)
        )
        update_markdown(args.update_md, text, f"python examples/deepnet_probe.py {argv}".strip())


if __name__ == "__main__":
    main()
