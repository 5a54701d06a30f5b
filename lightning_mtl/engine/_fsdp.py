"""Every use of FSDP2's private API (and the DTensor placement checks) that the engine makes, in one place.

FSDP2 (``fully_shard``) exposes no public way to reach its parameter groups, the gathered parameters autograd sees,
or whether a micro-batch reduces gradients. The engine reads (never writes) these attributes:

* ``FSDPModule._get_fsdp_state()`` and the state's ``_fsdp_param_groups`` (torch >= 2.11) / ``_fsdp_param_group``;
* a group's ``fsdp_params`` and ``reduce_grads``;
* an ``FSDPParam``'s ``sharded_param`` and ``_unsharded_param`` (the latter exists from the first all-gather on).

When torch moves them, this module is the one to change.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mtl._dtensor import is_dtensor
from lightning_mtl.engine._common import world

__all__ = [
    "check_reduces",
    "check_sharding",
    "fsdp_groups",
    "sharded_params",
    "squared_norm",
]


def fsdp_groups(module: nn.Module) -> list[Any]:
    """The FSDP2 parameter groups under ``module`` (private torch API, read only)."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch built without distributed
        return []
    groups: list[Any] = []
    for m in module.modules():
        if isinstance(m, FSDPModule):
            state = m._get_fsdp_state()
            found = getattr(state, "_fsdp_param_groups", None)  # torch >= 2.11; before: one group per state
            groups.extend(found if found is not None else [g for g in [state._fsdp_param_group] if g is not None])
    return groups


def sharded_params(groups: list[Any]) -> dict[int, nn.Parameter]:
    """FSDP2: ``id`` of each managed parameter's gathered copy (what autograd sees) and of its shard (what the module
    and the optimizer hold after the backward) → the shard, over the given FSDP2 parameter groups."""
    out: dict[int, nn.Parameter] = {}
    for group in groups:
        for fp in group.fsdp_params:
            out[id(fp.sharded_param)] = fp.sharded_param
            if hasattr(fp, "_unsharded_param"):  # exists from the first all-gather on
                out[id(fp._unsharded_param)] = fp.sharded_param
    return out


def check_reduces(groups: list[Any]) -> None:
    """Raise unless every group reduce-scatters its gradients at this micro-batch."""
    if not all(getattr(g, "reduce_grads", True) for g in groups):
        raise RuntimeError(
            "Parameter mode under FSDP2 reads each task's gradient from FSDP2's reduce-scatter, but gradient sync is "
            "off for this micro-batch (set_requires_gradient_sync(False), or Fabric's no_backward_sync). Keep "
            "gradient sync on for every micro-batch, or use mode='representation'."
        )


def check_sharding(params: Sequence[nn.Parameter], module: nn.Module) -> None:
    """The shard Gramians sum to the full Gramian when every element lives on exactly one rank of a mesh spanning
    all processes: pure ``Shard`` placements (FSDP2 alone or with tensor parallelism), no replicated mesh dims."""
    from torch.distributed.tensor import DTensor, Replicate

    n = world()
    for p in params:
        if not isinstance(p, DTensor):
            continue
        if any(isinstance(pl, Replicate) for pl in p.placements):
            raise ValueError(
                f"A shared parameter of {type(module).__name__} is replicated along a mesh dimension "
                f"({p.placements}; HSDP or a replicated tensor-parallel weight): parameter mode sums shard Gramians "
                "over all ranks and would count it several times. Use a mesh that only shards, or "
                "mode='representation'."
            )
        if p.device_mesh.size() != n:
            raise ValueError(
                f"Parameter mode under FSDP2 needs the shared parameters' device mesh to span all {n} "
                f"processes (it spans {p.device_mesh.size()}). Use mode='representation'."
            )


def squared_norm(grads: Iterable[Tensor], like: Tensor) -> Tensor:
    r""":math:`\sum \|g\|^2` over ``grads``, in ``like``'s dtype on its device; a DTensor gradient counts globally
    (DTensor reduces its partial sum over the mesh, whatever the placements).

    Plain tensors: one multi-tensor norm per width (``torch._foreach_norm``: half and fp32 gradients accumulated in
    fp32, so a scaled fp16 gradient cannot overflow; float64 ones in float64), then the squares summed in ``like``'s
    dtype: no per-parameter copy in float64.
    """
    grads = [g.detach() for g in grads]
    total = like.new_zeros((), dtype=like.dtype)
    plain = [g for g in grads if not is_dtensor(g)]
    narrow = [g for g in plain if g.dtype != torch.float64]
    wide = [g for g in plain if g.dtype == torch.float64]
    norms = [
        *(torch._foreach_norm(narrow, 2, dtype=torch.float32) if narrow else ()),
        *(torch._foreach_norm(wide, 2) if wide else ()),
    ]
    if norms:
        total = total + torch.stack([n.to(device=like.device, dtype=like.dtype) for n in norms]).square().sum()
    for g in grads:
        if is_dtensor(g):
            part = g.to(like.dtype).square().sum().full_tensor()  # type: ignore[attr-defined]
            total = total + part.to(like.device)
    return total
