"""The scan and gate report (JSON + HTML), built from a hand-made ScanResult and STRIP/patch dicts."""
import base64
import json
import re

import numpy as np
import pytest

from trojan_gate.gates.deepinspect.result import ScanResult
from trojan_gate.plugins.report import VERDICTS, build_report, render_html, write_report
from trojan_gate.plugins.report.findings import SEVERITIES

REQUIRED_SECTIONS = ("Verdict", "Findings", "DeepInspect deviation factors", "Recovered triggers",
                     "Run-time check", "Patch before/after", "Errors")


def _scan(flagged=(3,), k=10, shape=(1, 8, 8), seed=0, with_arrays=True):
    """A realistic DeepInspect result: one class with a much smaller trigger than the others."""
    rng = np.random.default_rng(seed)
    stats = rng.normal(6.0, 0.4, size=k)
    for c in flagged:
        stats[c] = 1.2
    med = np.median(stats)
    left = stats[stats < med]
    mad = 1.4826 * np.median(np.abs(left - med))
    df = np.where(stats < med, (med - stats) / mad, 0.0)
    flagged = [int(c) for c in np.flatnonzero(df > 2.0)]
    ts = rng.normal(0, 0.05, size=(k, 4) + shape).astype(np.float32)
    for c in flagged:
        ts[c] = 0.0
        ts[c, :, :, -3:-1, -3:-1] = 0.9  # a small bright corner patch
    inv_x = rng.random((k * 5,) + shape).astype(np.float32)
    inv_y = np.repeat(np.arange(k), 5)
    return ScanResult(
        is_trojaned=bool(flagged), flagged_classes=flagged,
        statistics=stats.tolist(), deviation_factors=df.tolist(), success_rates=rng.uniform(0.9, 1.0, k).tolist(),
        threshold=2.0, alpha=0.05, n_classes=k, input_shape=shape, model_sha256="ab" * 32, queries=123456,
        seconds=42.5, phases={"inversion": {"queries": 23456, "calls": 10, "seconds": 1.5},
                              "generator": {"queries": 100000, "calls": 600, "seconds": 30.0}},
        seed=seed, config={"steps": 600}, versions={"onnxruntime": "x"},
        trigger_samples=ts if with_arrays else None, inverted_x=inv_x if with_arrays else None,
        inverted_y=inv_y if with_arrays else None)


def _strip(seed=0, trojan=True):
    rng = np.random.default_rng(seed)
    benign = rng.normal(-0.55, 0.08, 500)  # STRIP's score -H: higher = more trojan-like
    d = {"benign_scores": benign, "mean": float(benign.mean()), "std": float(benign.std(ddof=1)),
         "threshold": -0.364, "empirical_threshold": -0.37, "frr": 0.01, "rule": "normal", "n_perturbations": 10,
         "blend": "average", "estimated_far": 0.02}
    if trojan:
        d["trojan_scores"] = rng.normal(-0.1, 0.05, 200)
    return d


PATCH = {"before": {"clean_accuracy": 0.951, "trojan_activation_rate": 0.98, "instance_score": 9.4},
         "after": {"clean_accuracy": 0.947, "trojan_activation_rate": 0.06, "instance_score": 1.3},
         "source_version": "3", "new_version": "4", "passed": True}


def _pngs(page):
    return re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)


def test_full_report_json(tmp_path):
    rep = build_report(kind="gate", model_name="fmnist", version="3", verdict="patched", scan=_scan(), check=_strip(),
                       patch=PATCH, errors=(), meta={"class_names": [f"c{i}" for i in range(10)], "run_id": "r1"})
    text = json.dumps(rep, allow_nan=False)  # strict JSON, no arrays of scores
    assert len(text) < 20_000
    assert set(rep) >= {"summary", "findings", "errors", "meta", "scan", "check", "patch"}
    s = rep["summary"]
    assert s["verdict"] == "patched" and s["model"] == {"name": "fmnist", "version": "3", "sha256": "ab" * 32}
    assert s["flagged_classes"] == [3] and s["instance_score"] > 2.0 and s["is_trojaned"] is True
    assert s["threshold"] == 2.0
    assert s["queries"] == 123456 and s["seconds"] == 42.5 and s["check_threshold"] == pytest.approx(-0.364)
    assert s["patched"] is True and s["new_version"] == "4"
    assert set(s["total_issues_by_severity"]) == set(SEVERITIES)
    sev = [f["severity"] for f in rep["findings"]]
    assert all(v in SEVERITIES for v in sev)
    assert sev == sorted(sev, key=SEVERITIES.index)
    critical = [f for f in rep["findings"] if f["severity"] == "CRITICAL"]
    assert len(critical) == 1 and critical[0]["class"] == 3 and "c3" in critical[0]["title"]
    assert critical[0]["deviation_factor"] == pytest.approx(rep["scan"]["deviation_factors"][3])
    assert any(f["title"].startswith("Trojan mitigated") for f in rep["findings"])
    st = rep["check"]
    assert st["n_benign"] == 500 and st["n_trojan"] == 200 and st["trojan_detection_rate"] > 0.95
    assert 0.0 <= st["measured_frr"] < 0.05
    assert rep["meta"]["run_id"] == "r1" and "trojan-gate" in rep["meta"]["versions"] and rep["meta"]["created_at"]


