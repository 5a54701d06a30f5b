"""Lazy re-exports and deprecated module paths (private).

Packages whose names pull in optional dependencies (diffusers, transformers) export them lazily, so that importing
the package costs nothing until a name is used; modules that moved keep their old path for one release through a
module ``__getattr__`` that warns with the new path.
"""

from __future__ import annotations

import importlib
import warnings
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports", "moved"]


def lazy_exports(package: str, exports: Mapping[str, str]) -> Callable[[str], Any]:
    """A module ``__getattr__`` for ``package`` that imports ``name`` from ``package + "." + exports[name]``."""

    def __getattr__(name: str) -> Any:
        if name in exports:
            return getattr(importlib.import_module(f"{package}.{exports[name]}"), name)
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
