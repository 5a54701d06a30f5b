r"""Representation mode (MGDA-UB, about one plain step): the task gradients at the shared features, and a tensor hook.

``capture`` computes :math:`d_k = \partial\mathcal L_k / \partial z` of the shared features ``z`` (backward through
the heads only), their Gramian, the weights, and registers a hook on ``z`` that replaces the gradient arriving there
by :math:`\sum_k w_k d_k`, so the loop's single ordinary backward carries the combined gradient through the trunk.
This is Sener & Koltun's upper-bound approximation; Su (https://kexue.fm/archives/8896) shows their proof that it
still finds a Pareto-stationary direction is wrong, and it needs samples labelled for several tasks (with disjoint task
data the :math:`d_k` are orthogonal).

Every micro-batch is weighted with its own Gramian (the hook acts inside each backward); under gradient accumulation
the update is the mean of the per-micro-batch combinations. Under DDP the K×K Gramian is all-reduced (summed over
ranks, then divided by the world size squared: the exact Gramian of the global mean losses) unless
``rank_local=True``.

``z`` must be upstream of the heads in the autograd graph. When ``torch.compile`` compiles the trunk and the heads
into one graph (``trainer.fit(torch.compile(module))``), ``z`` and the losses are sibling outputs of that graph and no
gradient can be read at ``z``: this is refused with a message (compile the trunk, a submodule, instead).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_mtl.engine._common import combine, gramian, scaled, world
from lightning_mtl.engine._compile import is_compiled_node, retained_backward
from lightning_mtl.engine.strategy import CaptureStrategy, Host
from lightning_mtl.tasks import TaskLosses

__all__ = ["RepresentationCapture", "task_feature_gradients"]


def task_feature_gradients(record: TaskLosses, factor: Tensor) -> tuple[Tensor, Tensor]:
    """The shared features ``z`` of ``record`` and the flat ``[K, numel(z)]`` gradients :math:`d_k` of the scaled
    task losses at ``z`` (in at least fp32); raises with what to do for a missing, detached or unreachable ``z``."""
    z = record.shared
    if z is None:
        raise ValueError(
            "mode='representation' needs the shared features: return "
            "task_losses(self, {...}, shared=z) with z the trunk output that every head reads."
        )
    if not z.requires_grad:
        raise ValueError(
            "task_losses(shared=z): z does not require grad, so no gradient flows through it. Pass the trunk "
            "output itself (not a detached copy, and not computed under torch.no_grad())."
        )
    d = []
    with retained_backward(record.losses.values()):
        for loss in record.losses.values():
            (g,) = torch.autograd.grad(scaled(loss, factor), z, retain_graph=True, allow_unused=True)
            d.append(g)
    if all(g is None for g in d):
        compiled = is_compiled_node(z.grad_fn)
        raise ValueError(
            "mode='representation': no task loss reaches the shared features z through autograd, so there is no "
            "gradient to read at z. "
            + (
                "z and the losses come out of one torch.compile'd graph (the trunk and the heads compiled together, "
                "e.g. trainer.fit(torch.compile(module))), which hides z from autograd. Compile the trunk only "
                "(`self.trunk = torch.compile(self.trunk)`, any submodule that ends at z), or use mode='parameter' "
                "(which supports a compiled module)."
                if compiled
                else "Pass as shared=z the tensor the heads actually read."
            )
        )
    flat = torch.stack([(torch.zeros_like(z) if g is None else g).reshape(-1) for g in d])
    return z, flat.to(torch.promote_types(z.dtype, torch.float32))


class RepresentationCapture(CaptureStrategy):
    """Gramian of the :math:`d_k`; a hook on ``z`` writes :math:`\\sum_k w_k d_k` into the loop's backward.

    Args:
        host: the engine.
        rank_local: under DDP, weight with each rank's own Gramian (no all-reduce).
    """

    def __init__(self, host: Host, *, rank_local: bool = False) -> None:
        super().__init__(host)
        self.rank_local = rank_local
        self._weights: Tensor | None = None

    def capture(self, record: TaskLosses, factor: Tensor, *, loss_scale: Tensor | float) -> None:
        z, flat = task_feature_gradients(record, factor)
        gram = self._gramian(flat, factor)
        w = self.host._weigh(gram)
        self._weights = w.detach()
        combined = combine(w, flat).view_as(z)
        z.register_hook(lambda grad: None if grad is None else combined.to(grad.dtype))

    def _gramian(self, flat: Tensor, factor: Tensor) -> Tensor:
        gram = gramian(flat) / factor.double().square()
        n = world()
        if not self.rank_local and n > 1:
            dist.all_reduce(gram)
            gram = gram / n**2
            self.host.bytes_all_reduced += gram.numel() * gram.element_size()
        return gram

    def apply(self, grad_scale: Tensor | float) -> Tensor | None:
        """The hook did the work inside the backward: the weights of the last micro-batch."""
        return self._weights
