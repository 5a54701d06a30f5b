"""Lightning callbacks: thin adapters over :mod:`lightning_mtl.engine` and the probes."""

from lightning_mtl.callbacks.multitask import MultiTaskGradient
from lightning_mtl.callbacks.probes import GradientMagnitudeProbe, ResidualProbe

__all__ = ["GradientMagnitudeProbe", "MultiTaskGradient", "ResidualProbe"]
