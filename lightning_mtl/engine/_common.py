"""Small tensor helpers shared by the capture strategies (no state, no Lightning)."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_mtl._dtensor import local_tensor

__all__ = ["as_tensor", "flatten", "scaled", "world", "write_grads"]


def scaled(loss: Tensor, factor: Tensor) -> Tensor:
    """``loss * factor`` in at least fp32, as GradScaler does (2^16 would overflow an fp16 loss)."""
    return loss.to(torch.promote_types(loss.dtype, torch.float32)) * factor


def world() -> int:
    """The number of processes (1 without an initialised process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def as_tensor(x: Tensor | float, like: Tensor) -> Tensor:
    """``x`` as a detached float32 tensor on ``like``'s device."""
    if isinstance(x, Tensor):
        return x.detach().to(device=like.device, dtype=torch.float32)
    return torch.tensor(float(x), device=like.device, dtype=torch.float32)


def flatten(grads: Sequence[Tensor | None], params: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    """The local shards of ``grads`` (zeros for ``None``) concatenated, optionally into ``out``."""
    parts = [
        local_tensor(g).reshape(-1)
        if g is not None
        else torch.zeros(local_tensor(p).numel(), dtype=p.dtype, device=p.device)
        for g, p in zip(grads, params, strict=True)
    ]
    if not parts:
        return torch.zeros(0) if out is None else out.zero_()
    return torch.cat(parts) if out is None else torch.cat(parts, out=out)


def write_grads(flat: Tensor, params: Iterable[nn.Parameter]) -> None:
    """Copy consecutive chunks of ``flat`` into the (local shards of the) ``.grad`` of ``params``."""
    offset = 0
    for p in params:
        local = local_tensor(p)
        n = local.numel()
        chunk = flat[offset : offset + n].view(local.shape)
        offset += n
        if p.grad is not None:  # None: no task reached p this step, so the optimizer skips it as it would anyway
            local_tensor(p.grad).copy_(chunk)
