"""Lightning callbacks: thin adapters over :mod:`lightning_mtl.engine` and the probes."""

from lightning_mtl.callbacks.multitask import MultiTaskGradient

__all__ = ["MultiTaskGradient"]
