"""lightning-mtl: multi-task gradient control, training probes and reference models for PyTorch Lightning.

Return ``task_losses(self, {...})`` from ``training_step`` and add
``lightning_mtl.callbacks.MultiTaskGradient(weighting)`` to the Trainer.
"""

from lightning_mtl.engine import GradientEngine
from lightning_mtl.losses import NLI_LABELS, cosent_loss
from lightning_mtl.scalarize import (
    GeneralizedMean,
    InitialLossNormalization,
    PriorLossNormalization,
    RealTimeNormalization,
    UncertaintyWeighting,
)
from lightning_mtl.tasks import TaskLosses, task_losses
from lightning_mtl.weighting import (
    MGDA,
    GradNormalize,
    Mean,
    PCGrad,
    PrimaryAuxiliary,
    Sum,
    Weighting,
    as_weighting,
    min_norm_weights,
)

__version__ = "0.1.0"

__all__ = [
    "MGDA",
    "NLI_LABELS",
    "GeneralizedMean",
    "GradNormalize",
    "GradientEngine",
    "InitialLossNormalization",
    "Mean",
    "PCGrad",
    "PrimaryAuxiliary",
    "PriorLossNormalization",
    "RealTimeNormalization",
    "Sum",
    "TaskLosses",
    "UncertaintyWeighting",
    "Weighting",
    "as_weighting",
    "cosent_loss",
    "min_norm_weights",
    "task_losses",
]
