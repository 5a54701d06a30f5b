"""Models built on :mod:`lightning_mtl`, each in its own package with its data module.

* :mod:`lightning_gen.cosent`: the CoSENT sentence encoder (any Hugging Face encoder; extra ``nlp``).
* :mod:`lightning_gen.ddpm`: DDPM on diffusers (extra ``gen``).
* :mod:`lightning_gen.gau`: the gated attention unit and the GAU language model.
* :mod:`lightning_gen.span`: GlobalPointer entity extraction and GPLinker relations and events (extra ``nlp``).

Names are imported lazily, so ``import lightning_gen`` needs neither diffusers nor transformers.
"""

from __future__ import annotations

from lightning_mtl._imports import lazy_exports

_EXPORTS = {
    "CoSENTEncoder": "cosent",
    "SentencePairDataModule": "cosent",
    "cosent_loss": "cosent",
    "DDPM": "ddpm",
    "SampleGrid": "ddpm",
    "ema_weights": "ddpm",
    "make_noise_scheduler": "ddpm",
    "article_coefficients": "ddpm",
    "article_alphas": "ddpm",
    "UNET_PRESETS": "ddpm",
    "ImageDataModule": "ddpm",
    "load_mnist": "ddpm",
    "load_digits_images": "ddpm",
    "read_idx": "ddpm",
    "GAU": "gau",
    "GAUStack": "gau",
    "GAULanguageModel": "gau",
    "BitsPerCharacter": "gau",
    "TextDataModule": "gau",
    "ByteTokenizer": "gau",
    "CharTokenizer": "gau",
    "SpanExtractor": "span",
    "RelationExtractor": "span",
    "EventExtractor": "span",
    "SpanDataModule": "span",
    "RelationDataModule": "span",
    "EventDataModule": "span",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
