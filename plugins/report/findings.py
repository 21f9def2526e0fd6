"""The report's findings: what a reviewer must read first, each with a severity (ModelScan's habit).

Findings come from plain dicts (the scan's `to_dict`, the STRIP and patch summaries), so the
same rules serve `trojan-gate scan` and `trojan-gate gate`.
"""
from __future__ import annotations

import numpy as np

from trojan_gate.gates.deepinspect.cotargets import link_strength

from .format import class_name, fmt, num, pct

SEVERITIES = ("CRITICAL", "HIGH", "MEDIUM", "LOW", "INFO")
NEAR_THRESHOLD = 0.75  # a class with deviation factor in [0.75 c, c] gets a MEDIUM finding


def _co_target_finding(scan: dict, k: int, names) -> dict:
    """A class flagged through a co-activation link (a multi-target trojan): its strongest link to a flagged class."""
    a = np.asarray(scan["co_activation"], dtype=float)
    w = link_strength(a)
    others = [int(c) for c in scan["flagged_classes"] if int(c) != k]
    j = max(others, key=lambda c: w[k, c])
    natural = scan.get("reference_links")
    natural = "" if natural is None else f"; {np.asarray(natural)[k, j]:.3f} on the benign reference models"
    return {"severity": "CRITICAL", "title": f"Trojan suspected: class {class_name(k, names)} (co-target)",
            "detail": (f"Deviation factor {fmt(scan['deviation_factors'][k], 3)} alone is under the threshold, but "
                       f"the recovered trigger of flagged class {class_name(j, names)} hands this class "
                       f"{pct(a[j, k])} of the probability and its own trigger hands {pct(a[k, j])} back "
                       f"(link {w[k, j]:.3f} >= {scan['config'].get('link_threshold')}{natural}): one trigger, "
                       f"several targets."),
            "class": int(k), "deviation_factor": scan["deviation_factors"][k], "linked_to": j}


def decision_findings(decision: dict | None, names) -> list[dict]:
    """What decided the scan, and the calibrated verdict with its false-block probability."""
    if decision is None:
        return []
    cal = decision.get("calibrated")
    if decision["decided_by"] == "paper":
        return [{"severity": "LOW", "title": "Decided by the paper's test (no calibrated decision)",
                 "detail": decision["reason"] + ". DeepInspect's double-MAD test depends on the scan's draw "
                                                "(docs/deepinspect.md)."}]
    fbp = cal["false_block_probability"]
    paper = decision.get("paper")
    beside = ("the paper's test was not run" if paper is None else
              f"the paper's test reads {'trojaned' if paper['is_trojaned'] else 'clean'}"
              + (f" (classes {', '.join(class_name(c, names) for c in paper['flagged_classes'])})"
                 if paper["flagged_classes"] else ""))
    if cal["is_trojaned"]:
        classes = ", ".join(class_name(c, names) for c in cal["flagged_classes"])
        return [{"severity": "CRITICAL", "title": f"Trojan suspected by the calibrated decision: {classes}",
                 "detail": f"Score {cal['instance_score']:.3f} > threshold {cal['threshold']:.3f}: benign models of "
                           f"this task score as high with probability {fbp:.3f} (calibration "
                           f"{(decision.get('calibration') or {}).get('sha256', '')[:16]}); {beside}."}]
    return [{"severity": "INFO", "title": "No trojan found by the calibrated decision",
             "detail": f"Score {cal['instance_score']:.3f} <= threshold {cal['threshold']:.3f} (benign models of this "
                       f"task score as high with probability {fbp:.3f}); {beside}."}]


def scan_findings(scan: dict | None, names, decision: dict | None = None) -> list[dict]:
    if scan is None and decision is not None and decision["decided_by"] == "calibrated":
        return []  # the paper's test was not asked for: the calibrated decision's finding says so
    if scan is None:
        return [{"severity": "HIGH", "title": "DeepInspect scan did not complete",
                 "detail": "No trojan verdict could be reached; the model is not cleared."}]
    if decision is not None and decision["decided_by"] == "calibrated":
        return [dict(f, severity="MEDIUM" if f["severity"] == "CRITICAL" else f["severity"],
                     title=f"Paper's test (reported beside): {f['title']}") for f in _paper_findings(scan, names)]
    return _paper_findings(scan, names)


def _paper_findings(scan: dict, names) -> list[dict]:
    out = []
    dfs, stats_, rates, threshold = scan["deviation_factors"], scan["statistics"], scan["success_rates"], scan["threshold"]
    linked = set(scan.get("co_targets") or [])
    for k in scan["flagged_classes"]:
        if k in linked:
            out.append(_co_target_finding(scan, k, names))
            continue
        out.append({"severity": "CRITICAL", "title": f"Trojan suspected: class {class_name(k, names)}",
                    "detail": (f"Deviation factor {fmt(dfs[k], 3)} > threshold {threshold:g} (alpha {scan['alpha']:.4f}): "
                               f"the recovered trigger for this class needs an abnormally small perturbation "
                               f"({fmt(stats_[k])}) and reaches the class in {pct(rates[k])} of stamped inputs."),
                    "class": int(k), "deviation_factor": dfs[k]})
    for k, v in enumerate(dfs):
        if k not in scan["flagged_classes"] and v is not None and NEAR_THRESHOLD * threshold <= v <= threshold:
            out.append({"severity": "MEDIUM", "title": f"Class {class_name(k, names)} close to the threshold",
                        "detail": f"Deviation factor {v:.2f} within {100 * (1 - NEAR_THRESHOLD):.0f}% of the "
                                  f"threshold {threshold:g}; not flagged.",
                        "class": int(k), "deviation_factor": v})
    if not scan["flagged_classes"]:
        out.append({"severity": "INFO", "title": "No trojan found by DeepInspect",
                    "detail": f"Largest deviation factor {fmt(scan['instance_score'], 3)} <= threshold "
                              f"{threshold:g} over {scan['n_classes']} classes ({scan['queries']} queries)."})
    return out


