"""Generative reference models built on :mod:`lightning_mtl`: DDPM on diffusers and a GAU language model.

Names are imported lazily, so ``import lightning_gen`` needs neither diffusers nor the language-model code.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DDPM": "ddpm",
    "SampleGrid": "ddpm",
    "ema_weights": "ddpm",
    "make_noise_scheduler": "ddpm",
    "article_coefficients": "ddpm",
    "article_alphas": "ddpm",
    "UNET_PRESETS": "ddpm",
    "ImageDataModule": "image_data",
    "load_mnist": "image_data",
    "load_digits_images": "image_data",
    "read_idx": "image_data",
    "GAU": "gau",
    "GAUStack": "gau",
    "GAULanguageModel": "lm",
    "BitsPerCharacter": "lm",
    "TextDataModule": "text_data",
    "ByteTokenizer": "text_data",
    "CharTokenizer": "text_data",
}


def __getattr__(name: str) -> Any:
    if name in _EXPORTS:
        return getattr(importlib.import_module(f"lightning_gen.{_EXPORTS[name]}"), name)
    raise AttributeError(f"module 'lightning_gen' has no attribute {name!r}")


__all__ = sorted(_EXPORTS)
