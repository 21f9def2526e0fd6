"""Validate a held-out set with great-expectations before any use.

Expectations (each failure is reported by name):
- every image has the model's input shape (C, H, W);
- every pixel is finite (no NaN / inf);
- every pixel is inside [min_value, max_value] (default [0, 1]);
- every label is an integer class of the model, 0 <= y < n_classes;
- every class is present, with at least `min_per_class` images.

The per-image facts (shape, non-finite count, min, max, label) become a pandas frame that
great-expectations checks; class counts become a second frame.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from .errors import DataValidationError

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")


@dataclass
class ValidationReport:
    """Outcome of the held-out expectations: success, image count, failure messages and per-check records."""

    success: bool
    n_images: int
    failures: list = field(default_factory=list)
    checks: list = field(default_factory=list)

    def raise_for_failures(self):
        """Raise DataValidationError listing the failures unless the validation succeeded."""
        if not self.success:
            raise DataValidationError(self.failures)


def _context():
    import great_expectations as gx

    logging.getLogger("great_expectations").setLevel(logging.ERROR)
    ctx = gx.get_context(mode="ephemeral")
    try:
        from great_expectations.data_context.types.base import ProgressBarsConfig

        ctx.variables.progress_bars = ProgressBarsConfig(globally=False)
    except Exception:  # progress bars are cosmetic; older/newer layouts differ
        pass
    return ctx


def _batch(ctx, name: str, df: pd.DataFrame):
    bd = (ctx.data_sources.add_pandas(f"{name}_source")
          .add_dataframe_asset(f"{name}_asset")
          .add_batch_definition_whole_dataframe(f"{name}_batch"))
    return bd.get_batch(batch_parameters={"dataframe": df})


def image_facts(x: np.ndarray, y: np.ndarray) -> pd.DataFrame:
    """One row per image: shape ("CxHxW"), non-finite pixel count, min and max of its finite pixels, label."""
    n = len(x)
    x = np.asarray(x)
    shape_str = "x".join(map(str, x.shape[1:]))
    flat = x.reshape(n, -1).astype(np.float64) if n else np.zeros((0, 1))
    finite = np.isfinite(flat)
    with np.errstate(invalid="ignore"):
        mins = np.where(finite, flat, np.inf).min(axis=1) if n else np.zeros(0)
        maxs = np.where(finite, flat, -np.inf).max(axis=1) if n else np.zeros(0)
    y = np.asarray(y)
    label_ok = np.issubdtype(y.dtype, np.integer)
    return pd.DataFrame({
        "shape": [shape_str] * n,
        "nonfinite": (~finite).sum(axis=1).astype(np.int64),
        "min": mins,
        "max": maxs,
        "label": y.astype(np.int64) if label_ok else y.astype(np.float64),
    })


def validate_heldout(x, y, input_shape: tuple, n_classes: int, min_per_class: int = 5,
                     value_range: tuple = (0.0, 1.0), raise_on_failure: bool = True) -> ValidationReport:
    """Run the held-out expectations; raise DataValidationError listing every failure."""
    import great_expectations as gx

    x = np.asarray(x)
    y = np.asarray(y).reshape(-1)
    failures: list[str] = []
    checks: list[dict] = []
    if len(x) != len(y):
        failures.append(f"x has {len(x)} images but y has {len(y)} labels")
        rep = ValidationReport(False, len(x), failures, checks)
        if raise_on_failure:
            rep.raise_for_failures()
        return rep
    if len(x) == 0:
        failures.append("held-out set is empty")
        rep = ValidationReport(False, 0, failures, checks)
        if raise_on_failure:
            rep.raise_for_failures()
        return rep
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        failures.append(f"images must be numeric, got dtype {x.dtype}")
        rep = ValidationReport(False, len(x), failures, checks)
        if raise_on_failure:
            rep.raise_for_failures()
        return rep
    expected_shape = "x".join(map(str, input_shape))
    ctx = _context()
    facts = image_facts(x, y)
    batch = _batch(ctx, "images", facts)
    lo, hi = value_range
    E = gx.expectations
    image_expectations = [
        (E.ExpectColumnValuesToBeInSet(column="shape", value_set=[expected_shape]),
         f"image shape equals the model input {tuple(input_shape)}"),
        (E.ExpectColumnValuesToBeBetween(column="nonfinite", min_value=0, max_value=0),
         "all pixel values are finite (no NaN/inf)"),
        (E.ExpectColumnValuesToBeBetween(column="min", min_value=lo),
         f"pixel values >= {lo}"),
        (E.ExpectColumnValuesToBeBetween(column="max", max_value=hi),
         f"pixel values <= {hi}"),
        (E.ExpectColumnValuesToBeInSet(column="label", value_set=list(range(n_classes))),
         f"labels are integer classes in [0, {n_classes - 1}]"),
        (E.ExpectColumnDistinctValuesToContainSet(column="label", value_set=list(range(n_classes))),
         f"every one of the {n_classes} classes is present"),
    ]
    labels = facts["label"].to_numpy()
    valid = np.isin(labels, np.arange(n_classes))
    counts = np.bincount(labels[valid].astype(np.int64), minlength=n_classes)[:n_classes]
    count_batch = _batch(ctx, "counts", pd.DataFrame({"cls": np.arange(n_classes), "count": counts}))
    count_expectation = (E.ExpectColumnValuesToBeBetween(column="count", min_value=min_per_class),
                         f"each class has at least {min_per_class} images")
    for b, (exp, desc) in [(batch, e) for e in image_expectations] + [(count_batch, count_expectation)]:
        r = b.validate(exp)
        res = r.result or {}
        detail = {k: res[k] for k in ("unexpected_count", "partial_unexpected_list", "partial_missing_list",
                                      "observed_value") if k in res}
        checks.append({"expectation": type(exp).__name__, "description": desc, "success": bool(r.success),
                       "detail": _jsonable(detail)})
        if not r.success:
            if b is count_batch:
                short = [int(c) for c in np.flatnonzero(counts < min_per_class)]
                desc += f" (classes below: {short}, counts {[int(counts[c]) for c in short]})"
            elif detail:
                desc += f" ({_summary(detail)})"
            failures.append(f"{type(exp).__name__}: {desc}")
    rep = ValidationReport(not failures, len(x), failures, checks)
    if raise_on_failure:
        rep.raise_for_failures()
    return rep


def _summary(detail: dict) -> str:
    parts = []
    if "unexpected_count" in detail:
        parts.append(f"{detail['unexpected_count']} unexpected")
    if detail.get("partial_unexpected_list"):
        parts.append(f"e.g. {list(detail['partial_unexpected_list'])[:5]}")
    if detail.get("partial_missing_list"):
        parts.append(f"missing {list(detail['partial_missing_list'])}")
    return ", ".join(parts)


def _jsonable(v):
    if isinstance(v, dict):
        return {k: _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, float) and not np.isfinite(v):
        return str(v)
    return v
