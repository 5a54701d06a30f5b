"""DDPM on diffusers (Su, https://kexue.fm/archives/9119): the article's schedule (``schedule``), the
LightningModule (``model``), EMA weights (``ema``), the sample grid (``sampling``) and image data (``data``). Names
are imported lazily: the data needs no diffusers."""

from __future__ import annotations

from lightning_mtl._imports import lazy_exports

_EXPORTS = {
    "DDPM": "model",
    "UNET_PRESETS": "model",
    "ArticleCoefficients": "schedule",
    "article_alphas": "schedule",
    "article_coefficients": "schedule",
    "make_noise_scheduler": "schedule",
    "ema_weights": "ema",
    "find_weight_averaging": "ema",
    "SampleGrid": "sampling",
    "make_grid": "sampling",
    "save_png": "sampling",
    "ImageDataModule": "data",
    "load_digits_images": "data",
    "load_mnist": "data",
    "read_idx": "data",
    "resize_images": "data",
    "to_unit": "data",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
