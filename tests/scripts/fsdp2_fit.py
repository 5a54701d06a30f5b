"""Run by tests/test_distributed.py in a subprocess: ModelParallelStrategy (FSDP2, fully_shard) on 2 CPU processes
with MultiTaskGradient, one fit per configuration given on the command line; each rank saves its full parameters to
OUT/{name}.rank{rank}.pt.

A configuration is ``mode:weighting:accumulate`` (e.g. ``parameter:MGDA:1``); ``nosync`` for accumulate turns FSDP2's
gradient sync off and saves the error parameter mode raises to OUT/nosync.rank{rank}.txt instead.
ModelParallelStrategy launches by re-running this script, which is why it is a script and not a test function.
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
from tests.test_distributed import WEIGHTINGS, InOrder


class Sharded(TwoHeads):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.trunk:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


class NoSync(L.Callback):
    def on_train_start(self, trainer, pl_module):
        pl_module.set_requires_gradient_sync(False)


def fit(out: str, config: str) -> None:
    mode, name, accumulate = config.split(":")
    nosync = accumulate == "nosync"
    ds = make_data(n=80)
    torch.manual_seed(0)
    model = Sharded()
    t = trainer(
        strategy=ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        devices=2,
        max_epochs=1,
        use_distributed_sampler=False,
        accumulate_grad_batches=1 if nosync else int(accumulate),
        callbacks=[MultiTaskGradient(WEIGHTINGS[name](), mode=mode), *([NoSync()] if nosync else [])],
    )
    if nosync:
        try:
            t.fit(model, InOrder(ds, 8))
        except RuntimeError as err:
            Path(f"{out}/nosync.rank{t.global_rank}.txt").write_text(str(err))
        return
    t.fit(model, InOrder(ds, 8))
    full = [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
    torch.save(full, f"{out}/{config.replace(':', '_')}.rank{t.global_rank}.pt")


if __name__ == "__main__":
    for config in sys.argv[2:]:
        fit(sys.argv[1], config)
