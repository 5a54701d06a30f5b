"""Run by tests/test_distributed.py (and tests/test_cuda.py) in a subprocess: ``Trainer(strategy="ddp", devices=2)``,
Lightning's subprocess launcher, with MultiTaskGradient, one fit per configuration given on the command line.

Usage: ``python tests/scripts/ddp_fit.py OUT ACCELERATOR CONFIG...`` with ACCELERATOR ``cpu`` (gloo) or ``cuda``
(NCCL, two GPUs). A configuration is ``mode:weighting:accumulate`` (e.g. ``parameter:MGDA:1``); each fit trains
``TwoHeads`` in float64 for one epoch of 80 samples, 8 per rank and micro-batch, rank r taking samples r, r+2, ...
in order (``InOrder``). Each rank saves its final parameters (on the CPU) to ``OUT/{config}.rank{rank}.pt`` and, once,
``OUT/launch.rank{rank}.txt`` with its launcher, world size and process id.

``strategy="ddp"`` starts the other rank by re-running this script (with ``LOCAL_RANK`` set), which is why it is a
script and not a test function: inside pytest it would re-launch pytest.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from lightning_mtl.callbacks import MultiTaskGradient
from tests._distributed import shut_down
from tests._mtl_models import TwoHeads, make_data, trainer
from tests.test_distributed import WEIGHTINGS, InOrder, SaveParams


def fit(out: Path, accelerator: str, config: str) -> None:
    mode, name, accumulate = config.split(":")
    ds = make_data(n=80, dtype=torch.float64)
    torch.manual_seed(0)
    model = TwoHeads().double()
    stem = config.replace(":", "_")
    t = trainer(
        accelerator=accelerator,
        strategy="ddp",
        devices=2,
        precision="64-true",
        deterministic=accelerator == "cpu",  # cuBLAS needs CUBLAS_WORKSPACE_CONFIG for it; float64 is tight anyway
        use_distributed_sampler=False,
        accumulate_grad_batches=int(accumulate),
        callbacks=[MultiTaskGradient(WEIGHTINGS[name](), mode=mode), SaveParams(out, f"{stem}.")],
    )
    t.fit(model, InOrder(ds, 8))
    launch = out / f"launch.rank{t.global_rank}.txt"
    if not launch.exists():
        launcher = type(t.strategy.launcher).__name__ if t.strategy.launcher is not None else "None"
        launch.write_text(f"{type(t.strategy).__name__} {launcher} world_size={t.world_size} pid={os.getpid()}")


if __name__ == "__main__":
    out, accelerator = Path(sys.argv[1]), sys.argv[2]
    for config in sys.argv[3:]:
        fit(out, accelerator, config)
    shut_down()
