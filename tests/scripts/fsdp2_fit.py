"""Run by tests/test_distributed.py in a subprocess: ModelParallelStrategy (FSDP2, fully_shard) on 2 CPU processes
with MultiTaskGradient, one fit per configuration given on the command line; each rank saves its full parameters to
OUT/{config}.rank{rank}.pt (and the last step's task gradient norms to OUT/{config}.rank{rank}.norms.pt).

A configuration is ``mode:weighting:accumulate:K:variant`` (e.g. ``parameter:MGDA:1:2:``). K = 3 uses a hidden width
of 7, so the shards are uneven (4 and 3 rows). Variants: ``exact`` (``subtract_last=False``); ``nosync`` (FSDP2's
gradient sync turned off) and ``unsharded`` (no ``fully_shard``) save the error that parameter mode raises to
OUT/{config}.rank{rank}.txt instead. ModelParallelStrategy launches by re-running this script, which is why it is a
script and not a test function.
"""

from __future__ import annotations

import sys
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_mtl.callbacks import MultiTaskGradient
from tests._mtl_models import TwoHeads, make_data, trainer
from tests.test_distributed import WEIGHTINGS, InOrder, fsdp2_hidden


class Sharded(TwoHeads):
    shard = True

    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        if not self.shard:
            return
        mesh = self.device_mesh["data_parallel"]
        for layer in self.trunk:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class NoSync(L.Callback):
    def on_train_start(self, trainer, pl_module):
        pl_module.set_requires_gradient_sync(False)


def fit(out: str, config: str) -> None:
    mode, name, accumulate, k, variant = config.split(":")
    ds = make_data(n=80, k=int(k))
    torch.manual_seed(0)
    model = Sharded(k=int(k), hidden=fsdp2_hidden(int(k)))
    model.shard = variant != "unsharded"
    callback = MultiTaskGradient(WEIGHTINGS[name](), mode=mode, subtract_last=variant != "exact")
    t = trainer(
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        devices=2,
        max_epochs=1,
        use_distributed_sampler=False,
        accumulate_grad_batches=int(accumulate),
        callbacks=[callback, *([NoSync()] if variant == "nosync" else [])],
    )
    stem = f"{out}/{config.replace(':', '_')}.rank{t.global_rank}"
    if variant in ("nosync", "unsharded"):
        try:
            t.fit(model, InOrder(ds, 8))
        except Exception as err:  # the test reads the message
            Path(f"{stem}.txt").write_text(f"{type(err).__name__}: {err}")
        return
    t.fit(model, InOrder(ds, 8))
    torch.save(
        [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()],
        f"{stem}.pt",
    )
    torch.save(callback.last_step.norms.cpu(), f"{stem}.norms.pt")


if __name__ == "__main__":
    for config in sys.argv[2:]:
        fit(sys.argv[1], config)
