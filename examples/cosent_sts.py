"""Fine-tune a sentence encoder with CoSENT on STS-B and save it for sentence-transformers.

    python examples/cosent_sts.py --data ../shared/data/stsb_en --output-dir out/cosent-minilm
    python -c "from sentence_transformers import SentenceTransformer as S; print(S('out/cosent-minilm').encode('hi'))"

With ``--snli FILE`` SNLI becomes a second task (its own CoSENT loss, entailment > neutral > contradiction;
``--holdout`` pairs of it are kept for validation) and ``--weighting gradnormalize`` balances
the two task gradients with
``MultiTaskGradient(GradNormalize())`` instead of summing the losses:

    python examples/cosent_sts.py --data ../shared/data/stsb_en --snli ../shared/data/snli/snli_1.0_dev.tsv \\
        --weighting gradnormalize --output-dir out/cosent-mtl

Prints the dev Spearman (×100) of every validation set before and after training. Same as
``lightning-mtl fit --config cosent_sts`` (and ``cosent_multitask``).
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L

from lightning_gen.cosent import CoSENTEncoder, SentencePairDataModule


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="directory with sts-train.tsv and sts-dev.tsv")
    p.add_argument("--output-dir", required=True, help="where the trained encoder is saved")
    p.add_argument("--model", default=None, help="Hugging Face path or name (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--pooling", choices=["mean", "cls"], default="mean")
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=2e-5)
    p.add_argument("--scale", type=float, default=20.0)
    p.add_argument("--max-length", type=int, default=64)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snli", default=None, help="an SNLI TSV (sentence1, sentence2, label) as a second task")
    p.add_argument("--holdout", type=int, default=2000, help="SNLI pairs held out for validation")
    p.add_argument("--weighting", choices=["sum", "gradnormalize"], default="sum")
    p.add_argument("--limit-train-batches", type=float, default=1.0, help="e.g. 20 for a quick run")
    p.add_argument("--no-zero-shot", action="store_true", help="skip the validation before training")
    args = p.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    L.seed_everything(args.seed)
    data_dir = Path(args.data)
    train = {"stsb": str(data_dir / "sts-train.tsv")}
    holdout = {}
    if args.snli:
        train["snli"] = args.snli
        holdout["snli"] = args.holdout
    data = SentencePairDataModule(
        train=train, val={"stsb": str(data_dir / "sts-dev.tsv")}, holdout=holdout, batch_size=args.batch_size
    )
    model = CoSENTEncoder(args.model, pooling=args.pooling, scale=args.scale, lr=args.lr, max_length=args.max_length)
    callbacks = []
    if args.weighting == "gradnormalize":
        if not args.snli:
            p.error("--weighting gradnormalize needs a second task (--snli).")
        from lightning_mtl import GradNormalize
        from lightning_mtl.callbacks import MultiTaskGradient

        callbacks.append(MultiTaskGradient(GradNormalize()))
    trainer = L.Trainer(
        max_epochs=args.epochs,
        devices=1,
        gradient_clip_val=1.0,
        callbacks=callbacks,
        limit_train_batches=args.limit_train_batches,
        enable_checkpointing=False,
        default_root_dir=args.output_dir,
        log_every_n_steps=20,
    )
    if not args.no_zero_shot:
        before = trainer.validate(model, data, verbose=False)[0]
    trainer.fit(model, data)  # validates at the end of every epoch
    after = {k: float(v) for k, v in trainer.callback_metrics.items()}
    for key in sorted(k for k in after if k.startswith("val/spearman/")):
        zero = "" if args.no_zero_shot else f"zero-shot {100 * before[key]:.2f} -> "
        print(f"{key}: {zero}trained {100 * after[key]:.2f}")
    out = model.save_pretrained(args.output_dir)
    print(f"saved to {out} (SentenceTransformer({str(out)!r}) loads it)")


if __name__ == "__main__":
    main()
