r"""DDPM as a LightningModule on diffusers, with noise levels as tasks.

Notation of Su, *生成扩散模型漫谈(一): DDPM = 拆楼 + 建楼*, https://kexue.fm/archives/9119 (2022).
Demolishing (the forward process) is :math:`x_t = \alpha_t x_{t-1} + \beta_t\varepsilon_t` with
:math:`\alpha_t^2 + \beta_t^2 = 1`; with :math:`\bar\alpha_t = \alpha_1\cdots\alpha_t` and
:math:`\bar\beta_t = \sqrt{1-\bar\alpha_t^2}` it collapses to

.. math::  x_t = \bar\alpha_t x_0 + \bar\beta_t\bar\varepsilon, \qquad \bar\varepsilon\sim\mathcal N(0, I).

Building (training) minimises :math:`\|\varepsilon - \epsilon_\theta(\bar\alpha_t x_0 +
\bar\beta_t\varepsilon, t)\|^2`
(the article's :math:`\frac{\bar\beta_t}{\beta_t}\epsilon_\theta` is diffusers' :math:`\epsilon_\theta`),
and sampling
runs :math:`x_{t-1} = \frac1{\alpha_t}\bigl(x_t - \frac{\beta_t^2}{\bar\beta_t}\epsilon_\theta(x_t, t)\bigr)
+ \sigma_t z`. diffusers writes the same quantities as ``betas`` :math:`=\beta_t^2`, ``alphas``
:math:`=\alpha_t^2`
and ``alphas_cumprod`` :math:`=\bar\alpha_t^2` (see :func:`article_coefficients`). The article's schedule
:math:`\alpha_t = \sqrt{1 - 0.02\,t/T}` is ``beta_schedule="article"``: diffusers' linear betas from
:math:`0.02/T` to :math:`0.02`.

Reused from diffusers: ``UNet2DModel``, ``DDPMScheduler`` (``add_noise``, ``get_velocity``, ``step``),
``DDIMScheduler`` for fast sampling, ``DDPMPipeline`` for export, ``compute_snr`` for Min-SNR weighting.
"""

from __future__ import annotations

import copy
import itertools
import math
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, NamedTuple

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.callbacks.weight_averaging import WeightAveraging
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.rank_zero import rank_zero_warn
from torch import Tensor
from typing_extensions import override

from lightning_gen.ddpm.data import to_unit
from lightning_mtl.tasks import task_losses

__all__ = [
    "DDPM",
    "UNET_PRESETS",
    "ArticleCoefficients",
    "SampleGrid",
    "article_alphas",
    "article_coefficients",
    "ema_weights",
    "make_grid",
    "make_noise_scheduler",
    "save_png",
]

_D, _U = "DownBlock2D", "UpBlock2D"
#: ``UNet2DModel`` keyword arguments of the named presets (grey-scale images in, noise/x0/v out).
UNET_PRESETS: dict[str, dict[str, Any]] = {
    # the default: 28×28 MNIST, 28 -> 14 -> 7, attention only at 7×7 (cheap on a CPU).
    "mnist28": dict(
        sample_size=28,
        in_channels=1,
        out_channels=1,
        layers_per_block=2,
        block_out_channels=(32, 64, 64),
        down_block_types=(_D, _D, "AttnDownBlock2D"),
        up_block_types=("AttnUpBlock2D", _U, _U),
        norm_num_groups=8,
    ),
    # 14×14 (MNIST averaged over 2×2), 14 -> 7, no attention.
    "mnist14": dict(
        sample_size=14,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(32, 64),
        down_block_types=(_D, _D),
        up_block_types=(_U, _U),
        norm_num_groups=8,
    ),
}
# 8×8 (scikit-learn's digits, or MNIST averaged to 8×8), 8 -> 4, no attention: the 14×14 network at 8×8.
UNET_PRESETS["digits8"] = {**UNET_PRESETS["mnist14"], "sample_size": 8}
_SCHEDULES = ("article", "linear", "scaled_linear", "squaredcos_cap_v2", "sigmoid")
_PREDICTIONS = ("epsilon", "sample", "v_prediction")


