"""Lazy re-exports, deprecated module paths and missing extras (private).

Packages whose names pull in optional dependencies (diffusers, transformers) export them lazily, so that importing
the package costs nothing until a name is used; modules that moved keep their old path for one release through a
module ``__getattr__`` that warns with the new path. An optional package that is not installed is reported with the
extra that installs it (:func:`needs_extra`; the lazy exports do it for every name they import).
"""

from __future__ import annotations

import contextlib
import importlib
import warnings
from collections.abc import Callable, Iterator, Mapping
from typing import Any

__all__ = ["EXTRAS", "lazy_exports", "moved", "needs_extra"]

#: the optional packages of the public code, by import name, with the extra of pyproject.toml that installs them
EXTRAS: dict[str, str] = {
    "transformers": "nlp",
    "sentence_transformers": "nlp",
    "datasets": "nlp",
    "diffusers": "gen",
    "torchjd": "bench",
}


@contextlib.contextmanager
def needs_extra(what: str) -> Iterator[None]:
    """Turn the ``ModuleNotFoundError`` of an optional package (:data:`EXTRAS`) imported inside the block into one
    that says that ``what`` needs it and which extra installs it; any other error passes unchanged.

    Example::

        with needs_extra(type(self).__name__):
            from transformers import AutoModel
    """
    try:
        yield
    except ModuleNotFoundError as err:
        package = (err.name or "").partition(".")[0]
        extra = EXTRAS.get(package)
        if extra is None:
            raise
        raise ModuleNotFoundError(
            f"{what} needs the optional package {package!r}, which the main install (`pip install lightning-mtl` or "
            f'`pip install -e .`) leaves out: pip install "lightning-mtl[{extra}]" (from a checkout: '
            f'pip install -e ".[{extra}]").',
            name=err.name,
        ) from err


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``name`` from ``package + "." + exports[name]``."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            with needs_extra(f"{package}.{name}"):
                module = importlib.import_module(f"{package}.{exports[name]}")
            return getattr(module, name)
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__


def moved(old: str, new: str, names: Mapping[str, str] | None = None) -> Callable[[str], Any]:
    """A module ``__getattr__`` for the old module path ``old``: every name is looked up in ``new`` (or in the module
    that ``names`` gives for it) and a :class:`DeprecationWarning` names the path to import from instead."""

    def __getattr__(name: str) -> Any:
        if name.startswith("__"):
            raise AttributeError(name)
        target = (names or {}).get(name, new)
        value = getattr(importlib.import_module(target), name)
        warnings.warn(
            f"{old}.{name} moved to {target}.{name}: import it from {target} (the old path stops working in the "
            "next release).",
            DeprecationWarning,
            stacklevel=2,
        )
        return value

    return __getattr__
