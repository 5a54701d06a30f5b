r"""Per-task gradients, their Gramian, and the weighted gradient: the plain-PyTorch machinery under the callbacks.

:class:`lightning_mtl.callbacks.MultiTaskGradient` drives the engine from Lightning's hooks; a Fabric, hand-written or
manual-optimisation loop drives it directly. One optimisation step is::

    engine.capture(record, module, grad_scale=S, accumulation=N)  # before the ordinary backward of sum(L) * S / N
    (sum(L) * S / N).backward()                                   # the loop's own backward (Lightning's, Fabric's, ...)
    engine.apply()                                                # after the gradients are unscaled, before the step

or, in a loop of one's own, ``engine.backward({name: loss, ...}, module=model, backward=...)`` then ``engine.apply()``.

**Layout.** :mod:`.core` holds :class:`GradientEngine` (binds the tasks, chooses one capture strategy, weighs, keeps
state). Each way of capturing the task gradients is a :class:`~.strategy.CaptureStrategy` with ``capture(record,
factor, loss_scale=)`` and ``apply(grad_scale)``, chosen once per model: :mod:`.parameter` (the exact
``autograd.grad`` path), :mod:`.sharded` (FSDP2 shards, by ``backward(retain_graph=True)``),
:mod:`.representation` (the tensor-hook path), :mod:`.single` (one task). :mod:`.detect` finds (or resolves the named)
shared parameters; :mod:`._fsdp` holds every use of FSDP2's private API, :mod:`._compile` what ``torch.compile``
needs.

Two modes (:attr:`GradientEngine.mode`):

``"parameter"`` (exact)
    The task gradients :math:`g_k` of the *shared* parameters (those that more than one task's loss reaches, or those
    named by ``shared_parameters=``), K backward passes per step (:mod:`.parameter`). ``apply`` forms
    :math:`G = JJ^\top`, asks the weighting for ``w`` and writes :math:`\sum_k w_k g_k` into ``.grad``.

``"representation"`` (MGDA-UB, ~ one plain step)
    The gradients :math:`d_k = \partial\mathcal L_k / \partial z` of the shared features ``z``, their Gramian, and a
    tensor hook on ``z`` that makes the loop's single backward carry :math:`\sum_k w_k d_k` (:mod:`.representation`).

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

**Sharded parameters** (FSDP2, ``fully_shard``). Parameter mode captures each task gradient with a
``backward(retain_graph=True)``, reads the reduce-scattered shards and all-reduces the K×K sum of the shard Gramians,
so every rank writes the same weighting into its own shard (:mod:`.sharded`, costs and constraints there).

**torch.compile.** Supported in both modes for a compiled submodule (``self.encoder = torch.compile(encoder)``,
heads eager or compiled separately) and, in parameter mode, for a whole compiled module
(``trainer.fit(torch.compile(module))``): the update equals the eager one. A compiled region is one autograd node that
lists every parameter it reads, so the shared parameters are *probed* through it (:mod:`.detect`), or named with
``shared_parameters=``. A compiled backward must run once per task, so the training forward must be compiled
without donated buffers (:func:`without_donated_buffers`; the callback does it for you). Representation mode needs
``z`` to be a graph boundary: with trunk and heads compiled into one graph it refuses with a message.

**One task.** With a single task loss there is nothing to weight: the engine leaves training exactly as it would be
without it (no extra backward, no rewritten gradient, no hook), warns once, and reports weight 1 and the task's true
gradient norm (:mod:`.single`).
"""

from lightning_mtl.engine._compile import without_donated_buffers
from lightning_mtl.engine.core import GradientEngine
from lightning_mtl.engine.detect import SharedParameters, reached_parameters
from lightning_mtl.engine.strategy import CaptureStrategy
from lightning_mtl.engine.summary import StepSummary, summarize_step

__all__ = [
    "CaptureStrategy",
    "GradientEngine",
    "SharedParameters",
    "StepSummary",
    "reached_parameters",
    "summarize_step",
    "without_donated_buffers",
]
