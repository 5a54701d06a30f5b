"""lightning-mtl: multi-task gradient control, training probes and reference models for PyTorch Lightning.

Return ``task_losses(self, {...})`` from ``training_step`` and add
``lightning_mtl.callbacks.MultiTaskGradient(weighting)`` to the Trainer.
"""

from lightning_mtl._imports import moved
from lightning_mtl.engine import GradientEngine
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
    "min_norm_weights",
    "task_losses",
]

# lightning_mtl.cosent_loss and lightning_mtl.NLI_LABELS moved with the CoSENT model (one release of grace).
__getattr__ = moved("lightning_mtl", "lightning_gen.cosent")
