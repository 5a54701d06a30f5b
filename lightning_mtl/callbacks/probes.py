r"""
Training probes: gradient magnitudes and the DeepNet update size
^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^

Two callbacks that show "increment explosion" (Su, https://kexue.fm/archives/8994, and the DeepNet analysis
https://kexue.fm/archives/8978; Wang et al., *DeepNet: Scaling Transformers to 1,000 Layers*,
arXiv:2203.00555) in any Lightning run, without changing it:

* :class:`GradientMagnitudeProbe`: per-layer gradient norms, update-to-weight ratios, and the observed loss
  change of one step beside its first-order predictions; per-task norms and cosines under
  :class:`~lightning_mtl.callbacks.MultiTaskGradient`.
* :class:`ResidualProbe`: the residual branch ratio :math:`\|\varepsilon F(x)\|/\|x\|` of every block and the
  model update :math:`\|F(x;\theta_t) - F(x;\theta_0)\|` on a fixed probe batch.

The math (and the block discovery rule, and the figures) lives in :mod:`lightning_mtl.probes_math`.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor, nn
from typing_extensions import override

from lightning_mtl.probes_math import (
    RngState,
    aggregate_rows,
    depth_figure,
    find_residual_blocks,
    first_order_predictions,
    first_tensor,
    gramian_norms_cosines,
    is_position_spec,
    local_tensor,
    map_tensors,
    parameter_layers,
    parameter_stats,
    reduce_sharded_rows,
    select_layers,
)
from lightning_mtl.tasks import pop_task_losses

__all__ = ["GradientMagnitudeProbe", "ResidualProbe", "find_residual_blocks"]

_ADAM = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax)


# ====================================================================================================
# shared helpers
# ====================================================================================================
def _check_interval(name: str, every_n_steps: int) -> None:
    if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps <= 0:
        raise MisconfigurationException(
            f"{name}(every_n_steps=...) must be a positive integer (probe every that many optimizer steps), "
            f"got {every_n_steps!r}."
        )


def _check_spec(name: str, arg: str, spec: Any) -> None:
    if not isinstance(spec, str) or not spec.strip():
        raise MisconfigurationException(
            f"{name}({arg}=...) must be 'all', a list of positions like 'first,middle,last' or '0,-1', or a "
            f"regex; got {spec!r}."
        )
    if spec == "all" or is_position_spec(spec):
        return
    try:
        re.compile(spec)
    except re.error as err:
        raise MisconfigurationException(f"{name}({arg}={spec!r}) is not a valid regular expression: {err}.") from err


def _select(name: str, arg: str, names: Sequence[str], spec: str, what: str) -> list[str]:
    try:
        return select_layers(names, spec)
    except ValueError as err:
        raise MisconfigurationException(f"{name}({arg}={spec!r}): {err}".replace("layers", what)) from err


def _log_scalars(trainer: pl.Trainer, metrics: dict[str, float]) -> None:
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


@contextlib.contextmanager
def _quiet_logging(module: pl.LightningModule) -> Iterator[None]:
    """Turn ``self.log``/``self.log_dict`` into no-ops while the probe re-runs ``training_step``."""

    def noop(*args: Any, **kwargs: Any) -> None:
        return None

    module.__dict__["log"] = noop
    module.__dict__["log_dict"] = noop
    try:
        yield
    finally:
        module.__dict__.pop("log", None)
        module.__dict__.pop("log_dict", None)


def _plot_dir(trainer: pl.Trainer) -> str:
    path = trainer.log_dir  # a collective: every rank must call it
    return path if path else trainer.default_root_dir


def _world(trainer: pl.Trainer) -> int:
    return int(getattr(trainer.strategy, "world_size", 1) or 1)


# ====================================================================================================
# GradientMagnitudeProbe
# ====================================================================================================
class GradientMagnitudeProbe(Callback):
    r"""Per-layer gradient norms, update-to-weight ratios and the loss change of one step, every N steps.

    On a probe step (``trainer.global_step`` after the step is a multiple of ``every_n_steps``) it records,
    for each "layer" (a module that owns parameters directly, named as in ``named_modules``; depth is the
    registration order):

    * ``grad_norm/<layer>`` :math:`\|g_l\|_2` and ``grad_norm/total`` :math:`\|g\|_2` over all trainable
      parameters;
    * ``update_ratio/<layer>`` :math:`\|\Delta\theta_l\|_2/\|\theta_l\|_2` and ``update_ratio/total``, with
      :math:`\Delta\theta` the step the optimizer actually took (a snapshot of the parameters is taken in
      ``on_before_optimizer_step`` of probe steps only and compared in ``on_train_batch_end``);
    * the loss change of the step (Su, https://kexue.fm/archives/8994, METHODS §12):
      ``loss_change/observed`` :math:`\mathcal L(\theta_{t+1}; B_t) - \mathcal L(\theta_t; B_t)` on the *same*
      batch :math:`B_t`, ``loss_change/linear`` :math:`\langle g,\Delta\theta\rangle` (its exact first-order
      term), and ``loss_change/predicted``: the article's estimate :math:`-\eta\|g\|_2^2` for SGD or
      :math:`-\eta\|g\|_1` for the Adam family (``predicted_sgd`` and ``predicted_adam`` are both kept in
      :attr:`history`). :math:`\mathcal L(\theta_t; B_t)` is the loss ``training_step`` returned for the step.
      :math:`\mathcal L(\theta_{t+1}; B_t)` is measured by running ``training_step`` again on the same batch
      after the step, under ``torch.no_grad()``, in train mode with the random state of the original forward
      (so dropout draws the same masks), with ``self.log`` silenced, and with every buffer (BatchNorm
      statistics) and every random generator restored afterwards: training is unaffected. :math:`\eta` is each
      parameter group's ``lr`` at ``on_before_optimizer_step`` (the rate the step uses). Under DDP both losses
      are averaged over the ranks, matching the averaged gradient. It needs ``accumulate_grad_batches == 1``
      and automatic optimisation, and it costs one extra forward pass per probe step; ``loss_change=False``
      turns it off.
    * with :class:`~lightning_mtl.callbacks.MultiTaskGradient` in ``trainer.callbacks``:
      ``task/grad_norm/<task>``, ``task/cos/<a>~<b>`` and ``task/weight/<task>`` from its engine's Gramian of
      the step (no extra backward).

    The gradient :math:`g` is copied in ``on_before_optimizer_step`` of the probe step: unscaled by AMP and
    accumulated over ``accumulate_grad_batches``, *before* gradient clipping, i.e. the gradient of the training
    loss, which is what the first-order term :math:`\langle g,\Delta\theta\rangle` needs (a clipped
    gradient would not be). With :class:`~lightning_mtl.callbacks.MultiTaskGradient`, list the probe *before*
    it to see the gradient of the summed loss; listed after it, the probe sees the combined gradient
    :math:`\sum_k w_k g_k` (it says so at setup). Under DDP the gradient is already all-reduced, so all ranks
    compute the same values; under FSDP2 the per-parameter sums of squares of the local shards are all-reduced
    (one collective). With a *fused* optimizer and a GradScaler the gradient is still multiplied by the loss
    scale when the hooks see it: the probe then warns once and leaves the gradient quantities out (update
    ratios stay). Memory: on a probe step the probe holds one copy of the (local) parameters and one of their
    gradients until the end of the step.

    Logged scalars go to every logger of the Trainer (``prefix`` + name, at ``trainer.global_step``); only the
    layers chosen by ``log_layers`` are logged, all layers of ``layers`` are kept in :attr:`history`. Without
    a logger the values are only kept in :attr:`history`. At the end of fit, rank 0 writes
    ``gradient_magnitude_probe.png`` (gradient norm and update ratio vs depth, one line per probe step, and
    the loss changes vs step) into ``trainer.log_dir`` (``default_root_dir`` without a logger); its path is
    :attr:`plot_path`.

    Args:
        every_n_steps: probe every that many optimizer steps (default 50).
        layers: the layers measured and plotted: ``"all"`` (default), a comma list of positions
            (``"first,middle,last"``, ``"0,1,-1"``), or a regular expression searched in the layer names.
        log_layers: the subset of ``layers`` sent to the logger, same syntax (default ``"first,middle,last"``,
            so the logger is not flooded; ``"all"`` logs every layer).
        loss_change: measure the observed loss change (one extra forward pass per probe step).
        rule: which first-order prediction is ``loss_change/predicted``: ``"auto"`` (SGD for
            ``torch.optim.SGD``, Adam for Adam/AdamW/NAdam/RAdam/Adamax, none otherwise), ``"sgd"`` or
            ``"adam"``.
        prefix: prepended to every logged name.
        plot: write the PNG at the end of fit.

    Raises:
        MisconfigurationException: for ``every_n_steps <= 0``, an invalid spec or rule, and (in ``setup``) for
            a ``layers``/``log_layers`` spec that matches no layer, or a model without trainable parameters.

    Example::

        >>> import lightning as L
        >>> from lightning_mtl.callbacks.probes import GradientMagnitudeProbe
        >>> probe = GradientMagnitudeProbe(every_n_steps=50, log_layers="first,middle,last")
        >>> trainer = L.Trainer(callbacks=[probe])
    """

    PLOT_NAME = "gradient_magnitude_probe.png"

    def __init__(
        self,
        every_n_steps: int = 50,
        layers: str = "all",
        log_layers: str = "first,middle,last",
        *,
        loss_change: bool = True,
        rule: Literal["auto", "sgd", "adam"] = "auto",
        prefix: str = "probe/",
        plot: bool = True,
    ) -> None:
        name = type(self).__name__
        _check_interval(name, every_n_steps)
        _check_spec(name, "layers", layers)
        _check_spec(name, "log_layers", log_layers)
        if rule not in ("auto", "sgd", "adam"):
            raise MisconfigurationException(f"{name}(rule=...) must be 'auto', 'sgd' or 'adam', got {rule!r}.")
        self.every_n_steps = every_n_steps
        self.layers = layers
        self.log_layers = log_layers
        self.loss_change = loss_change
        self.rule = rule
        self.prefix = prefix
        self.plot = plot
        #: One dict per probe step ``{"step": s, "<name>": value, ...}``: names without prefix, all layers.
        self.history: list[dict[str, float]] = []
        self.layer_names: list[str] = []
        self.plot_path: str | None = None
        self._params: list[nn.Parameter] = []
        self._owner: Tensor | None = None
        self._logged: set[str] = set()
        self._mtl: Any = None
        self._rng: RngState | None = None
        self._before: list[Tensor] | None = None
        self._grads: list[Tensor | None] | None = None
        self._lr: Tensor | None = None
        self._kind: str | None = None
        self._grads_valid = True
        self._armed_step = -1
        self._warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, layers=self.layers)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    # --- environment -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = type(self).__name__
        groups = parameter_layers(pl_module)
        if not groups:
            raise MisconfigurationException(f"{name}: the model has no trainable parameters to probe.")
        chosen = _select(name, "layers", list(groups), self.layers, "layers")
        logged = _select(name, "log_layers", chosen, self.log_layers, "probed layers")
        self.layer_names = chosen
        self._logged = set(logged)
        index = {n: i for i, n in enumerate(chosen)}
        self._params, owner = [], []
        for layer, params in groups.items():
            for p in params:
                self._params.append(p)
                owner.append(index.get(layer, len(chosen)))  # unselected layers go to a dropped extra row
        self._owner = torch.tensor(owner, dtype=torch.long)
        from lightning_mtl.callbacks.multitask import MultiTaskGradient

        self._mtl = next((cb for cb in trainer.callbacks if isinstance(cb, MultiTaskGradient)), None)
        if self._mtl is not None and trainer.callbacks.index(self._mtl) < trainer.callbacks.index(self):
            rank_zero_info(
                f"{name} is listed after MultiTaskGradient: it sees the combined gradient sum_k w_k g_k, so "
                "grad_norm/* and loss_change/linear refer to that direction, not to the gradient of the summed "
                "loss. List the probe before MultiTaskGradient for the latter."
            )
        if self.loss_change and not pl_module.automatic_optimization:
            self._warn_once(
                "manual",
                f"{name}: manual optimisation: the observed loss change is not measured (it re-runs "
                "training_step, which would call manual_backward). Gradient norms and update ratios still "
                "are.",
            )
        if not trainer.loggers:
            rank_zero_info(f"{name}: the Trainer has no logger; the probe values are kept in `{name}.history`.")

    # --- probe steps -----------------------------------------------------------------------------------
    def _next_is_probe(self, trainer: pl.Trainer) -> bool:
        return (trainer.global_step + 1) % self.every_n_steps == 0

    def _measures_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        if not self.loss_change or not pl_module.automatic_optimization:
            return False
        if trainer.accumulate_grad_batches != 1:
            self._warn_once(
                "accumulate",
                f"{type(self).__name__}: accumulate_grad_batches > 1: the observed loss change is not "
                "measured (the gradient spans several batches, the re-evaluation would see only the last "
                "one).",
            )
            return False
        return True

    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._next_is_probe(trainer) and self._measures_loss(trainer, pl_module):
            self._rng = RngState.capture()  # the state the training forward starts from (copies, draws nothing)

    @override
    def on_before_optimizer_step(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if not self._next_is_probe(trainer) or self._armed_step == trainer.global_step + 1:
            return
        self._armed_step = trainer.global_step + 1
        opt = getattr(optimizer, "_optimizer", optimizer)
        self._before = [local_tensor(p.detach()).clone() for p in self._params]
        lr_of: dict[int, float] = {}
        for group in opt.param_groups:
            for p in group["params"]:
                lr_of[id(p)] = float(group["lr"])
        self._lr = torch.tensor([lr_of.get(id(p), 0.0) for p in self._params], dtype=torch.float64)
        if self.rule != "auto":
            self._kind = self.rule
        else:
            self._kind = "adam" if isinstance(opt, _ADAM) else "sgd" if isinstance(opt, torch.optim.SGD) else None
        scaler = getattr(trainer.precision_plugin, "scaler", None)
        self._grads_valid = not (scaler is not None and opt.defaults.get("fused"))
        self._grads = None
        if self._grads_valid:  # before clipping (which runs after this hook) and before the step
            self._grads = [None if p.grad is None else local_tensor(p.grad.detach()).clone() for p in self._params]
        else:
            self._warn_once(
                "fused",
                f"{type(self).__name__}: a fused optimizer with a GradScaler leaves the gradients multiplied "
                "by the loss scale; gradient norms and loss-change predictions are left out (update ratios "
                "are kept). Use a non-fused optimizer (fused=False) to probe gradients.",
            )

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._before is None or trainer.global_step != self._armed_step:
            return
        before, self._before = self._before, None
        rng, self._rng = self._rng, None
        self._record(trainer, pl_module, before, rng, outputs, batch, batch_idx)

    def _record(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        before: list[Tensor],
        rng: RngState | None,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        assert self._owner is not None and self._lr is not None
        params = self._params
        grads, self._grads = self._grads, None
        rows = parameter_stats(params, grads if grads is not None else [None] * len(params), before)
        rows = reduce_sharded_rows(rows, params)
        n = len(self.layer_names)
        per_layer = aggregate_rows(rows, self._owner, n + 1)[:n]
        total = rows.sum(0)
        pred = first_order_predictions(rows, self._lr)
        keys: list[str] = []
        values: list[Tensor] = []

        device = rows.device

        def put(key: str, value: Tensor) -> None:
            keys.append(key)
            values.append(value.detach().reshape(()).to(device=device, dtype=torch.float64))

        grads_ok = self._grads_valid
        nan = torch.tensor(math.nan, dtype=torch.float64, device=device)
        if grads_ok:
            put("grad_norm/total", total[0].sqrt())
        put("update_ratio/total", total[2].sqrt() / total[3].sqrt())
        for i, layer in enumerate(self.layer_names):
            if grads_ok:
                put(f"grad_norm/{layer}", per_layer[i, 0].sqrt())
            put(f"update_ratio/{layer}", per_layer[i, 2].sqrt() / per_layer[i, 3].sqrt())
        if grads_ok:
            put("loss_change/linear", pred["linear"])
            put("loss_change/predicted_sgd", pred["sgd"])
            put("loss_change/predicted_adam", pred["adam"])
            put("loss_change/predicted", pred[self._kind] if self._kind else nan)
        if rng is not None:
            observed = self._observed_change(trainer, pl_module, outputs, batch, batch_idx, rng)
            if observed is not None:
                put("loss_change/observed", observed)
        if grads_ok and self._mtl is not None and self._mtl.engine.last_gramian is not None:
            engine = self._mtl.engine
            norms, cos = gramian_norms_cosines(engine.last_gramian.detach())
            names = engine.tasks or ()
            for a, task in enumerate(names):
                put(f"task/grad_norm/{task}", norms[a])
                if engine.last_weights is not None:
                    put(f"task/weight/{task}", engine.last_weights[a])
                for b in range(a + 1, len(names)):
                    put(f"task/cos/{task}~{names[b]}", cos[a, b])
        floats = torch.stack(values).tolist()  # the one synchronisation of a probe step
        entry: dict[str, float] = {"step": float(trainer.global_step)}
        entry.update(zip(keys, floats, strict=True))
        self.history.append(entry)
        if trainer.loggers:
            _log_scalars(trainer, {self.prefix + k: v for k, v in entry.items() if k != "step" and self._is_logged(k)})

    def _is_logged(self, key: str) -> bool:
        head, _, layer = key.partition("/")
        if head in ("grad_norm", "update_ratio") and layer != "total":
            return layer in self._logged
        return True

    def _observed_change(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        rng: RngState,
    ) -> Tensor | None:
        before = outputs.get("loss") if isinstance(outputs, Mapping) else outputs
        if not isinstance(before, Tensor):
            return None
        after = self._reevaluate(trainer, pl_module, batch, batch_idx, rng)
        if after is None:
            return None
        pair = torch.stack([before.detach().double().reshape(()), after.detach().double().reshape(())])
        if _world(trainer) > 1:
            pair = trainer.strategy.reduce(pair, reduce_op="mean")
        return pair[1] - pair[0]

    def _reevaluate(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, rng: RngState
    ) -> Tensor | None:
        """``training_step`` on the same batch after the step; no trace on training (see the class
        docstring)."""
        now = RngState.capture()
        buffers = [(b, b.detach().clone()) for b in pl_module.buffers()]
        try:
            rng.restore()
            with torch.no_grad(), _quiet_logging(pl_module), trainer.precision_plugin.train_step_context():
                out = pl_module.training_step(batch, batch_idx)
        except Exception as err:  # a training_step that cannot run under no_grad (gradient penalty, ...)
            self.loss_change = False
            self._warn_once(
                "reeval",
                f"{type(self).__name__}: re-running training_step to measure the observed loss change "
                f"failed ({type(err).__name__}: {err}); loss_change is turned off for this run.",
            )
            return None
        finally:
            with torch.no_grad():
                for b, saved in buffers:
                    b.copy_(saved)
            pop_task_losses(pl_module)
            now.restore()
        loss = out.get("loss") if isinstance(out, Mapping) else out
        return loss if isinstance(loss, Tensor) else None

    # --- end of fit ------------------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.plot:
            return
        directory = _plot_dir(trainer)
        if not trainer.is_global_zero or not self.history or not directory:
            return
        os.makedirs(directory, exist_ok=True)
        self.plot_path = os.path.join(directory, self.PLOT_NAME)
        lines = [("loss_change/observed", "observed ΔL"), ("loss_change/linear", "⟨g, Δθ⟩")]
        if any("loss_change/predicted" in h and not math.isnan(h["loss_change/predicted"]) for h in self.history):
            lines.append(("loss_change/predicted", f"predicted ({self._kind or self.rule})"))
        depth_figure(
            self.history,
            [
                ("gradient norm ‖g_l‖", "grad_norm", self.layer_names),
                ("update ratio ‖Δθ_l‖/‖θ_l‖", "update_ratio", self.layer_names),
            ],
            ("loss change of one step", lines),
            "GradientMagnitudeProbe",
            self.plot_path,
        )

    # --- checkpointing ---------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]


# ====================================================================================================
# ResidualProbe
# ====================================================================================================
BlockSpec = Sequence[nn.Module] | type | tuple[type, ...] | str | None
ForwardFn = Callable[[pl.LightningModule, Any], Any]


def _default_forward(module: pl.LightningModule, batch: Any) -> Any:
    if isinstance(batch, Tensor):
        return module(batch)
    if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
        return module(batch[0])
    raise MisconfigurationException(
        f"ResidualProbe: cannot tell the model input in a batch of type {type(batch).__name__}. The default "
        "feeds `batch` (a Tensor) or `batch[0]` (a tuple/list) to the module; pass "
        "forward_fn=lambda module, batch: module(batch['input_ids']) (or similar)."
    )


class ResidualProbe(Callback):
    r"""Residual branch ratios and the DeepNet "model update" on a fixed probe batch, every N optimizer steps.

    For residual blocks :math:`y = x + \varepsilon F(x)` (Su, https://kexue.fm/archives/8994) or DeepNorm
    blocks :math:`y = \mathrm{LN}(\alpha x + F(x))` (Wang et al., arXiv:2203.00555;
    https://kexue.fm/archives/8978) it records, on a probe batch fixed at the first training batch:

    * ``model_update`` :math:`\|F(x;\theta_t) - F(x;\theta_0)\|_F` of the whole model's output (the quantity
      the DeepNet paper plots over early steps) and ``model_update/relative`` (divided by
      :math:`\|F(x;\theta_0)\|_F`);
    * ``branch_ratio/<block>``: :math:`\|y - x\|_F / \|x\|_F` from forward hooks on the block, which is
      exactly :math:`\|\varepsilon F(x)\|/\|x\|` for :math:`y = x + \varepsilon F(x)`; with ``branch="name"``
      it is :math:`\|b\|_F/\|x\|_F` with :math:`b` the output of the submodule ``block.<name>`` (use this for
      post-norm blocks, whose output is not :math:`x` plus the branch);
    * ``block_update/<block>``: :math:`\|y_l(\theta_t) - y_l(\theta_0)\|_F / \|y_l(\theta_0)\|_F`, the
      relative update of each block's output (how the model update builds up with depth).

    The probe has no effect on training: the probe forward runs under ``torch.no_grad()`` in eval mode (every
    module's own ``training`` flag is restored afterwards), the hooks exist only during that forward, and the
    torch, CUDA, Python and NumPy random states are saved and restored around it. Step 0 (the reference,
    before the first optimizer step) is recorded too. Under DDP rank 0's probe batch is broadcast so all ranks
    measure the same thing; under AMP the forward runs in the precision plugin's autocast context.

    **Blocks** (``blocks``): a list of modules; a class or tuple of classes (all instances in the model); a
    regex searched in the qualified module names; or ``None``: :func:`find_residual_blocks`, the children of
    the first ``nn.ModuleList``/``nn.Sequential`` (breadth-first) whose ≥ 2 children share one class. A block
    whose output shape differs from its input shape gets NaN ratios and a warning.

    Logged scalars go to every logger (``prefix`` + name, at ``trainer.global_step``; per-block values only
    for ``log_blocks``); all values are kept in :attr:`history`. At the end of fit rank 0 writes
    ``residual_probe.png`` (model update vs step; branch ratio and block update vs depth) into
    ``trainer.log_dir`` (``default_root_dir`` without a logger), path in :attr:`plot_path`.

    Args:
        blocks: which modules are residual blocks (see above).
        every_n_steps: probe every that many optimizer steps (default 50).
        probe_batch: the probe batch; default: the first training batch. Either way its tensors are cut to
            their first ``probe_size`` rows.
        probe_size: rows of the probe batch (memory: one copy of every block's output for these rows is kept).
        forward_fn: ``forward_fn(pl_module, batch) -> output``; default ``pl_module(batch)`` for a Tensor
            batch, ``pl_module(batch[0])`` for a tuple/list. The output is a Tensor, or the first Tensor of a
            tuple/list/dict, or its ``.logits``.
        branch: the attribute path of the residual branch inside each block (e.g. ``"ffn"``), or ``None``.
            Its output should include the scale :math:`\varepsilon` (else the ratio is :math:`\|F\|/\|x\|`).
        log_blocks: the blocks whose values are logged: ``"all"``, positions, or a regex (default
            ``"first,middle,last"``).
        prefix: prepended to every logged name.
        plot: write the PNG at the end of fit.

    Raises:
        MisconfigurationException: for ``every_n_steps <= 0``, ``probe_size <= 0``, a bad
            ``blocks``/``log_blocks`` argument, and (in ``setup``) when no residual block is found or
            ``branch`` is not an attribute of them.

    Example::

        >>> import lightning as L
        >>> from lightning_mtl.callbacks.probes import ResidualProbe
        >>> trainer = L.Trainer(callbacks=[ResidualProbe(every_n_steps=10)])
    """

    PLOT_NAME = "residual_probe.png"

    def __init__(
        self,
        blocks: BlockSpec = None,
        every_n_steps: int = 50,
        *,
        probe_batch: Any = None,
        probe_size: int = 16,
        forward_fn: ForwardFn | None = None,
        branch: str | None = None,
        log_blocks: str = "first,middle,last",
        prefix: str = "probe/",
        plot: bool = True,
    ) -> None:
        name = type(self).__name__
        _check_interval(name, every_n_steps)
        if isinstance(probe_size, bool) or not isinstance(probe_size, int) or probe_size <= 0:
            raise MisconfigurationException(f"{name}(probe_size=...) must be a positive integer, got {probe_size!r}.")
        if forward_fn is not None and not callable(forward_fn):
            raise MisconfigurationException(
                f"{name}(forward_fn=...) must be callable, got {type(forward_fn).__name__}."
            )
        _check_spec(name, "log_blocks", log_blocks)
        if isinstance(blocks, str):
            try:
                re.compile(blocks)
            except re.error as err:
                raise MisconfigurationException(f"{name}(blocks={blocks!r}) is not a valid regex: {err}.") from err
        elif isinstance(blocks, nn.Module):
            blocks = [blocks]
        elif blocks is not None and not isinstance(blocks, type):
            if isinstance(blocks, tuple) and blocks and all(isinstance(b, type) for b in blocks):
                pass
            elif not all(isinstance(b, nn.Module) for b in blocks):
                raise MisconfigurationException(
                    f"{name}(blocks=...) must be None, a list of modules, a module class (or tuple of "
                    "classes) or a regex over module names."
                )
        self.blocks = blocks
        self.every_n_steps = every_n_steps
        self.probe_batch = probe_batch
        self.probe_size = probe_size
        self.forward_fn: ForwardFn = forward_fn or _default_forward
        self.branch = branch
        self.log_blocks = log_blocks
        self.prefix = prefix
        self.plot = plot
        #: One dict per probe step ``{"step": s, "<name>": value, ...}``: names without prefix, all blocks.
        self.history: list[dict[str, float]] = []
        self.block_names: list[str] = []
        self.plot_path: str | None = None
        self._modules: list[nn.Module] = []
        self._logged: set[str] = set()
        self._batch: Any = None
        self._ref_out: Tensor | None = None
        self._ref_blocks: list[Tensor | None] | None = None
        self._last_step = -1
        self._warned: set[str] = set()

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, branch=self.branch)

    # --- environment -----------------------------------------------------------------------------------
    def _resolve(self, pl_module: pl.LightningModule) -> list[tuple[str, nn.Module]]:
        spec = self.blocks
        named = list(pl_module.named_modules())
        if spec is None:
            return find_residual_blocks(pl_module)
        if isinstance(spec, str):
            pattern = re.compile(spec)
            return [(n, m) for n, m in named if n and pattern.search(n)]
        if isinstance(spec, type) or (isinstance(spec, tuple) and all(isinstance(b, type) for b in spec)):
            return [(n, m) for n, m in named if isinstance(m, spec)]
        ids = {id(m): n for n, m in named}
        missing = [type(m).__name__ for m in spec if id(m) not in ids]
        if missing:
            raise MisconfigurationException(
                f"ResidualProbe(blocks=[...]): {len(missing)} of the given modules "
                f"({', '.join(missing[:4])}) are not submodules of the LightningModule being trained."
            )
        return [(ids[id(m)], m) for m in spec]

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        found = self._resolve(pl_module)
        if not found:
            if self.blocks is None:
                rule = "no nn.ModuleList/nn.Sequential with >= 2 children of one class"
            else:
                rule = f"blocks={self.blocks!r} matched no submodule"
            raise MisconfigurationException(
                f"ResidualProbe found no residual blocks ({rule}). Pass blocks=[module, ...], "
                "blocks=MyBlockClass or blocks='regex over module names'."
            )
        if self.branch is not None:
            for n, m in found:
                if _get_path(m, self.branch) is None:
                    raise MisconfigurationException(
                        f"ResidualProbe(branch={self.branch!r}): block {n!r} ({type(m).__name__}) has no "
                        f"submodule {self.branch!r}."
                    )
        self.block_names = [n for n, _ in found]
        self._modules = [m for _, m in found]
        self._logged = set(_select("ResidualProbe", "log_blocks", self.block_names, self.log_blocks, "blocks"))
        if not trainer.loggers:
            rank_zero_info("ResidualProbe: the Trainer has no logger; the probe values are kept in `.history`.")

    # --- probing ---------------------------------------------------------------------------------------
    @override
    def on_train_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self._batch is None:
            self._set_batch(trainer, pl_module, batch)
        if self._ref_out is None:
            if trainer.global_step > 0:
                self._warn_once(
                    "late",
                    f"ResidualProbe: the reference F(x; θ_0) is taken at step {trainer.global_step}, not at "
                    "initialisation (resumed without the probe's state); model_update is relative to that "
                    "step.",
                )
            self._probe(trainer, pl_module, reference=True)

    def _set_batch(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any) -> None:
        source = batch if self.probe_batch is None else self.probe_batch
        cut = map_tensors(source, lambda t: t.detach()[: self.probe_size].clone() if t.ndim else t.detach().clone())
        if _world(trainer) > 1:
            cut = trainer.strategy.broadcast(map_tensors(cut, lambda t: t.cpu()), src=0)
        self._batch = map_tensors(cut, lambda t: t.to(pl_module.device))

    @override
    def on_train_batch_end(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = trainer.global_step
        if step != self._last_step and step > 0 and step % self.every_n_steps == 0:
            self._probe(trainer, pl_module, reference=False)

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _forward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> tuple[Tensor, list[Any]]:
        """One eval-mode, no-grad forward of the probe batch with hooks on the blocks; training state
        restored."""
        records: list[Any] = [None] * len(self._modules)
        handles = []

        def block_hook(i: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], output: Any) -> None:
                x = first_tensor(args) if first_tensor(args) is not None else first_tensor(kwargs)
                y = first_tensor(output)
                prev = records[i] or {}
                records[i] = {**prev, "x": x, "y": y}

            return hook

        def branch_hook(i: int) -> Callable[..., None]:
            def hook(module: nn.Module, args: tuple[Any, ...], output: Any) -> None:
                prev = records[i] or {}
                records[i] = {**prev, "b": first_tensor(output)}

            return hook

        modes = [(m, m.training) for m in pl_module.modules()]
        rng = RngState.capture()
        try:
            for i, m in enumerate(self._modules):
                handles.append(m.register_forward_hook(block_hook(i), with_kwargs=True))
                if self.branch is not None:
                    sub = _get_path(m, self.branch)
                    assert sub is not None
                    handles.append(sub.register_forward_hook(branch_hook(i)))
            batch = map_tensors(self._batch, lambda t: t.to(pl_module.device))  # no-op unless resumed
            pl_module.eval()
            with torch.no_grad(), trainer.precision_plugin.forward_context():
                out = first_tensor(self.forward_fn(pl_module, batch))
        finally:
            for h in handles:
                h.remove()
            for m, mode in modes:
                m.training = mode
            rng.restore()
        if out is None:
            raise MisconfigurationException(
                "ResidualProbe: the model output on the probe batch is not a Tensor (nor a tuple/dict "
                "holding one, nor has .logits). Pass forward_fn=... that returns the output tensor."
            )
        return out.detach(), records

    def _probe(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *, reference: bool) -> None:
        out, records = self._forward(trainer, pl_module)
        self._last_step = trainer.global_step
        nan = torch.tensor(math.nan, dtype=torch.float64, device=out.device)
        if reference:
            self._ref_out = out.clone()
            self._ref_blocks = [None if r is None or r["y"] is None else r["y"].detach().clone() for r in records]
        assert self._ref_out is not None and self._ref_blocks is not None
        ref_out = self._ref_out.to(out.device)
        keys = ["model_update", "model_update/relative", "output_norm"]
        diff = torch.linalg.vector_norm((out - ref_out).double())
        ref_norm = torch.linalg.vector_norm(ref_out.double())
        values = [diff, diff / ref_norm, torch.linalg.vector_norm(out.double())]
        for name, rec, ref in zip(self.block_names, records, self._ref_blocks, strict=True):
            ratio = update = nan
            if rec is None or rec.get("y") is None:
                self._warn_once(name, f"ResidualProbe: block {name!r} did not run in the probe forward.")
            else:
                x, y = rec["x"], rec["y"]
                if self.branch is not None and rec.get("b") is not None and x is not None:
                    ratio = torch.linalg.vector_norm(rec["b"].double()) / torch.linalg.vector_norm(x.double())
                elif x is not None and x.shape == y.shape:
                    ratio = torch.linalg.vector_norm((y - x).double()) / torch.linalg.vector_norm(x.double())
                else:
                    self._warn_once(
                        name,
                        f"ResidualProbe: block {name!r} maps {None if x is None else tuple(x.shape)} to "
                        f"{tuple(y.shape)}: not a residual block (input and output shapes differ); ratio is "
                        "NaN.",
                    )
                if ref is not None and ref.shape == y.shape:
                    ref = ref.to(y.device)
                    update = torch.linalg.vector_norm((y - ref).double()) / torch.linalg.vector_norm(ref.double())
            keys += [f"branch_ratio/{name}", f"block_update/{name}"]
            values += [ratio.to(out.device), update.to(out.device)]
        floats = torch.stack([v.reshape(()) for v in values]).tolist()  # one synchronisation
        entry: dict[str, float] = {"step": float(trainer.global_step)}
        entry.update(zip(keys, floats, strict=True))
        self.history.append(entry)
        if trainer.loggers:
            _log_scalars(trainer, {self.prefix + k: v for k, v in entry.items() if k != "step" and self._is_logged(k)})

    def _is_logged(self, key: str) -> bool:
        head, _, block = key.partition("/")
        if head in ("branch_ratio", "block_update"):
            return block in self._logged
        return True

    # --- end of fit ------------------------------------------------------------------------------------
    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.plot:
            return
        directory = _plot_dir(trainer)
        if not trainer.is_global_zero or not self.history or not directory:
            return
        os.makedirs(directory, exist_ok=True)
        self.plot_path = os.path.join(directory, self.PLOT_NAME)
        depth_figure(
            self.history,
            [
                ("branch ratio ‖εF(x)‖/‖x‖", "branch_ratio", self.block_names),
                ("block update ‖y_l(θ_t)−y_l(θ_0)‖/‖y_l(θ_0)‖", "block_update", self.block_names),
            ],
            ("model update ‖F(x;θ_t)−F(x;θ_0)‖", [("model_update", "model update")]),
            "ResidualProbe",
            self.plot_path,
        )

    # --- checkpointing ---------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        def cpu(x: Any) -> Any:
            return map_tensors(x, lambda t: t.detach().cpu())

        return {
            "history": [dict(h) for h in self.history],
            "batch": cpu(self._batch),
            "reference_output": cpu(self._ref_out),
            "reference_blocks": cpu(self._ref_blocks),
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
        self._batch = state_dict.get("batch")
        self._ref_out = state_dict.get("reference_output")
        self._ref_blocks = state_dict.get("reference_blocks")


def _get_path(module: nn.Module, path: str) -> nn.Module | None:
    try:
        sub = module.get_submodule(path)
    except AttributeError:
        return None
    return sub if isinstance(sub, nn.Module) else None
