"""Formatting helpers shared by the report's findings, figures and HTML."""
from __future__ import annotations

import math


def num(v):
    """A finite float, or None."""
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def first(d: dict, *keys):
    """The first of `keys` whose value in d is not None."""
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def class_name(k: int, names) -> str:
    return f"{k} ({names[k]})" if names and 0 <= k < len(names) else str(k)


def pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def fmt(v, digits=4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"
