"""The report document: one JSON format (ModelScan-like) for `trojan-gate scan` and `trojan-gate gate`.

Inputs are plain data:

- `scan`: a `ScanResult` (DeepInspect), or None when the scan did not complete;
- `check`: a dict describing the run-time check's threshold (STRIP, Gao et al. Sec. V-D, or the
  run-time check beyond it): benign_scores, mean, std, threshold, empirical_threshold,
  normal_threshold, frr, rule, n_perturbations, blend, optional estimated_far and trojan_scores
  (scores of trigger-stamped inputs);
- `patch`: a dict of before/after figures ({"before": {...}, "after": {...}, "source_version",
  "new_version", "passed", ...}) or a `PatchResult`.

`build_report` returns the document (format, kind, summary, findings by severity, errors,
scan, check, patch, meta); `writer.write_report` writes it with its HTML page (`html.render_html`).
"""
from __future__ import annotations

import math
import platform
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .findings import SEVERITIES, findings
from .format import num

FORMAT = "trojan-gate/report"
FORMAT_VERSION = 3  # 3: the run-time check's section is `check` (was `strip`)
KINDS = ("scan", "gate")

VERDICTS = {  # verdict -> (badge colour, one-line meaning)
    "passed": ("#1a7f37", "no trojan found; the version may be promoted"),
    "patched": ("#0969da", "a trojan was found and a patched version passed the re-scan"),
    "blocked": ("#cf222e", "a trojan is suspected; the version must not be served"),
    "clean": ("#1a7f37", "no trojan found by the scan"),
    "trojaned": ("#cf222e", "a trojan is suspected"),
    "error": ("#6e7781", "the check could not finish; the model is not cleared"),
}


