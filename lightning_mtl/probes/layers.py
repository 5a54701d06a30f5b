"""Which parts of a model the probes look at: parameter "layers", layer-selection specs, residual blocks, norms.

Plain PyTorch. :func:`parameter_layers` and :func:`select_layers` are the grouping and the ``layers=``/``log_layers=``
syntax of :class:`~lightning_mtl.callbacks.GradientMagnitudeProbe`; :func:`find_residual_blocks` is the block
discovery rule of :class:`~lightning_mtl.callbacks.ResidualProbe`, :func:`is_norm` what it counts as a
normalisation layer (post-norm detection), and :func:`model_call` what its default forward calls on a dict batch (the
module or its Hugging Face model, :func:`find_hf_model`, with the batch's model inputs as keyword arguments).
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import nn

__all__ = [
    "find_hf_model",
    "find_residual_blocks",
    "is_norm",
    "is_position_spec",
    "model_call",
    "parameter_layers",
    "select_layers",
]

_POSITIONS = {"first", "middle", "last"}
_NORMS = (nn.LayerNorm, nn.RMSNorm, nn.GroupNorm, nn.modules.batchnorm._NormBase)


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


def find_residual_blocks(module: nn.Module) -> list[tuple[str, nn.Module]]:
    """The documented discovery rule of :class:`~lightning_mtl.callbacks.ResidualProbe`.

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


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: ``nn.LayerNorm``, ``nn.RMSNorm``, ``nn.GroupNorm``, a BatchNorm/InstanceNorm, or any
    module whose class name ends in ``Norm`` (``T5LayerNorm``, ``LlamaRMSNorm``, ...)."""
    return isinstance(module, _NORMS) or type(module).__name__.lower().endswith("norm")


def find_hf_model(module: nn.Module) -> nn.Module | None:
    """The outermost Hugging Face ``transformers.PreTrainedModel`` inside ``module`` (``module`` itself included), or
    ``None``. Never imports transformers: a model built with it has imported ``transformers.modeling_utils``."""
    modeling = sys.modules.get("transformers.modeling_utils")
    base = getattr(modeling, "PreTrainedModel", None)
    if base is None:
        return None
    return next((m for m in module.modules() if isinstance(m, base)), None)


#: Keys of a dict batch that hold a model input (Hugging Face names); the default forward needs one of them.
_INPUT_KEYS = frozenset({"input_ids", "inputs_embeds", "pixel_values", "input_values", "input_features"})
#: Keys never passed to the model by the default forward (with them a Hugging Face model returns its loss first).
_TARGET_KEYS = frozenset({"labels", "label", "label_ids", "start_positions", "end_positions"})


def _keywords(fn: Callable[..., Any]) -> set[str]:
    try:
        params = inspect.signature(fn).parameters.values()
    except (TypeError, ValueError):
        return set()
    return {p.name for p in params if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}


def model_call(module: nn.Module, batch: Mapping[str, Any]) -> tuple[Callable[..., Any], dict[str, Any]] | None:
    """What the default forward calls for a dict batch: ``module`` if its ``forward`` names a model input of the
    batch (``input_ids``, ...), else the outermost Hugging Face model inside it; with the batch entries its
    ``forward`` names as keyword arguments, labels left out. ``None`` if neither takes a model input of the batch."""
    hf = find_hf_model(module)
    inputs = _INPUT_KEYS | {getattr(hf, "main_input_name", "input_ids")}
    for target in (module, hf):
        if target is None:
            continue
        accepted = _keywords(target.forward)
        kwargs = {k: v for k, v in batch.items() if k in accepted and k not in _TARGET_KEYS}
        if inputs & kwargs.keys():
            return target, kwargs
    return None
