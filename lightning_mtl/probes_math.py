r"""The small, Lightning-free helpers behind :mod:`lightning_mtl.callbacks.probes`: math, blocks, figures.

Everything here is plain PyTorch (plus ``torch.distributed`` for sharded parameters) so it can be tested
against a hand computation and reused from a Fabric or hand-written loop.

Quantities (Su, https://kexue.fm/archives/8994 and /8978; Wang et al., DeepNet, arXiv:2203.00555):

* per-layer gradient norm :math:`\|g_l\|_2` and the total :math:`\|g\|_2`;
* update-to-weight ratio :math:`\|\Delta\theta_l\|_2 / \|\theta_l\|_2` of the step actually taken;
* first-order loss change of one step: exact linearisation :math:`\langle g, \Delta\theta\rangle`, and the
  article's predictions :math:`-\eta\|g\|_2^2` (SGD) and :math:`-\eta\|g\|_1` (Adam, whose early steps are
  sign descent: the very first bias-corrected Adam step is :math:`-\eta\,\mathrm{sign}(g)` up to ``eps``);
* the block discovery rule of the ResidualProbe (:func:`find_residual_blocks`) and its figures.
* per-task gradient norms and cosines from a task Gramian :math:`G_{ij} = \langle g_i, g_j\rangle`.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_mtl._dtensor import local_tensor

__all__ = [
    "STAT_COLUMNS",
    "RngState",
    "aggregate_rows",
    "depth_figure",
    "find_residual_blocks",
    "first_order_predictions",
    "first_tensor",
    "gramian_norms_cosines",
    "is_position_spec",
    "local_tensor",
    "map_tensors",
    "parameter_layers",
    "parameter_stats",
    "reduce_sharded_rows",
    "select_layers",
]

#: Columns of :func:`parameter_stats`: squared grad norm, grad L1 norm, squared update norm, squared weight norm
#: (before the step), and the inner product <g, Δθ>.
STAT_COLUMNS = ("grad_sq", "grad_l1", "update_sq", "weight_sq", "grad_dot_update")

_POSITIONS = {"first", "middle", "last"}


# ----------------------------------------------------------------------------------------------------
# layers
# ----------------------------------------------------------------------------------------------------
def parameter_layers(module: nn.Module) -> dict[str, list[nn.Parameter]]:
    """Group the trainable parameters of ``module`` into "layers": the modules that own parameters directly.

    The key is the module's qualified name (``"blocks.3.fc1"``; ``"(root)"`` for parameters of ``module``
    itself); the order is registration order (``named_modules``), which is depth order for the usual stacks. A
    parameter shared by several modules belongs to the first one.
    """
    layers: dict[str, list[nn.Parameter]] = {}
    seen: set[int] = set()
    for name, mod in module.named_modules():
        params = [p for p in mod.parameters(recurse=False) if p.requires_grad and id(p) not in seen]
        if params:
            seen.update(id(p) for p in params)
            layers[name or "(root)"] = params
    return layers


def is_position_spec(spec: str) -> bool:
    """Whether ``spec`` is a comma list of ``first``/``middle``/``last``/integers (else it is a regex)."""
    return all(t.strip() in _POSITIONS or re.fullmatch(r"-?\d+", t.strip()) for t in spec.split(","))


def select_layers(names: Sequence[str], spec: str) -> list[str]:
    """Select layer names by a spec string.

    ``"all"``: every layer. A comma list of ``first``, ``middle``, ``last`` and integer positions (negative
    counts from the end), e.g. ``"first,middle,last"`` or ``"0,1,-2,-1"``: those positions in depth order
    (``middle`` is ``len // 2``). Anything else is a regular expression matched with :func:`re.search` against
    the names.

    Raises:
        ValueError: if the spec selects nothing (with some of the available names in the message).
    """
    names = list(names)
    if spec == "all":
        chosen = names
    else:
        tokens = [t.strip() for t in spec.split(",")]
        if is_position_spec(spec):
            n = len(names)
            picked: list[int] = []
            for t in tokens:
                i = {"first": 0, "middle": n // 2, "last": n - 1}.get(t)
                if i is None:
                    i = int(t) + (n if int(t) < 0 else 0)
                    if not 0 <= i < n:
                        raise ValueError(f"Layer position {t} is out of range: the model has {n} layers.")
                if 0 <= i < n and i not in picked:
                    picked.append(i)
            chosen = [names[i] for i in sorted(picked)]
        else:
            try:
                pattern = re.compile(spec)
            except re.error as err:
                raise ValueError(f"Layer spec {spec!r} is neither a position list nor a valid regex: {err}.") from err
            chosen = [n for n in names if pattern.search(n)]
    if not chosen:
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "")
        raise ValueError(
            f"The layer spec {spec!r} matches none of the {len(names)} layers with trainable parameters "
            f"({shown}). Use 'all', 'first,middle,last', positions like '0,-1', or a regex that matches "
            "these names."
        )
    return chosen


# ----------------------------------------------------------------------------------------------------
# statistics
# ----------------------------------------------------------------------------------------------------
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
    \|g_p\|_1` (METHODS §12, https://kexue.fm/archives/8994).
    """
    lr = lr.to(rows)
    return {
        "linear": rows[:, 4].sum(),
        "sgd": -(lr * rows[:, 0]).sum(),
        "adam": -(lr * rows[:, 1]).sum(),
    }


def gramian_norms_cosines(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Per-task gradient norms ``sqrt(diag G)`` and the cosine matrix ``G_ij / (|g_i| |g_j|)`` (0 for a zero
    norm)."""
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(torch.finfo(gram.dtype).tiny), torch.zeros_like(gram))
    return norms, cos


# ----------------------------------------------------------------------------------------------------
# RNG
# ----------------------------------------------------------------------------------------------------
@dataclass
class RngState:
    """A snapshot of every random generator a training step may draw from: torch (CPU), CUDA, Python,
    NumPy."""

    torch_cpu: Tensor
    cuda: list[Tensor] | None
    python: Any
    numpy: Any

    @classmethod
    def capture(cls) -> RngState:
        cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
        try:
            import numpy as np

            np_state: Any = np.random.get_state()
        except ImportError:  # pragma: no cover - numpy ships with torch wheels
            np_state = None
        return cls(torch.get_rng_state(), cuda, random.getstate(), np_state)

    def restore(self) -> None:
        torch.set_rng_state(self.torch_cpu)
        if self.cuda is not None:
            torch.cuda.set_rng_state_all(self.cuda)
        random.setstate(self.python)
        if self.numpy is not None:
            import numpy as np

            np.random.set_state(self.numpy)


# ----------------------------------------------------------------------------------------------------
# residual blocks, batches
# ----------------------------------------------------------------------------------------------------
def find_residual_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The documented discovery rule of :class:`ResidualProbe`.

    Breadth-first over ``named_modules``, the first ``nn.ModuleList`` or ``nn.Sequential`` with at least two
    children that are all of the same class (the repeated stack of a transformer or a ResNet stage); its
    children are the blocks. Returns ``[]`` if there is none.
    """
    queue: list[tuple[str, nn.Module]] = [("", module)]
    while queue:
        prefix, mod = queue.pop(0)
        for name, child in mod.named_children():
            full = f"{prefix}.{name}" if prefix else name
            if isinstance(child, (nn.ModuleList, nn.Sequential)):
                kids = list(child.named_children())
                if len(kids) >= 2 and len({type(k) for _, k in kids}) == 1:
                    return [(f"{full}.{n}", k) for n, k in kids]
            queue.append((full, child))
    return []


def first_tensor(x: Any) -> Tensor | None:
    """``x`` if a Tensor, else the first Tensor of a tuple/list/dict, else ``x.logits`` (``None`` if none)."""
    if isinstance(x, Tensor):
        return x
    if isinstance(x, Mapping):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        for item in x:
            if isinstance(item, Tensor):
                return item
    logits = getattr(x, "logits", None)
    return logits if isinstance(logits, Tensor) else None


def map_tensors(x: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    """Apply ``fn`` to every Tensor in a nested tuple/list/dict/namedtuple, keeping the structure."""
    if isinstance(x, Tensor):
        return fn(x)
    if isinstance(x, Mapping):
        return type(x)({k: map_tensors(v, fn) for k, v in x.items()})  # type: ignore[call-arg]
    if isinstance(x, tuple) and hasattr(x, "_fields"):
        return type(x)(*(map_tensors(v, fn) for v in x))
    if isinstance(x, (list, tuple)):
        return type(x)(map_tensors(v, fn) for v in x)
    return x


# ----------------------------------------------------------------------------------------------------
# figures
# ----------------------------------------------------------------------------------------------------
def depth_figure(
    history: list[dict[str, float]],
    panels: Sequence[tuple[str, str, Sequence[str]]],
    series: tuple[str, Sequence[tuple[str, str]]],
    title: str,
    path: str,
) -> None:
    """Save a figure: panels "value vs depth, one line per probed step (colour = step)" and one "value vs step".

    ``panels`` holds ``(ylabel, key, names)``: the value of ``names[i]`` at depth ``i`` is ``entry[f"{key}/{name}"]``;
    ``series`` is ``(ylabel, [(key, label), ...])`` for the last panel. Uses matplotlib's Agg canvas directly (no
    pyplot, no global backend change).
    """
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5.0 * (len(panels) + 1), 4.0))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(panels) + 1)
    steps = [int(h["step"]) for h in history]
    cmap = colormaps["viridis"]
    for ax, (ylabel, key, names) in zip(axes, panels, strict=False):
        for i, h in enumerate(history):
            ys = [h.get(f"{key}/{n}", math.nan) for n in names]
            if all(math.isnan(y) for y in ys):
                continue
            ax.plot(range(len(names)), ys, color=cmap(i / max(len(history) - 1, 1)), lw=1)
        ax.set_xlabel("depth (layer index, registration order)")
        ax.set_ylabel(ylabel)
        ax.set_yscale("log")
    if steps and len(panels):
        sm = scalar_mappable(cmap, min(steps), max(steps))
        fig.colorbar(sm, ax=axes[len(panels) - 1], label="step")
    ax = axes[-1]
    ylabel, lines = series
    for key, label in lines:
        ys = [h.get(key, math.nan) for h in history]
        if not all(math.isnan(y) for y in ys):
            ax.plot(steps, ys, marker=".", label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(ylabel)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize="small")
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def scalar_mappable(cmap: Any, lo: float, hi: float) -> Any:
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    return ScalarMappable(norm=Normalize(lo, hi if hi > lo else lo + 1), cmap=cmap)
