r"""GradientMagnitudeProbe: per-layer gradient norms, update-to-weight ratios and the loss change of one step."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Mapping
from typing import Any, Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info
from torch import Tensor, nn
from typing_extensions import override

from lightning_mtl._dtensor import local_tensor
from lightning_mtl._utils import RngState
from lightning_mtl.callbacks._probe import _Probe, check_spec, ends_fit, select, world_size
from lightning_mtl.probes.figures import Panels, Series
from lightning_mtl.probes.layers import parameter_layers
from lightning_mtl.probes.stats import aggregate_rows, first_order_predictions, parameter_stats, reduce_sharded_rows
from lightning_mtl.tasks import pop_task_losses

__all__ = ["GradientMagnitudeProbe"]

_ADAM = (torch.optim.Adam, torch.optim.AdamW, torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adamax)


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


class GradientMagnitudeProbe(_Probe, example_args="every_n_steps=50"):
    r"""Per-layer gradient norms, update-to-weight ratios and the loss change of one step, every N steps.

    Probe steps (``trainer.global_step`` after the step): every multiple of ``every_n_steps``, the first optimizer
    step of the fit, and its last one when ``max_steps``/``max_epochs`` end it (a fit that ``EarlyStopping`` or
    ``max_time`` ends is not foreseen), so that even a run shorter than ``every_n_steps`` has a curve. On a probe
    step it records, for each "layer" (a module that owns parameters directly, named as in ``named_modules``; depth
    is the registration order):

    * ``grad_norm/<layer>`` :math:`\|g_l\|_2` and ``grad_norm/total`` :math:`\|g\|_2` over all trainable
      parameters;
    * ``update_ratio/<layer>`` :math:`\|\Delta\theta_l\|_2/\|\theta_l\|_2` and ``update_ratio/total``, with
      :math:`\Delta\theta` the step the optimizer actually took (a snapshot of the parameters is taken in
      ``on_before_optimizer_step`` of probe steps only and compared in ``on_train_batch_end``);
    * the loss change of the step (Su, https://kexue.fm/archives/8994):
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
      ``task/grad_norm/<task>``, ``task/cos/<a>~<b>`` and ``task/weight/<task>`` from its
      :attr:`~lightning_mtl.callbacks.MultiTaskGradient.last_step` (no extra backward).

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
    :attr:`plot_path`. When the history holds too little to draw a curve it warns instead of writing the PNG.

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
        >>> from lightning_mtl.callbacks import GradientMagnitudeProbe
        >>> probe = GradientMagnitudeProbe(every_n_steps=50, log_layers="first,middle,last")
        >>> trainer = L.Trainer(callbacks=[probe])
    """

    PLOT_NAME = "gradient_magnitude_probe.png"
    _PER_NAME = ("grad_norm", "update_ratio")

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
        super().__init__(every_n_steps, prefix=prefix, plot=plot)
        check_spec(self._name, "layers", layers)
        check_spec(self._name, "log_layers", log_layers)
        if rule not in ("auto", "sgd", "adam"):
            raise MisconfigurationException(f"{self._name}(rule=...) must be 'auto', 'sgd' or 'adam', got {rule!r}.")
        self.layers = layers
        self.log_layers = log_layers
        self.loss_change = loss_change
        self.rule = rule
        self.layer_names: list[str] = []
        self._params: list[nn.Parameter] = []
        self._owner: Tensor | None = None
        self._mtl: Any = None
        self._rng: RngState | None = None
        self._before: list[Tensor] | None = None
        self._grads: list[Tensor | None] | None = None
        self._lr: Tensor | None = None
        self._kind: str | None = None
        self._grads_valid = True
        self._armed_step = -1

    @property
    def state_key(self) -> str:
        return self._generate_state_key(every_n_steps=self.every_n_steps, layers=self.layers)

    # --- environment -----------------------------------------------------------------------------------
    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        name = self._name
        groups = parameter_layers(pl_module)
        if not groups:
            raise MisconfigurationException(f"{name}: the model has no trainable parameters to probe.")
        chosen = select(name, "layers", list(groups), self.layers, "layers")
        logged = select(name, "log_layers", chosen, self.log_layers, "probed layers")
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
        self._say_no_logger(trainer)

    # --- probe steps -----------------------------------------------------------------------------------
    def _next_is_probe(self, trainer: pl.Trainer) -> bool:
        step = trainer.global_step + 1
        return self._scheduled(step) or ends_fit(trainer, step)

    def _measures_loss(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> bool:
        if not self.loss_change or not pl_module.automatic_optimization:
            return False
        if trainer.accumulate_grad_batches != 1:
            self._warn_once(
                "accumulate",
                f"{self._name}: accumulate_grad_batches > 1: the observed loss change is not measured (the "
                "gradient spans several batches, the re-evaluation would see only the last one).",
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
                f"{self._name}: a fused optimizer with a GradScaler leaves the gradients multiplied by the loss "
                "scale; gradient norms and loss-change predictions are left out (update ratios are kept). Use a "
                "non-fused optimizer (fused=False) to probe gradients.",
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
        values: dict[str, Tensor] = {}
        grads_ok = self._grads_valid
        if grads_ok:
            values["grad_norm/total"] = total[0].sqrt()
        values["update_ratio/total"] = total[2].sqrt() / total[3].sqrt()
        for i, layer in enumerate(self.layer_names):
            if grads_ok:
                values[f"grad_norm/{layer}"] = per_layer[i, 0].sqrt()
            values[f"update_ratio/{layer}"] = per_layer[i, 2].sqrt() / per_layer[i, 3].sqrt()
        if grads_ok:
            values["loss_change/linear"] = pred["linear"]
            values["loss_change/predicted_sgd"] = pred["sgd"]
            values["loss_change/predicted_adam"] = pred["adam"]
            values["loss_change/predicted"] = pred[self._kind] if self._kind else torch.tensor(math.nan)
        if rng is not None:
            observed = self._observed_change(trainer, pl_module, outputs, batch, batch_idx, rng)
            if observed is not None:
                values["loss_change/observed"] = observed
        summary = self._mtl.last_step if grads_ok and self._mtl is not None else None
        if summary is not None:
            names = summary.tasks
            for a, task in enumerate(names):
                values[f"task/grad_norm/{task}"] = summary.norms[a]
                values[f"task/weight/{task}"] = summary.weights[a]
                for b in range(a + 1, len(names)):
                    values[f"task/cos/{task}~{names[b]}"] = summary.cosines[a, b]
        self._commit(trainer, list(values), list(values.values()))  # the one synchronisation of a probe step

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
        if world_size(trainer) > 1:
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
                f"{self._name}: re-running training_step to measure the observed loss change failed "
                f"({type(err).__name__}: {err}); loss_change is turned off for this run.",
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
    def _figure(self) -> tuple[Panels, Series]:
        lines = [("loss_change/observed", "observed ΔL"), ("loss_change/linear", "⟨g, Δθ⟩")]
        if any("loss_change/predicted" in h and not math.isnan(h["loss_change/predicted"]) for h in self.history):
            lines.append(("loss_change/predicted", f"predicted ({self._kind or self.rule})"))
        panels = [
            ("gradient norm ‖g_l‖", "grad_norm", self.layer_names),
            ("update ratio ‖Δθ_l‖/‖θ_l‖", "update_ratio", self.layer_names),
        ]
        return panels, ("loss change of one step", lines)