def _borderline_accuracy(patch: dict):
    """A MEDIUM finding when the patch's accuracy drop lies within one paired standard error of
    the bound: the verdict on accuracy then depends on which held-out images were kept to check it."""
    drop, bound = num(patch.get("accuracy_drop")), num(patch.get("max_accuracy_drop"))
    se = num(patch.get("accuracy_drop_se"))
    if drop is None or bound is None or not se or abs(drop - bound) > se:
        return None
    side = "within" if patch.get("accuracy_within_bound") else "over"
    return {"severity": "MEDIUM", "title": "Patch accuracy check is borderline",
            "detail": f"The clean-accuracy drop of {100 * drop:.2f} points is {side} the bound of {100 * bound:g} "
                      f"by less than its paired standard error ({100 * se:.2f} points over "
                      f"{patch.get('n_eval')} held-out images); another draw of evaluation images could "
                      "decide the other way. More held-out data narrows it."}


def patch_findings(patch: dict | None, names) -> list[dict]:
    if patch is None:
        return []
    before, after = patch.get("before") or {}, patch.get("after") or {}
    figs = (f"trojan activation rate {pct(num(before.get('trojan_activation_rate')))} -> "
            f"{pct(num(after.get('trojan_activation_rate')))}, clean accuracy "
            f"{pct(num(before.get('clean_accuracy')))} -> {pct(num(after.get('clean_accuracy')))}")
    out = []
    if patch.get("passed"):
        new = patch.get("new_version")
        out.append({"severity": "LOW", "title": "Trojan mitigated by patching" + (f" (version {new})" if new else ""),
                    "detail": f"The patched model passed the re-scan: {figs}."})
    else:
        flagged_again = patch.get("fresh_flagged_classes")
        reasons = []
        if flagged_again:
            reasons.append(f"its fresh scan flags {', '.join(class_name(c, names) for c in flagged_again)} "
                           f"(max deviation factor {fmt(num(after.get('instance_score')), 3)})")
        if patch.get("accuracy_within_bound") is False:  # the gate's own decision, not re-derived here
            drop, bound = num(patch.get("accuracy_drop")), num(patch.get("max_accuracy_drop"))
            se = num(patch.get("accuracy_drop_se"))
            noise = (f" (± {100 * se:.2f}, one paired standard error over {patch.get('n_eval')} held-out images)"
                     if se is not None else "")
            reasons.append(f"clean accuracy dropped {100 * drop:.2f} points{noise}, over the bound of {100 * bound:g}")
        title = ("Patch removed the trigger but cost too much clean accuracy" if reasons and not flagged_again
                 else "Patching did not remove the trojan")
        because = "; ".join(reasons) if reasons else "it failed its targets"
        out.append({"severity": "HIGH", "title": title,
                    "detail": f"The patched model is not promoted: {because}. Figures: {figs}."})
    borderline = _borderline_accuracy(patch)
    if borderline is not None:
        out.append(borderline)
    return out


def check_findings(check: dict | None, verdict: str) -> list[dict]:
    if check is None:
        if verdict in ("passed", "patched"):
            return [{"severity": "LOW", "title": "No run-time check",
                     "detail": "Serving is not guarded at run time: no held-out data gave a run-time check threshold."}]
        return []
    if check.get("kind") == "runtime":
        lo, hi = (check.get("frr_interval") or [None, None])[:2]
        detail = (f"Run-time check: threshold {fmt(check['threshold'])} on the negated combined min-p of "
                  f"{', '.join(check.get('statistics') or [])} (preset FRR {pct(check.get('frr'))}, realised "
                  f"{pct(check.get('realised_frr'))}, 95% interval {pct(lo)}–{pct(hi)}, N = "
                  f"{check.get('n_perturbations')}, early accept after {check.get('stages')} copies, "
                  f"{check['n_benign']} benign inputs)")
    else:
        detail = (f"Threshold {fmt(check['threshold'])} on the negated normalised entropy ({check.get('rule')} rule, "
                  f"preset FRR {pct(check.get('frr'))}, N = {check.get('n_perturbations')}, "
                  f"{check['n_benign']} benign inputs)")
    if check.get("estimated_far") is not None:
        detail += f"; estimated FAR {pct(check['estimated_far'])} (an upper bound, see docs/strip.md)"
    if check.get("trojan_detection_rate") is not None:
        detail += (f"; {pct(check['trojan_detection_rate'])} of {check['n_trojan']} "
                   "trigger-stamped inputs score at or above it")
    title = "Run-time check fitted" if check.get("kind") == "runtime" else "STRIP threshold fitted"
    return [{"severity": "INFO", "title": title, "detail": detail + "."}]


def findings(verdict: str, scan: dict | None, check: dict | None, patch: dict | None, errors: list,
             names, decision: dict | None = None) -> list[dict]:
    """Every finding of a report, most severe first."""
    out = (decision_findings(decision, names) + scan_findings(scan, names, decision) + patch_findings(patch, names)
           + check_findings(check, verdict))
    out += [{"severity": "HIGH", "title": f"Error: {e['type']}", "detail": e["message"]} for e in errors]
    order = {s: i for i, s in enumerate(SEVERITIES)}
    return sorted(out, key=lambda x: order[x["severity"]])
