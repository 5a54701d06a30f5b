"""The base of the training probes (private): argument checks, the probe schedule, warn-once, the history, the one
host synchronisation per probe step before logging, the end-of-fit PNG and the checkpointed state.

A probe subclass measures; it hands its values to :meth:`_Probe._commit` as tensors, describes its figure in
:meth:`_Probe._figure`, and names the per-layer keys that ``log_*`` selects in ``_PER_NAME``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from typing import Any, ClassVar

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_info, rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_mtl.callbacks._base import InstanceCallback
from lightning_mtl.probes.figures import Panels, Series, depth_figure, plottable
from lightning_mtl.probes.layers import is_position_spec, select_layers

__all__ = ["check_spec", "ends_fit", "select", "world_size"]


def check_spec(name: str, arg: str, spec: Any) -> None:
    """``spec`` is ``'all'``, a position list or a valid regex (else a :class:`MisconfigurationException`)."""
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


def select(name: str, arg: str, names: Sequence[str], spec: str, what: str) -> list[str]:
    """:func:`~lightning_mtl.probes.select_layers`, its ``ValueError`` as a :class:`MisconfigurationException`."""
    try:
        return select_layers(names, spec)
    except ValueError as err:
        raise MisconfigurationException(f"{name}({arg}={spec!r}): {err}".replace("layers", what)) from err


def world_size(trainer: pl.Trainer) -> int:
    return int(getattr(trainer.strategy, "world_size", 1) or 1)


def ends_fit(trainer: pl.Trainer, step: int) -> bool:
    """Whether the optimizer step that brings ``global_step`` to ``step`` is the last of the fit, as far as
    ``max_steps`` and ``max_epochs`` tell (valid from ``on_train_batch_start`` of that step's last batch). A fit
    that ``EarlyStopping``, ``max_time`` or ``trainer.should_stop`` ends is not foreseen."""
    max_steps = trainer.max_steps
    if max_steps is not None and max_steps >= 0 and step >= max_steps:
        return True
    max_epochs = trainer.max_epochs
    if max_epochs is None or max_epochs < 0 or trainer.current_epoch + 1 < max_epochs:
        return False
    progress = trainer.fit_loop.epoch_loop.batch_progress
    return bool(progress.is_last_batch) or progress.current.ready == trainer.num_training_batches


class _Probe(InstanceCallback):
    """Shared machinery of the probes; see the module docstring."""

    #: File name of the end-of-fit figure.
    PLOT_NAME: ClassVar[str] = "probe.png"
    #: Heads of the per-layer keys ``<head>/<name>`` that are logged only for the selected names (``total`` always).
    _PER_NAME: ClassVar[tuple[str, ...]] = ()

    def __init__(self, every_n_steps: int, *, prefix: str, plot: bool) -> None:
        if isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int) or every_n_steps <= 0:
            raise MisconfigurationException(
                f"{self._name}(every_n_steps=...) must be a positive integer (probe every that many optimizer "
                f"steps), got {every_n_steps!r}."
            )
        self.every_n_steps = every_n_steps
        self.prefix = prefix
        self.plot = plot
        #: One dict per probe step ``{"step": s, "<name>": value, ...}``: names without prefix, all layers.
        self.history: list[dict[str, float]] = []
        self.plot_path: str | None = None
        self._logged: set[str] = set()
        self._warned: set[str] = set()
        self._first_step = 1

    @property
    def _name(self) -> str:
        return type(self).__name__

    def _warn_once(self, key: str, message: str) -> None:
        if key not in self._warned:
            self._warned.add(key)
            rank_zero_warn(message)

    def _say_no_logger(self, trainer: pl.Trainer) -> None:
        if not trainer.loggers:
            rank_zero_info(
                f"{self._name}: the Trainer has no logger; the probe values are kept in `{self._name}.history`."
            )

    # --- schedule --------------------------------------------------------------------------------------
    @override
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._first_step = trainer.global_step + 1

    def _scheduled(self, step: int) -> bool:
        """Every ``every_n_steps``-th step, and the first optimizer step of the fit."""
        return step % self.every_n_steps == 0 or step == self._first_step

    # --- recording -------------------------------------------------------------------------------------
    def _commit(self, trainer: pl.Trainer, keys: Sequence[str], values: Sequence[Tensor]) -> None:
        """Append ``{step, key: value}`` to the history (one host synchronisation) and log the selected keys."""
        device = values[0].device
        floats = torch.stack([v.detach().reshape(()).to(device=device, dtype=torch.float64) for v in values]).tolist()
        entry: dict[str, float] = {"step": float(trainer.global_step)}
        entry.update(zip(keys, floats, strict=True))
        self.history.append(entry)
        if trainer.loggers:
            metrics = {self.prefix + k: v for k, v in entry.items() if k != "step" and self._is_logged(k)}
            for logger in trainer.loggers:
                logger.log_metrics(metrics, step=trainer.global_step)

    def _is_logged(self, key: str) -> bool:
        head, _, name = key.partition("/")
        if head in self._PER_NAME and name != "total":
            return self._selection_name(name) in self._logged
        return True

    def _selection_name(self, name: str) -> str:
        """The name that ``log_*`` selected for the per-layer value ``name``."""
        return name

    # --- end of fit ------------------------------------------------------------------------------------
    def _figure(self) -> tuple[Panels, Series]:
        """The depth panels and the step series of the end-of-fit PNG."""
        raise NotImplementedError

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not self.plot:
            return
        directory = trainer.log_dir or trainer.default_root_dir  # log_dir is a collective: every rank calls it
        if not trainer.is_global_zero or not directory:
            return
        panels, series = self._figure()
        if not plottable(self.history, panels, series):
            rank_zero_warn(
                f"{self._name}: {len(self.history)} probe step(s) recorded, too little to draw a curve (a line "
                f"needs two positive values over depth or two values over steps); {self.PLOT_NAME} is not "
                "written. The values are in `.history`."
            )
            return
        os.makedirs(directory, exist_ok=True)
        self.plot_path = os.path.join(directory, self.PLOT_NAME)
        depth_figure(self.history, panels, series, self._name, self.plot_path)

    # --- checkpointing ---------------------------------------------------------------------------------
    @override
    def state_dict(self) -> dict[str, Any]:
        return {"history": [dict(h) for h in self.history]}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.history = [dict(h) for h in state_dict.get("history", [])]
