"""CoSENT sentence encoder (Su, https://kexue.fm/archives/8847): the loss, sentence-pair data and the
LightningModule. Names are imported lazily: the loss needs only torch, the model needs ``transformers``."""

from __future__ import annotations

from lightning_mtl._imports import lazy_exports

_EXPORTS = {
    "CoSENTEncoder": "model",
    "SentencePairDataModule": "data",
    "default_model_path": "model",
    "pool": "model",
    "cosent_loss": "loss",
    "cosent_loss_from_embeddings": "loss",
    "pairwise_cosine": "loss",
    "NLI_LABELS": "loss",
    "DataFormatError": "data",
    "SentencePairs": "data",
    "collate_pairs": "data",
    "load_pairs": "data",
    "read_hf_pairs": "data",
    "read_pair_file": "data",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