def test_full_report_html_has_all_figures():
    scan, strip = _scan(), _strip()
    rep = build_report(kind="gate", model_name="fmnist", version="3", verdict="patched", scan=scan, check=strip, patch=PATCH)
    page = render_html(rep, scan=scan, check=strip)
    assert page.startswith("<!DOCTYPE html>") and page.count("<img") == 3
    pngs = _pngs(page)
    assert len(pngs) == 3
    for p in pngs:
        assert base64.b64decode(p)[:8] == b"\x89PNG\r\n\x1a\n"
    for title in REQUIRED_SECTIONS:
        assert f">{title}</h2>" in page.replace("&#x27;", "'")
    assert 'class="badge verdict-patched"' in page and VERDICTS["patched"][0] in page
    assert "placeholder" not in page.split("<h2")[1:][0]  # no placeholder in the verdict section
    assert page.count('class="placeholder"') == 0
    patch_section = page.split('id="patch-before-after"')[1].split("<h2")[0]
    for cell in ("95.1%", "94.7%", "-0.4 pt", "98.0%", "6.0%", "-92.0 pt", "9.4", "1.3", "-8.100", "PASSED"):
        assert f">{cell}<" in patch_section, cell
    assert "http://" not in page and "https://" not in page  # self-contained


def test_render_with_missing_parts_uses_placeholders(tmp_path):
    rep = build_report(kind="gate", model_name="m", version=None, verdict="error", scan=None,
                       errors=[RuntimeError("oracle <budget> exhausted"), "second problem"])
    page = render_html(rep)
    assert "<img" not in page
    assert page.count('class="placeholder"') == 4  # deviation, triggers, STRIP, patch
    assert "scan did not complete" in page and "No run-time check" in page and "No patch" in page
    assert "oracle &lt;budget&gt; exhausted" in page and "<budget>" not in page
    assert 'class="badge verdict-error"' in page
    assert [e["type"] for e in rep["errors"]] == ["RuntimeError", "Error"]
    assert rep["summary"]["scan_completed"] is False and rep["summary"]["instance_score"] is None
    sev = {f["severity"] for f in rep["findings"]}
    assert "HIGH" in sev and "CRITICAL" not in sev


def test_scan_without_arrays_and_strip_without_scores():
    scan = _scan(flagged=(), with_arrays=False)
    strip = {k: v for k, v in _strip(trojan=False).items() if k != "benign_scores"}
    rep = build_report(kind="gate", model_name="m", version="1", verdict="passed", scan=scan, check=strip)
    page = render_html(rep, scan=scan, check=strip)
    assert page.count("<img") == 1  # only the deviation chart (drawn from the JSON)
    assert page.count('class="placeholder"') == 3  # triggers, STRIP histogram, patch
    assert "carries no trigger samples" in page and "benign scores were not passed" in page
    assert 'verdict-passed' in page
    assert rep["summary"]["flagged_classes"] == []
    assert any(f["title"] == "No trojan found by DeepInspect" for f in rep["findings"])
    assert not any(f["severity"] == "CRITICAL" for f in rep["findings"])


def test_deviation_chart_drawn_from_json_alone():
    scan = _scan()
    rep = json.loads(json.dumps(build_report(kind="gate", model_name="m", version="1", verdict="blocked", scan=scan)))
    page = render_html(rep)  # no ScanResult: chart yes, trigger grid placeholder
    assert page.count("<img") == 1
    assert "No recovered triggers to show: the scan result (with its trigger samples) was not passed" in page
    assert 'verdict-blocked' in page