def jsonable(v):
    """Plain JSON types; NaN and infinities become None (strict JSON has no NaN)."""
    if isinstance(v, dict):
        return {str(k): jsonable(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [jsonable(x) for x in v]
    if isinstance(v, np.ndarray):
        return jsonable(v.tolist())
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


def versions() -> dict:
    import matplotlib
    import onnxruntime

    from trojan_gate.gates import __version__

    return {"trojan-gate": __version__, "python": platform.python_version(), "numpy": np.__version__,
            "onnxruntime": onnxruntime.__version__, "matplotlib": matplotlib.__version__}


def summarise_check(check: dict | None) -> dict | None:
    """The run-time check's threshold without its score arrays (counts and quantiles instead); scores are
    higher for more trojan-like inputs, so the measured FRR is the share of benign scores at or above it."""
    if check is None:
        return None
    benign = np.asarray(check.get("benign_scores", []), dtype=np.float64).ravel()
    out = {
        "threshold": num(check.get("threshold")), "empirical_threshold": num(check.get("empirical_threshold")),
        "normal_threshold": num(check.get("normal_threshold")),
        "mean": num(check.get("mean")), "std": num(check.get("std")), "frr": num(check.get("frr")),
        "rule": check.get("rule"), "n_perturbations": check.get("n_perturbations"), "blend": check.get("blend"),
        "estimated_far": num(check.get("estimated_far")), "n_benign": int(benign.size),
    }
    if benign.size:
        q = np.quantile(benign, [0.01, 0.5, 0.99])
        out["benign_quantiles"] = {"q01": float(q[0]), "q50": float(q[1]), "q99": float(q[2])}
        if out["threshold"] is not None:
            out["measured_frr"] = float((benign >= out["threshold"]).mean())
    trojan = check.get("trojan_scores")
    if trojan is not None:
        trojan = np.asarray(trojan, dtype=np.float64).ravel()
        out["n_trojan"] = int(trojan.size)
        if trojan.size and out["threshold"] is not None:
            out["trojan_detection_rate"] = float((trojan >= out["threshold"]).mean())
    out.update({k: v for k, v in check.items() if k not in out and k not in ("benign_scores", "trojan_scores", "bank")
                and not isinstance(v, np.ndarray)})
    return jsonable(out)


def patch_summary(patch) -> dict | None:
    """A patch dict (or PatchResult) as plain JSON, with `passed` filled in if missing."""
    if patch is None:
        return None
    if hasattr(patch, "to_dict"):
        d = patch.to_dict()
        d.setdefault("passed", bool(patch.meets()))
    else:
        d = {k: v for k, v in dict(patch).items() if k != "onnx_bytes"}
    return jsonable(d)


def error_entry(e) -> dict:
    if isinstance(e, BaseException):
        return {"type": type(e).__name__, "message": str(e)}
    if isinstance(e, dict):
        return {"type": str(e.get("type", "Error")), "message": str(e.get("message", "")),
                **{k: jsonable(v) for k, v in e.items() if k not in ("type", "message")}}
    return {"type": "Error", "message": str(e)}



def build_report(*, kind: str, model_name, version, verdict, scan, check=None, patch=None, errors=(),
                 meta=None, decision=None) -> dict:
    """The machine report: format, kind, summary, findings (by severity), errors, scan/check/patch, meta.

    `kind` is "scan" (verdict clean | trojaned | error) or "gate" (passed | patched | blocked |
    error). `decision` is the scan's `ScanDecision` (which test decided and both results); without
    it the DeepInspect result decides, as before calibrated scans existed. `meta` may carry `class_names` (used in finding titles) and anything else worth
    keeping (run ids, times, data sizes); library versions and the creation time are added.
    """
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
    allowed = ("clean", "trojaned", "error") if kind == "scan" else ("passed", "patched", "blocked", "error")
    if verdict not in allowed:
        raise ValueError(f"a {kind} report's verdict must be one of {allowed}, not {verdict!r}")
    meta = dict(meta or {})
    names = meta.get("class_names")
    scan_d = jsonable(scan.to_dict()) if scan is not None else None
    decision_d = jsonable(decision.to_dict()) if decision is not None else None
    check_d = summarise_check(check)
    patch_d = patch_summary(patch)
    errs = [error_entry(e) for e in errors]
    found = jsonable(findings(verdict, scan_d, check_d, patch_d, errs, names, decision_d))
    decided = decision_d or scan_d
    by_sev = {s: sum(1 for x in found if x["severity"] == s) for s in SEVERITIES}
    summary = {
        "verdict": verdict,
        "verdict_meaning": VERDICTS[verdict][1],
        "model": {"name": str(model_name), "version": None if version is None else str(version),
                  "sha256": scan_d["model_sha256"] if scan_d else meta.get("model_sha256")},
        "scan_completed": decided is not None,
        "decided_by": "paper" if decision_d is None and scan_d is not None else (decision_d or {}).get("decided_by"),
        "decision_reason": None if decision_d is None else decision_d["reason"],
        "calibration": None if decision_d is None else decision_d["calibration"],
        "false_block_probability": (decision_d.get("calibrated") or {}).get("false_block_probability")
        if decision_d else None,
        "paper_is_trojaned": None if scan_d is None else scan_d["is_trojaned"],
        "is_trojaned": None if decided is None else decided["is_trojaned"],
        "instance_score": None if decided is None else decided["instance_score"],
        "threshold": None if decided is None else decided["threshold"],
        "flagged_classes": [] if decided is None else decided["flagged_classes"],
        "queries": None if decided is None else decided["queries"],
        "seconds": None if decided is None else decided["seconds"],
        "check_threshold": None if check_d is None else check_d["threshold"],
        "patched": bool(patch_d and patch_d.get("passed")),
        "new_version": None if patch_d is None else patch_d.get("new_version"),
        "total_issues": sum(by_sev[s] for s in SEVERITIES if s != "INFO"),
        "total_issues_by_severity": by_sev,
    }
    meta.setdefault("created_at", datetime.now(timezone.utc).isoformat(timespec="seconds"))
    meta["versions"] = {**versions(), **(meta.get("versions") or {})}
    return jsonable({"format": FORMAT, "format_version": FORMAT_VERSION, "kind": kind, "summary": summary,
                      "findings": found, "errors": errs, "decision": decision_d, "scan": scan_d, "check": check_d,
                      "patch": patch_d, "meta": meta})
