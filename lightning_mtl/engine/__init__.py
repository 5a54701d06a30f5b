"""Per-task gradients, their Gramian and the weighted gradient: the plain-PyTorch machinery under the callbacks."""

from lightning_mtl.engine.core import GradientEngine, reached_parameters

__all__ = ["GradientEngine", "reached_parameters"]
