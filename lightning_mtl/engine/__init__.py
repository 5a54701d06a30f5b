"""Per-task gradients, their Gramian and the weighted gradient: the plain-PyTorch machinery under the callbacks."""

from lightning_mtl.engine.core import GradientEngine, StepSummary, reached_parameters, summarize_step

__all__ = ["GradientEngine", "StepSummary", "reached_parameters", "summarize_step"]