def test_failed_patch_is_high_and_blocked():
    bad = {**PATCH, "after": {"clean_accuracy": 0.90, "trojan_activation_rate": 0.6}, "passed": False,
           "new_version": None}
    rep = build_report(kind="gate", model_name="m", version="2", verdict="blocked", scan=_scan(), patch=bad)
    assert rep["summary"]["patched"] is False
    assert any(f["severity"] == "HIGH" and "did not remove" in f["title"] for f in rep["findings"])
    assert rep["summary"]["total_issues_by_severity"]["CRITICAL"] == 1


def test_failed_patch_finding_names_why_it_failed():
    flagged = {**PATCH, "passed": False, "new_version": None, "fresh_flagged_classes": [5],
               "accuracy_drop": 0.004, "max_accuracy_drop": 0.01, "accuracy_within_bound": True}
    rep = build_report(kind="gate", model_name="m", version="2", verdict="blocked", scan=_scan(), patch=flagged)
    high = [f for f in rep["findings"] if f["severity"] == "HIGH"]
    assert len(high) == 1 and high[0]["title"] == "Patching did not remove the trojan"
    assert "fresh scan flags 5" in high[0]["detail"] and "points" not in high[0]["detail"].split("Figures")[0]

    costly = {**PATCH, "passed": False, "new_version": None, "fresh_flagged_classes": [],
              "accuracy_drop": 0.011, "max_accuracy_drop": 0.01, "accuracy_within_bound": False}
    rep = build_report(kind="gate", model_name="m", version="2", verdict="blocked", scan=_scan(), patch=costly)
    high = [f for f in rep["findings"] if f["severity"] == "HIGH"]
    assert high[0]["title"] == "Patch removed the trigger but cost too much clean accuracy"
    assert "dropped 1.10 points, over the bound of 1" in high[0]["detail"]

    measured = {**costly, "accuracy_drop_se": 0.0042, "n_eval": 1000}
    rep = build_report(kind="gate", model_name="m", version="2", verdict="blocked", scan=_scan(), patch=measured)
    detail = [f for f in rep["findings"] if f["severity"] == "HIGH"][0]["detail"]
    assert "dropped 1.10 points (± 0.42, one paired standard error over 1000 held-out images)" in detail
    assert "paired standard error</b></td><td>0.42 pt" in render_html(rep, scan=_scan()).replace("\n", "")


def test_a_drop_within_one_standard_error_of_the_bound_is_called_borderline():
    def medium(patch):
        rep = build_report(kind="gate", model_name="m", version="2", verdict="patched" if patch["passed"] else "blocked",
                           scan=_scan(), patch=patch)
        return [f for f in rep["findings"] if f["title"] == "Patch accuracy check is borderline"]

    near = {**PATCH, "passed": False, "new_version": None, "fresh_flagged_classes": [], "accuracy_drop": 0.011,
            "max_accuracy_drop": 0.01, "accuracy_within_bound": False, "accuracy_drop_se": 0.0057, "n_eval": 1000}
    found = medium(near)
    assert len(found) == 1 and found[0]["severity"] == "MEDIUM"
    assert "1.10 points is over the bound of 1 by less than its paired standard error (0.57" in found[0]["detail"]
    passed_near = {**near, "passed": True, "new_version": "4", "accuracy_drop": 0.006, "accuracy_within_bound": True}
    assert "is within the bound" in medium(passed_near)[0]["detail"]
    assert medium({**near, "accuracy_drop": 0.02}) == []  # 1.8 standard errors over: not borderline
    assert medium({**near, "accuracy_drop_se": None}) == [] and medium(PATCH) == []


def test_many_classes_and_rgb_grid():
    scan = _scan(flagged=(7, 30), k=43, shape=(3, 8, 8))
    assert {7, 30} <= set(scan.flagged_classes)
    rep = build_report(kind="gate", model_name="gtsrb", version="1", verdict="blocked", scan=scan)
    page = render_html(rep, scan=scan)
    assert page.count("<img") == 2 and "Showing 20 of 43 classes" in page
    critical = [f["class"] for f in rep["findings"] if f["severity"] == "CRITICAL"]
    assert critical == scan.flagged_classes


def test_nan_statistics_and_unknown_verdict():
    scan = _scan()
    scan.statistics[5] = float("inf")
    rep = build_report(kind="gate", model_name="m", version="1", verdict="blocked", scan=scan)
    json.dumps(rep, allow_nan=False)
    assert rep["scan"]["statistics"][5] is None
    render_html(rep, scan=scan)
    with pytest.raises(ValueError, match="verdict"):  # clean is a scan's verdict, not a gate's
        build_report(kind="gate", model_name="m", version="1", verdict="clean", scan=scan)
    with pytest.raises(ValueError, match="kind"):
        build_report(kind="audit", model_name="m", version="1", verdict="clean", scan=scan)


