r"""Parameter mode over FSDP2-sharded shared parameters (``fully_shard``): each task gradient by a real backward.

FSDP2 frees its gathered parameters after the forward and re-gathers them inside the backward, so
``torch.autograd.grad`` cannot ask for them; and only a real backward reduce-scatters a gradient into the shards. This
strategy therefore captures each task gradient with a ``backward(retain_graph=True)`` of that task's loss, reads the
reduce-scattered (rank-averaged) shard of every shared parameter, and puts the ``.grad`` tensors of the micro-batches
before back. Each rank holds its shard of every global task gradient; the Gramian is the sum over ranks of the shard
Gramians (one K×K all-reduce), so every rank gets the same weights and writes :math:`\sum_k w_k g_k` into its own
shard.

Each extra backward re-gathers the shared parameters and reduce-scatters one more gradient: (K-1)·P through the
network per micro-batch, the same ring bytes as the DDP path (measured in ``benchmarks/scaling.md``), and K·P/W
task-gradient elements per rank in memory. FSDP2 must synchronise gradients at every micro-batch (no
``set_requires_gradient_sync(False)``), which Lightning's ``ModelParallelStrategy`` does. With a low-precision
``MixedPrecisionPolicy(param_dtype=...)`` the task gradients are computed in that dtype, so the subtracted last task
carries its rounding error relative to the total gradient (as under fp16): put the dominant loss last, or set
``subtract_last=False``. All use of FSDP2's private API is in :mod:`lightning_mtl.engine._fsdp`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.distributed as dist
from torch import Tensor, nn

from lightning_mtl.engine._common import accumulate, flatten, scaled, world
from lightning_mtl.engine._fsdp import check_reduces
from lightning_mtl.engine.parameter import ParameterCapture
from lightning_mtl.engine.strategy import Host

__all__ = ["ShardedCapture"]


class ShardedCapture(ParameterCapture):
    """:class:`~lightning_mtl.engine.parameter.ParameterCapture` for FSDP2 shards: task gradients by backward.

    Args:
        host: the engine.
        params: the shared parameters (FSDP2 shards, DTensors).
        groups: the module's FSDP2 parameter groups (to check that each micro-batch reduce-scatters).
        holders: every parameter object whose ``.grad`` a task backward can set (shards and gathered copies).
        subtract_last: as for :class:`~lightning_mtl.engine.parameter.ParameterCapture`.
    """

    def __init__(
        self,
        host: Host,
        params: list[nn.Parameter],
        groups: list[Any],
        holders: list[nn.Parameter],
        *,
        subtract_last: bool = True,
    ) -> None:
        super().__init__(host, params, subtract_last=subtract_last)
        self.groups = groups
        self.holders = holders

    def _capture_rows(self, losses: Sequence[Tensor], factor: Tensor, first: bool) -> None:
        """One ``backward(retain_graph=True)`` per task, reading the reduce-scattered shards; the ``.grad`` of earlier
        micro-batches is set aside meanwhile and put back, so the loop's backward accumulates as usual."""
        params, jac, every = self.shared_params, self._jac, self.holders
        assert params is not None and jac is not None
        check_reduces(self.groups)
        kept = [p.grad for p in every]
        try:
            for i, loss in enumerate(losses):
                for p in every:
                    p.grad = None
                scaled(loss, factor).backward(retain_graph=True)
                grads = [p.grad for p in params]
                if first:
                    flatten(grads, params, out=jac[i])
                else:
                    accumulate(jac[i], grads, params)
        finally:
            for p, g in zip(every, kept, strict=True):
                p.grad = g

    def _reduce_rows(self, head: Tensor) -> None:
        """FSDP2's reduce-scatter already averaged the shards over the ranks."""

    def _reduce_gram(self, gram: Tensor) -> Tensor:
        """The sum of the shard Gramians over the ranks is the Gramian of the full task gradients."""
        if world() > 1:
            dist.all_reduce(gram)
            self.host.bytes_all_reduced += gram.numel() * gram.element_size()
        return gram
