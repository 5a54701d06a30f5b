r"""Parameter mode, the exact path: the task gradients of the shared parameters by ``torch.autograd.grad``.

``capture`` computes :math:`g_1..g_{K-1}` of the shared parameters with ``torch.autograd.grad(...,
retain_graph=True)`` (all K with ``subtract_last=False``); the loop's ordinary backward produces :math:`\sum_k g_k` in
``.grad``, and ``apply`` recovers :math:`g_K` by subtraction, so a step costs one forward and K backward passes: the
floor for exact per-task gradients. ``apply`` writes :math:`g_K` into the last row of the flat K×P task Jacobian
:math:`J` (one pass over ``.grad`` and the other rows), forms :math:`G = JJ^\top` in float64 from products of K×4096
tiles, asks the weighting for ``w`` and writes :math:`\sum_k w_k g_k` into each ``.grad`` parameter by parameter:
three passes over :math:`J` per optimiser step besides the capture's copies. On CPU with fp32 rows the recovery pass
becomes a copy: the last row takes :math:`T = \sum_k g_k` itself, :math:`G` follows from the Gramian of
:math:`[g_1..g_{K-1}; T]` by a K×K transform, and ``.grad`` from :math:`w_K T + \sum_{k<K}(w_k - w_K) g_k`, as long
as :math:`\|g_K\|^2 \ge` :data:`MIN_LAST_SHARE` :math:`\cdot\|T\|^2` keeps the transform accurate (else the exact
path, see ``_gram_subtracting``).

The captured rows are taken of :math:`\mathcal L_k \cdot S/N` (the loop's loss scale S, N accumulated
micro-batches) and accumulate over the micro-batches of one optimiser step; ``apply`` brings them into the scale of
``.grad`` and, under DDP, all-reduces them (one flat bucket of (K-1)·P elements) so that every rank holds the global
task gradients. The subtracted last task carries a rounding error of about eps·‖Σg‖: put the dominant loss last
under fp16, or set ``subtract_last=False`` (K+1 backward passes).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_mtl import _device
from lightning_mtl._dtensor import local_tensor
from lightning_mtl.engine._common import (
    accumulate,
    add_combination,
    as_tensor,
    flatten,
    gramian,
    gramian_from_total,
    recover_last,
    scaled,
    world,
    write_combination,
)
from lightning_mtl.engine._compile import retained_backward
from lightning_mtl.engine.strategy import CaptureStrategy, Host
from lightning_mtl.tasks import TaskLosses

__all__ = ["MIN_LAST_SHARE", "ParameterCapture"]

#: The least :math:`\|g_K\|^2 / \|\sum_k g_k\|^2` at which the Gramian is formed from the total gradient (CPU, fp32):
#: its last row and column then carry a relative error below about 1e-5 (measured: 6e-8 of :math:`\|T\|^2`).
MIN_LAST_SHARE = 1e-2


class ParameterCapture(CaptureStrategy):
    """Task gradients of ``params`` by ``torch.autograd.grad``; the weighted sum written into their ``.grad``.

    Args:
        host: the engine.
        params: the shared parameters.
        subtract_last: recover the last task's gradient as ``.grad`` minus the others (K backward passes).
    """

    def __init__(self, host: Host, params: list[nn.Parameter], *, subtract_last: bool = True) -> None:
        super().__init__(host)
        self.shared_params = params
        self.subtract_last = subtract_last
        self._jac: Tensor | None = None  # [K, P]; rows 0..K-2 accumulate captured task gradients (scaled)
        self._scale: Tensor | None = None  # S of the current accumulation cycle
        self._unit_scale = False
        self._pending = False  # micro-batches captured since the last apply
        self._total_ok = True  # the last task's share of the total allows reading g_K off the Gramian (CPU)

    # --- per micro-batch --------------------------------------------------------------------------------------
    def capture(self, record: TaskLosses, factor: Tensor, *, loss_scale: Tensor | float) -> None:
        params = self.shared_params
        assert params is not None
        losses = list(record.losses.values())
        k = len(losses)
        ref = params[0] if params else record.total
        if self._jac is None or self._jac.shape[0] != k or self._jac.device != ref.device:
            numel = sum(local_tensor(p).numel() for p in params)
            self._jac = torch.zeros(k, numel, dtype=ref.dtype if params else torch.float32, device=ref.device)
        first = not self._pending
        if first:
            self._scale = as_tensor(loss_scale, record.total).clone()  # the scaler updates its tensor in place
            self._unit_scale = isinstance(loss_scale, float) and loss_scale == 1.0  # known on the host: no rescale
        self._pending = True
        captured = losses[:-1] if self.subtract_last else losses
        with retained_backward(captured):
            self._capture_rows(captured, factor, first)

    def _capture_rows(self, losses: Sequence[Tensor], factor: Tensor, first: bool) -> None:
        """Row ``i`` of the Jacobian (+)= the gradient of ``losses[i] * factor`` w.r.t. the shared parameters."""
        params, jac = self.shared_params, self._jac
        assert params is not None and jac is not None
        for i, loss in enumerate(losses):
            grads = torch.autograd.grad(scaled(loss, factor), params, retain_graph=True, allow_unused=True)
            if first:
                flatten(grads, params, out=jac[i])  # written in place: no temporary of size P
            else:
                accumulate(jac[i], grads, params)

    # --- per optimiser step -----------------------------------------------------------------------------------
    def apply(self, grad_scale: Tensor | float) -> Tensor:
        params, jac = self.shared_params, self._jac
        assert params is not None and jac is not None and self._scale is not None
        self._pending = False
        k = jac.shape[0]
        n_captured = k - 1 if self.subtract_last else k
        head = jac[:n_captured]
        out_scale = as_tensor(grad_scale, jac).to(jac.dtype)
        if not (self._unit_scale and isinstance(grad_scale, float) and grad_scale == 1.0):
            head.mul_(out_scale / self._scale.to(jac.dtype))  # captured at the loss scale, now in the scale of .grad
        if n_captured > 0:
            self._reduce_rows(head)
        if self.subtract_last:
            gram, holds_total = self._gram_subtracting(jac, params)
        else:
            gram, holds_total = self._reduce_gram(gramian(jac)), False
        gram = gram / out_scale.double().square()
        w = self.host._weigh(gram)
        # a non-finite Gramian (an inf/NaN task gradient under fp16): leave .grad as the backward made it (weights 1),
        # so that what the GradScaler checked and what the optimizer would see agree
        if holds_total:  # CPU: .grad holds T, so sum_k w_k g_k = w_K T + sum_{k<K} (w_k - w_K) g_k is written onto it
            if bool(torch.isfinite(gram).all()):
                weights = w.tolist()
                last = weights.pop()
                add_combination(last, torch.tensor([weights], dtype=jac.dtype) - last, jac[:-1], params)
            return w
        applied = torch.where(torch.isfinite(gram).all(), w, torch.ones_like(w))  # no host round trip
        write_combination(applied.to(jac.dtype), jac, params)
        return w

    def _gram_subtracting(self, jac: Tensor, params: list[nn.Parameter]) -> tuple[Tensor, bool]:
        r"""The Gramian of the K task gradients, the last one known only through ``.grad``; ``True`` where the last
        row of ``jac`` holds the total :math:`T` rather than :math:`g_K`.

        On CPU with fp32 rows (where a pass over ``jac`` costs milliseconds and reading a scalar costs nothing) the
        last row takes a copy of ``.grad`` and the Gramian of :math:`[g_1..g_{K-1}; T]` is transformed
        (:func:`~lightning_mtl.engine._common.gramian_from_total`): one pass fewer than recovering :math:`g_K`. That
        is accurate to about 1e-5 of :math:`\|g_K\|^2` while :math:`\|g_K\|^2 \ge 10^{-2}\|T\|^2`; below it,
        and on the steps after such a step until the share recovers, :math:`g_K` is recovered exactly. Elsewhere
        (GPU, half-precision rows) always exactly, with no host read.
        """
        on_host = _device.on_host(jac) and jac.dtype == torch.float32
        if on_host and self._total_ok:
            flatten([p.grad for p in params], params, out=jac[-1])  # T: a copy, not a subtraction
            raw = self._reduce_gram(gramian(jac))
            gram = gramian_from_total(raw)
            if bool(gram[-1, -1] >= MIN_LAST_SHARE * raw[-1, -1]):
                return gram, True
            for row in jac[:-1]:  # too little of T is g_K to read it off the Gramian: subtract for real
                jac[-1].sub_(row)
        else:
            recover_last(jac, params)  # g_K = .grad - (g_1 + ... + g_{K-1}), written straight into its row
        gram = self._reduce_gram(gramian(jac))
        if on_host:  # ||T||^2 = 1'G1: come back to the fast path once g_K holds twice the share it needs
            self._total_ok = bool(gram[-1, -1] >= 2 * MIN_LAST_SHARE * gram.sum())
        return gram, False

    def _reduce_rows(self, head: Tensor) -> None:
        """DDP: the captured rows are rank-local (``.grad`` is already averaged): average them in one all-reduce."""
        n = world()
        if n > 1:
            dist.all_reduce(head)
            head.div_(n)
            self.host.bytes_all_reduced += head.numel() * head.element_size()

    def _reduce_gram(self, gram: Tensor) -> Tensor:
        """The Gramian of the (already global) rows: nothing to reduce."""
        return gram
