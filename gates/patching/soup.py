"""The uniform model soup the patcher averages its fine-tuning runs into."""
from __future__ import annotations

import torch


def uniform_soup(states: list[dict]) -> dict:
    """The uniform model soup (Wortsman et al., ICML'22): theta = (1/m) * sum_i theta_i over m
    fine-tuning runs from the same source weights; integer buffers are taken from the first run.
    Runs that start from one set of weights stay in one basin, so their average is a model of the
    same architecture whose clean accuracy is at least the runs' mean, usually above it."""
    if not states:
        raise ValueError("a soup needs at least one state")
    keys = list(states[0])
    if any(list(s) != keys for s in states[1:]):
        raise ValueError("soup members must share one architecture (same state keys)")
    out = {}
    for k in keys:
        v = states[0][k]
        out[k] = torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v.clone()
    return out
