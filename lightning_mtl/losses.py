"""Generic losses as small pure-torch functions (no Lightning here).

Model-specific losses live with their models: the CoSENT loss is :mod:`lightning_gen.cosent.loss`.
"""

from __future__ import annotations

from lightning_mtl._imports import moved

__all__: list[str] = []

# lightning_mtl.losses.cosent_loss & co. moved with the CoSENT model; the old path works for one release.
__getattr__ = moved("lightning_mtl.losses", "lightning_gen.cosent")
