"""Lightning callbacks: thin adapters over :mod:`lightning_mtl.engine` and the probes (one callback per module)."""

from lightning_mtl.callbacks.exponentiated import ExponentiatedStepSize
from lightning_mtl.callbacks.gradient_probe import GradientMagnitudeProbe
from lightning_mtl.callbacks.multitask import MultiTaskGradient
from lightning_mtl.callbacks.projected_decay import ProjectedWeightDecay
from lightning_mtl.callbacks.residual_probe import ResidualProbe

__all__ = [
    "ExponentiatedStepSize",
    "GradientMagnitudeProbe",
    "MultiTaskGradient",
    "ProjectedWeightDecay",
    "ResidualProbe",
]
