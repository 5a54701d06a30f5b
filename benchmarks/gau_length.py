"""Length generalisation of the GAU LM's attention normalisers (and: does the auxiliary t+2 task help?).

``--study length`` trains one causal GAU LM per (normaliser, training length, seed) with the same budget (steps,
batch, learning-rate schedule), then measures bits-per-character on held-out text at 64 ... 1024 tokens: the
same held-out tokens at every length, every position scored (the setting of https://kexue.fm/archives/8823's table).

``--study aux`` trains softmax_plus at one length three ways with the same seed and budget: main loss only; main +
auxiliary (token t+2) summed; main + auxiliary under ``MultiTaskGradient(PrimaryAuxiliary(primary="lm"))``.

Both write JSON (``--out``) and a markdown table; ``--md benchmarks/gau.md`` replaces the table between the markers
``<!-- gau_length:begin/end -->`` (or ``gau_aux``). Runs go to ``--workers`` processes of ``--threads`` threads each.

    python benchmarks/gau_length.py --study length --md benchmarks/gau.md
    python benchmarks/gau_length.py --study aux --md benchmarks/gau.md
    python benchmarks/gau_length.py --device cuda --workers 8 --dim 256 --depth 4 --steps 3000 --minutes 3 --md x.md

``--device cuda`` trains every run on the GPU (``--workers`` processes share it); ``--minutes`` stops a run's
training after that much wall time (the learning-rate schedule still spans ``--steps``; the steps actually run are
reported).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

DEFAULT_DATA = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare" / "input.txt")


def run_one(cfg: dict) -> dict:
    """Train one model as ``cfg`` says and return its held-out bits-per-character at every evaluation length."""
    import torch

    torch.set_num_threads(cfg["threads"])
    import lightning as L

    import lightning_mtl as mtl
    from lightning_gen.gau import GAULanguageModel, TextDataModule
    from lightning_mtl.callbacks import MultiTaskGradient

    L.seed_everything(cfg["seed"], verbose=False)
    dm = TextDataModule(
        cfg["data"],
        vocab="byte",
        seq_len=cfg["train_len"],
        batch_size=cfg["batch"],
        steps_per_epoch=cfg["steps"],
        seed=cfg["seed"],
    )
    model = GAULanguageModel(
        dim=cfg["dim"],
        depth=cfg["depth"],
        qk_dim=cfg["qk_dim"],
        attention=cfg["attention"],
        length=cfg["length"],
        aux=cfg["aux"] != "none",
        lr=cfg["lr"],
        warmup_steps=cfg["warmup"],
        max_steps=cfg["steps"],
    )
    callbacks = []
    if cfg["aux"] == "primary":
        callbacks.append(MultiTaskGradient(mtl.PrimaryAuxiliary(primary="lm"), validate=False))
    on_gpu = cfg.get("device", "cpu") == "cuda"
    trainer = L.Trainer(
        max_steps=cfg["steps"],
        max_time=None if cfg.get("minutes") is None else {"minutes": cfg["minutes"]},
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        callbacks=callbacks,
        accelerator="gpu" if on_gpu else "cpu",
        devices=1,
    )
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    train_s = time.perf_counter() - t0
    steps_run = trainer.global_step
    if on_gpu:
        model.to("cuda")  # Lightning's teardown moved it back to the CPU
    bpc = {}
    for n in cfg["eval_lens"]:
        loader = dm.eval_dataloader(n, max_windows=max(1, cfg["eval_tokens"] // n), batch_size=max(1, 4096 // n))
        bpc[n] = model.bits_per_character(loader)
    return {**cfg, "bpc": bpc, "train_s": train_s, "steps_run": steps_run, "eval_s": time.perf_counter() - t0 - train_s}


def _table_length(results: list[dict], eval_lens: list[int]) -> str:
    groups: dict[tuple, list[dict]] = {}
    for r in results:
        groups.setdefault((r["train_len"], r["attention"], r["length"]), []).append(r)
    lines = [
        "| train n | attention (n in relu²/n, log n) | seeds | "
        + " | ".join(f"n={n}" for n in eval_lens)
        + " | 8× / 1× |",
        "|---|---|---|" + "---|" * len(eval_lens) + "---|",
    ]
    for (tl, att, length), rs in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][2] != "visible", kv[0][1])):
        cells = []
        for n in eval_lens:
            vals = [r["bpc"][n] for r in rs]
            cells.append(f"{statistics.mean(vals):.3f}" + (f" ± {statistics.stdev(vals):.3f}" if len(vals) > 1 else ""))
        ratio = [r["bpc"][8 * tl] / r["bpc"][tl] for r in rs if 8 * tl in r["bpc"]]
        rtxt = f"{statistics.mean(ratio):.3f}" if ratio else "–"
        lines.append(f"| {tl} | {att} ({length}) | {len(rs)} | " + " | ".join(cells) + f" | {rtxt} |")
    return "\n".join(lines)


def _table_aux(results: list[dict]) -> str:
    names = {"none": "main loss only", "sum": "main + aux, summed", "primary": "main + aux, PrimaryAuxiliary"}
    lines = ["| training | seed | val bpc (main, n=train) | train s |", "|---|---|---|---|"]
    for r in sorted(results, key=lambda r: (list(names).index(r["aux"]), r["seed"])):
        tl = r["train_len"]
        lines.append(f"| {names[r['aux']]} | {r['seed']} | {r['bpc'][tl]:.3f} | {r['train_s']:.0f} |")
    return "\n".join(lines)


def _replace(md: Path, key: str, text: str) -> None:
    from _report import write_block  # here: the workers set torch's threads before importing it

    write_block(md, f"<!-- {key}:begin -->", f"<!-- {key}:end -->", text)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--study", choices=["length", "aux"], default="length")
    p.add_argument("--data", default=DEFAULT_DATA)
    p.add_argument("--attentions", nargs="+", default=["relu2", "softmax", "softmax_plus"])
    p.add_argument("--train-lens", nargs="+", type=int, default=[64, 128])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="seeds at the first training length")
    p.add_argument("--other-seeds", nargs="+", type=int, default=[0], help="seeds at the other training lengths")
    p.add_argument(
        "--total",
        nargs="*",
        default=["relu2", "softmax_plus"],
        help="also run these with length='total' (first training length, first seed)",
    )
    p.add_argument("--eval-lens", nargs="+", type=int, default=[64, 128, 256, 512, 1024])
    p.add_argument("--eval-tokens", type=int, default=16384)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=3)
    p.add_argument("--qk-dim", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=30)
    p.add_argument("--aux-len", type=int, default=128)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--minutes", type=float, default=None, help="stop each run's training after this long")
    p.add_argument("--out", default=None)
    p.add_argument("--md", default=None)
    a = p.parse_args(argv)

    base = dict(
        data=a.data,
        eval_lens=a.eval_lens,
        eval_tokens=a.eval_tokens,
        steps=a.steps,
        batch=a.batch,
        dim=a.dim,
        depth=a.depth,
        qk_dim=a.qk_dim,
        lr=a.lr,
        warmup=a.warmup,
        threads=a.threads,
        device=a.device,
        minutes=a.minutes,
    )
    cfgs = []
    if a.study == "length":
        for i, tl in enumerate(a.train_lens):
            for seed in a.seeds if i == 0 else a.other_seeds:
                for att in a.attentions:
                    cfgs.append(
                        {**base, "train_len": tl, "seed": seed, "attention": att, "length": "visible", "aux": "none"}
                    )
        for att in a.total:
            cfgs.append(
                {
                    **base,
                    "train_len": a.train_lens[0],
                    "seed": a.seeds[0],
                    "attention": att,
                    "length": "total",
                    "aux": "none",
                }
            )
    else:
        for seed in a.seeds:
            for aux in ("none", "sum", "primary"):
                cfgs.append(
                    {
                        **base,
                        "train_len": a.aux_len,
                        "seed": seed,
                        "attention": "softmax_plus",
                        "length": "visible",
                        "aux": aux,
                        "eval_lens": [a.aux_len],
                    }
                )
    out = Path(a.out or f"benchmarks/gau_{a.study}.json")
    print(
        f"{len(cfgs)} runs on {a.workers} worker(s) x {a.threads} thread(s); {a.steps} steps x {a.batch} windows",
        flush=True,
    )
    t0 = time.perf_counter()
    results: list[dict] = []
    with ProcessPoolExecutor(a.workers, mp_context=get_context("spawn")) as pool:
        futures = [pool.submit(run_one, c) for c in cfgs]
        for f in as_completed(futures):
            r = f.result()
            results.append(r)
            print(
                f"[{time.perf_counter() - t0:6.0f}s] {r['attention']:>12} ({r['length']}) n={r['train_len']} "
                f"seed={r['seed']} aux={r['aux']}: "
                + " ".join(f"{k}:{v:.3f}" for k, v in r["bpc"].items())
                + f"  (train {r['train_s']:.0f}s, eval {r['eval_s']:.0f}s)",
                flush=True,
            )
            out.write_text(json.dumps(results, indent=1))
    wall = time.perf_counter() - t0
    table = _table_length(results, a.eval_lens) if a.study == "length" else _table_aux(results)
    cmd = "python benchmarks/gau_length.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = (
        f"{table}\n\n`{cmd}` — {len(cfgs)} runs, wall {wall / 60:.1f} min on {os.cpu_count()} shared cores "
        f"({a.workers} workers x {a.threads} thread{', one GPU' if a.device == 'cuda' else ''}); model d={a.dim}, "
        f"{a.depth} layers, s={a.qk_dim}; {a.steps} steps"
        + (f" (at most {a.minutes:g} min; run: {sorted({r['steps_run'] for r in results})})" if a.minutes else "")
        + f" x {a.batch} windows, lr {a.lr}, byte vocabulary, data {Path(a.data).name}."
    )
    print(text)
    if a.md:
        _replace(Path(a.md), f"gau_{a.study}", text)


if __name__ == "__main__":
    sys.exit(main())
