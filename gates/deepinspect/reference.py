"""Reference models: how small a trigger does a *benign* model need for each class?

DeepInspect (Sec. 3.3) flags a class whose recovered trigger is abnormally small next to the
other classes'. On real data some classes are naturally easy to reach: on Fashion-MNIST a
few dozen bright pixels turn many garments into "sandal" or "bag" for a perfectly benign
model, and a trojan with a large or faint trigger then hides inside that natural spread
(measured in benchmarks/deepinspect.md). The paper's test has no notion of this.

When labelled held-out data is given, the scan therefore also trains `n_models` small
benign CNNs on it (never on the scanned model's answers), measures their per-class
statistics with exactly the scan's own procedure (inversion or held-out substitute set,
generator, support ladder, bisection; the reference is queried through ONNX Runtime like
any oracle, its queries counted apart) and tests the *reference-normalised* level

    r[t] = log stat_oracle[t] - mean_j log stat_ref_j[t]

with the left-tail double MAD (Eq. 7). A class that is easy for every model cancels out; a
class that is easy only for the scanned model stands out. The reference models are trained
on held-out images that are kept out of the substitute set, so no model is tested on its
own training images.
"""
from __future__ import annotations


import numpy as np

from ..data import Dataset


def split_heldout(heldout: Dataset, n_per_class: int, n_classes: int, seed: int = 0) -> tuple[Dataset, Dataset]:
    """Per class, `n_per_class` images for the substitute set and the rest for the reference models."""
    rng = np.random.default_rng(seed)
    sub, ref = [], []
    for c in range(n_classes):
        idx = rng.permutation(np.flatnonzero(heldout.y == c))
        sub.append(idx[:n_per_class])
        ref.append(idx[n_per_class:])
    return heldout.subset(np.concatenate(sub)), heldout.subset(np.concatenate(ref))


def reference_level(reference_statistics) -> np.ndarray:
    """Per class, the geometric mean of the reference models' statistics ((n_models, K) -> (K,))."""
    return np.exp(np.log(np.asarray(reference_statistics, np.float64)).mean(0))


def normalised_levels(statistics, reference_statistics) -> np.ndarray:
    """r[t] = log stat[t] - mean_j log ref_j[t] (reference_statistics: (n_models, K))."""
    return np.log(np.asarray(statistics, np.float64)) - np.log(reference_level(reference_statistics))