def test_a_scan_report_has_the_same_format_without_gate_sections():
    scan = _scan()
    rep = build_report(kind="scan", model_name="m.onnx", version=None, verdict="trojaned", scan=scan)
    assert rep["format"] == "trojan-gate/report" and rep["kind"] == "scan"
    assert rep["summary"]["verdict"] == "trojaned" and rep["summary"]["is_trojaned"] is True
    assert rep["check"] is None and rep["patch"] is None
    assert not any("STRIP" in f["title"] for f in rep["findings"])  # a scan attaches no threshold
    page = render_html(rep, scan=scan)
    assert "trojan-gate scan report: m.onnx" in page and "Run-time check</h2>" not in page
    assert "Patch before/after" not in page and len(_pngs(page)) == 2
    with pytest.raises(ValueError, match="verdict"):
        build_report(kind="scan", model_name="m", version=None, verdict="passed", scan=scan)


def test_write_report(tmp_path):
    scan, strip = _scan(), _strip()
    jp, hp = write_report(tmp_path / "out", kind="gate", model_name="m", version="7", verdict="blocked", scan=scan, check=strip,
                          errors=[{"type": "QueryBudgetExceeded", "message": "budget", "phase": "generator"}])
    rep = json.loads(jp.read_text())
    assert rep["summary"]["verdict"] == "blocked" and rep["errors"][0]["phase"] == "generator"
    page = hp.read_text()
    assert len(_pngs(page)) == 3 and "QueryBudgetExceeded" in page


def test_scan_table_shows_the_reference_models_when_the_test_used_them():
    scan = _scan()
    plain = render_html(build_report(kind="gate", model_name="m", version="1", verdict="blocked", scan=scan), scan=scan)
    assert "reference models" not in plain
    scan.reference_statistics = [[2.0] * 10, [8.0] * 10]  # geometric mean 4
    page = render_html(build_report(kind="gate", model_name="m", version="1", verdict="blocked", scan=scan), scan=scan)
    assert "reference models (geometric mean)" in page and "over 2 benign reference models" in page
    assert page.count("<td>4</td>") - plain.count("<td>4</td>") == 10  # one reference cell per class


def test_a_co_target_finding_names_its_link_not_a_deviation_factor():
    from dataclasses import replace

    scan = _scan(flagged=(3,))
    a = np.zeros((10, 10))
    a[3, 5], a[5, 3] = 0.09, 0.04  # link sqrt(0.09 * 0.04) = 0.06
    scan = replace(scan, flagged_classes=[3, 5], co_targets=[5], co_activation=a.tolist(),
                   config={"link_threshold": 0.035})
    rep = build_report(kind="gate", model_name="m", version="1", verdict="blocked", scan=scan, check=None, patch=None, errors=())
    by_class = {f.get("class"): f for f in rep["findings"] if f["severity"] == "CRITICAL"}
    assert set(by_class) == {3, 5}
    assert "co-target" in by_class[5]["title"] and by_class[5]["linked_to"] == 3
    assert "0.060 >= 0.035" in by_class[5]["detail"] and "under the threshold" in by_class[5]["detail"]
    assert "co-target" not in by_class[3]["title"]
    assert rep["summary"]["flagged_classes"] == [3, 5]


def test_a_link_flagged_on_its_own_reports_both_classes_and_the_natural_level():
    from dataclasses import replace

    scan = _scan(flagged=())
    a = np.zeros((10, 10))
    a[2, 9], a[9, 2] = 0.08, 0.05
    refs = np.zeros((10, 10))
    refs[2, 9] = refs[9, 2] = 0.004
    scan = replace(scan, is_trojaned=True, flagged_classes=[2, 9], co_targets=[2, 9],
                   co_activation=a.tolist(), reference_links=refs.tolist(), config={"link_threshold": 0.035})
    rep = build_report(kind="gate", model_name="m", version="1", verdict="blocked", scan=scan, check=None, patch=None, errors=())
    by_class = {f.get("class"): f for f in rep["findings"] if f["severity"] == "CRITICAL"}
    assert by_class[2]["linked_to"] == 9 and by_class[9]["linked_to"] == 2
    assert "0.004 on the benign reference models" in by_class[2]["detail"]
