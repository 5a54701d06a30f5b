"""Train a GlobalPointer entity extractor (flat CoNLL-2003 or nested LitBank) and save it.

    python examples/ner_globalpointer.py --data ../shared/data/conll2003 --output-dir out/ner
    python examples/ner_globalpointer.py --data ../shared/data/litbank --output-dir out/ner-litbank
    python -c "from lightning_gen import SpanExtractor as S; print(S.from_pretrained('out/ner').predict(['EU won']))"

The folder holds ``train.txt``/``dev.txt`` (CoNLL: token ... tag, IOB2) or ``train.data``/``dev.data`` (LitBank: token
and one IOB2 layer per tab-separated column); the format is detected from the file (``--format`` forces it).

Defaults, chosen to finish in about 30 minutes on 2 CPU cores: all-MiniLM-L6-v2 (bundled, offline), Efficient
GlobalPointer (head size 64), 1 epoch, batch 32, max length 128 sub-words (longer sentences are windowed), AdamW lr
5e-5 for the encoder and 1e-3 for the head, 10% warm-up then linear decay, dense multi-label cross-entropy. Prints
the data-loading summary, then the dev precision/recall/F1 per type and micro-averaged, and saves the model
(``SpanExtractor.from_pretrained(OUTPUT_DIR)`` loads it). Same as ``lightning-mtl fit --config span_conll2003``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L

from lightning_gen.span import SpanDataModule, SpanExtractor

_TRAIN = ("train.txt", "train.data", "train.tsv")
_DEV = ("dev.txt", "dev.data", "valid.txt", "val.txt", "dev.tsv")


def find(folder: Path, names: tuple[str, ...], what: str) -> str:
    for name in names:
        if (folder / name).is_file():
            return str(folder / name)
    raise SystemExit(f"{folder}: no {what} file (looked for {', '.join(names)}).")


def print_scores(metrics: dict[str, float], labels: list[str]) -> None:
    print(f"{'type':<10}{'P':>8}{'R':>8}{'F1':>8}")
    for name, suffix in [*((label, f"/{label}") for label in labels), ("micro", "")]:
        p, r, f = (100 * metrics[f"val/{m}{suffix}"] for m in ("precision", "recall", "f1"))
        print(f"{name:<10}{p:8.2f}{r:8.2f}{f:8.2f}")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--data", required=True, help="folder with train.txt/dev.txt (CoNLL) or train.data/dev.data (LitBank)"
    )
    p.add_argument("--output-dir", required=True, help="where the trained model is saved")
    p.add_argument("--format", choices=["auto", "conll", "litbank"], default="auto")
    p.add_argument("--model", default=None, help="Hugging Face path or name (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--head", choices=["global_pointer", "efficient_global_pointer"], default="efficient_global_pointer")
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--loss", choices=["dense", "sparse"], default="dense")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (e.g. 20 for a smoke run)")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training sentences")
    p.add_argument("--limit-val", type=int, default=None, help="use only the first N dev sentences")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--warmup-ratio", type=float, default=0.1)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    L.seed_everything(args.seed)
    folder = Path(args.data)
    data = SpanDataModule(
        train=find(folder, _TRAIN, "training"),
        val=find(folder, _DEV, "dev"),
        format=args.format,
        batch_size=args.batch_size,
        limit_train=args.limit_train,
        limit_val=args.limit_val,
    )
    model = SpanExtractor(
        model_name_or_path=args.model,
        head=args.head,
        head_size=args.head_size,
        loss=args.loss,
        lr=args.lr,
        head_lr=args.head_lr,
        warmup_ratio=args.warmup_ratio,
        max_length=args.max_length,
    )
    trainer = L.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        devices=1,
        gradient_clip_val=1.0,
        enable_checkpointing=False,
        logger=False,
        default_root_dir=args.output_dir,
        log_every_n_steps=20,
        limit_val_batches=0,  # validate once, after training
    )
    trainer.fit(model, data)
    evaluator = L.Trainer(devices=1, logger=False, enable_checkpointing=False, enable_model_summary=False)
    metrics = {k: float(v) for k, v in evaluator.validate(model, data, verbose=False)[0].items()}
    print("data:\n" + data.report.summary())
    print_scores(metrics, model.labels or [])
    out = model.save_pretrained(args.output_dir)
    print(f"saved to {out} (SpanExtractor.from_pretrained({str(out)!r}) loads it)")
    text = "EU rejects German call to boycott British lamb."
    print(f"predict([{text!r}]):")
    for entity in model.predict([text])[0]:  # raw text in, character offsets and scores out
        print(f"  {entity.start:>3} {entity.end:>3} {entity.label:<6} {entity.text!r} {entity.score:.2f}")


if __name__ == "__main__":
    main()
