"""Train a GPLinker relation extractor on WebNLG* (partial match) or WebNLG (exact match) and save it.

    python examples/gplinker_relations.py --data ../shared/data/webnlg_star --output-dir out/gplinker-webnlg-star
    python examples/gplinker_relations.py --data ../shared/data/webnlg --output-dir out/gplinker-webnlg
    python examples/gplinker_relations.py --data ../shared/data/webnlg_star --weighting gradnormalize --output-dir out/g

The folder holds ``train_triples.json``, ``val_triples.json`` (or ``dev_triples.json``) and ``rel2id.json`` in the
CasRel format. The metric setting (``--match``) is detected from the data: ``partial`` (last word of subject and
object) when every training entity is a single word (WebNLG*), else ``exact`` (WebNLG).

Defaults, chosen to finish in about 30 minutes on 2 CPU cores: all-MiniLM-L6-v2 (bundled, offline), Efficient
GlobalPointer pointers (head size 64), 2 epochs, batch 32, max length 128 tokens, AdamW lr 5e-5 for the encoder and
1e-3 for the pointers, the three pointer losses summed (``--weighting gradnormalize`` balances them with
``MultiTaskGradient(GradNormalize(), mode="representation")``: weights from the gradients w.r.t. the shared encoder
states, about the cost of a plain step). Prints the data-loading summary, then dev triple precision/recall/F1, and
saves the model (``RelationExtractor.from_pretrained(OUTPUT_DIR)`` loads it). Same as
``lightning-mtl fit --config span_webnlg_star``.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import lightning as L

from lightning_gen.span import RelationDataModule, RelationExtractor


def find(folder: Path, names: tuple[str, ...], what: str, required: bool = True) -> str | None:
    for name in names:
        if (folder / name).is_file():
            return str(folder / name)
    if required:
        raise SystemExit(f"{folder}: no {what} file (looked for {', '.join(names)}).")
    return None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, help="folder with train_triples.json, val_triples.json, rel2id.json")
    p.add_argument("--output-dir", required=True, help="where the trained model is saved")
    p.add_argument("--match", choices=["auto", "partial", "exact"], default="auto")
    p.add_argument("--occurrence", choices=["first", "nearest"], default="first")
    p.add_argument("--model", default=None, help="Hugging Face path or name (default: bundled all-MiniLM-L6-v2)")
    p.add_argument("--head", choices=["global_pointer", "efficient_global_pointer"], default="efficient_global_pointer")
    p.add_argument("--head-size", type=int, default=64)
    p.add_argument("--weighting", choices=["sum", "gradnormalize"], default="sum")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many steps (e.g. 20 for a smoke run)")
    p.add_argument("--limit-train", type=int, default=None, help="use only the first N training texts")
    p.add_argument("--limit-val", type=int, default=None, help="use only the first N dev texts")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--lr", type=float, default=5e-5)
    p.add_argument("--head-lr", type=float, default=1e-3)
    p.add_argument("--max-length", type=int, default=128)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    L.seed_everything(args.seed)
    folder = Path(args.data)
    data = RelationDataModule(
        train=find(folder, ("train_triples.json", "train.json"), "training"),
        val=find(folder, ("val_triples.json", "dev_triples.json", "dev.json"), "dev"),
        rel2id=find(folder, ("rel2id.json",), "rel2id", required=False),
        match=None if args.match == "auto" else args.match,
        occurrence=args.occurrence,
        batch_size=args.batch_size,
        limit_train=args.limit_train,
        limit_val=args.limit_val,
    )
    model = RelationExtractor(
        model_name_or_path=args.model,
        head=args.head,
        head_size=args.head_size,
        lr=args.lr,
        head_lr=args.head_lr,
        max_length=args.max_length,
    )
    callbacks = []
    if args.weighting == "gradnormalize":
        from lightning_mtl import GradNormalize
        from lightning_mtl.callbacks import MultiTaskGradient

        callbacks.append(MultiTaskGradient(GradNormalize(), mode="representation"))
    trainer = L.Trainer(
        max_epochs=args.epochs,
        max_steps=args.max_steps,
        devices=1,
        gradient_clip_val=1.0,
        callbacks=callbacks,
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
    print(
        f"dev triples ({model.match} match): P {100 * metrics['val/precision']:.2f}  "
        f"R {100 * metrics['val/recall']:.2f}  F1 {100 * metrics['val/f1']:.2f}"
    )
    out = model.save_pretrained(args.output_dir)
    print(f"saved to {out} (RelationExtractor.from_pretrained({str(out)!r}) loads it)")
    text = "Alan Bean was born in Wheeler, Texas."
    print(f"predict([{text!r}]):")
    for r in model.predict([text])[0]:  # raw text in, character spans and scores out
        s, o = r.subject, r.object
        print(f"  ({s.text!r} {s.start}-{s.end}, {r.relation}, {o.text!r} {o.start}-{o.end}) {r.score:.2f}")


if __name__ == "__main__":
    main()
