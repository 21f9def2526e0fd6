"""The gate's report: a machine JSON (ModelScan-like) and one self-contained HTML page.

Inputs are plain data, so the module stays free of MLflow:

- `scan`: a `ScanResult` (DeepInspect), or None when the scan did not complete;
- `strip`: a dict describing the STRIP boundary (Gao et al. Sec. V-D): benign_scores, mean,
  std, threshold (or boundary), empirical_threshold, frr, rule, n_perturbations, blend,
  optional estimated_far and trojan_scores (entropies of trigger-stamped inputs);
- `patch`: a dict of before/after figures ({"before": {...}, "after": {...}, "source_version",
  "new_version", "passed", ...}) or a `PatchResult`.

`build_report` returns the JSON document (summary, findings with severities, errors, meta),
`render_html` draws the page (figures as base64 PNG through matplotlib's Agg backend, no
external resources), `write_report` writes both files.
"""
from __future__ import annotations

import base64
import html
import io
import json
import math
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

FORMAT = "trojan-gate/report"
FORMAT_VERSION = 1

VERDICTS = {  # verdict -> (badge colour, one-line meaning)
    "passed": ("#1a7f37", "no trojan found; the version may be promoted"),
    "patched": ("#0969da", "a trojan was found and a patched version passed the re-scan"),
    "blocked": ("#cf222e", "a trojan is suspected; the version must not be served"),
    "error": ("#6e7781", "the gate could not finish; the version is not cleared"),
}
SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "INFO")
SEVERITY_COLOURS = {"CRITICAL": "#82071e", "HIGH": "#cf222e", "MEDIUM": "#bf8700", "LOW": "#0969da",
                    "INFO": "#57606a"}
GRID_CLASSES = 20  # classes shown in the trigger grid
NEAR_CUTOFF = 0.75  # a class with df in [0.75 c, c] gets a MEDIUM finding


