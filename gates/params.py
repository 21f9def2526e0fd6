"""scikit-learn's `get_params` habit: an estimator's parameters read from its `__init__` signature.

    get_params(obj) = {name: cast(getattr(obj, name)) for name in signature(type(obj).__init__)}

minus the names that change nothing in the result (progress bars, caches, worker counts), each
value cast to its default's type (bool, int, float) so that `6` and `6.0` read alike in a
fingerprint. A parameter added to `__init__` enters every fingerprint without anyone listing it.
"""
from __future__ import annotations

import inspect


def init_params(obj, exclude=("progress",)) -> dict:
    """The `__init__` parameters of `obj` and their current values (see the module's equation)."""
    out = {}
    for name, p in inspect.signature(type(obj).__init__).parameters.items():
        if name == "self" or name in exclude or p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
            continue
        value, default = getattr(obj, name), p.default
        if value is not None and not isinstance(value, (list, tuple, dict, str)):
            if isinstance(default, bool):
                value = bool(value)
            elif isinstance(default, int) or (default is None and float(value) == int(value)):
                value = int(value)
            elif isinstance(default, float):
                value = float(value)
        out[name] = list(value) if isinstance(value, tuple) else value
    return out
