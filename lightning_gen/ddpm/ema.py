"""EMA weights: find Lightning's ``EMAWeightAveraging`` (any ``WeightAveraging``) callback and swap its averaged
weights into the LightningModule for a while."""

from __future__ import annotations

import itertools
from collections.abc import Iterator
from contextlib import contextmanager

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging

__all__ = ["ema_weights", "find_weight_averaging"]


def find_weight_averaging(trainer: pl.Trainer | None, *, ready: bool = True) -> WeightAveraging | None:
    """The Trainer's first ``WeightAveraging`` callback (``EMAWeightAveraging`` is one), or ``None``.

    With ``ready`` (the default) only a callback that has built its averaged model counts (it does so in its
    ``setup``), i.e. one whose weights can be swapped in; ``ready=False`` finds the callback whenever it is in the
    Trainer's list, also before ``setup``. ``None`` as well when there is no Trainer.
    """
    if trainer is None:
        return None
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, WeightAveraging) and (not ready or getattr(cb, "_average_model", None) is not None):
            return cb
    return None


def _swap(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pairs = zip(
        itertools.chain(a.parameters(), a.buffers()),
        itertools.chain(b.parameters(), b.buffers()),
        strict=True,
    )
    with torch.no_grad():
        for pa, pb in pairs:
            tmp = pa.detach().clone()
            pa.copy_(pb)
            pb.copy_(tmp)


@contextmanager
def ema_weights(pl_module: pl.LightningModule, trainer: pl.Trainer | None = None) -> Iterator[bool]:
    """Swap the weights of Lightning's ``EMAWeightAveraging`` (any ``WeightAveraging``) into ``pl_module``.

    Yields ``True`` if averaged weights were swapped in, ``False`` if the trainer has no such callback (or it has not
    been set up yet). The training weights are put back on exit, also after an exception. This is the
    ``store -> copy_to -> restore`` of diffusers' ``EMAModel``, without a second copy of the weights.
    """
    trainer = trainer if trainer is not None else pl_module._trainer
    cb = find_weight_averaging(trainer)
    if cb is None:
        yield False
        return
    average = cb._average_model.module  # type: ignore[union-attr]
    _swap(average, pl_module)
    try:
        yield True
    finally:
        _swap(average, pl_module)
