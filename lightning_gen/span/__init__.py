"""Span extraction with GlobalPointer heads (Su, https://kexue.fm/archives/8877) and GPLinker
(https://kexue.fm/archives/8888 relations, https://kexue.fm/archives/8926 events): for now the event decoding, the
clique search over the argument graph. The heads and losses are generic and live in :mod:`lightning_mtl.heads` and
:mod:`lightning_mtl.losses`."""

from __future__ import annotations

from lightning_mtl._imports import lazy_exports

_EXPORTS = {
    "clique_search": "events",
}

__getattr__ = lazy_exports(__name__, _EXPORTS)
__all__ = sorted(_EXPORTS)
