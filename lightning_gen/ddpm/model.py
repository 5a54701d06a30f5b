r"""DDPM as a LightningModule on diffusers, with noise levels as tasks.

The notation is Su's, *生成扩散模型漫谈(一): DDPM = 拆楼 + 建楼*, https://kexue.fm/archives/9119 (2022):
:math:`x_t = \bar\alpha_t x_0 + \bar\beta_t\bar\varepsilon`; :mod:`lightning_gen.ddpm.schedule` translates it into
diffusers' names and holds the article's schedule. The EMA weights are in :mod:`lightning_gen.ddpm.ema`, the sample
grid in :mod:`lightning_gen.ddpm.sampling`.

Reused from diffusers: ``UNet2DModel``, ``DDPMScheduler`` (``add_noise``, ``get_velocity``, ``step``),
``DDIMScheduler`` for fast sampling, ``DDPMPipeline`` for export, ``compute_snr`` for Min-SNR weighting.
"""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from diffusers import DDIMScheduler, DDPMPipeline, DDPMScheduler, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor
from torch import Tensor
from typing_extensions import override

from lightning_gen.ddpm.data import to_unit
from lightning_gen.ddpm.ema import ema_weights
from lightning_gen.ddpm.schedule import make_noise_scheduler
from lightning_mtl._utils import eval_mode, fused_ok, warmup_schedule
from lightning_mtl.tasks import task_losses

__all__ = ["DDPM", "UNET_PRESETS"]

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
    :math:`L_k = \frac1B\sum_{i: t_i\in\text{range}_k}\ell_i`, so :math:`\sum_k L_k` is the ordinary batch mean and
    :class:`~lightning_mtl.callbacks.MultiTaskGradient` can balance the noise levels (e.g. with
    :class:`~lightning_mtl.GradNormalize`). A range without a sample in the batch still returns a (zero) loss
    connected to the graph, so the task set never changes.

    Args:
        preset: a key of :data:`UNET_PRESETS`: ``"mnist28"`` (default), ``"mnist14"`` or ``"digits8"``.
        unet: ``UNet2DModel`` keyword arguments that override the preset's (e.g. ``{"block_out_channels": [16, 32]}``).
        num_train_timesteps: :math:`T`.
        beta_schedule: ``"linear"`` (DDPM paper, diffusers' default), ``"article"``
            (:math:`\alpha_t = \sqrt{1-0.02t/T}`), ``"scaled_linear"``, ``"squaredcos_cap_v2"`` or ``"sigmoid"``.
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
            "DDPM expects a batch of images: a Tensor (B, C, H, W) in [-1, 1], a tuple/list whose first item is "
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
        """The task losses of a batch: ``{"loss": mean}``, or one per noise-level bucket (they sum to the mean)."""
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
        """AdamW on the UNet, with the warm-up and learning-rate schedule of the arguments.

        Fused (one kernel per step) except under ``"16-mixed"`` (a fused optimizer unscales inside its step:
        Lightning could not clip, and ``.grad`` would hold scaled gradients for the callbacks), under ``"bf16-mixed"``
        with gradient clipping (Lightning refuses to clip a fused optimizer and raises) and for DTensor parameters:
        then the non-fused AdamW, which works everywhere (the rule: :func:`lightning_mtl._utils.fused_ok`).
        """
        hp = self.hparams
        fused = fused_ok(self._trainer, self.unet.parameters()) or None
        opt = torch.optim.AdamW(
            self.unet.parameters(), lr=hp.lr, betas=tuple(hp.betas), weight_decay=hp.weight_decay, fused=fused
        )
        if hp.warmup_steps == 0 and hp.lr_schedule == "constant":
            return opt
        total = max(int(self.trainer.estimated_stepping_batches), 1) if hp.lr_schedule == "cosine" else 0
        warmup, decay = hp.warmup_steps, hp.lr_schedule
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_schedule(step, warmup, total, decay=decay))
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
        ``use_ema`` and a Trainer that has ``EMAWeightAveraging``, the averaged weights are used and the training
        weights restored afterwards.
        """
        if n < 1:
            raise ValueError(f"sample(n=...) must be >= 1, got {n}.")
        sch = self.inference_scheduler(scheduler)
        steps = steps if steps is not None else (sch.config.num_train_timesteps if scheduler == "ddpm" else 50)
        if not 1 <= steps <= sch.config.num_train_timesteps:
            raise ValueError(f"sample(steps=...) must be in [1, {sch.config.num_train_timesteps}], got {steps}.")
        batch_size = batch_size or n
        dtype, device = self.unet.dtype, self.unet.device
        out = []
        averaged = ema_weights(self) if use_ema else contextlib.nullcontext(False)  # entered after eval_mode
        with eval_mode(self.unet), averaged:
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
        return torch.cat(out)

    def to_pipeline(self, scheduler: Literal["ddpm", "ddim"] = "ddpm") -> DDPMPipeline:
        """A diffusers ``DDPMPipeline`` on a copy of this UNet (current weights) and a fresh scheduler."""
        return DDPMPipeline(unet=copy.deepcopy(self.unet).float().eval(), scheduler=self.inference_scheduler(scheduler))

    def save_pretrained(self, path: str | Path, scheduler: Literal["ddpm", "ddim"] = "ddpm") -> None:
        """Write a ``DDPMPipeline`` directory (``DDPMPipeline.from_pretrained(path)`` loads it).

        The current weights are saved: after ``Trainer.fit`` with ``EMAWeightAveraging`` those are the averaged ones
        (the callback copies them in at the end of training).
        """
        self.to_pipeline(scheduler).save_pretrained(str(path))
