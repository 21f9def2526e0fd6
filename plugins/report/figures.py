"""The report's figures as base64 PNG (matplotlib's Agg backend, no external resources).

- `deviation_figure`: DeepInspect's per-class deviation factors with the threshold (Eq. 7);
- `trigger_grid_figure`: the recovered triggers per class and a stamped substitute image;
- `check_figure`: the STRIP benign-entropy histogram, its fitted normal and the threshold
  (Gao et al. Sec. V-D), with trigger-stamped inputs' entropies when known.
"""
from __future__ import annotations

import base64
import io
import math

import numpy as np

from .format import num


def figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def deviation_figure(deviation_factors, threshold, flagged, names=None) -> str:
    """Bar chart of the per-class deviation factors with the threshold line; flagged bars in red."""
    cutoff = threshold
    df = np.asarray(deviation_factors, dtype=np.float64)
    k = len(df)
    fig = figure(min(12, max(5, 0.45 * k + 1.5)), 3.2)
    ax = fig.add_subplot(111)
    flagged = set(int(c) for c in flagged)
    colours = ["#cf222e" if i in flagged else "#8c959f" for i in range(k)]
    ax.bar(np.arange(k), df, color=colours, edgecolor="none")
    ax.axhline(cutoff, color="#cf222e", ls="--", lw=1.2, label=f"threshold c = {cutoff:g}")
    ax.set_xlabel("class")
    ax.set_ylabel("deviation factor")
    if k <= 30:
        ax.set_xticks(np.arange(k))
        ax.set_xticklabels([str(i) for i in range(k)])
    ax.set_ylim(0, max(cutoff * 1.25, float(np.nanmax(df)) * 1.1 if k else 1.0))
    ax.legend(loc="upper right", frameon=False)
    ax.set_title("DeepInspect deviation factors (left tail, double MAD)")
    return png(fig)


def trigger_grid_figure(trigger_samples, flagged, statistics=None, inverted_x=None, inverted_y=None,
                        max_classes: int = 20) -> str:
    """Recovered triggers G(z, k) per class (top row) and, with inverted data, a stamped example.

    Perturbations share one colour scale so their sizes compare; flagged classes are framed
    in red. Beyond `max_classes`, the flagged classes and those with the smallest statistic
    are shown.
    """
    ts = np.asarray(trigger_samples, dtype=np.float32)
    k_all = ts.shape[0]
    flagged = [int(c) for c in flagged]
    if k_all <= max_classes:
        classes = list(range(k_all))
    else:
        order = list(np.argsort(statistics)) if statistics is not None else list(range(k_all))
        classes = sorted((flagged + [int(c) for c in order if c not in flagged])[:max_classes])
    deltas = ts[classes, 0]  # (n, C, H, W)
    scale = float(np.abs(deltas).max()) or 1.0
    stamped_row = inverted_x is not None and len(inverted_x) > 0
    per = 2 if stamped_row else 1  # figure rows per block of classes
    n = len(classes)
    cols = min(n, 10)
    blocks = int(math.ceil(n / cols))
    rows = blocks * per
    fig = figure(max(4.0, 1.25 * cols), 1.45 * rows + 0.4)
    for j, k in enumerate(classes):
        d = deltas[j]
        block, col = divmod(j, cols)
        ax = fig.add_subplot(rows, cols, block * per * cols + col + 1)
        if d.shape[0] == 1:
            ax.imshow(d[0], cmap="RdBu_r", vmin=-scale, vmax=scale, interpolation="nearest")
        else:
            ax.imshow(np.clip(0.5 + 0.5 * np.moveaxis(d[:3], 0, -1) / scale, 0, 1), interpolation="nearest")
        _frame(ax, k in flagged, f"{k}{' !' if k in flagged else ''}")
        if stamped_row:
            x = _example(inverted_x, inverted_y, k)
            s = np.clip(x + d, 0.0, 1.0)
            ax2 = fig.add_subplot(rows, cols, (block * per + 1) * cols + col + 1)
            if s.shape[0] == 1:
                ax2.imshow(s[0], cmap="gray", vmin=0, vmax=1, interpolation="nearest")
            else:
                ax2.imshow(np.moveaxis(s[:3], 0, -1), interpolation="nearest")
            _frame(ax2, k in flagged, None)
    below = " (top) and stamped inverted images (bottom)" if blocks == 1 else ", each above a stamped inverted image"
    fig.suptitle("recovered triggers" + (below if stamped_row else "")
                 + "; flagged classes in red", fontsize=9)
    return png(fig)


def _frame(ax, flagged: bool, title):
    ax.set_xticks([])
    ax.set_yticks([])
    for s in ax.spines.values():
        s.set_color("#cf222e" if flagged else "#d0d7de")
        s.set_linewidth(2.5 if flagged else 0.8)
    if title is not None:
        ax.set_title(title, fontsize=9, color="#cf222e" if flagged else "#24292f")


