"""Callbacks for the span models through ``trainer.fit`` / ``trainer.predict`` (and so the ``lightning-mtl`` CLI):
:class:`SavePretrained` writes the ``save_pretrained`` directory at the end of ``fit``; :class:`SpanPredictionWriter`
writes what ``predict_step`` returns as JSON lines."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import IO, Any

import lightning.pytorch as pl
from lightning.pytorch.callbacks import BasePredictionWriter
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_mtl.callbacks._base import InstanceCallback

__all__ = ["SavePretrained", "SpanPredictionWriter"]


def _run_dir(trainer: pl.Trainer) -> Path:
    return Path(trainer.log_dir or trainer.default_root_dir)


class SavePretrained(InstanceCallback, example_args='dirpath="out/ner"'):
    """At the end of ``fit``, write the model's :meth:`save_pretrained` directory (encoder, tokenizer, label set and
    heads: what ``SpanExtractor.from_pretrained(dir)`` loads, without unpickling).

    The weights saved are those at the end of training (for a :class:`~lightning.pytorch.callbacks.ModelCheckpoint`'s
    best ones, load that checkpoint with ``load_from_checkpoint`` and call ``save_pretrained``). Rank 0 writes.

    Args:
        dirpath: the directory; default: ``pretrained`` in the run's log directory (``trainer.log_dir``, e.g.
            ``lightning_logs/version_0/pretrained``), else in ``trainer.default_root_dir``.

    Example::

        trainer = L.Trainer(max_epochs=1, callbacks=[SavePretrained("out/ner")])
        trainer.fit(SpanExtractor(), SpanDataModule(train="train.txt", val="dev.txt"))
        model = SpanExtractor.from_pretrained("out/ner")

    In a LightningCLI config (``lightning-mtl fit --config span_conll2003`` has it)::

        trainer:
          callbacks:
            - class_path: lightning_gen.span.SavePretrained
              init_args: {dirpath: out/ner}
    """

    def __init__(self, dirpath: str | os.PathLike[str] | None = None) -> None:
        super().__init__()
        if dirpath is not None and not isinstance(dirpath, (str, os.PathLike)):
            raise TypeError(f"SavePretrained: dirpath must be a path or None, got {type(dirpath).__name__}.")
        self.dirpath = dirpath
        #: where the last ``fit`` saved the model
        self.saved_to: Path | None = None

    @override
    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not hasattr(pl_module, "save_pretrained"):
            raise TypeError(f"SavePretrained: {type(pl_module).__name__} has no save_pretrained (a span model has).")
        target = Path(self.dirpath) if self.dirpath is not None else _run_dir(trainer) / "pretrained"
        if trainer.is_global_zero:
            self.saved_to = pl_module.save_pretrained(target)
            rank_zero_info(f"SavePretrained: saved to {target} ({type(pl_module).__name__}.from_pretrained loads it)")
        trainer.strategy.barrier("SavePretrained")


class SpanPredictionWriter(BasePredictionWriter, InstanceCallback, example_args='output="predictions.jsonl"'):
    """Write ``trainer.predict`` outputs of the span models as JSON lines, one per input text and in input order:
    the records that ``predict_step`` returns (``line``, ``text`` and ``entities`` or ``relations`` with character
    offsets and scores).

    Args:
        output: the file; default: ``predictions.jsonl`` in the run's log directory (``trainer.log_dir``), else in
            ``trainer.default_root_dir``. With several processes each writes its own ``*.rank<N>.jsonl``.

    Example::

        data = SpanDataModule(predict_file="texts.txt")  # one text per line, or JSON lines with "text"
        L.Trainer(callbacks=[SpanPredictionWriter("out/predictions.jsonl")]).predict(model, data)

    ``lightning-mtl predict --config span_conll2003 --ckpt_path best.ckpt --data.predict_file texts.txt`` uses the
    writer of the config.
    """

    def __init__(self, output: str | os.PathLike[str] | None = None) -> None:
        super().__init__(write_interval="batch")
        if output is not None and not isinstance(output, (str, os.PathLike)):
            raise TypeError(f"SpanPredictionWriter: output must be a path or None, got {type(output).__name__}.")
        self.output = output
        #: the file written by the last ``predict``
        self.path: Path | None = None
        self._file: IO[str] | None = None
        self._count = 0

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        path = Path(self.output) if self.output is not None else _run_dir(trainer) / "predictions.jsonl"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        path.parent.mkdir(parents=True, exist_ok=True)
        self.path, self._count = path, 0
        self._file = path.open("w", encoding="utf-8")

    @override
    def write_on_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        prediction: Any,
        batch_indices: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int,
    ) -> None:
        if self._file is None:  # pragma: no cover - Lightning calls on_predict_start first
            raise RuntimeError("SpanPredictionWriter: no file open (on_predict_start was not called).")
        if not isinstance(prediction, list):
            raise TypeError(
                f"SpanPredictionWriter: predict_step must return a list of JSON-ready records, got "
                f"{type(prediction).__name__} (use it with the span models)."
            )
        for record in prediction:
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
        self._count += len(prediction)

    def _close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None

    @override
    def on_predict_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        rank_zero_info(f"SpanPredictionWriter: {self._count} predictions written to {self.path}")

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._close()
