"""Looking at samples: an image grid, a PNG writer, and the :class:`SampleGrid` callback that writes a fixed-seed grid
of a model's samples every few epochs."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Literal

import lightning.pytorch as pl
import torch
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gen.ddpm.ema import find_weight_averaging
from lightning_mtl.callbacks._base import InstanceCallback

__all__ = ["SampleGrid", "make_grid", "save_png"]


def make_grid(images: Tensor, nrow: int | None = None, padding: int = 1, pad_value: float = 1.0) -> Tensor:
    """``(N, C, H, W)`` in :math:`[0, 1]` -> one ``(C, H', W')`` image with ``nrow`` images per row."""
    if images.ndim != 4:
        raise ValueError(f"make_grid expects (N, C, H, W), got shape {tuple(images.shape)}.")
    n, c, h, w = images.shape
    nrow = nrow or max(1, math.ceil(math.sqrt(n)))
    rows = math.ceil(n / nrow)
    grid = images.new_full((c, rows * (h + padding) + padding, nrow * (w + padding) + padding), pad_value)
    for i in range(n):
        r, col = divmod(i, nrow)
        y, x = padding + r * (h + padding), padding + col * (w + padding)
        grid[:, y : y + h, x : x + w] = images[i]
    return grid


def save_png(grid: Tensor, path: str | Path, scale: int = 1) -> Path:
    """Write a ``(C, H, W)`` image in :math:`[0, 1]` as an 8-bit PNG (grey for C=1), upscaled ``scale`` times."""
    from PIL import Image

    arr = grid.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).cpu()
    arr = arr[0].numpy() if arr.shape[0] == 1 else arr.permute(1, 2, 0).numpy()
    img = Image.fromarray(arr)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, optimize=True)
    return path


class SampleGrid(InstanceCallback, example_args="every_n_epochs=5, steps=50"):
    r"""Every ``every_n_epochs`` epochs, on global rank 0 only, sample a fixed-seed grid and write it as a PNG.

    The same seed every time, so the grids of successive epochs show the same :math:`x_T` denoised by a better model.
    With ``EMAWeightAveraging`` in the Trainer, the averaged weights are swapped in for sampling and the training
    weights restored afterwards. The grid is also logged with ``add_image`` when the Trainer uses a
    ``TensorBoardLogger``. The other ranks do nothing (no collective runs inside ``sample``), so they simply continue
    to the next step's collectives and wait there.

    Args:
        every_n_epochs: sample after every that many training epochs (``>= 1``).
        num_samples: images in the grid.
        steps: sampling steps.
        scheduler: ``"ddim"`` (fast) or ``"ddpm"``.
        seed: the generator seed (fixed across epochs).
        dirpath: where PNGs go; default ``<trainer.log_dir or default_root_dir>/samples``.
        nrow: images per row (default: square-ish).
        scale: nearest-neighbour upscaling of the PNG (small images are hard to see).
        use_ema: use the averaged weights when the Trainer has ``EMAWeightAveraging``.

    Raises:
        MisconfigurationException: invalid arguments, or a LightningModule without ``sample(...)``.

    Example::

        >>> from lightning.pytorch.callbacks import EMAWeightAveraging
        >>> callbacks = [EMAWeightAveraging(decay=0.999), SampleGrid(every_n_epochs=5, steps=50)]
    """

    def __init__(
        self,
        every_n_epochs: int = 1,
        num_samples: int = 64,
        steps: int = 50,
        scheduler: Literal["ddpm", "ddim"] = "ddim",
        seed: int = 0,
        dirpath: str | None = None,
        nrow: int | None = None,
        scale: int = 2,
        use_ema: bool = True,
    ) -> None:
        if not isinstance(every_n_epochs, int) or every_n_epochs < 1:
            raise MisconfigurationException(
                f"SampleGrid(every_n_epochs=...) must be an int >= 1, got {every_n_epochs}."
            )
        if num_samples < 1:
            raise MisconfigurationException(f"SampleGrid(num_samples=...) must be >= 1, got {num_samples}.")
        if scheduler not in ("ddpm", "ddim"):
            raise MisconfigurationException(f"SampleGrid(scheduler=...) must be 'ddpm' or 'ddim', got {scheduler!r}.")
        if steps < 1:
            raise MisconfigurationException(f"SampleGrid(steps=...) must be >= 1, got {steps}.")
        self.every_n_epochs, self.num_samples, self.steps = every_n_epochs, num_samples, steps
        self.scheduler, self.seed, self.dirpath, self.nrow = scheduler, seed, dirpath, nrow
        self.scale, self.use_ema = scale, use_ema
        self.last_path: Path | None = None

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if not callable(getattr(pl_module, "sample", None)):
            raise MisconfigurationException(
                f"SampleGrid needs a LightningModule with `sample(n, steps, scheduler, generator)`, such as "
                f"lightning_gen.ddpm.DDPM; {type(pl_module).__name__} has none."
            )
        # ready=False: the averaging callback builds its model in its own setup, which may run after this one
        if self.use_ema and stage == "fit" and find_weight_averaging(trainer, ready=False) is None:
            rank_zero_warn(
                "SampleGrid(use_ema=True) but the Trainer has no EMAWeightAveraging: sampling uses the "
                "training weights."
            )

    def _dir(self, trainer: pl.Trainer) -> Path:
        if self.dirpath is not None:
            return Path(self.dirpath)
        return Path(trainer.log_dir or trainer.default_root_dir) / "samples"

    @override
    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if (trainer.current_epoch + 1) % self.every_n_epochs != 0 or not trainer.is_global_zero:
            return
        generator = torch.Generator(device=pl_module.device).manual_seed(self.seed)
        images = pl_module.sample(  # type: ignore[operator]
            self.num_samples, self.steps, self.scheduler, generator, use_ema=self.use_ema
        )
        grid = make_grid(images.cpu(), self.nrow)
        path = self._dir(trainer) / f"samples_epoch{trainer.current_epoch:04d}_step{trainer.global_step}.png"
        self.save_grid(trainer, grid, path)

    def save_grid(self, trainer: pl.Trainer, grid: Tensor, path: Path) -> None:
        """Write the PNG and log it to TensorBoard (override to send it elsewhere)."""
        self.last_path = save_png(grid, path, self.scale)
        for logger in trainer.loggers:
            experiment = getattr(logger, "experiment", None)
            if type(logger).__name__ == "TensorBoardLogger" and hasattr(experiment, "add_image"):
                experiment.add_image("samples", grid, global_step=trainer.global_step)
