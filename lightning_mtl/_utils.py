"""Small helpers that several parts of the project need (private): train/eval mode, random-generator state,
nested-batch traversal, and the learning-rate warm-up and weight-decay groups that the models share.

Kept here so that each is written once; the models in :mod:`lightning_gen` use them too.
"""

from __future__ import annotations

import contextlib
import math
import random
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from lightning_mtl._dtensor import is_dtensor

__all__ = [
    "RngState",
    "eval_mode",
    "first_tensor",
    "fused_ok",
    "map_tensors",
    "no_decay_groups",
    "warmup_schedule",
]


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """Put ``module`` (every submodule) in eval mode, and give each submodule back its own ``training`` flag on
    exit, also after an exception (a submodule frozen in eval mode stays so)."""
    modes = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield module
    finally:
        for m, mode in modes:
            m.training = mode


@dataclass
class RngState:
    """A snapshot of every random generator a training step may draw from: torch (CPU), CUDA, Python, NumPy."""

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


def warmup_schedule(
    step: int,
    warmup: int,
    total: int,
    *,
    decay: Literal["cosine", "linear", "constant"] = "cosine",
    floor: float = 0.0,
    from_zero: bool = False,
) -> float:
    r"""Learning-rate factor at optimizer step ``step`` (0-based, as ``LambdaLR`` counts): a linear warm-up over
    ``warmup`` steps, then ``decay`` from 1 to ``floor`` at step ``total`` (and ``floor`` after it).

    During the warm-up (``step < warmup``) the factor is ``(step + 1) / warmup``, so the first step already trains
    at ``1 / warmup`` and step ``warmup - 1`` at the full rate; with ``from_zero`` it is ``step / warmup`` (the first
    step at 0, as Hugging Face's ``get_linear_schedule_with_warmup``). After it, with
    :math:`p = \min(1, (\text{step} - \text{warmup}) / \max(1, \text{total} - \text{warmup}))`:

    * ``"cosine"``: :math:`\text{floor} + (1 - \text{floor})\,\tfrac12(1 + \cos\pi p)`;
    * ``"linear"``: :math:`\text{floor} + (1 - \text{floor})\max(0, (\text{total} - \text{step}) /
      \max(1, \text{total} - \text{warmup}))`;
    * ``"constant"``: 1 (``total`` and ``floor`` are not used).

    Use it with ``LambdaLR(optimizer, functools.partial(warmup_schedule, warmup=..., total=..., decay=...))``.
    """
    if decay not in ("cosine", "linear", "constant"):
        raise ValueError(f"warmup_schedule(decay=...) must be 'cosine', 'linear' or 'constant', got {decay!r}.")
    if step < warmup:
        return step / max(1, warmup) if from_zero else (step + 1) / warmup
    if decay == "constant":
        return 1.0
    if decay == "linear":
        return floor + (1 - floor) * max(0.0, (total - step) / max(1, total - warmup))
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def no_decay_groups(
    params: nn.Module | Iterable[tuple[str, Tensor]],
    weight_decay: float,
    *,
    no_decay_names: Sequence[str] = (),
    no_decay_prefixes: Sequence[str] = (),
    trainable_only: bool = True,
) -> list[dict[str, Any]]:
    """The two optimizer parameter groups ``[{"params": decay, "weight_decay": weight_decay}, {"params": no_decay,
    "weight_decay": 0.0}]`` of a module (its ``named_parameters()``) or of ``(name, parameter)`` pairs.

    No weight decay for every parameter with fewer than two dimensions (biases, norm gains and offsets), for names
    that contain one of ``no_decay_names`` (e.g. ``"LayerNorm"``) and for names that start with one of
    ``no_decay_prefixes`` (e.g. ``"embed"``). Both groups keep the order of the parameters. With ``trainable_only``
    the parameters with ``requires_grad=False`` are left out of both groups.
    """
    named = params.named_parameters() if isinstance(params, nn.Module) else params
    prefixes = tuple(no_decay_prefixes)
    decay: list[Tensor] = []
    no_decay: list[Tensor] = []
    for name, p in named:
        if trainable_only and not p.requires_grad:
            continue
        skip = p.ndim < 2 or any(s in name for s in no_decay_names) or (bool(prefixes) and name.startswith(prefixes))
        (no_decay if skip else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def fused_ok(trainer: Any, params: Iterable[Tensor] = ()) -> bool:
    """Whether the models may build their optimizer with ``fused=True`` (one kernel per step) for ``trainer``.

    ``False`` when the precision plugin holds a GradScaler (``"16-mixed"``): a fused optimizer unscales only inside
    its step, so Lightning could not clip (it raises) and every callback that reads ``.grad`` before the step (the
    gradient probes, the clipping of FSDP) would see gradients multiplied by the loss scale. ``False`` when the
    trainer clips gradients (``gradient_clip_val`` > 0) under Lightning's ``MixedPrecision`` plugin, also without a
    GradScaler (``"bf16-mixed"``): it refuses to clip for such an optimizer and raises at the first step. ``False``
    when a parameter is not a floating-point tensor on CPU or CUDA, or is a DTensor (FSDP2 / tensor parallel).
    ``True`` otherwise: ``"32-true"``, ``"bf16-true"``, ``"16-true"``, ``"bf16-mixed"`` without clipping, and no
    trainer attached yet (``None``). The models call it in ``configure_optimizers``, where the trainer's clipping
    and precision are known, and build the non-fused optimizer (which works everywhere) when it says no::

        AdamW(groups, lr=lr, fused=fused_ok(self._trainer, self.parameters()) or None)
    """
    if not all(p.is_floating_point() and p.device.type in ("cpu", "cuda") and not is_dtensor(p) for p in params):
        return False
    if trainer is None:
        return True
    plugin = getattr(trainer, "precision_plugin", None)
    if getattr(plugin, "scaler", None) is not None:
        return False
    clip = getattr(trainer, "gradient_clip_val", None)
    if not clip or clip <= 0:
        return True
    from lightning.pytorch.plugins.precision import MixedPrecision

    return not isinstance(plugin, MixedPrecision)
