"""The one place that decides which branch a training step takes, by where its tensors live.

On the host (CPU) a value can be read for free and fp32 matrix products are IEEE; the engine then takes its CPU
paths, which read a few scalars to save a pass over the task gradients. Anywhere else (a GPU) reading a value stalls
the host until the device catches up, and an fp32 matrix product may run in TF32 (``torch.backends.cuda.matmul``):
the engine then takes paths that read nothing back and use no fp32 matrix product where the result must be exact.

The test suite switches :func:`on_host` off to run the accelerator branches on CPU.
"""

from __future__ import annotations

from torch import Tensor

__all__ = ["on_host"]


def on_host(t: Tensor) -> bool:
    """``True`` where ``t``'s values can be read without a device synchronisation and its fp32 products are IEEE."""
    return t.device.type == "cpu"
