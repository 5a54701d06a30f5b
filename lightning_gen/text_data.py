"""Deprecated: moved to :mod:`lightning_gen.gau`.

The old path keeps working for one release, with a ``DeprecationWarning``."""

from lightning_mtl._imports import moved

__getattr__ = moved("lightning_gen.text_data", "lightning_gen.gau")
