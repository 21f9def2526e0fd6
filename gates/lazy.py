"""Lazy public names for a package (PEP 562): a submodule is imported when one of its names is first used."""
from __future__ import annotations

import importlib
import sys


def lazy_getattr(package: str, exports: dict):
    """A module-level `__getattr__` for `package` resolving name -> getattr(import(exports[name]), name),
    the module path relative to `package`; the value is kept in the package's namespace."""

    def __getattr__(name):
        if name in exports:
            value = getattr(importlib.import_module(exports[name], package), name)
            setattr(sys.modules[package], name, value)
            return value
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
