"""DTensor (FSDP2 / tensor parallel) helpers that do not import ``torch.distributed.tensor``: a DTensor is recognised
by its ``to_local`` method, so plain tensors and builds without distributed support pay nothing."""

from __future__ import annotations

from torch import Tensor


def is_dtensor(t: Tensor) -> bool:
    """Whether ``t`` is a DTensor (has a ``to_local`` method)."""
    return callable(getattr(t, "to_local", None))


def local_tensor(t: Tensor) -> Tensor:
    """The local shard of a DTensor, or ``t`` itself."""
    return t.to_local() if is_dtensor(t) else t