def _example(x, y, k):
    """An inverted image of a class other than k (the stamp moves it towards k)."""
    if y is not None:
        other = np.flatnonzero(np.asarray(y) != k)
        if len(other):
            return np.asarray(x[other[0]], dtype=np.float32)
    return np.asarray(x[0], dtype=np.float32)


def check_figure(check: dict) -> str:
    """Benign score histogram, the threshold (and trojan scores if given), higher = more trojan-like:
    STRIP's negated entropy with its fitted normal, or the run-time check's -min p as -log10(min p)."""
    runtime = check.get("kind") == "runtime"
    scale = (lambda v: -np.log10(np.clip(-v, 1e-12, None))) if runtime else (lambda v: v)
    benign = scale(np.asarray(check["benign_scores"], dtype=np.float64).ravel())
    trojan = check.get("trojan_scores")
    trojan = None if trojan is None else scale(np.asarray(trojan, dtype=np.float64).ravel())
    mean = num(check.get("mean"))
    std = num(check.get("std"))
    mean = float(benign.mean()) if mean is None else mean
    std = float(benign.std(ddof=1)) if std is None and benign.size > 1 and not runtime else std
    thr = num(check.get("threshold"))
    thr = None if thr is None else float(scale(np.float64(thr)))
    emp = num(check.get("empirical_threshold"))
    fig = figure(7, 3.2)
    ax = fig.add_subplot(111)
    values = [benign] + ([trojan] if trojan is not None and trojan.size else [])
    lo = min(float(v.min()) for v in values)
    hi = max(float(v.max()) for v in values)
    if thr is not None:
        lo, hi = min(lo, thr), max(hi, thr)
    pad = 0.05 * (hi - lo or 1.0)
    bins = np.linspace(lo - pad, hi + pad, 41)
    ax.hist(benign, bins=bins, density=True, color="#8c959f", alpha=0.75, label=f"benign (n = {benign.size})")
    if trojan is not None and trojan.size:
        ax.hist(trojan, bins=bins, density=True, color="#fb8f44", alpha=0.6,
                label=f"trigger-stamped (n = {trojan.size})")
    if std:
        grid = np.linspace(bins[0], bins[-1], 300)
        pdf = np.exp(-0.5 * ((grid - mean) / std) ** 2) / (std * math.sqrt(2 * math.pi))
        ax.plot(grid, pdf, color="#24292f", lw=1.4, label=f"fitted normal ({mean:.3f}, {std:.3f})")
    if thr is not None:
        ax.axvline(thr, color="#cf222e", lw=1.6, label=f"threshold {thr:.4f} ({check.get('rule', '')})")
    if emp is not None and (thr is None or not math.isclose(emp, thr)):
        ax.axvline(emp, color="#cf222e", lw=1.0, ls=":", label=f"empirical quantile {emp:.4f}")
    if runtime:
        ax.set_xlabel(f"-log10 combined min-p over {', '.join(check.get('statistics') or [])} (high = trojan-like)")
        ax.set_title("Run-time check scores of held-out inputs (leave-one-out)")
    else:
        ax.set_xlabel("negated normalised entropy -H (high = trojan-like)")
        ax.set_title("STRIP entropy of held-out inputs")
    ax.set_ylabel("density")
    ax.legend(fontsize=8, frameon=False)
    return png(fig)


def calibrated_figure(benign_scores, trojan_scores, score, threshold) -> str:
    """The calibrated decision: benign (and trojaned) calibration shadows' scores, the threshold at
    the stated false-block rate and the scanned model's score."""
    benign = np.asarray(benign_scores, dtype=np.float64)
    trojan = np.asarray(trojan_scores if trojan_scores is not None else [], dtype=np.float64)
    values = np.concatenate([benign, trojan, [float(score), float(threshold)]])
    lo, hi = float(values.min()), float(values.max())
    bins = np.linspace(lo - 0.05 * (hi - lo or 1.0), hi + 0.05 * (hi - lo or 1.0), 41)
    fig = figure(7, 3.2)
    ax = fig.add_subplot(111)
    ax.hist(benign, bins=bins, color="#8c959f", alpha=0.8, label=f"benign shadows (n = {benign.size})")
    if trojan.size:
        ax.hist(trojan, bins=bins, color="#fb8f44", alpha=0.6, label=f"trojaned shadows (n = {trojan.size})")
    ax.axvline(float(threshold), color="#cf222e", lw=1.6, ls="--", label=f"threshold {float(threshold):.2f}")
    ax.axvline(float(score), color="#0969da", lw=2.2, label=f"this model {float(score):.2f}")
    ax.set_xlabel("meta-classifier score (high = trojan-like)")
    ax.set_ylabel("calibration shadows")
    ax.set_title("Calibrated decision: this model against shadow models of the task")
    ax.legend(fontsize=8, frameon=False)
    return png(fig)
