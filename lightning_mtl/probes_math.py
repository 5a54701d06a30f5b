"""Deprecated path: the probes' math is in :mod:`lightning_mtl.probes` (``stats``, ``layers``, ``figures``); the
random-state and nested-batch helpers are in :mod:`lightning_mtl._utils`; per-task norms and cosines are
:class:`lightning_mtl.engine.StepSummary` (``MultiTaskGradient.last_step``). Importing a name from here works for one
more release, with a DeprecationWarning naming the new path."""

from __future__ import annotations

import warnings

from torch import Tensor

from lightning_mtl._imports import moved

_UTILS = "lightning_mtl._utils"

__getattr__ = moved(
    "lightning_mtl.probes_math",
    "lightning_mtl.probes",
    names={"RngState": _UTILS, "first_tensor": _UTILS, "map_tensors": _UTILS, "local_tensor": "lightning_mtl._dtensor"},
)


def gramian_norms_cosines(gram: Tensor) -> tuple[Tensor, Tensor]:
    """Deprecated: ``lightning_mtl.engine.summarize_step(tasks, gram, weights)`` (or ``MultiTaskGradient.last_step``)
    gives ``.norms`` and ``.cosines``."""
    from lightning_mtl.engine import summarize_step

    warnings.warn(
        "lightning_mtl.probes_math.gramian_norms_cosines is replaced by lightning_mtl.engine.summarize_step (its "
        ".norms and .cosines), or MultiTaskGradient.last_step (the old path stops working in the next release).",
        DeprecationWarning,
        stacklevel=2,
    )
    summary = summarize_step([str(k) for k in range(gram.shape[0])], gram, gram.new_zeros(gram.shape[0]))
    return summary.norms, summary.cosines
