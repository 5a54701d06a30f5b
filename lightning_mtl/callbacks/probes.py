"""Deprecated path: the probes are :class:`lightning_mtl.callbacks.GradientMagnitudeProbe` and
:class:`lightning_mtl.callbacks.ResidualProbe` (modules ``gradient_probe`` and ``residual_probe``), their math is in
:mod:`lightning_mtl.probes`. Importing a name from here works for one more release, with a DeprecationWarning."""

from lightning_mtl._imports import moved

__getattr__ = moved(
    "lightning_mtl.callbacks.probes",
    "lightning_mtl.callbacks",
    names={
        "find_residual_blocks": "lightning_mtl.probes",
        "BlockSpec": "lightning_mtl.callbacks.residual_probe",
        "ForwardFn": "lightning_mtl.callbacks.residual_probe",
    },
)
