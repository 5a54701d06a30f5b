"""Read small device tensors on the host without stalling the device: copy now, look later."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_mtl import _device

__all__ = ["DeferredRead"]


class DeferredRead:
    """A queue of small tensors on their way to the host, each with what to do once it is there.

    :meth:`put` starts a non-blocking copy into pinned host memory and records a CUDA event behind it; :meth:`poll`
    hands every copy that has landed (the event has completed: ``Event.query()``, which never waits) to its
    callback, in order; :meth:`flush` waits for the rest, for the points where the loop waits anyway (the end of an
    epoch). On the host (:func:`lightning_mtl._device.on_host`) the callback runs at once. The callback receives a
    NumPy array: host memory, which cannot synchronise anything. Only CUDA has the pinned memory and events this
    needs: on another accelerator (MPS, XLA) the copy is made at :meth:`put` and waits for the device.
    """

    def __init__(self) -> None:
        self._queue: deque[tuple[Tensor, Any, Callable[[np.ndarray], None]]] = deque()

    def put(self, value: Tensor, then: Callable[[np.ndarray], None]) -> None:
        value = value.detach()
        if _device.on_host(value):
            then(value.cpu().numpy())
            return
        pinned = value.device.type == "cuda"
        host = torch.empty(value.shape, dtype=value.dtype, device="cpu", pin_memory=pinned)
        host.copy_(value, non_blocking=pinned)
        event = None
        if pinned:
            event = torch.cuda.Event()
            event.record()
        self._queue.append((host, event, then))

    def poll(self) -> None:
        """Run the callbacks of the copies that have landed, oldest first; never waits."""
        while self._queue and (self._queue[0][1] is None or self._queue[0][1].query()):
            host, _, then = self._queue.popleft()
            then(host.numpy())

    def flush(self) -> None:
        """Wait for every copy still under way and run its callback."""
        while self._queue:
            host, event, then = self._queue.popleft()
            if event is not None:
                event.synchronize()
            then(host.numpy())

    def clear(self) -> None:
        self._queue.clear()
