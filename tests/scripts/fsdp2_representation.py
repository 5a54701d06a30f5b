"""Run by tests/test_distributed.py in a subprocess: ModelParallelStrategy (FSDP2, fully_shard) on 2 CPU processes
with MultiTaskGradient(mode="representation"); each rank saves its full parameters to OUT/fsdp{rank}.pt.

ModelParallelStrategy launches by re-running this script, which is why it is a script and not a test function.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import lightning_mtl as mtl
from lightning_mtl.callbacks import MultiTaskGradient
from tests._mtl_models import TwoHeads, make_data, trainer
from tests.test_distributed import InOrder


class Sharded(TwoHeads):
    def configure_model(self) -> None:
        from torch.distributed.fsdp import fully_shard

        mesh = self.device_mesh["data_parallel"]
        for layer in self.trunk:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer, mesh=mesh)
        fully_shard(self, mesh=mesh)


def main(out: str) -> None:
    ds = make_data(n=80)
    torch.manual_seed(0)
    model = Sharded()
    strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1)
    t = trainer(
        strategy=strategy,
        devices=2,
        max_epochs=1,
        use_distributed_sampler=False,
        callbacks=[MultiTaskGradient(mtl.MGDA(), mode="representation")],
    )
    t.fit(model, InOrder(ds, 8))
    full = [p.full_tensor().detach() if hasattr(p, "full_tensor") else p.detach() for p in model.parameters()]
    torch.save(full, f"{out}/fsdp{t.global_rank}.pt")


if __name__ == "__main__":
    main(sys.argv[1])
