r"""Per-parameter statistics of one optimiser step, their reduction over shards and layers, and the first-order
loss change (Su, https://kexue.fm/archives/8994).

* per-layer gradient norm :math:`\|g_l\|_2` and the total :math:`\|g\|_2`;
* update-to-weight ratio :math:`\|\Delta\theta_l\|_2 / \|\theta_l\|_2` of the step actually taken;
* first-order loss change of one step: exact linearisation :math:`\langle g, \Delta\theta\rangle`, and the
  article's predictions :math:`-\eta\|g\|_2^2` (SGD) and :math:`-\eta\|g\|_1` (Adam, whose early steps are
  sign descent: the very first bias-corrected Adam step is :math:`-\eta\,\mathrm{sign}(g)` up to ``eps``).

Plain PyTorch (plus ``torch.distributed`` for sharded parameters), so it can be tested against a hand computation
and reused from a Fabric or hand-written loop.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightning_mtl._dtensor import local_tensor

__all__ = [
    "STAT_COLUMNS",
    "aggregate_rows",
    "first_order_predictions",
    "parameter_stats",
    "positive_multiple",
    "reduce_sharded_rows",
]

#: Columns of :func:`parameter_stats`: squared grad norm, grad L1 norm, squared update norm, squared weight norm
#: (before the step), and the inner product <g, Δθ>.
STAT_COLUMNS = ("grad_sq", "grad_l1", "update_sq", "weight_sq", "grad_dot_update")


def parameter_stats(
    params: Sequence[Tensor],
    grads: Sequence[Tensor | None],
    before: Sequence[Tensor] | None = None,
) -> Tensor:
    """Per-parameter *local* partial sums, float64, shape ``[P, 5]`` (columns :data:`STAT_COLUMNS`).

    ``params`` hold the values after the step, ``before`` the (local) values before it (``None``: no update
    columns, and the weight column uses ``params``). A missing gradient counts as zero. For DTensors only the
    local shard is used: pass the result through :func:`reduce_sharded_rows` to get the global values. Norms
    use ``torch._foreach_norm`` and the inner products ``torch.dot`` in the tensors' dtype (half precision
    is upcast to float32 first); the per-parameter results are float64.
    """
    n = len(params)
    if n == 0:
        return torch.zeros(0, len(STAT_COLUMNS), dtype=torch.float64)
    new = [_wide(local_tensor(p.detach())) for p in params]
    device = new[0].device
    out = torch.zeros(n, len(STAT_COLUMNS), dtype=torch.float64, device=device)
    have = [i for i, g in enumerate(grads) if g is not None]
    g_local = [_wide(local_tensor(grads[i].detach())) for i in have]  # type: ignore[union-attr]
    index = torch.tensor(have, dtype=torch.long, device=device)
    if have:
        out[index, 0] = _norms(g_local, 2).square()
        out[index, 1] = _norms(g_local, 1)
    if before is None:
        out[:, 3] = _norms(new, 2).square()
        return out
    old = [_wide(b) for b in before]
    delta = torch._foreach_sub(new, old)
    out[:, 2] = _norms(delta, 2).square()
    out[:, 3] = _norms(old, 2).square()
    if have:
        dots = [torch.dot(g.reshape(-1), delta[i].reshape(-1)) for g, i in zip(g_local, have, strict=True)]
        out[index, 4] = torch.stack(dots).double()
    return out


def _wide(t: Tensor) -> Tensor:
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def _norms(tensors: list[Tensor], order: int) -> Tensor:
    return torch.stack(torch._foreach_norm(tensors, order)).double()


def _shard_groups(t: Tensor) -> tuple[Any, ...] | None:
    """The process groups a DTensor is sharded over (``None`` for a plain tensor or a fully replicated
    one)."""
    mesh = getattr(t, "device_mesh", None)
    placements = getattr(t, "placements", None)
    if mesh is None or placements is None:
        return None
    dims = tuple(i for i, pl in enumerate(placements) if pl.is_shard())
    if not dims:
        return None
    return tuple(mesh.get_group(i) for i in dims)


def reduce_sharded_rows(rows: Tensor, params: Sequence[Tensor]) -> Tensor:
    """Sum the rows of sharded (DTensor) parameters over the ranks that hold their shards.

    Plain (replicated, e.g. DDP) parameters are left alone: their gradients are already the same on every
    rank. Rows are grouped by their sharding process groups so FSDP2 costs one all-reduce; all ranks issue the
    same collectives in the same order because they hold the same parameter list.
    """
    groups: dict[tuple[Any, ...], list[int]] = {}
    for i, p in enumerate(params):
        key = _shard_groups(p)
        if key is not None:
            groups.setdefault(key, []).append(i)
    if not groups:
        return rows
    out = rows.clone()
    for key, idx in groups.items():
        index = torch.tensor(idx, device=rows.device)
        part = out.index_select(0, index)
        for group in key:
            dist.all_reduce(part, op=dist.ReduceOp.SUM, group=group)
        out.index_copy_(0, index, part)
    return out


def aggregate_rows(rows: Tensor, owner: Tensor, n_groups: int) -> Tensor:
    """Sum per-parameter rows ``[P, C]`` into per-layer rows ``[n_groups, C]`` (``owner[p]`` = layer
    index)."""
    out = rows.new_zeros(n_groups, rows.shape[1])
    return out.index_add_(0, owner.to(rows.device), rows)


def first_order_predictions(rows: Tensor, lr: Tensor) -> dict[str, Tensor]:
    r"""The first-order loss change of one step, from per-parameter rows and per-parameter learning rates.

    Returns ``linear`` = :math:`\langle g,\Delta\theta\rangle` (the exact linearisation for the step actually
    taken, any optimiser), ``sgd`` = :math:`-\sum_p \eta_p \|g_p\|_2^2` and ``adam`` = :math:`-\sum_p \eta_p
    \|g_p\|_1` (Su, https://kexue.fm/archives/8994).
    """
    lr = lr.to(rows)
    return {
        "linear": rows[:, 4].sum(),
        "sgd": -(lr * rows[:, 0]).sum(),
        "adam": -(lr * rows[:, 1]).sum(),
    }


def positive_multiple(r: Tensor, streams: Sequence[Tensor | None], tol: float) -> bool:
    """Whether ``r`` is ``c * s`` with ``c > 0`` for one of ``streams``: ``‖r - c s‖ <= tol``, ``c`` the
    least-squares coefficient. The ResidualProbe's test that ``z - b`` (a norm's input minus the branch output
    before it) is the residual stream: the block input ``x``, ``alpha * x`` for DeepNorm, or an earlier norm's
    output."""
    for s in streams:
        if s is None or s.shape != r.shape:
            continue
        s = s.double()
        ss = s.square().sum()
        if ss <= 0:
            continue
        c = (r * s).sum() / ss
        if c > 0 and torch.linalg.vector_norm(r - c * s) <= tol:
            return True
    return False
