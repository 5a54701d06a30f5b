r"""Per-task gradients, their Gramian, and the weighted gradient: the machinery under the callbacks.

The engine is plain PyTorch; :class:`lightning_mtl.callbacks.MultiTaskGradient` drives it from Lightning's hooks
and a Fabric (or hand-written) loop drives it directly. One optimisation step is::

    engine.capture(record, grad_scale=S, accumulation=N)   # before the ordinary backward of sum(L) * S / N
    (sum(L) * S / N).backward()                            # the loop's own backward (Lightning's, Fabric's, ...)
    engine.apply()                                         # after the gradients are unscaled, before the step

Two modes (:attr:`GradientEngine.mode`):

``"parameter"`` (exact)
    The task gradients :math:`g_k` of the *shared* parameters (those that more than one task's loss reaches;
    found once by walking the autograd graph). ``capture`` computes :math:`g_1..g_{K-1}` with
    ``torch.autograd.grad(..., retain_graph=True)``; the ordinary backward produces :math:`\sum_k g_k`, and
    ``apply`` recovers :math:`g_K` by subtraction, so a step costs one forward and K backward passes: the floor
    for exact per-task gradients. ``apply`` forms :math:`G = JJ^\top` (one matmul over the flat
    K×P task Jacobian), asks the weighting for ``w`` and writes :math:`\sum_k w_k g_k` into ``.grad``.

``"representation"`` (MGDA-UB, ~ one plain step)
    The gradients :math:`d_k = \partial\mathcal L_k / \partial z` of the shared features ``z`` (backward through the
    heads only), their Gramian, and a tensor hook on ``z`` that replaces the gradient arriving there by
    :math:`\sum_k w_k d_k`, so the loop's single ordinary backward carries the combined gradient through the trunk.
    This is Sener & Koltun's upper-bound approximation; Su (https://kexue.fm/archives/8896) shows their proof that
    it still finds a Pareto-stationary direction is wrong, and it needs samples labelled for several tasks (with
    disjoint task data the :math:`d_k` are orthogonal).

Task-specific parameters (heads) always keep their own task's gradient.

**Scaling (AMP).** ``capture`` differentiates :math:`\mathcal L_k \cdot S/N` exactly as the loop's backward does,
so fp16 gradients are as well protected from underflow as the loop's own; the Gramian is divided by the scale
before any weighting sees it, so every weighting (scale-invariant or not) sees true gradients, and the result is
written back in the scale the loop expects. A non-finite Gramian makes the weighting fall back to equal weights and,
in parameter mode, leaves ``.grad`` as the backward made it, so a GradScaler skips the step as it would without us.

**Gradient accumulation (N micro-batches per step).** Parameter mode accumulates the task gradients over the
micro-batches and weights once per optimiser step: the update is the weighting of the task gradients of the whole
accumulated batch, exactly as with one N-times larger batch. Representation mode weights every micro-batch by its
own Gramian (the hook acts inside each backward); the update is the mean of the per-micro-batch combinations.

**Several processes (DDP).** Parameter mode all-reduces the K-1 captured task gradients (one flat bucket) so that,
with the loop's already averaged ``.grad``, every rank holds the same global task gradients, Gramian and weights.
Representation mode all-reduces the K×K Gramian (summed over ranks, then divided by the world size squared: the
exact Gramian of the global mean losses) unless ``rank_local=True``.

**Sharded parameters (FSDP2, ``fully_shard``).** FSDP2 frees its gathered parameters after the forward and
re-gathers them inside the backward, so ``torch.autograd.grad`` cannot ask for them; and only a real backward
reduce-scatters a gradient into the shards. Parameter mode therefore captures each task gradient with a
``backward(retain_graph=True)`` of that task's loss, reads the reduce-scattered (rank-averaged) shard of every shared
parameter, and puts the ``.grad`` tensors of the micro-batches before back. Each rank holds its shard of every
global task gradient; the Gramian is the sum over ranks of the shard Gramians (one K×K all-reduce), so every rank
gets the same weights and writes :math:`\sum_k w_k g_k` into its own shard. Each extra backward re-gathers the
shared parameters and reduce-scatters one more gradient: (K-1)·P through the network per micro-batch, the same ring
bytes as the DDP path (measured in ``benchmarks/scaling.md``), and K·P/W task-gradient elements per rank in memory.
FSDP2 must synchronise gradients at every micro-batch (no ``set_requires_gradient_sync(False)``), which Lightning's
``ModelParallelStrategy`` does. With a low-precision ``MixedPrecisionPolicy(param_dtype=...)`` the task gradients are
computed in that dtype, so the subtracted last task carries its rounding error relative to the total gradient (as
under fp16): put the dominant loss last, or set ``subtract_last=False``.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist
from torch import Tensor, nn

from lightning_mtl._dtensor import is_dtensor, local_tensor
from lightning_mtl.tasks import TaskLosses
from lightning_mtl.weighting import Weighting, as_weighting

__all__ = ["GradientEngine", "StepSummary", "reached_parameters", "summarize_step"]

Mode = Literal["parameter", "representation"]


@dataclass(frozen=True)
class StepSummary:
    """What the last optimiser step's weighting saw and chose (read-only; detached tensors on the Gramian's device).

    Attributes:
        tasks: the task names, in the Gramian's order.
        gramian: :math:`G_{ij} = \\langle g_i, g_j\\rangle`, K×K float64, unscaled (global under DDP/FSDP2).
        weights: the weights :math:`w` the weighting returned (K).
        norms: :math:`\\|g_k\\| = \\sqrt{G_{kk}}` (K).
        cosines: :math:`G_{ij} / (\\|g_i\\|\\|g_j\\|)`, 0 where a norm is 0 (K×K).
    """

    tasks: tuple[str, ...]
    gramian: Tensor
    weights: Tensor
    norms: Tensor
    cosines: Tensor


def summarize_step(tasks: Sequence[str], gramian: Tensor, weights: Tensor) -> StepSummary:
    """The :class:`StepSummary` of a Gramian and its weights: norms :math:`\\sqrt{G_{kk}}` and cosines."""
    gram = gramian.detach()
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    cos = torch.where(denom > 0, gram / denom.clamp_min(torch.finfo(gram.dtype).tiny), torch.zeros_like(gram))
    return StepSummary(tuple(tasks), gram, weights.detach(), norms, cos)


def reached_parameters(loss: Tensor) -> set[int]:
    """The ``id``s of the leaf tensors (parameters) that ``loss``'s autograd graph accumulates gradients into."""
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


