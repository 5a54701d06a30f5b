"""The Lightning-free parts of the training probes (:class:`~lightning_mtl.callbacks.GradientMagnitudeProbe`,
:class:`~lightning_mtl.callbacks.ResidualProbe`), usable from Fabric or a hand-written loop:

* :mod:`~lightning_mtl.probes.stats`: per-parameter statistics of a step, their reduction over FSDP2 shards and
  over layers, the first-order loss change, and the residual-stream test of post-norm detection;
* :mod:`~lightning_mtl.probes.layers`: parameter layers, the layer-selection syntax, residual-block discovery,
  normalisation layers, the Hugging Face model of a module and how to call it on a dict batch;
* :mod:`~lightning_mtl.probes.figures`: the end-of-fit figure (matplotlib imported only when drawing).

Per-task gradient norms and cosines come from :class:`lightning_mtl.engine.StepSummary`
(``MultiTaskGradient.last_step``).
"""

from lightning_mtl.probes.figures import depth_figure, plottable, scalar_mappable
from lightning_mtl.probes.layers import (
    find_hf_model,
    find_residual_blocks,
    is_norm,
    is_position_spec,
    model_call,
    parameter_layers,
    select_layers,
)
from lightning_mtl.probes.stats import (
    STAT_COLUMNS,
    aggregate_rows,
    first_order_predictions,
    parameter_stats,
    positive_multiple,
    reduce_sharded_rows,
)

__all__ = [
    "STAT_COLUMNS",
    "aggregate_rows",
    "depth_figure",
    "find_hf_model",
    "find_residual_blocks",
    "first_order_predictions",
    "is_norm",
    "is_position_spec",
    "model_call",
    "parameter_layers",
    "parameter_stats",
    "plottable",
    "positive_multiple",
    "reduce_sharded_rows",
    "scalar_mappable",
    "select_layers",
]