def article_alphas(num_train_timesteps: int = 1000) -> Tensor:
    r"""The article's schedule :math:`\alpha_t = \sqrt{1 - 0.02\,t/T}`, :math:`t = 1..T` (float64)."""
    t = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64)
    return torch.sqrt(1 - 0.02 * t / num_train_timesteps)


def make_noise_scheduler(
    num_train_timesteps: int = 1000,
    beta_schedule: str = "linear",
    prediction_type: str = "epsilon",
    **kwargs: Any,
) -> DDPMScheduler:
    r"""A ``DDPMScheduler``; ``beta_schedule="article"`` gives :math:`\alpha_t=\sqrt{1-0.02t/T}`, i.e. the
    paper's
    :math:`\beta^{\text{paper}}_t = 1-\alpha_t^2 = 0.02t/T`: linear betas from ``0.02/T`` to ``0.02``.

    Extra keyword arguments go to ``DDPMScheduler`` (``clip_sample``, ``variance_type``, ...).
    """
    if beta_schedule not in _SCHEDULES:
        raise ValueError(f"beta_schedule must be one of {_SCHEDULES}, got {beta_schedule!r}.")
    if prediction_type not in _PREDICTIONS:
        raise ValueError(f"prediction_type must be one of {_PREDICTIONS}, got {prediction_type!r}.")
    if num_train_timesteps < 2:
        raise ValueError(f"num_train_timesteps must be >= 2, got {num_train_timesteps}.")
    if beta_schedule == "article":
        kwargs = {"beta_start": 0.02 / num_train_timesteps, "beta_end": 0.02, **kwargs}
        beta_schedule = "linear"
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        prediction_type=prediction_type,
        **kwargs,
    )


class ArticleCoefficients(NamedTuple):
    r"""The article's :math:`\alpha_t, \beta_t, \bar\alpha_t, \bar\beta_t` for :math:`t = 1..T` (index
    ``t-1``)."""

    alpha: Tensor
    beta: Tensor
    alpha_bar: Tensor
    beta_bar: Tensor


def article_coefficients(scheduler: DDPMScheduler) -> ArticleCoefficients:
    r"""Translate a diffusers scheduler into the article's notation (float64).

    :math:`\alpha_t = \sqrt{1-\beta^{\text{paper}}_t}`, :math:`\beta_t = \sqrt{\beta^{\text{paper}}_t}`,
    :math:`\bar\alpha_t = \alpha_1\cdots\alpha_t = \sqrt{\bar\alpha^{\text{paper}}_t}`,
    :math:`\bar\beta_t = \sqrt{1-\bar\alpha_t^2}` (the products in float64, from the scheduler's betas).
    """
    betas = scheduler.betas.double()
    alpha = torch.sqrt(1 - betas)
    alpha_bar = torch.cumprod(alpha, 0)  # in float64: the scheduler's float32 cumprod loses 1 - alpha_bar at small t
    return ArticleCoefficients(alpha, torch.sqrt(betas), alpha_bar, torch.sqrt(1 - alpha_bar**2))


# ------------------------------------------------------------------------------------------------------------
def _find_weight_averaging(trainer: pl.Trainer | None) -> WeightAveraging | None:
    if trainer is None:
        return None
    for cb in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(cb, WeightAveraging) and getattr(cb, "_average_model", None) is not None:
            return cb
    return None


def _swap(a: torch.nn.Module, b: torch.nn.Module) -> None:
    pairs = zip(
        itertools.chain(a.parameters(), a.buffers()),
        itertools.chain(b.parameters(), b.buffers()),
        strict=True,
    )
    with torch.no_grad():
        for pa, pb in pairs:
            tmp = pa.detach().clone()
            pa.copy_(pb)
            pb.copy_(tmp)


