"""DDPM on diffusers (Su, https://kexue.fm/archives/9119): the article's schedule, the LightningModule, EMA
weights, sampling and the sample grid, and image data. Names are imported lazily: the data needs no diffusers."""

from __future__ import annotations

from lightning_mtl._imports import lazy_exports

_EXPORTS = {
    "DDPM": "model",
    "UNET_PRESETS": "model",
    "ArticleCoefficients": "model",
    "SampleGrid": "model",
    "article_alphas": "model",
    "article_coefficients": "model",
    "ema_weights": "model",
    "make_grid": "model",
    "make_noise_scheduler": "model",
    "save_png": "model",
    "ImageDataModule": "data",
    "load_digits_images": "data",
    "load_mnist": "data",
    "read_idx": "data",
    "resize_images": "data",
    "to_unit": "data",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
