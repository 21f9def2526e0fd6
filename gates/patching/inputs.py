"""The patcher's input checks: images of the model's shape, labels in range, finite values."""
from __future__ import annotations

import numpy as np

from ..data import Dataset
from ..errors import InputShapeError


def as_xy(data) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) arrays of a Dataset or of an (x, y) pair."""
    if isinstance(data, Dataset):
        return data.x, data.y
    x, y = data
    return np.asarray(x), np.asarray(y)


def checked_images(x, y, shape, n_classes, what) -> tuple[np.ndarray, np.ndarray]:
    """float32 images of the model's (C, H, W) with int64 labels in range; None means empty."""
    x = np.zeros((0,) + shape, np.float32) if x is None else np.asarray(x)
    y = np.zeros(0, np.int64) if y is None else np.asarray(y).reshape(-1)
    if len(x) and tuple(x.shape[1:]) != shape:
        raise InputShapeError(f"{what}: images must be (n, {', '.join(map(str, shape))}); got {tuple(x.shape)}")
    if len(x) != len(y):
        raise InputShapeError(f"{what}: {len(x)} images but {len(y)} labels")
    x = np.ascontiguousarray(x, dtype=np.float32).reshape((-1,) + shape)
    if not np.isfinite(x).all():
        raise InputShapeError(f"{what}: images contain NaN or infinite values")
    if len(y) and (not np.all(y == np.round(y)) or y.min() < 0 or y.max() >= n_classes):
        raise InputShapeError(f"{what}: labels must be integers in 0..{n_classes - 1}")
    return x, y.astype(np.int64)
