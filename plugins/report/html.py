"""The report as one self-contained HTML page (figures inline as base64 PNG, no external resources).

The arrays behind the figures are not in the JSON: `render_html` takes the ScanResult (trigger
grid) and the STRIP dict (entropy histogram) beside the document to draw them; the deviation
chart and the patch table come from the document itself. Missing parts get a placeholder
saying why.
"""
from __future__ import annotations

import html
import json

import numpy as np

from trojan_gate.gates.deepinspect.reference import reference_level

from .document import FORMAT, FORMAT_VERSION, VERDICTS
from .figures import calibrated_figure, deviation_figure, check_figure, trigger_grid_figure
from .format import class_name, fmt, num, pct

SEVERITY_COLOURS = {"CRITICAL": "#82071e", "HIGH": "#cf222e", "MEDIUM": "#bf8700", "LOW": "#0969da",
                    "INFO": "#57606a"}
GRID_CLASSES = 20  # classes shown in the trigger grid


def _img(b64: str, alt: str) -> str:
    return f'<img alt="{html.escape(alt)}" src="data:image/png;base64,{b64}">'


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
            ("decided by", _e(s.get("decided_by"))),
            ("instance score", _e(None if s["instance_score"] is None
                                  else f"{fmt(s['instance_score'], 3)} (threshold {fmt(s['threshold'], 3)})")),
            ("flagged classes", _e(", ".join(map(str, s["flagged_classes"])) or "none")),
            ("oracle queries", _e(s["queries"])),
            ("scan seconds", _e(s["seconds"])),
            ("Run-time check threshold", _e(None if s["check_threshold"] is None else f"{s['check_threshold']:.4f}")),
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


def _section_decision(rep) -> str:
    d = rep.get("decision")
    if d is None:
        return "<p>Decided by the paper's test (DeepInspect's double MAD); no calibrated decision was asked for.</p>"
    parts = [f"<p><b>Decided by:</b> {_e(d['decided_by'])}. {_e(d['reason'])}.</p>"]
    cal = d.get("calibrated")
    if cal is not None:
        if cal.get("benign_null"):
            parts.append(_img(calibrated_figure(cal["benign_null"], cal.get("trojaned_calibration"),
                                                cal["instance_score"], cal["threshold"]), "calibrated decision"))
        rows = [("score", _e(fmt(cal["instance_score"], 3))), ("threshold", _e(fmt(cal["threshold"], 3))),
                ("false-block probability", _e(fmt(cal["false_block_probability"], 3))),
                ("flagged classes", _e(", ".join(map(str, cal["flagged_classes"])) or "none")),
                ("calibration", _e((d.get("calibration") or {}).get("source") or "")),
                ("calibration sha256", f"<code>{_e((d.get('calibration') or {}).get('sha256'))}</code>"),
                ("queries", _e(cal["queries"]))]
        parts.append(_table(("", ""), [(f"<b>{_e(a)}</b>", b) for a, b in rows]))
    paper = d.get("paper")
    parts.append("<p>The paper's test (DeepInspect, double MAD): " + (
        "not run." if paper is None else
        f"{'trojaned' if paper['is_trojaned'] else 'clean'}, flagged {_e(paper['flagged_classes'] or 'none')}, "
        f"max deviation factor {_e(fmt(paper['instance_score'], 3))} (seed {_e(paper['seed'])}).") + "</p>")
    return "".join(parts)


def _section_scan(rep) -> str:
    d = rep.get("scan")
    if d is None:
        if (rep.get("decision") or {}).get("decided_by") == "calibrated":
            return _placeholder("DeepInspect was not run: the calibrated decision found the model clean and the "
                                "settings do not ask for the paper's test beside it.")
        return _placeholder("No DeepInspect scan result: the scan did not complete (see Errors).")
    names = (rep.get("meta") or {}).get("class_names")
    parts = [_img(deviation_figure(d["deviation_factors"], d["threshold"], d["flagged_classes"]),
                  "deviation factors per class")]
    flagged = set(d["flagged_classes"])
    refs = d.get("reference_statistics")
    ref = reference_level(refs) if refs else None
    rows, cls = [], []
    for k in range(d["n_classes"]):
        row = [_e(class_name(k, names)), _e(fmt(d["statistics"][k]))]
        if ref is not None:
            row.append(_e(fmt(float(ref[k]))))
        row += [_e(fmt(d["deviation_factors"][k], 3)), _e(pct(d["success_rates"][k]))]
        rows.append(tuple(row + ["yes" if k in flagged else ""]))
        cls.append("flagged" if k in flagged else "")
    head = ["class", "perturbation statistic"] + (["reference models (geometric mean)"] if ref is not None else [])
    head += ["deviation factor", "trigger success"]
    parts.append(_table(tuple(head + ["flagged"]), rows, cls))
    if ref is not None:
        parts.append(f"<p>The deviation factors test log(statistic / reference) over {len(refs)} benign "
                     "reference models trained on the held-out data: a class every model finds easy cancels out.</p>")
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


