"""Wall-clock timing the benchmarks share: several runners timed interleaved, median per runner."""
from __future__ import annotations

import time

import numpy as np


def interleaved_medians(runners: dict, repeats: int) -> dict:
    """Median seconds of each zero-argument callable in `runners` over `repeats` rounds, one call of
    each per round, so that a change of machine load hits every runner alike (warm them up first)."""
    times = {name: [] for name in runners}
    for _ in range(repeats):
        for name, fn in runners.items():
            t0 = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - t0)
    return {name: float(np.median(t)) for name, t in times.items()}