def _scaled(loss: Tensor, factor: Tensor) -> Tensor:
    """``loss * factor`` in at least fp32, as GradScaler does (2^16 would overflow an fp16 loss)."""
    return loss.to(torch.promote_types(loss.dtype, torch.float32)) * factor


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _as_tensor(x: Tensor | float, like: Tensor) -> Tensor:
    if isinstance(x, Tensor):
        return x.detach().to(device=like.device, dtype=torch.float32)
    return torch.tensor(float(x), device=like.device, dtype=torch.float32)


class GradientEngine:
    """Per-task gradients → Gramian → weights → weighted gradient, for one model.

    Args:
        weighting: a :class:`~lightning_mtl.weighting.Weighting` (or a torchjd ``Weighting``).
        mode: ``"parameter"`` (exact) or ``"representation"`` (cheap; needs ``shared=`` features).
        rank_local: representation mode under DDP: use each rank's own Gramian instead of the all-reduced global
            one (saves a K×K all-reduce; ranks then combine with different weights and their averaged update is
            not the weighting of any one Gramian).
        subtract_last: parameter mode: recover the last task's gradient as ``.grad`` minus the others (K backward
            passes). Its rounding error is about eps·‖Σg‖, so a last task whose gradient is much smaller than the
            others' is imprecise in fp16; put the dominant loss last in the dict, or set ``False`` to compute every
            task gradient explicitly (K+1 backward passes).
    """

    def __init__(
        self,
        weighting: Weighting | nn.Module,
        mode: Mode = "parameter",
        *,
        rank_local: bool = False,
        subtract_last: bool = True,
    ) -> None:
        if mode not in ("parameter", "representation"):
            raise ValueError(f"mode must be 'parameter' or 'representation', got {mode!r}.")
        self.weighting = as_weighting(weighting)
        self.mode: Mode = mode
        self.rank_local = rank_local
        self.subtract_last = subtract_last
        self.tasks: tuple[str, ...] | None = None
        self.shared_params: list[nn.Parameter] | None = None
        self.last_gramian: Tensor | None = None
        self.last_weights: Tensor | None = None
        self.steps = 0
        self._jac: Tensor | None = None  # [K, P]; rows 0..K-2 accumulate captured task gradients (scaled)
        self._scale: Tensor | None = None  # S of the current accumulation cycle
        self._unit_scale = False
        self._captured = 0  # micro-batches captured since the last apply
        self._sharded = False  # shared parameters are FSDP2 shards: capture by backward, all-reduce the Gramian
        self._fsdp_groups: list[Any] = []  # FSDP2 parameter groups of the module (sharded case)
        self._grad_holders: list[nn.Parameter] = []  # every parameter object whose .grad a task backward can set
        self.bytes_all_reduced = 0  # for the scaling benchmark

    def reset(self) -> None:
        """Forget the model: the shared parameters are found again at the next capture (a new ``fit``, or
        parameters frozen or unfrozen). The task order and the weighting's state are kept."""
        self.shared_params = None
        self._jac = None
        self._scale = None
        self._captured = 0
        self._sharded = False
        self._fsdp_groups = []
        self._grad_holders = []

    # ----------------------------------------------------------------------------------------------------------
    def _bind(self, record: TaskLosses, module: nn.Module | None) -> None:
        names = record.names
        if self.tasks is None:
            self.weighting.bind(names)
            self.tasks = names
        elif names != self.tasks:
            raise ValueError(
                f"The tasks changed between steps: first {list(self.tasks)}, now {list(names)}. The task set and "
                "order are fixed by the first step; return every task each step (use a zero loss, e.g. "
                "`0 * head(z).sum()`, for a task without data in this batch)."
            )
        if self.mode == "parameter" and self.shared_params is None:
            self.shared_params = self._detect_shared(record, module)

    def _detect_shared(self, record: TaskLosses, module: nn.Module | None) -> list[nn.Parameter]:
        if module is None:
            raise ValueError("Parameter mode needs the module whose parameters the task losses reach.")
        groups = _fsdp_groups(module)
        sharded = _fsdp_sharded_params(groups)  # the graph holds FSDP2's gathered copies: count their shards
        counts: dict[int, int] = {}
        for loss in record.losses.values():
            for pid in {id(sharded[q]) if q in sharded else q for q in reached_parameters(loss)}:
                counts[pid] = counts.get(pid, 0) + 1
        if len(record.losses) == 1:
            warnings.warn(
                "Only one task loss was given: there is nothing to weight, the gradient is left as it is.",
                UserWarning,
                stacklevel=3,
            )
        candidates = {id(p): p for p in (sharded.get(id(q), q) for q in module.parameters())}  # ordered, unique
        shared = [p for p in candidates.values() if p.requires_grad and counts.get(id(p), 0) > 1]
        if not shared and len(record.losses) > 1:
            raise ValueError(
                "No parameter is reached by more than one task loss, so there is nothing to combine. "
                "Check that the task heads read a shared trunk."
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
        self._sharded = n_sharded > 0
        if self._sharded:
            _check_fsdp_sharding(shared, module)
            self._fsdp_groups = groups
            self._grad_holders = list({id(p): p for p in [*module.parameters(), *sharded.values()]}.values())
        return shared

    @property
    def last_step(self) -> StepSummary | None:
        """Tasks, Gramian, weights, norms and cosines of the last weighting (``None`` before the first step)."""
        if self.last_gramian is None or self.last_weights is None or self.tasks is None:
            return None
        return summarize_step(self.tasks, self.last_gramian, self.last_weights)

    @property
    def sharded(self) -> bool:
        """Parameter mode found FSDP2-sharded shared parameters (known after the first capture)."""
        return self._sharded

    # ----------------------------------------------------------------------------------------------------------
    def capture(
        self,
        record: TaskLosses,
        module: nn.Module | None = None,
        *,
        grad_scale: Tensor | float = 1.0,
        accumulation: int = 1,
    ) -> None:
        """Compute what the coming ordinary backward of ``record.total * grad_scale / accumulation`` cannot.

        Call it after the forward pass and before that backward, once per micro-batch.
        """
        self._bind(record, module)
        factor = _as_tensor(grad_scale, record.total) / accumulation
        if self.mode == "parameter":
            self._capture_parameters(record, factor, grad_scale)
        else:
            self._capture_representation(record, factor)
        self._captured += 1

    def _capture_parameters(self, record: TaskLosses, factor: Tensor, grad_scale: Tensor | float) -> None:
        params = self.shared_params
        assert params is not None
        losses = list(record.losses.values())
        k = len(losses)
        ref = params[0] if params else record.total
        if self._jac is None or self._jac.shape[0] != k or self._jac.device != ref.device:
            numel = sum(local_tensor(p).numel() for p in params)
            self._jac = torch.zeros(k, numel, dtype=ref.dtype if params else torch.float32, device=ref.device)
        if self._captured == 0:
            self._scale = _as_tensor(grad_scale, record.total).clone()  # the scaler updates its tensor in place
            self._unit_scale = isinstance(grad_scale, float) and grad_scale == 1.0  # known on the host: no rescale
        first = self._captured == 0
        captured = losses[:-1] if self.subtract_last else losses
        if self._sharded:
            self._capture_sharded(captured, factor, first)
            return
        for i, loss in enumerate(captured):
            grads = torch.autograd.grad(_scaled(loss, factor), params, retain_graph=True, allow_unused=True)
            if first:
                _flatten(grads, params, out=self._jac[i])  # written in place: no temporary of size P
            else:
                self._jac[i].add_(_flatten(grads, params))

    def _capture_sharded(self, losses: Sequence[Tensor], factor: Tensor, first: bool) -> None:
        """FSDP2: one ``backward(retain_graph=True)`` per task, reading the reduce-scattered shards; the ``.grad``
        of earlier micro-batches is set aside meanwhile and put back, so the loop's backward accumulates as usual."""
        params, jac, every = self.shared_params, self._jac, self._grad_holders
        assert params is not None and jac is not None
        _check_fsdp_reduces(self._fsdp_groups)
        kept = [p.grad for p in every]
        try:
            for i, loss in enumerate(losses):
                for p in every:
                    p.grad = None
                _scaled(loss, factor).backward(retain_graph=True)
                grads = [p.grad for p in params]
                if first:
                    _flatten(grads, params, out=jac[i])
                else:
                    jac[i].add_(_flatten(grads, params))
        finally:
            for p, g in zip(every, kept, strict=True):
                p.grad = g

    def _capture_representation(self, record: TaskLosses, factor: Tensor) -> None:
        z = record.shared
        if z is None:
            raise ValueError(
                "mode='representation' needs the shared features: return "
                "task_losses(self, {...}, shared=z) with z the trunk output that every head reads."
            )
        if not z.requires_grad:
            raise ValueError(
                "task_losses(shared=z): z does not require grad, so no gradient flows through it. Pass the trunk "
                "output itself (not a detached copy, and not computed under torch.no_grad())."
            )
        d = []
        for loss in record.losses.values():
            (g,) = torch.autograd.grad(_scaled(loss, factor), z, retain_graph=True, allow_unused=True)
            d.append(torch.zeros_like(z) if g is None else g)
        flat = torch.stack([g.reshape(-1) for g in d]).to(torch.promote_types(z.dtype, torch.float32))
        gram = (flat @ flat.mT).double() / factor.double().square()
        if not self.rank_local and _world() > 1:
            dist.all_reduce(gram)
            gram = gram / _world() ** 2
            self.bytes_all_reduced += gram.numel() * gram.element_size()
        w = self._weigh(gram)
        combined = (w.to(flat.dtype) @ flat).view_as(z)
        z.register_hook(lambda grad: combined.to(grad.dtype))

    def _weigh(self, gram: Tensor) -> Tensor:
        w = self.weighting(gram)
        self.last_gramian = gram.detach()
        self.last_weights = w.detach()
        return w

    # ----------------------------------------------------------------------------------------------------------
    def apply(self, grads_scale: Tensor | float = 1.0) -> Tensor | None:
        """Write the weighted gradient into ``.grad`` (parameter mode); call after the backward, before the step.

        Args:
            grads_scale: the loss scale the ``.grad`` tensors still carry: 1 once a GradScaler has unscaled them
                (the usual case), the scale itself for optimizers that unscale inside their fused step.

        Returns the weights used (representation mode: those of the last micro-batch), or ``None`` if nothing was
        captured since the last call.
        """
        if self._captured == 0:
            return None
        self._captured = 0
        self.steps += 1
        if self.mode == "representation":
            return self.last_weights
        params = self.shared_params
        jac = self._jac
        assert params is not None and jac is not None and self._scale is not None
        k = jac.shape[0]
        n_captured = k - 1 if self.subtract_last else k
        head = jac[:n_captured]
        out_scale = _as_tensor(grads_scale, jac).to(jac.dtype)
        if not (self._unit_scale and isinstance(grads_scale, float) and grads_scale == 1.0):
            head.mul_(out_scale / self._scale.to(jac.dtype))  # captured at the loss scale, now in the scale of .grad
        if _world() > 1 and n_captured > 0 and not self._sharded:  # FSDP2's reduce-scatter already averaged them
            dist.all_reduce(head)
            head.div_(_world())
            self.bytes_all_reduced += head.numel() * head.element_size()
        if self.subtract_last:
            last = jac[k - 1]
            _flatten([p.grad for p in params], params, out=last)
            if k == 2:
                last.sub_(head[0])  # no temporary for the common two-task case
            elif k > 2:
                last.sub_(head.sum(0))
        gram = jac @ jac.mT
        if self._sharded and _world() > 1:
            dist.all_reduce(gram)  # the sum of the shard Gramians is the Gramian of the full task gradients
            self.bytes_all_reduced += gram.numel() * gram.element_size()
        gram = gram.double() / out_scale.double().square()
        w = self._weigh(gram)
        # a non-finite Gramian (an inf/NaN task gradient under fp16): leave .grad as the backward made it (weights 1),
        # so that what the GradScaler checked and what the optimizer would see agree
        applied = torch.where(torch.isfinite(gram).all(), w, torch.ones_like(w))
        update = applied.to(jac.dtype) @ jac
        _write_grads(update, params)
        return w

    def backward(
        self,
        losses: Mapping[str, Tensor],
        *,
        module: nn.Module | None = None,
        shared: Tensor | None = None,
        backward: Callable[[Tensor], Any] | None = None,
        grad_scale: Tensor | float = 1.0,
        accumulation: int = 1,
    ) -> Tensor:
        """For hand-written and Fabric loops: capture, then run ``backward(sum(losses) / accumulation)``.

        ``backward`` defaults to ``Tensor.backward``; pass ``fabric.backward`` under Fabric (it applies the strategy's
        and precision's behaviour). ``grad_scale`` is the loss scale that ``backward`` applies (fp16 GradScaler).
        Call :meth:`apply` before the optimiser step. Returns the (unscaled, undivided) summed loss.
        """
        record = TaskLosses(dict(losses), shared, torch.stack([v.reshape(()) for v in losses.values()]).sum())
        self.capture(record, module, grad_scale=grad_scale, accumulation=accumulation)
        (backward or Tensor.backward)(record.total / accumulation)
        return record.total.detach()

    # ----------------------------------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        return {"tasks": self.tasks, "steps": self.steps, "weighting": self.weighting.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.tasks = None if state.get("tasks") is None else tuple(state["tasks"])
        if self.tasks is not None:
            self.weighting.bind(self.tasks)
        self.steps = int(state.get("steps", 0))
        if "weighting" in state:
            self.weighting.load_state_dict(state["weighting"])


def _flatten(grads: Sequence[Tensor | None], params: Sequence[Tensor], out: Tensor | None = None) -> Tensor:
    parts = [
        local_tensor(g).reshape(-1)
        if g is not None
        else torch.zeros(local_tensor(p).numel(), dtype=p.dtype, device=p.device)
        for g, p in zip(grads, params, strict=True)
    ]
    if not parts:
        return torch.zeros(0) if out is None else out.zero_()
    return torch.cat(parts) if out is None else torch.cat(parts, out=out)


def _fsdp_sharded_params(groups: list[Any]) -> dict[int, nn.Parameter]:
    """FSDP2: ``id`` of each managed parameter's gathered copy (what autograd sees) and of its shard (what the module
    and the optimizer hold after the backward) → the shard, over the given FSDP2 parameter groups."""
    out: dict[int, nn.Parameter] = {}
    for group in groups:
        for fp in group.fsdp_params:
            out[id(fp.sharded_param)] = fp.sharded_param
            if hasattr(fp, "_unsharded_param"):  # exists from the first all-gather on
                out[id(fp._unsharded_param)] = fp.sharded_param
    return out


def _fsdp_groups(module: nn.Module) -> list[Any]:
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


def _check_fsdp_reduces(groups: list[Any]) -> None:
    if not all(getattr(g, "reduce_grads", True) for g in groups):
        raise RuntimeError(
            "Parameter mode under FSDP2 reads each task's gradient from FSDP2's reduce-scatter, but gradient sync is "
            "off for this micro-batch (set_requires_gradient_sync(False), or Fabric's no_backward_sync). Keep "
            "gradient sync on for every micro-batch, or use mode='representation'."
        )


def _check_fsdp_sharding(params: Sequence[nn.Parameter], module: nn.Module) -> None:
    """The shard Gramians sum to the full Gramian when every element lives on exactly one rank of a mesh spanning
    all processes: pure ``Shard`` placements (FSDP2 alone or with tensor parallelism), no replicated mesh dims."""
    from torch.distributed.tensor import DTensor, Replicate

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
        if p.device_mesh.size() != _world():
            raise ValueError(
                f"Parameter mode under FSDP2 needs the shared parameters' device mesh to span all {_world()} "
                f"processes (it spans {p.device_mesh.size()}). Use mode='representation'."
            )


def _write_grads(flat: Tensor, params: Iterable[nn.Parameter]) -> None:
    offset = 0
    for p in params:
        local = local_tensor(p)
        n = local.numel()
        chunk = flat[offset : offset + n].view(local.shape)
        offset += n
        if p.grad is not None:  # None: no task reached p this step, so the optimizer skips it as it would anyway
            local_tensor(p.grad).copy_(chunk)