@contextmanager
def ema_weights(pl_module: pl.LightningModule, trainer: pl.Trainer | None = None) -> Iterator[bool]:
    """Swap the weights of Lightning's ``EMAWeightAveraging`` (any ``WeightAveraging``) into ``pl_module``.

    Yields ``True`` if averaged weights were swapped in, ``False`` if the trainer has no such callback (or
    it has
    not been set up yet). The training weights are put back on exit, also after an exception. This is the
    ``store -> copy_to -> restore`` of diffusers' ``EMAModel``, without a second copy of the weights.
    """
    trainer = trainer if trainer is not None else pl_module._trainer
    cb = _find_weight_averaging(trainer)
    if cb is None:
        yield False
        return
    average = cb._average_model.module  # type: ignore[union-attr]
    _swap(average, pl_module)
    try:
        yield True
    finally:
        _swap(average, pl_module)


# ------------------------------------------------------------------------------------------------------------
class DDPM(pl.LightningModule):
    r"""Denoising diffusion (DDPM) on a diffusers ``UNet2DModel`` and ``DDPMScheduler``.

    Training step, with :math:`t` uniform on :math:`\{0..T-1\}` and :math:`\varepsilon\sim\mathcal N(0,I)`:

    .. math::  x_t = \bar\alpha_t x_0 + \bar\beta_t\varepsilon,\qquad
               \ell_i = w(t_i)\,\frac{1}{CHW}\|\text{target}_i - f_\theta(x_t, t)_i\|^2

    with target :math:`\varepsilon` (``"epsilon"``), :math:`x_0` (``"sample"``) or
    :math:`v = \bar\alpha_t\varepsilon - \bar\beta_t x_0` (``"v_prediction"``), and :math:`w \equiv 1` or the
    Min-SNR weight (Hang et al. 2023) :math:`\min(\mathrm{SNR}_t, \gamma)/\mathrm{SNR}_t` (epsilon),
    :math:`/(\mathrm{SNR}_t+1)` (v), :math:`\min(\mathrm{SNR}_t, \gamma)` (sample), with
    :math:`\mathrm{SNR}_t = \bar\alpha_t^2/\bar\beta_t^2` from diffusers' ``compute_snr``. The noise, the
    noisy input :math:`x_t`, the loss and ``alphas_cumprod`` stay in float32 whatever the Trainer's precision;
    only the UNet runs in the precision's dtype.

    **Noise levels as tasks** (``timestep_buckets=K >= 2``): the timesteps are split into K equal ranges and
    ``training_step`` returns :func:`lightning_mtl.task_losses` with one loss per range,
    :math:`L_k = \frac1B\sum_{i: t_i\in\text{range}_k}\ell_i`, so :math:`\sum_k L_k` is the ordinary batch
    mean
    and :class:`~lightning_mtl.callbacks.MultiTaskGradient` can balance the noise levels (e.g. with
    :class:`~lightning_mtl.GradNormalize`). A range without a sample in the batch still returns a (zero) loss
    connected to the graph, so the task set never changes.

    Args:
        preset: a key of :data:`UNET_PRESETS`: ``"mnist28"`` (default), ``"mnist14"`` or ``"digits8"``.
        unet: ``UNet2DModel`` keyword arguments that override the preset's (e.g. ``{"block_out_channels":
        [16, 32]}``).
        num_train_timesteps: :math:`T`.
        beta_schedule: ``"linear"`` (DDPM paper, diffusers' default), ``"article"`` (:math:`\alpha_t =
            \sqrt{1-0.02t/T}`), ``"scaled_linear"``, ``"squaredcos_cap_v2"`` or ``"sigmoid"``.
        prediction_type: ``"epsilon"``, ``"sample"`` (x0) or ``"v_prediction"``.
        snr_gamma: Min-SNR :math:`\gamma` (5.0 is the paper's choice); ``None`` for unweighted.
        timestep_buckets: 0 or 1 for one loss; ``K >= 2`` for K noise-level tasks.
        lr: AdamW learning rate.
        betas: AdamW betas (diffusers' unconditional example: ``(0.95, 0.999)``).
        weight_decay: AdamW weight decay.
        warmup_steps: linear learning-rate warm-up steps.
        lr_schedule: after warm-up, ``"constant"`` or ``"cosine"`` (to zero at the Trainer's last step).
        scheduler_kwargs: extra ``DDPMScheduler`` arguments (``clip_sample``, ``variance_type``, ...).

    Example::

        >>> model = DDPM(preset="digits8", timestep_buckets=4)
        >>> images = model.sample(4, steps=10, scheduler="ddim", generator=torch.Generator().manual_seed(0))
        >>> tuple(images.shape)
        (4, 1, 8, 8)
    """

    def __init__(
        self,
        preset: str = "mnist28",
        unet: dict[str, Any] | None = None,
        num_train_timesteps: int = 1000,
        beta_schedule: str = "linear",
        prediction_type: str = "epsilon",
        snr_gamma: float | None = None,
        timestep_buckets: int = 0,
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.95, 0.999),
        weight_decay: float = 1e-6,
        warmup_steps: int = 0,
        lr_schedule: Literal["constant", "cosine"] = "constant",
        scheduler_kwargs: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if preset not in UNET_PRESETS:
            raise ValueError(f"DDPM(preset=...) must be one of {sorted(UNET_PRESETS)}, got {preset!r}.")
        if snr_gamma is not None and not snr_gamma > 0:
            raise ValueError(f"DDPM(snr_gamma=...) must be > 0 or None, got {snr_gamma}.")
        if not 0 <= timestep_buckets <= num_train_timesteps:
            raise ValueError(
                f"DDPM(timestep_buckets=...) must be in [0, num_train_timesteps={num_train_timesteps}], "
                f"got {timestep_buckets}."
            )
        if lr_schedule not in ("constant", "cosine"):
            raise ValueError(f"DDPM(lr_schedule=...) must be 'constant' or 'cosine', got {lr_schedule!r}.")
        if warmup_steps < 0:
            raise ValueError(f"DDPM(warmup_steps=...) must be >= 0, got {warmup_steps}.")
        self.save_hyperparameters()
        config = {**UNET_PRESETS[preset], **(unet or {})}
        config = {k: tuple(v) if isinstance(v, list) else v for k, v in config.items()}
        self.unet = UNet2DModel(**config)
        # Not an nn.Module: Trainer precision (``.half()``, ``.to(bfloat16)``) never down-casts its tensors.
        self.noise_scheduler = make_noise_scheduler(
            num_train_timesteps, beta_schedule, prediction_type, **(scheduler_kwargs or {})
        )
        self.prediction_type = prediction_type
        self.snr_gamma = snr_gamma
        self.timestep_buckets = timestep_buckets
        t = num_train_timesteps
        k = max(timestep_buckets, 1)
        edges = [i * t // k for i in range(k + 1)]  # bucket of t is t * K // T
        self.task_names = tuple(f"t{edges[i]}-{edges[i + 1] - 1}" for i in range(k))

    # --------------------------------------------------------------------------------------------------------
    @property
    def image_shape(self) -> tuple[int, int, int]:
        """``(C, H, W)`` of the images the UNet takes."""
        size = self.unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (self.unet.config.in_channels, h, w)

    @override
    def forward(self, x: Tensor, timesteps: Tensor | int) -> Tensor:
        """The UNet's prediction (ε, x0 or v) for noisy images ``x`` at ``timesteps``."""
        return self.unet(x, timesteps).sample

    def _images(self, batch: Any) -> Tensor:
        if isinstance(batch, Tensor):
            return batch
        if isinstance(batch, (list, tuple)) and batch and isinstance(batch[0], Tensor):
            return batch[0]
        if isinstance(batch, Mapping) and isinstance(batch.get("images"), Tensor):
            return batch["images"]
        raise TypeError(
            "DDPM expects a batch of images: a Tensor (B, C, H, W) in [-1, 1], a tuple/list whose "
            "first item is "
            f"one, or a dict with key 'images'; got {type(batch).__name__}."
        )

    def per_sample_loss(
        self, x0: Tensor, timesteps: Tensor | None = None, noise: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Per-image losses :math:`\\ell_i` (float32, shape ``(B,)``) and the timesteps used."""
        x0 = x0.float()
        if x0.shape[1:] != self.image_shape:
            raise ValueError(f"DDPM: images of shape {tuple(x0.shape[1:])}, the UNet takes {self.image_shape}.")
        sch = self.noise_scheduler
        if noise is None:
            noise = torch.randn_like(x0)
        if timesteps is None:
            timesteps = torch.randint(0, sch.config.num_train_timesteps, (x0.shape[0],), device=x0.device)
        noisy = sch.add_noise(x0, noise.float(), timesteps)  # fp32 scheduler, fp32 inputs -> fp32
        pred = self.unet(noisy.to(self.unet.dtype), timesteps).sample.float()
        if self.prediction_type == "epsilon":
            target = noise.float()
        elif self.prediction_type == "sample":
            target = x0
        else:
            target = sch.get_velocity(x0, noise.float(), timesteps)
        loss = F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)
        if self.snr_gamma is not None:
            from diffusers.training_utils import compute_snr  # slow import: only when used

            snr = compute_snr(sch, timesteps).float()
            weight = snr.clamp(max=self.snr_gamma)
            if self.prediction_type == "epsilon":
                weight = weight / snr
            elif self.prediction_type == "v_prediction":
                weight = weight / (snr + 1)
            loss = loss * weight
        return loss, timesteps

    def losses(self, x0: Tensor) -> dict[str, Tensor]:
        """The task losses of a batch: ``{"loss": mean}``, or one per noise-level bucket (they sum to the
        mean)."""
        loss, timesteps = self.per_sample_loss(x0)
        if self.timestep_buckets <= 1:
            return {"loss": loss.mean()}
        buckets = timesteps * self.timestep_buckets // self.noise_scheduler.config.num_train_timesteps
        n = loss.shape[0]
        return {name: (loss * (buckets == k)).sum() / n for k, name in enumerate(self.task_names)}

    @override
    def training_step(self, batch: Any, batch_idx: int) -> Tensor:
        losses = self.losses(self._images(batch))
        if len(losses) == 1:
            total = losses["loss"]
        else:
            total = task_losses(self, losses)
            self.log_dict({f"train/loss_{k}": v.detach() for k, v in losses.items()}, on_step=True)
        self.log("train/loss", total.detach(), on_step=True, prog_bar=True)
        return total

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> Tensor:
        loss = self.losses(self._images(batch))
        total = torch.stack(list(loss.values())).sum()
        self.log("val/loss", total, on_epoch=True, prog_bar=True, sync_dist=True)
        return total

    @override
    def configure_optimizers(self) -> Any:
        hp = self.hparams
        opt = torch.optim.AdamW(self.unet.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay)
        if hp.warmup_steps == 0 and hp.lr_schedule == "constant":
            return opt
        total = max(int(self.trainer.estimated_stepping_batches), 1) if hp.lr_schedule == "cosine" else 0
        warmup = hp.warmup_steps

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / warmup
            if hp.lr_schedule == "constant":
                return 1.0
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return 0.5 * (1 + math.cos(math.pi * progress))

        sched = torch.optim.lr_scheduler.LambdaLR(opt, factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    # --------------------------------------------------------------------------------------------------------
    def inference_scheduler(self, scheduler: Literal["ddpm", "ddim"] = "ddpm") -> DDPMScheduler | DDIMScheduler:
        """A fresh ``DDPMScheduler`` or ``DDIMScheduler`` with this model's training configuration."""
        if scheduler == "ddpm":
            return DDPMScheduler.from_config(self.noise_scheduler.config)
        if scheduler == "ddim":
            return DDIMScheduler.from_config(self.noise_scheduler.config)
        raise ValueError(f"sample(scheduler=...) must be 'ddpm' or 'ddim', got {scheduler!r}.")

    @torch.no_grad()
    def sample(
        self,
        n: int,
        steps: int | None = None,
        scheduler: Literal["ddpm", "ddim"] = "ddpm",
        generator: torch.Generator | None = None,
        *,
        eta: float = 0.0,
        batch_size: int | None = None,
        use_ema: bool = True,
    ) -> Tensor:
        r"""Generate ``n`` images in :math:`[0, 1]`, shape ``(n, C, H, W)``, float32.

        Starts from :math:`x_T\sim\mathcal N(0, I)` and applies the scheduler's ``step`` ``steps`` times
        (default: :math:`T` for ``"ddpm"``, 50 for ``"ddim"``; DDIM with ``eta=0`` is deterministic given
        :math:`x_T`). With a ``generator`` the result is reproducible and, for ``batch_size >= n``, equal to
        ``DDPMPipeline(unet, scheduler)(n, generator, steps, output_type="np")`` with the same generator. With
        ``use_ema`` and a Trainer that has ``EMAWeightAveraging``, the averaged weights are used and the
        training
        weights restored afterwards.
        """
        if n < 1:
            raise ValueError(f"sample(n=...) must be >= 1, got {n}.")
        sch = self.inference_scheduler(scheduler)
        steps = steps if steps is not None else (sch.config.num_train_timesteps if scheduler == "ddpm" else 50)
        if not 1 <= steps <= sch.config.num_train_timesteps:
            raise ValueError(f"sample(steps=...) must be in [1, {sch.config.num_train_timesteps}], got {steps}.")
        batch_size = batch_size or n
        was_training = self.unet.training
        self.unet.eval()
        dtype, device = self.unet.dtype, self.unet.device
        out = []
        try:
            with ema_weights(self) if use_ema else _nullcontext():
                for start in range(0, n, batch_size):
                    b = min(batch_size, n - start)
                    x = randn_tensor((b, *self.image_shape), generator=generator, device=device, dtype=dtype)
                    x = x.float()
                    sch.set_timesteps(steps, device=device)
                    for t in sch.timesteps:
                        model_output = self.unet(x.to(dtype), t).sample.float()
                        kwargs = {"eta": eta} if scheduler == "ddim" else {}
                        x = sch.step(model_output, t, x, generator=generator, **kwargs).prev_sample.float()
                    out.append(to_unit(x))
        finally:
            self.unet.train(was_training)
        return torch.cat(out)

    def to_pipeline(self, scheduler: Literal["ddpm", "ddim"] = "ddpm") -> DDPMPipeline:
        """A diffusers ``DDPMPipeline`` on a copy of this UNet (current weights) and a fresh scheduler."""
        return DDPMPipeline(unet=copy.deepcopy(self.unet).float().eval(), scheduler=self.inference_scheduler(scheduler))

    def save_pretrained(self, path: str | Path, scheduler: Literal["ddpm", "ddim"] = "ddpm") -> None:
        """Write a ``DDPMPipeline`` directory (``DDPMPipeline.from_pretrained(path)`` loads it).

        The current weights are saved: after ``Trainer.fit`` with ``EMAWeightAveraging`` those are the
        averaged
        ones (the callback copies them in at the end of training).
        """
        self.to_pipeline(scheduler).save_pretrained(str(path))


@contextmanager
def _nullcontext() -> Iterator[bool]:
    yield False


# ------------------------------------------------------------------------------------------------------------
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
    """Write a ``(C, H, W)`` image in :math:`[0, 1]` as an 8-bit PNG (grey for C=1), upscaled ``scale``
    times."""
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


class SampleGrid(Callback):
    r"""Every ``every_n_epochs`` epochs, on global rank 0 only, sample a fixed-seed grid and write it as a
    PNG.

    The same seed every time, so the grids of successive epochs show the same :math:`x_T` denoised by a better
    model. With ``EMAWeightAveraging`` in the Trainer, the averaged weights are swapped in for sampling and
    the
    training weights restored afterwards. The grid is also logged with ``add_image`` when the Trainer uses a
    ``TensorBoardLogger``. The other ranks do nothing (no collective runs inside ``sample``), so they simply
    continue to the next step's collectives and wait there.

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
        if self.use_ema and stage == "fit" and _has_weight_averaging(trainer) is False:
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


def _has_weight_averaging(trainer: pl.Trainer) -> bool:
    return any(isinstance(cb, WeightAveraging) for cb in trainer.callbacks)  # type: ignore[attr-defined]
