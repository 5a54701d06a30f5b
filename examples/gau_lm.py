"""Train a small GAU language model and print a sample.

By default it reads the English text that ships with Python (``pydoc_data.topics``), trains a byte-level
4-layer softmax_plus GAU for at most ``--max-seconds`` (2 min) with the auxiliary token-after-next task kept from
rising by ``MultiTaskGradient(PrimaryAuxiliary(primary="lm"))``, then prints the validation bits-per-character and
a sample.

    python examples/gau_lm.py
    python examples/gau_lm.py --data ../shared/data/tinyshakespeare/input.txt --vocab char --steps 2000
    python examples/gau_lm.py --attention relu2 --no-mtl

The same run through the CLI: ``lightning-mtl fit --config gau_lm``.
"""

from __future__ import annotations

import argparse
import time

import lightning as L
import torch

import lightning_mtl as mtl
from lightning_gen.gau import GAULanguageModel, TextDataModule
from lightning_mtl.callbacks import MultiTaskGradient


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None, help="a UTF-8 text file (default: Python's pydoc_data text)")
    p.add_argument("--vocab", choices=["byte", "char"], default="byte")
    p.add_argument("--attention", choices=["relu2", "softmax", "softmax_plus"], default="softmax_plus")
    p.add_argument("--dim", type=int, default=128)
    p.add_argument("--depth", type=int, default=4)
    p.add_argument("--qk-dim", type=int, default=64)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--max-seconds", type=float, default=120.0, help="stop training after this long")
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--no-mtl", action="store_true", help="train on the plain sum lm + aux (no gradient callback)")
    p.add_argument(
        "--mode",
        choices=["representation", "parameter"],
        default="representation",
        help="MultiTaskGradient mode: per-task gradients of the shared features h (about the cost of a "
        "plain step) or of every shared parameter (exact; one extra backward pass)",
    )
    p.add_argument("--prompt", default="The ")
    p.add_argument("--sample-tokens", type=int, default=200)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is fastest for this small model on a busy machine)"
    )
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    L.seed_everything(a.seed, verbose=False)

    dm = TextDataModule(
        a.data,
        vocab=a.vocab,
        seq_len=a.seq_len,
        batch_size=a.batch_size,
        steps_per_epoch=a.steps,
        max_val_windows=32,
        seed=a.seed,
    )
    model = GAULanguageModel(
        vocab=dm.vocab,
        dim=a.dim,
        depth=a.depth,
        qk_dim=a.qk_dim,
        attention=a.attention,
        lr=a.lr,
        warmup_steps=min(100, a.steps // 10),
        max_steps=a.steps,
    )
    callbacks = [] if a.no_mtl else [MultiTaskGradient(mtl.PrimaryAuxiliary(primary="lm"), mode=a.mode, validate=False)]
    trainer = L.Trainer(
        max_steps=a.steps,
        max_time={"seconds": a.max_seconds},
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        enable_model_summary=False,
        accelerator="cpu",
        devices=1,
    )
    t0 = time.perf_counter()
    trainer.fit(model, dm)
    seconds = time.perf_counter() - t0
    bpc = model.bits_per_character(dm.val_dataloader())
    print(
        f"\n{trainer.global_step} steps in {seconds:.0f} s; held-out bits per character: {bpc:.3f} "
        f"({sum(p.numel() for p in model.parameters()) / 1e6:.2f} M parameters, {a.attention})"
    )
    print("-" * 80)
    print(model.generate(a.prompt, a.sample_tokens, temperature=0.8, top_k=20, seed=a.seed, context=a.seq_len))
    print("-" * 80)


if __name__ == "__main__":
    main()
