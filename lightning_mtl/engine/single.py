"""One task: nothing to weight. Training is left exactly as it would be without the engine; the true values are kept.

With K = 1 every weighting is trivial, so the engine neither calls it nor touches a gradient: no extra backward, no
write into ``.grad``, no hook on the shared features. What :attr:`~lightning_mtl.engine.GradientEngine.last_step`
reports (and the callback logs) is weight 1 and the task's true gradient norm: in parameter mode the norm of the
whole gradient (every trainable parameter's ``.grad``, unscaled; global under DDP and FSDP2), in representation mode
the norm of :math:`\\partial\\mathcal L/\\partial z`, as with several tasks.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from lightning_mtl.engine._common import as_tensor
from lightning_mtl.engine._fsdp import squared_norm
from lightning_mtl.engine.representation import RepresentationCapture, task_feature_gradients
from lightning_mtl.engine.strategy import CaptureStrategy, Host
from lightning_mtl.tasks import TaskLosses

__all__ = ["SingleTaskParameters", "SingleTaskRepresentation"]


class SingleTaskParameters(CaptureStrategy):
    """Parameter mode with one task: captures nothing, reads the norm of the loop's own gradient at ``apply``.

    Args:
        host: the engine.
        params: every trainable parameter of the module (the task's gradient is theirs).
    """

    def __init__(self, host: Host, params: list[nn.Parameter]) -> None:
        super().__init__(host)
        self.params = params

    def capture(self, record: TaskLosses, factor: Tensor, *, loss_scale: Tensor | float) -> None:
        """Nothing: the loop's backward computes the one task gradient."""

    def apply(self, grad_scale: Tensor | float) -> Tensor:
        device = self.params[0].device if self.params else torch.device("cpu")
        like = torch.zeros((), dtype=torch.float64, device=device)
        sq = squared_norm([p.grad for p in self.params if p.grad is not None], like)
        gram = (sq / as_tensor(grad_scale, like).double().square()).reshape(1, 1)
        w = torch.ones(1, dtype=torch.float64, device=device)
        self.host._record(gram, w)
        return w


class SingleTaskRepresentation(RepresentationCapture):
    """Representation mode with one task: records ``‖∂L/∂z‖²`` and weight 1, registers no hook."""

    def capture(self, record: TaskLosses, factor: Tensor, *, loss_scale: Tensor | float) -> None:
        _, flat = task_feature_gradients(record, factor)
        gram = self._gramian(flat, factor)
        w = torch.ones(1, dtype=torch.float64, device=gram.device)
        self.host._record(gram, w)
        self._weights = w
