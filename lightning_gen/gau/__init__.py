"""Gated attention unit (GAU; Hua et al. 2022, Su https://kexue.fm/archives/9019) and the GAU language model: the
layer with relu²/n, softmax and softmax_plus attention, the LM with its auxiliary task, and text data."""

from __future__ import annotations

from lightning_mtl._imports import lazy_exports

_EXPORTS = {
    "GAU": "layer",
    "GAUStack": "layer",
    "ScaleOffset": "layer",
    "apply_rotary": "layer",
    "rotary_cos_sin": "layer",
    "Attention": "layer",
    "Length": "layer",
    "Norm": "layer",
    "GAULanguageModel": "lm",
    "BitsPerCharacter": "lm",
    "warmup_cosine": "lm",
    "TextDataModule": "data",
    "ByteTokenizer": "data",
    "CharTokenizer": "data",
    "Windows": "data",
    "default_text": "data",
    "make_tokenizer": "data",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
