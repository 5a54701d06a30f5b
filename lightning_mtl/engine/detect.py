"""Which parameters are shared between tasks: found in the autograd graph, probed through compiled graphs, or named.

Parameter mode combines the task gradients of the *shared* parameters only; every other parameter keeps the gradient
the loop's backward gave it (a head: its own task's gradient). The shared set is found once per ``fit`` / epoch:

* **named** (``GradientEngine(shared_parameters=...)``, ``MultiTaskGradient(shared_parameters=...)``): exactly
  those parameters (the trainable ones among them); nothing is detected.
* **found** (default): a parameter is shared when more than one task loss reaches it. Reaching is read from the
  autograd graph (:func:`reached_parameters`), which is exact for eager code. A ``torch.compile``'d region is a single
  autograd node that lists every parameter it reads, whichever output a task uses, so through such a node the engine
  *probes* instead: it backpropagates a NaN from each task loss (``retain_graph=True``, once per detection) and takes
  the parameters whose gradient it turns into NaN. NaN survives every multiplication, also by a zero weight, so a task
  with a zero loss in that batch still reaches what its graph reads (unless the compiler folded the multiplication
  away: see below); a parameter that a task reads only through a branch closed at that batch (a ``where``/ReLU mask
  that is all off) is not counted for it.

Where the engine cannot tell, it raises and asks for ``shared_parameters=``; it never guesses: a compiled graph over
FSDP2-sharded parameters (whose gathered copies autograd cannot be asked for), and a task whose probe reaches none of
the compiled parameters its graph reads (inductor folds ``0 * loss`` to a constant, for instance).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn

from lightning_mtl._dtensor import is_dtensor
from lightning_mtl.engine._compile import is_compiled_node, retained_backward
from lightning_mtl.engine._fsdp import check_sharding, fsdp_groups, sharded_params
from lightning_mtl.tasks import TaskLosses

__all__ = ["SharedParameters", "SharedSet", "find_shared", "reached_parameters", "trainable_parameters"]

#: How to name the shared parameters: an attribute path of the module (``"trunk"``, ``"enc.layers"``, or a parameter
#: such as ``"trunk.0.weight"``), several of them, a module, parameters, or a callable ``module -> any of these``.
SharedParameters = str | Sequence[str] | nn.Module | Iterable[Tensor] | Callable[[nn.Module], Any]

_HOW_TO_NAME = (
    "Name the shared parameters: MultiTaskGradient(..., shared_parameters='trunk') (an attribute path, a list of "
    "them, a module, parameters, or a callable module -> parameters; GradientEngine takes the same argument)."
)


@dataclass
class SharedSet:
    """The shared parameters of one module and how they are held."""

    params: list[nn.Parameter]
    sharded: bool = False  # FSDP2 shards: captured by backward, Gramian all-reduced
    groups: list[Any] = field(default_factory=list)  # the module's FSDP2 parameter groups (sharded case)
    holders: list[nn.Parameter] = field(default_factory=list)  # every parameter whose .grad a task backward can set
    compiled: bool = False  # found by probing through torch.compile'd graphs


def reached_parameters(loss: Tensor) -> set[int]:
    """The ``id`` values of the leaf tensors (parameters) that the autograd graph of ``loss`` accumulates gradients
    into.

    Through a ``torch.compile``'d region this is every parameter the region reads (see :mod:`.detect`)."""
    seen: set[Any] = set()
    leaves: set[int] = set()
    stack = [loss.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or fn in seen:
            continue
        seen.add(fn)
        variable = getattr(fn, "variable", None)
        if variable is not None:
            leaves.add(id(variable))
        stack.extend(nxt for nxt, _ in fn.next_functions)
    return leaves


def _walk(loss: Tensor) -> tuple[set[int], dict[int, Tensor]]:
    """:func:`reached_parameters`, split: the leaves reached without passing through a compiled graph, and those
    below a compiled graph (which a compiled graph may or may not pass on to this loss: to be probed)."""
    seen: set[Any] = set()
    leaves: set[int] = set()
    opaque: dict[int, Tensor] = {}
    stack = [(loss.grad_fn, False)]
    while stack:
        fn, under_compiled = stack.pop()
        if fn is None or (fn, under_compiled) in seen:
            continue
        seen.add((fn, under_compiled))
        variable = getattr(fn, "variable", None)
        if variable is not None:
            if under_compiled:
                opaque[id(variable)] = variable
            else:
                leaves.add(id(variable))
        below = under_compiled or is_compiled_node(fn)
        stack.extend((nxt, below) for nxt, _ in fn.next_functions)
    return leaves, opaque


def _probe(losses: Sequence[Tensor], tensors: list[Tensor]) -> list[set[int]]:
    """For each loss, the ``id`` values of the ``tensors`` whose gradient a NaN seeded at the loss reaches."""
    out = []
    with torch.autograd.set_detect_anomaly(False), retained_backward(losses):  # the NaN is the point
        for loss in losses:
            seed = torch.full_like(loss, float("nan"))
            grads = torch.autograd.grad(loss, tensors, grad_outputs=seed, retain_graph=True, allow_unused=True)
            hit = [g is not None for g in grads]
            flags = torch.stack([g.isnan().any() for g in grads if g is not None]).tolist() if any(hit) else []
            it = iter(flags)
            out.append({id(t) for t, h in zip(tensors, hit, strict=True) if h and next(it)})
    return out


def _named(spec: SharedParameters, module: nn.Module) -> list[Tensor]:
    """The tensors that ``spec`` names in ``module``."""
    if callable(spec) and not isinstance(spec, nn.Module):
        spec = spec(module)
    if isinstance(spec, (str, nn.Module, Tensor)):
        spec = [spec]
    out: list[Tensor] = []
    for item in spec:  # type: ignore[union-attr]
        if isinstance(item, str):
            out.extend(_by_path(module, item))
        elif isinstance(item, nn.Module):
            out.extend(item.parameters())
        elif isinstance(item, Tensor):
            out.append(item)
        else:
            raise TypeError(
                f"shared_parameters: expected attribute paths, modules or parameters, got a {type(item).__name__}."
            )
    return out


def _by_path(module: nn.Module, path: str) -> list[Tensor]:
    try:
        return list(module.get_submodule(path).parameters())
    except AttributeError:
        pass
    try:
        return [module.get_parameter(path)]
    except AttributeError:
        children = [name for name, _ in module.named_children()]
        raise ValueError(
            f"shared_parameters: {path!r} is neither a submodule nor a parameter of {type(module).__name__} "
            f"(its submodules: {children})."
        ) from None


def trainable_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable parameters of ``module`` as the optimizer holds them: FSDP2's gathered copies (which the module
    may hold between forward and backward) replaced by their shards."""
    sharded = sharded_params(fsdp_groups(module))
    unique = {id(p): p for p in (sharded.get(id(q), q) for q in module.parameters())}
    return [p for p in unique.values() if p.requires_grad]


def find_shared(record: TaskLosses, module: nn.Module | None, named: SharedParameters | None = None) -> SharedSet:
    """The shared parameters of ``module`` for the tasks of ``record`` (K >= 2), named or found."""
    if module is None:
        raise ValueError("Parameter mode needs the module whose parameters the task losses reach.")
    groups = fsdp_groups(module)
    sharded = sharded_params(groups)  # the graph holds FSDP2's gathered copies: count their shards
    candidates = {id(p): p for p in (sharded.get(id(q), q) for q in module.parameters())}  # ordered, unique
    compiled = False
    if named is not None:
        chosen = {id(sharded.get(id(t), t)) for t in _named(named, module)}
        foreign = chosen - candidates.keys()
        if foreign:
            raise ValueError(
                f"shared_parameters names {len(foreign)} tensor(s) that are not parameters of "
                f"{type(module).__name__}. Name its own submodules or parameters."
            )
        shared = [p for p in candidates.values() if p.requires_grad and id(p) in chosen]
        if not shared:
            raise ValueError("shared_parameters names no trainable parameter (all are frozen, or the set is empty).")
    else:
        walks = [_walk(loss) for loss in record.losses.values()]
        opaque = {k: v for _, o in walks for k, v in o.items()}
        compiled = bool(opaque)
        if compiled and sharded:
            raise ValueError(
                "The task losses run through a torch.compile'd graph over FSDP2-sharded parameters: the compiled graph "
                "lists every parameter it reads whichever task uses it, and FSDP2's gathered parameters cannot be "
                f"probed per task, so the engine cannot tell which parameters are shared. {_HOW_TO_NAME}"
            )
        if compiled:
            probed = _probe(list(record.losses.values()), list(opaque.values()))
            for name, (_, below), hits in zip(record.names, walks, probed, strict=True):
                if below and not hits:
                    raise ValueError(
                        f"The loss of task {name!r} runs through a torch.compile'd graph, but a probe of that graph "
                        "reaches none of the parameters it reads (the compiler may have folded the loss, e.g. "
                        "`0 * loss` for a task without data in this batch, or every path is masked in this batch), so "
                        f"the engine cannot tell which parameters this task shares. {_HOW_TO_NAME}"
                    )
            reached = [leaves | hits for (leaves, _), hits in zip(walks, probed, strict=True)]
        else:
            reached = [leaves for leaves, _ in walks]
        counts: dict[int, int] = {}
        for ids in reached:
            for pid in {id(sharded[q]) if q in sharded else q for q in ids}:
                counts[pid] = counts.get(pid, 0) + 1
        shared = [p for p in candidates.values() if p.requires_grad and counts.get(id(p), 0) > 1]
        if not shared:
            raise ValueError(
                "No parameter is reached by more than one task loss, so there is nothing to combine. Check that the "
                f"task heads read a shared trunk. {_HOW_TO_NAME}"
            )
    n_sharded = sum(id(p) in sharded for p in shared)
    if 0 < n_sharded < len(shared):
        plain = {id(p) for p in shared if id(p) not in sharded}
        names = [n for n, p in module.named_parameters() if id(p) in plain]
        raise ValueError(
            f"Some shared parameters are sharded by FSDP2 and some are not ({names[:5]} are not): nothing would "
            "reduce the gradients of the plain ones across ranks. Apply fully_shard to the root module as well."
        )
    if n_sharded == 0 and any(is_dtensor(p) for p in shared):
        raise ValueError(
            "The shared parameters are DTensors that FSDP2 does not manage (tensor parallelism without "
            "fully_shard): each rank holds a different slice, which parameter mode cannot combine. Apply "
            "fully_shard over them as well, or use mode='representation'."
        )
    if n_sharded == 0:
        return SharedSet(shared, compiled=compiled)
    check_sharding(shared, module)
    holders = list({id(p): p for p in [*module.parameters(), *sharded.values()]}.values())
    return SharedSet(shared, sharded=True, groups=groups, holders=holders, compiled=compiled)