# ----------------------------------------------------------------------------- JSON helpers
def _jsonable(v):
    """Plain JSON types; NaN and infinities become None (strict JSON has no NaN)."""
    if isinstance(v, dict):
        return {str(k): _jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return _jsonable(v.tolist())
    if isinstance(v, (bool, np.bool_)):
        return bool(v)
    if isinstance(v, (int, np.integer)):
        return int(v)
    if isinstance(v, (float, np.floating)):
        v = float(v)
        return v if math.isfinite(v) else None
    if v is None or isinstance(v, str):
        return v
    if isinstance(v, Path):
        return str(v)
    return str(v)


def _borderline_accuracy(patch_d: dict):
    """A MEDIUM finding when the patch's accuracy drop lies within one paired standard error of
    the bound: the verdict on accuracy then depends on which held-out images were kept to check it."""
    drop, bound = _num(patch_d.get("accuracy_drop")), _num(patch_d.get("max_accuracy_drop"))
    se = _num(patch_d.get("accuracy_drop_se"))
    if drop is None or bound is None or not se or abs(drop - bound) > se:
        return None
    side = "within" if patch_d.get("accuracy_within_bound") else "over"
    return {"severity": "MEDIUM", "title": "Patch accuracy check is borderline",
            "detail": f"The clean-accuracy drop of {100 * drop:.2f} points is {side} the bound of {100 * bound:g} "
                      f"by less than its paired standard error ({100 * se:.2f} points over "
                      f"{patch_d.get('n_eval')} held-out images); another draw of evaluation images could "
                      "decide the other way. More held-out data narrows it."}


def _num(v):
    try:
        v = float(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _first(d: dict, *keys):
    for k in keys:
        if d.get(k) is not None:
            return d[k]
    return None


def _class_name(k: int, names) -> str:
    return f"{k} ({names[k]})" if names and 0 <= k < len(names) else str(k)


def versions() -> dict:
    import matplotlib
    import onnxruntime

    from . import __version__

    return {"trojan-gate": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__, "matplotlib": matplotlib.__version__}


# ----------------------------------------------------------------------------- parts
def strip_summary(strip: dict | None) -> dict | None:
    """The STRIP boundary without its score arrays (counts and quantiles instead)."""
    if strip is None:
        return None
    benign = np.asarray(strip.get("benign_scores", []), dtype=np.float64).ravel()
    out = {
        "threshold": _num(_first(strip, "threshold", "boundary")),
        "empirical_threshold": _num(_first(strip, "empirical_threshold", "empirical_boundary")),
        "normal_threshold": _num(_first(strip, "normal_threshold", "normal_boundary")),
        "mean": _num(strip.get("mean")), "std": _num(strip.get("std")), "frr": _num(strip.get("frr")),
        "rule": strip.get("rule"), "n_perturbations": strip.get("n_perturbations"), "blend": strip.get("blend"),
        "estimated_far": _num(strip.get("estimated_far")), "n_benign": int(benign.size),
    }
    if benign.size:
        q = np.quantile(benign, [0.01, 0.5, 0.99])
        out["benign_quantiles"] = {"q01": float(q[0]), "q50": float(q[1]), "q99": float(q[2])}
        if out["threshold"] is not None:
            out["measured_frr"] = float((benign <= out["threshold"]).mean())
    trojan = strip.get("trojan_scores")
    if trojan is not None:
        trojan = np.asarray(trojan, dtype=np.float64).ravel()
        out["n_trojan"] = int(trojan.size)
        if trojan.size and out["threshold"] is not None:
            out["trojan_detection_rate"] = float((trojan <= out["threshold"]).mean())
    extra = {k: v for k, v in strip.items() if k not in out and k not in (
        "benign_scores", "trojan_scores", "boundary", "empirical_boundary", "normal_boundary", "bank")}
    out.update({k: v for k, v in extra.items() if not isinstance(v, np.ndarray)})
    return _jsonable(out)


def patch_summary(patch) -> dict | None:
    """A patch dict (or PatchResult) as plain JSON, with `passed` filled in if missing."""
    if patch is None:
        return None
    if hasattr(patch, "to_dict"):
        d = patch.to_dict()
        d.setdefault("passed", bool(patch.meets()))
    else:
        d = {k: v for k, v in dict(patch).items() if k != "onnx_bytes"}
    return _jsonable(d)


def _error_entry(e) -> dict:
    if isinstance(e, BaseException):
        return {"type": type(e).__name__, "message": str(e)}
    if isinstance(e, dict):
        return {"type": str(e.get("type", "Error")), "message": str(e.get("message", "")),
                **{k: _jsonable(v) for k, v in e.items() if k not in ("type", "message")}}
    return {"type": "Error", "message": str(e)}


def _findings(verdict, scan_d, strip_d, patch_d, errors, names) -> list[dict]:
    f = []
    if scan_d is None:
        f.append({"severity": "HIGH", "title": "DeepInspect scan did not complete",
                  "detail": "No trojan verdict could be reached; the version is not cleared."})
    else:
        dfs, stats_, rates = scan_d["deviation_factors"], scan_d["statistics"], scan_d["success_rates"]
        cutoff = scan_d["cutoff"]
        linked = set(scan_d.get("co_targets") or [])
        for k in scan_d["flagged_classes"]:
            if k in linked:
                f.append(_co_target_finding(scan_d, k, names))
                continue
            f.append({"severity": "CRITICAL", "title": f"Trojan suspected: class {_class_name(k, names)}",
                      "detail": (f"Deviation factor {_fmt(dfs[k], 3)} > cutoff {cutoff:g} (alpha {scan_d['alpha']}): "
                                 f"the recovered trigger for this class needs an abnormally small perturbation "
                                 f"({_fmt(stats_[k])}) and reaches the class in {_pct(rates[k])} of stamped inputs."),
                      "class": int(k), "deviation_factor": dfs[k]})
        for k, v in enumerate(dfs):
            if (k not in scan_d["flagged_classes"] and k not in (scan_d.get("transferable_classes") or [])
                    and v is not None and NEAR_CUTOFF * cutoff <= v <= cutoff):
                f.append({"severity": "MEDIUM", "title": f"Class {_class_name(k, names)} close to the cutoff",
                          "detail": f"Deviation factor {v:.2f} within {100 * (1 - NEAR_CUTOFF):.0f}% of the "
                                    f"cutoff {cutoff:g}; not flagged.",
                          "class": int(k), "deviation_factor": v})
        transfer = scan_d.get("transfer_rates")
        for k in scan_d.get("transferable_classes") or []:
            f.append({"severity": "MEDIUM", "title": f"Class {_class_name(k, names)} past the cutoff, not flagged",
                      "detail": (f"Deviation factor {_fmt(dfs[k], 3)} > cutoff {cutoff:g}, but its trigger also moves "
                                 f"{_pct(transfer[k])} of stamped inputs on the benign reference models (median "
                                 f"class {_pct(float(np.median(transfer)))}): a natural class feature rather than "
                                 "a backdoor (transfer_factor); review if in doubt."),
                      "class": int(k), "deviation_factor": dfs[k]})
        if not scan_d["flagged_classes"]:
            f.append({"severity": "INFO", "title": "No trojan found by DeepInspect",
                      "detail": f"Largest deviation factor {_fmt(scan_d['max_deviation_factor'], 3)} <= cutoff "
                                f"{cutoff:g} over {scan_d['n_classes']} classes ({scan_d['queries']} queries)."})
    if patch_d is not None:
        before, after = patch_d.get("before") or {}, patch_d.get("after") or {}
        tar_b, tar_a = _num(before.get("trojan_activation_rate")), _num(after.get("trojan_activation_rate"))
        figs = (f"trojan activation rate {_pct(tar_b)} -> {_pct(tar_a)}, clean accuracy "
                f"{_pct(_num(before.get('clean_accuracy')))} -> {_pct(_num(after.get('clean_accuracy')))}")
        if patch_d.get("passed"):
            new = patch_d.get("new_version")
            f.append({"severity": "LOW", "title": "Trojan mitigated by patching" + (f" (version {new})" if new else ""),
                      "detail": f"The patched model passed the re-scan: {figs}."})
        else:
            flagged_again = patch_d.get("fresh_flagged_classes")
            reasons = []
            if flagged_again:
                reasons.append(f"its fresh scan flags {', '.join(_class_name(c, names) for c in flagged_again)} "
                               f"(max deviation factor {_fmt(_num(after.get('max_deviation_factor')), 3)})")
            if patch_d.get("accuracy_within_bound") is False:  # the gate's own decision, not re-derived here
                drop, bound = _num(patch_d.get("accuracy_drop")), _num(patch_d.get("max_accuracy_drop"))
                se = _num(patch_d.get("accuracy_drop_se"))
                noise = (f" (± {100 * se:.2f}, one paired standard error over {patch_d.get('n_eval')} held-out images)"
                         if se is not None else "")
                reasons.append(f"clean accuracy dropped {100 * drop:.2f} points{noise}, over the bound of {100 * bound:g}")
            title = ("Patch removed the trigger but cost too much clean accuracy" if reasons and not flagged_again
                     else "Patching did not remove the trojan")
            because = "; ".join(reasons) if reasons else "it failed its targets"
            f.append({"severity": "HIGH", "title": title,
                      "detail": f"The patched model is not promoted: {because}. Figures: {figs}."})
        borderline = _borderline_accuracy(patch_d)
        if borderline is not None:
            f.append(borderline)
    if strip_d is None:
        if verdict in ("passed", "patched"):
            f.append({"severity": "LOW", "title": "No STRIP boundary",
                      "detail": "Serving is not guarded at run time: no held-out data gave a STRIP boundary."})
    else:
        detail = (f"Boundary {_fmt(strip_d['threshold'])} on the normalised entropy ({strip_d.get('rule')} rule, "
                  f"preset FRR {_pct(strip_d.get('frr'))}, N = {strip_d.get('n_perturbations')}, "
                  f"{strip_d['n_benign']} benign inputs)")
        if strip_d.get("estimated_far") is not None:
            detail += f"; estimated FAR {_pct(strip_d['estimated_far'])}"
        if strip_d.get("trojan_detection_rate") is not None:
            detail += (f"; {_pct(strip_d['trojan_detection_rate'])} of {strip_d['n_trojan']} "
                       "trigger-stamped inputs fall below it")
        f.append({"severity": "INFO", "title": "STRIP boundary fitted", "detail": detail + "."})
    for e in errors:
        f.append({"severity": "HIGH", "title": f"Gate error: {e['type']}", "detail": e["message"]})
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(f, key=lambda x: order[x["severity"]])


def _pct(v) -> str:
    return "n/a" if v is None else f"{100 * v:.1f}%"


def _fmt(v, digits=4) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


# ----------------------------------------------------------------------------- JSON report
def build_report(*, model_name, version, verdict, scan, strip=None, patch=None, errors=(), meta=None) -> dict:
    """The machine report: format, summary, findings (by severity), errors, scan/strip/patch, meta.

    `meta` may carry `class_names` (used in finding titles) and anything else worth keeping
    (run ids, times, data sizes); library versions and the creation time are added.
    """
    if verdict not in VERDICTS:
        raise ValueError(f"verdict must be one of {tuple(VERDICTS)}, not {verdict!r}")
    meta = dict(meta or {})
    names = meta.get("class_names")
    scan_d = _jsonable(scan.to_dict()) if scan is not None else None
    strip_d = strip_summary(strip)
    patch_d = patch_summary(patch)
    errs = [_error_entry(e) for e in errors]
    findings = _jsonable(_findings(verdict, scan_d, strip_d, patch_d, errs, names))
    by_sev = {s: sum(1 for x in findings if x["severity"] == s) for s in SEVERITIES}
    summary = {
        "verdict": verdict,
        "verdict_meaning": VERDICTS[verdict][1],
        "model": {"name": str(model_name), "version": None if version is None else str(version),
                  "sha256": scan_d["model_sha256"] if scan_d else meta.get("model_sha256")},
        "scan_completed": scan_d is not None,
        "trojan_suspected": None if scan_d is None else scan_d["trojan_suspected"],
        "max_deviation_factor": None if scan_d is None else scan_d["max_deviation_factor"],
        "cutoff": None if scan_d is None else scan_d["cutoff"],
        "flagged_classes": [] if scan_d is None else scan_d["flagged_classes"],
        "queries": None if scan_d is None else scan_d["queries"],
        "seconds": None if scan_d is None else scan_d["seconds"],
        "strip_boundary": None if strip_d is None else strip_d["threshold"],
        "patched": bool(patch_d and patch_d.get("passed")),
        "new_version": None if patch_d is None else patch_d.get("new_version"),
        "total_issues": sum(by_sev[s] for s in SEVERITIES if s != "INFO"),
        "total_issues_by_severity": by_sev,
    }
    meta.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    meta["versions"] = {**versions(), **(meta.get("versions") or {})}
    return _jsonable({"format": FORMAT, "format_version": FORMAT_VERSION, "summary": summary,
                      "findings": findings, "errors": errs, "scan": scan_d, "strip": strip_d,
                      "patch": patch_d, "meta": meta})


# ----------------------------------------------------------------------------- figures
def _figure(w, h):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(w, h), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight")
    return base64.b64encode(buf.getvalue()).decode("ascii")


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


def _co_target_finding(scan_d: dict, k: int, names) -> dict:
    """A class flagged through a co-activation link (a multi-target trojan): its strongest link to a flagged class."""
    from .cotargets import link_strength

    a = np.asarray(scan_d["co_activation"], dtype=float)
    w = link_strength(a)
    others = [int(c) for c in scan_d["flagged_classes"] if int(c) != k]
    j = max(others, key=lambda c: w[k, c])
    natural = scan_d.get("reference_links")
    natural = "" if natural is None else f"; {np.asarray(natural)[k, j]:.3f} on the benign reference models"
    return {"severity": "CRITICAL", "title": f"Trojan suspected: class {_class_name(k, names)} (co-target)",
            "detail": (f"Deviation factor {_fmt(scan_d['deviation_factors'][k], 3)} alone is under the cutoff, but "
                       f"the recovered trigger of flagged class {_class_name(j, names)} hands this class "
                       f"{_pct(a[j, k])} of the probability and its own trigger hands {_pct(a[k, j])} back "
                       f"(link {w[k, j]:.3f} >= {scan_d['config'].get('link_threshold')}{natural}): one trigger, "
                       f"several targets."),
            "class": int(k), "deviation_factor": scan_d["deviation_factors"][k], "linked_to": j}


def deviation_figure(deviation_factors, cutoff, flagged, names=None) -> str:
    """Bar chart of the per-class deviation factors with the cutoff line; flagged bars in red."""
    df = np.asarray(deviation_factors, dtype=np.float64)
    k = len(df)
    fig = _figure(min(12, max(5, 0.45 * k + 1.5)), 3.2)
    ax = fig.add_subplot(111)
    flagged = set(int(c) for c in flagged)
    colours = ["#cf222e" if i in flagged else "#8c959f" for i in range(k)]
    ax.bar(np.arange(k), df, color=colours, edgecolor="none")
    ax.axhline(cutoff, color="#cf222e", ls="--", lw=1.2, label=f"cutoff c = {cutoff:g}")
    ax.set_xlabel("class")
    ax.set_ylabel("deviation factor")
    if k <= 30:
        ax.set_xticks(np.arange(k))
        ax.set_xticklabels([str(i) for i in range(k)])
    ax.set_ylim(0, max(cutoff * 1.25, float(np.nanmax(df)) * 1.1 if k else 1.0))
    ax.legend(loc="upper right", frameon=False)
    ax.set_title("DeepInspect deviation factors (left tail, double MAD)")
    return _png(fig)


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
    fig = _figure(max(4.0, 1.25 * cols), 1.45 * rows + 0.4)
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
    return _png(fig)


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


def strip_figure(strip: dict) -> str:
    """Benign entropy histogram, its fitted normal, the boundary (and trojan entropies if given)."""
    benign = np.asarray(strip["benign_scores"], dtype=np.float64).ravel()
    trojan = strip.get("trojan_scores")
    trojan = None if trojan is None else np.asarray(trojan, dtype=np.float64).ravel()
    mean = _num(strip.get("mean"))
    std = _num(strip.get("std"))
    mean = float(benign.mean()) if mean is None else mean
    std = float(benign.std(ddof=1)) if std is None and benign.size > 1 else std
    thr = _num(_first(strip, "threshold", "boundary"))
    emp = _num(_first(strip, "empirical_threshold", "empirical_boundary"))
    fig = _figure(7, 3.2)
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
        ax.axvline(thr, color="#cf222e", lw=1.6, label=f"boundary {thr:.4f} ({strip.get('rule', '')})")
    if emp is not None and (thr is None or not math.isclose(emp, thr)):
        ax.axvline(emp, color="#cf222e", lw=1.0, ls=":", label=f"empirical quantile {emp:.4f}")
    ax.set_xlabel("normalised entropy H (low = trojan-like)")
    ax.set_ylabel("density")
    ax.set_title("STRIP entropy of held-out inputs")
    ax.legend(fontsize=8, frameon=False)
    return _png(fig)


# ----------------------------------------------------------------------------- HTML
_CSS = """
body{font-family:-apple-system,Segoe UI,Helvetica,Arial,sans-serif;margin:2rem auto;max-width:1100px;color:#24292f;padding:0 1rem}
h1{margin-bottom:.2rem}h2{border-bottom:1px solid #d0d7de;padding-bottom:.3rem;margin-top:2rem}
.badge{display:inline-block;color:#fff;font-weight:700;padding:.35rem .9rem;border-radius:2rem;font-size:1.1rem;letter-spacing:.04em}
table{border-collapse:collapse;margin:.5rem 0}td,th{border:1px solid #d0d7de;padding:.3rem .6rem;text-align:left;font-size:.9rem}
th{background:#f6f8fa}.sev{color:#fff;font-weight:700;padding:.1rem .45rem;border-radius:.3rem;font-size:.8rem}
.placeholder{background:#f6f8fa;border:1px dashed #8c959f;padding:1rem;color:#57606a;border-radius:.4rem}
.flagged td{background:#ffebe9}img{max-width:100%}pre{background:#f6f8fa;padding:.8rem;overflow:auto;font-size:.8rem}
.muted{color:#57606a}
"""


def _e(v) -> str:
    return html.escape("n/a" if v is None else str(v))


def _placeholder(text: str) -> str:
    return f'<div class="placeholder">{_e(text)}</div>'


def _table(header, rows, row_classes=None) -> str:
    out = ["<table><tr>" + "".join(f"<th>{_e(h)}</th>" for h in header) + "</tr>"]
    for i, r in enumerate(rows):
        cls = f' class="{row_classes[i]}"' if row_classes and row_classes[i] else ""
        out.append(f"<tr{cls}>" + "".join(f"<td>{c}</td>" for c in r) + "</tr>")
    return "".join(out) + "</table>"


def _section_summary(rep) -> str:
    s = rep["summary"]
    colour = VERDICTS[s["verdict"]][0]
    rows = [("model", _e(f"{s['model']['name']} version {s['model']['version']}")),
            ("model sha256", f"<code>{_e(s['model']['sha256'])}</code>"),
            ("max deviation factor", _e(None if s["max_deviation_factor"] is None
                                         else f"{_fmt(s['max_deviation_factor'], 3)} (cutoff {s['cutoff']:g})")),
            ("flagged classes", _e(", ".join(map(str, s["flagged_classes"])) or "none")),
            ("oracle queries", _e(s["queries"])),
            ("scan seconds", _e(s["seconds"])),
            ("STRIP boundary", _e(None if s["strip_boundary"] is None else f"{s['strip_boundary']:.4f}")),
            ("issues by severity", _e(", ".join(f"{k} {v}" for k, v in s["total_issues_by_severity"].items())))]
    if s.get("new_version"):
        rows.insert(1, ("patched version", _e(s["new_version"])))
    return (f'<p><span class="badge verdict-{_e(s["verdict"])}" style="background:{colour}">'
            f'{_e(s["verdict"].upper())}</span> <span class="muted">{_e(s["verdict_meaning"])}</span></p>'
            + _table(("", ""), [(f"<b>{_e(a)}</b>", b) for a, b in rows]))


def _section_findings(rep) -> str:
    if not rep["findings"]:
        return _placeholder("No findings.")
    rows = [(f'<span class="sev" style="background:{SEVERITY_COLOURS[f["severity"]]}">{_e(f["severity"])}</span>',
             _e(f["title"]), _e(f["detail"])) for f in rep["findings"]]
    return _table(("severity", "finding", "detail"), rows)


def _section_scan(rep, scan) -> str:
    d = rep.get("scan")
    if d is None:
        return _placeholder("No DeepInspect scan result: the scan did not complete (see Errors).")
    names = (rep.get("meta") or {}).get("class_names")
    parts = [_img(deviation_figure(d["deviation_factors"], d["cutoff"], d["flagged_classes"]),
                  "deviation factors per class")]
    flagged = set(d["flagged_classes"])
    refs = d.get("reference_statistics")
    if refs:
        from .reference import reference_level  # lazily: it imports torch through the lab

        ref = reference_level(refs)
    else:
        ref = None
    transfer = d.get("transfer_rates")
    rows, cls = [], []
    for k in range(d["n_classes"]):
        row = [_e(_class_name(k, names)), _e(_fmt(d["statistics"][k]))]
        if ref is not None:
            row.append(_e(_fmt(float(ref[k]))))
        row += [_e(_fmt(d["deviation_factors"][k], 3)), _e(_pct(d["success_rates"][k]))]
        if transfer is not None:
            row.append(_e(_pct(transfer[k])))
        rows.append(tuple(row + ["yes" if k in flagged else ""]))
        cls.append("flagged" if k in flagged else "")
    head = ["class", "perturbation statistic"] + (["reference models (geometric mean)"] if ref is not None else [])
    head += ["deviation factor", "trigger success"] + (["transfer to references"] if transfer is not None else [])
    parts.append(_table(tuple(head + ["flagged"]), rows, cls))
    if ref is not None:
        parts.append(f"<p>The deviation factors test log(statistic / reference) over {len(refs)} benign "
                     "reference models trained on the held-out data: a class every model finds easy cancels out.</p>")
    if transfer is not None:
        parts.append("<p>Transfer to references: the share of stamped inputs the class's measured trigger also "
                     "moves on the benign reference models. A backdoor trigger is specific to its model (low); a "
                     "natural class feature moves benign models too.</p>")
    phases = d.get("phases") or {}
    if phases:
        parts.append("<p>Oracle queries by phase:</p>" + _table(
            ("phase", "queries", "seconds"),
            [(_e(p), _e(v.get("queries")), _e(v.get("seconds"))) for p, v in phases.items()]))
    return "".join(parts)


def _section_triggers(rep, scan) -> str:
    if scan is None or getattr(scan, "trigger_samples", None) is None:
        if rep.get("scan") is None:
            why = "the scan did not complete"
        elif scan is None:
            why = "the scan result (with its trigger samples) was not passed to the renderer"
        else:
            why = "the scan result carries no trigger samples"
        return _placeholder(f"No recovered triggers to show: {why}.")
    k = len(scan.trigger_samples)
    note = "" if k <= GRID_CLASSES else (f'<p class="muted">Showing {GRID_CLASSES} of {k} classes: the flagged ones '
                                         f"and those with the smallest perturbation statistic.</p>")
    return note + _img(trigger_grid_figure(scan.trigger_samples, scan.flagged_classes, scan.statistics,
                                           scan.inverted_x, scan.inverted_y, GRID_CLASSES),
                       "recovered triggers per class")


def _section_strip(rep, strip) -> str:
    d = rep.get("strip")
    if d is None:
        return _placeholder("No STRIP boundary: no held-out data was given or calibration failed; "
                            "serving is not guarded at run time.")
    rows = [("boundary (in force)", _e(_fmt(d["threshold"], 6))), ("rule", _e(d.get("rule"))),
            ("normal boundary", _e(_fmt(d.get("normal_threshold"), 6))),
            ("empirical boundary", _e(_fmt(d.get("empirical_threshold"), 6))),
            ("fitted normal mean / std", _e(f"{_fmt(d.get('mean'))} / {_fmt(d.get('std'))}")),
            ("preset FRR", _e(_pct(d.get("frr")))), ("measured FRR on benign", _e(_pct(d.get("measured_frr")))),
            ("perturbations N / blend", _e(f"{d.get('n_perturbations')} / {d.get('blend')}")),
            ("benign inputs", _e(d["n_benign"]))]
    if d.get("estimated_far") is not None:
        rows.append(("estimated FAR", _e(_pct(d["estimated_far"]))))
    if d.get("trojan_detection_rate") is not None:
        rows.append(("trigger-stamped inputs detected", _e(f"{_pct(d['trojan_detection_rate'])} of {d['n_trojan']}")))
    table = _table(("", ""), [(f"<b>{_e(a)}</b>", b) for a, b in rows])
    if strip is None or not len(np.ravel(strip.get("benign_scores", []))):
        return _placeholder("The benign entropy scores were not passed to the renderer; no histogram.") + table
    return _img(strip_figure(strip), "STRIP entropy histogram") + table


def _section_patch(rep) -> str:
    d = rep.get("patch")
    if d is None:
        return _placeholder("No patch: the model was not flagged, or patching was not requested.")
    before, after = d.get("before") or {}, d.get("after") or {}
    rows = []
    for key, label, pct in (("clean_accuracy", "clean accuracy (held-out)", True),
                            ("trojan_activation_rate", "trojan activation rate", True),
                            ("max_deviation_factor", "max deviation factor", False)):
        b, a = _num(before.get(key)), _num(after.get(key))
        show = _pct if pct else (lambda v: _fmt(v, 4))
        change = None if a is None or b is None else (f"{100 * (a - b):+.1f} pt" if pct else f"{a - b:+.3f}")
        rows.append((_e(label), _e(show(b)), _e(show(a)), _e(change)))
    verdict = "passed" if d.get("passed") else "failed"
    colour = VERDICTS["patched" if d.get("passed") else "blocked"][0]
    head = (f'<p>Patch <span class="sev" style="background:{colour}">{verdict.upper()}</span> '
            f'source version {_e(d.get("source_version"))} &rarr; new version {_e(d.get("new_version"))}</p>')
    extra = {k: d[k] for k in ("sha256", "best_epoch", "epochs_run", "seconds", "n_train", "n_eval", "eval_source")
             if k in d}
    if _num(d.get("accuracy_drop_se")) is not None:
        extra["accuracy drop, paired standard error"] = f"{100 * _num(d['accuracy_drop_se']):.2f} pt"
    tail = _table(("", ""), [(f"<b>{_e(k)}</b>", _e(v)) for k, v in extra.items()]) if extra else ""
    return head + _table(("", "before", "after", "change"), rows) + tail


def _section_errors(rep) -> str:
    if not rep["errors"]:
        return "<p>No errors.</p>"
    return _table(("type", "message"), [(_e(e["type"]), f"<pre>{_e(e['message'])}</pre>") for e in rep["errors"]])


def render_html(report_dict: dict, scan=None, strip=None, patch=None) -> str:
    """One self-contained HTML page for `report_dict` (from build_report).

    The arrays behind the figures are not in the JSON: pass the ScanResult (trigger grid)
    and the STRIP dict (entropy histogram) to draw them; the deviation chart and the patch
    table come from the report itself. Missing parts get a placeholder saying why. `patch`
    is accepted for symmetry; its figures are already in the report.
    """
    rep = report_dict
    if patch is not None and rep.get("patch") is None:
        rep = {**rep, "patch": patch_summary(patch)}
    s = rep["summary"]
    title = f"trojan-gate report: {s['model']['name']} v{s['model']['version']}"
    sections = [
        ("Verdict", _section_summary(rep)),
        ("Findings", _section_findings(rep)),
        ("DeepInspect deviation factors", _section_scan(rep, scan)),
        ("Recovered triggers", _section_triggers(rep, scan)),
        ("STRIP boundary", _section_strip(rep, strip)),
        ("Patch before/after", _section_patch(rep)),
        ("Errors", _section_errors(rep)),
        ("Details", "<pre>" + _e(json.dumps({"meta": rep.get("meta"),
                                              "config": (rep.get("scan") or {}).get("config")}, indent=2)) + "</pre>"),
    ]
    body = "".join(f'<h2 id="{_e(t.lower().replace(" ", "-").replace("/", "-"))}">{_e(t)}</h2>{c}' for t, c in sections)
    created = (rep.get("meta") or {}).get("created_at")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"
            f"<p class=\"muted\">{_e(FORMAT)} v{FORMAT_VERSION}, generated {_e(created)}</p>{body}</body></html>")


def write_report(directory, *, model_name, version, verdict, scan, strip=None, patch=None, errors=(), meta=None,
                 basename: str = "trojan_report") -> tuple[Path, Path]:
    """Build, render and write `<basename>.json` and `<basename>.html` into `directory`."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    rep = build_report(model_name=model_name, version=version, verdict=verdict, scan=scan, strip=strip,
                       patch=patch, errors=errors, meta=meta)
    json_path = directory / f"{basename}.json"
    html_path = directory / f"{basename}.html"
    json_path.write_text(json.dumps(rep, indent=2, allow_nan=False))
    html_path.write_text(render_html(rep, scan=scan, strip=strip, patch=patch), encoding="utf-8")
    return json_path, html_path
