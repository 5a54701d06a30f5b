"""benchmarks/mtl_overhead.py on a tiny budget: every configuration runs, and the alternating Trainer measurement
really switches the callback on for the even steps only."""

import sys
from pathlib import Path

import lightning as L
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import mtl_overhead as bench

import lightning_mtl as mtl


def test_every_configuration_runs_a_step():
    steps = bench.make_steps(2)
    assert {"plain", "floor", "floor+gram+write", "ours-param/MGDA", "ours-repr/MGDA"} <= set(steps)
    times = bench.measure(steps, n=1, warmup=0)
    assert set(times) == set(steps) and all(t > 0 for t in times.values())


@pytest.mark.parametrize("mode", ["parameter", "representation"])
def test_every_other_step_weighs_the_even_steps_only(mode):
    data = bench._trainer_data(2, 5)
    callback = bench.EveryOtherStep(mtl.MGDA(), mode=mode, validate=False)
    weighed: list[int] = []
    apply = callback.engine.apply

    def counting_apply(*args, **kwargs):
        out = apply(*args, **kwargs)
        if out is not None:
            weighed.append(callback.engine.steps)
        return out

    callback.engine.apply = counting_apply
    flags: list[bool] = []

    class Flags(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            flags.append(callback.on)

    bench._fit(bench._lightning_module(2)(), data, [callback, Flags()])
    assert flags == [True, False, True, False, True]
    assert weighed == [1, 2, 3]  # one weighting on each of batches 0, 2 and 4, none on 1 and 3