def _section_check(rep, check) -> str:
    d = rep.get("check")
    if d is None:
        return _placeholder("No run-time check: no held-out data was given or calibration failed; "
                            "serving is not guarded at run time.")
    rows = [("threshold (in force)", _e(fmt(d["threshold"], 6))), ("rule", _e(d.get("rule"))),
            ("normal-fit threshold", _e(fmt(d.get("normal_threshold"), 6))),
            ("empirical threshold", _e(fmt(d.get("empirical_threshold"), 6))),
            ("fitted normal mean / std", _e(f"{fmt(d.get('mean'))} / {fmt(d.get('std'))}")),
            ("preset FRR", _e(pct(d.get("frr")))), ("measured FRR on benign", _e(pct(d.get("measured_frr")))),
            ("perturbations N / blend", _e(f"{d.get('n_perturbations')} / {d.get('blend')}")),
            ("benign inputs", _e(d["n_benign"]))]
    if d.get("estimated_far") is not None:
        rows.append(("estimated FAR", _e(pct(d["estimated_far"]))))
    if d.get("trojan_detection_rate") is not None:
        rows.append(("trigger-stamped inputs detected", _e(f"{pct(d['trojan_detection_rate'])} of {d['n_trojan']}")))
    table = _table(("", ""), [(f"<b>{_e(a)}</b>", b) for a, b in rows])
    if check is None or not len(np.ravel(check.get("benign_scores", []))):
        return _placeholder("The benign scores were not passed to the renderer; no histogram.") + table
    return _img(check_figure(check), "Run-time check score histogram") + table


def _section_patch(rep) -> str:
    d = rep.get("patch")
    if d is None:
        return _placeholder("No patch: the model was not flagged, or patching was not requested.")
    before, after = d.get("before") or {}, d.get("after") or {}
    rows = []
    for key, label, is_rate in (("clean_accuracy", "clean accuracy (held-out)", True),
                                ("trojan_activation_rate", "trojan activation rate", True),
                                ("instance_score", "max deviation factor", False)):
        b, a = num(before.get(key)), num(after.get(key))
        show = pct if is_rate else (lambda v: fmt(v, 4))
        change = None if a is None or b is None else (f"{100 * (a - b):+.1f} pt" if is_rate else f"{a - b:+.3f}")
        rows.append((_e(label), _e(show(b)), _e(show(a)), _e(change)))
    verdict = "passed" if d.get("passed") else "failed"
    colour = VERDICTS["patched" if d.get("passed") else "blocked"][0]
    head = (f'<p>Patch <span class="sev" style="background:{colour}">{verdict.upper()}</span> '
            f'source version {_e(d.get("source_version"))} &rarr; new version {_e(d.get("new_version"))}</p>')
    extra = {k: d[k] for k in ("sha256", "epochs_run", "seconds", "n_train", "n_eval", "eval_source")
             if k in d}
    if num(d.get("accuracy_drop_se")) is not None:
        extra["accuracy drop, paired standard error"] = f"{100 * num(d['accuracy_drop_se']):.2f} pt"
    tail = _table(("", ""), [(f"<b>{_e(k)}</b>", _e(v)) for k, v in extra.items()]) if extra else ""
    return head + _table(("", "before", "after", "change"), rows) + tail


def _section_errors(rep) -> str:
    if not rep["errors"]:
        return "<p>No errors.</p>"
    return _table(("type", "message"), [(_e(e["type"]), f"<pre>{_e(e['message'])}</pre>") for e in rep["errors"]])


def render_html(report: dict, scan=None, check=None, decision=None) -> str:
    """One self-contained HTML page for `report` (from `build_report`)."""
    s = report["summary"]
    what = "gate report" if report.get("kind") == "gate" else "scan report"
    version = "" if s["model"]["version"] is None else f" v{s['model']['version']}"
    title = f"trojan-gate {what}: {s['model']['name']}{version}"
    sections = [
        ("Verdict", _section_summary(report)),
        ("Findings", _section_findings(report)),
        ("Scan decision", _section_decision(report)),
        ("DeepInspect deviation factors", _section_scan(report)),
        ("Recovered triggers", _section_triggers(report, scan)),
    ]
    if report.get("kind") == "gate":
        sections += [("Run-time check", _section_check(report, check)), ("Patch before/after", _section_patch(report))]
    sections += [
        ("Errors", _section_errors(report)),
        ("Details", "<pre>" + _e(json.dumps({"meta": report.get("meta"),
                                              "config": (report.get("scan") or {}).get("config")}, indent=2)) + "</pre>"),
    ]
    body = "".join(f'<h2 id="{_e(t.lower().replace(" ", "-").replace("/", "-"))}">{_e(t)}</h2>{c}' for t, c in sections)
    created = (report.get("meta") or {}).get("created_at")
    return (f"<!DOCTYPE html><html lang=\"en\"><head><meta charset=\"utf-8\"><title>{_e(title)}</title>"
            f"<style>{_CSS}</style></head><body><h1>{_e(title)}</h1>"
            f"<p class=\"muted\">{_e(FORMAT)} v{FORMAT_VERSION}, generated {_e(created)}</p>{body}</body></html>")
