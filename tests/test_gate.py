"""The registry gate on a real local MLflow store: passed, blocked, patched, fail-closed, reuse, racing."""
import json
import tempfile

import mlflow
import pytest
from mlflow import MlflowClient

from trojan_gate.gates.data import Dataset
from trojan_gate.plugins.gate import GateConfig, run_gate
from trojan_gate.plugins.gate import steps as gate_steps
from trojan_gate.plugins.registry import intake_onnx, version_tags

from helpers import leftover_scratch

pytestmark = pytest.mark.slow


def _aliases(name):
    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


@pytest.fixture
def heldout(digits):
    _, test = digits
    return Dataset(test.x, test.y)


def test_benign_version_passes_gets_alias_strip_and_report(mlflow_store, tmp_path, digits_benign, heldout, cached_scan):
    ref = intake_onnx(digits_benign.save(tmp_path / "benign.onnx"), "clf")
    out = run_gate(ref.uri, heldout, GateConfig(policy="block"), scan_fn=cached_scan)
    assert out.verdict == "passed" and out.exit_code == 0, out.error
    tags = version_tags(ref)
    assert tags["trojan_gate.verdict"] == "passed" and tags["trojan_gate.status"] == "passed"
    assert tags["trojan_gate.gate.state"] == "done" and tags["trojan_gate.gate.fingerprint"]
    for key in ("scan.is_trojaned", "scan.instance_score", "scan.threshold", "scan.flagged_classes", "scan.queries",
                "scan.seconds", "check.threshold", "check.artifact_sha256", "report", "gate.version", "gate.run_id"):
        assert f"trojan_gate.{key}" in tags, key
    assert tags["trojan_gate.scan.is_trojaned"] == "false" and float(tags["trojan_gate.scan.instance_score"]) <= 2.0
    assert _aliases("clf") == {"candidate": ref.version}
    run = MlflowClient().get_run(out.run_id)
    assert run.data.metrics["instance_score"] <= 2.0 and "check_threshold" in run.data.metrics
    files = {f.path for f in MlflowClient().list_artifacts(out.run_id, "report")}
    assert {"report/trojan_report.html", "report/trojan_report.json"} <= files
    # the run-time check beyond STRIP by default (student + hidden features: no copies, so no stages); the
    # estimated FAR is reported, never used to pick
    assert tags["trojan_gate.check.kind"] == "runtime" and tags["trojan_gate.check.rule"] == "min-p(reference,activation)"
    boundary = json.loads(mlflow.artifacts.load_text(tags["trojan_gate.check.artifact_uri"] + "/check.json"))
    assert boundary["statistics"] == ["reference", "activation"] and boundary["stages"] == []
    assert boundary["activation_sha256"] and boundary["reference_sha256"]
    assert "estimated_far" in boundary["extra"] and boundary["frr_interval"][0] <= boundary["realised_frr"]
    resolved = json.loads(mlflow.artifacts.load_text(f"runs:/{out.run_id}/gate_config.json"))
    assert resolved["patch"]["soup"] == 4 and resolved["scan"]["generator_steps"] == 300  # defaults filled in

    again = run_gate(ref.uri, heldout, GateConfig(policy="block"), scan_fn=cached_scan)
    assert again.reused and again.verdict == "passed"
    assert len(MlflowClient().search_model_versions("name='clf'")) == 1


def test_a_record_is_reused_only_when_the_aliases_agree(mlflow_store, tmp_path, digits_benign, heldout, cached_scan):
    ref = intake_onnx(digits_benign.save(tmp_path / "benign.onnx"), "clf")
    first = run_gate(ref.uri, heldout, GateConfig(), scan_fn=cached_scan)
    MlflowClient().delete_registered_model_alias("clf", "candidate")  # the registry no longer agrees
    second = run_gate(ref.uri, heldout, GateConfig(), scan_fn=cached_scan)
    assert not second.reused and second.verdict == "passed" and second.run_id != first.run_id
    assert _aliases("clf") == {"candidate": ref.version}
    # a changed recipe, even one the gate never reaches here, does not reuse the record
    third = run_gate(ref.uri, heldout, GateConfig(patch={"soup": 2}), scan_fn=cached_scan)
    assert not third.reused


def test_the_fingerprint_hashes_the_resolved_configuration():
    base = GateConfig().fingerprint("ab" * 32)
    assert GateConfig(patch={"soup": 4}, check={"n_perturbations": 10}).fingerprint("ab" * 32) == base  # defaults
    assert GateConfig(patch={"soup": 2}).fingerprint("ab" * 32) != base
    assert GateConfig(scan={"options": {"generator_steps": 100}}).fingerprint("ab" * 32) != base
    assert GateConfig(timeout_s=10).fingerprint("ab" * 32) == base  # how long it may take decides nothing
    assert GateConfig().fingerprint("cd" * 32) != base
    assert GateConfig().fingerprint("ab" * 32, None, "e" * 64) != base  # a verdict on other held-out data
    assert GateConfig().fingerprint("ab" * 32, None, "e" * 64) != GateConfig().fingerprint("ab" * 32, None, "f" * 64)


def test_a_passing_version_is_downloaded_once(mlflow_store, tmp_path, digits_benign, heldout, cached_scan,
                                              monkeypatch):
    """Scan, FAR estimate and STRIP calibration share one verified download of the ONNX."""
    ref = intake_onnx(digits_benign.save(tmp_path / "benign.onnx"), "clf")
    real, fetched = mlflow.artifacts.download_artifacts, []

    def counting(*args, **kwargs):
        fetched.append(kwargs.get("artifact_uri", args[0] if args else None))
        return real(*args, **kwargs)

    monkeypatch.setattr(mlflow.artifacts, "download_artifacts", counting)
    out = run_gate(ref.uri, heldout, GateConfig(policy="block"), scan_fn=cached_scan)
    assert out.verdict == "passed", out.error
    assert fetched.count(ref.uri) == 1, fetched


def test_a_file_changed_after_download_is_refused_at_calibration(mlflow_store, tmp_path, digits_benign, heldout):
    from trojan_gate.gates.errors import ArtifactIntegrityError
    from trojan_gate.plugins.calibration import calibrate_registered
    from trojan_gate.plugins.registry import fetch_onnx

    ref = intake_onnx(digits_benign.save(tmp_path / "benign.onnx"), "clf")
    local = fetch_onnx(ref, dst=str(tmp_path / "copy"))
    local.write_bytes(local.read_bytes() + b"\0")
    with pytest.raises(ArtifactIntegrityError, match="tampered"):
        calibrate_registered(ref, heldout, onnx_path=local)


def test_trojaned_version_is_blocked_and_loses_its_alias(mlflow_store, trojan_onnx, heldout, cached_scan):
    ref = intake_onnx(trojan_onnx, "clf")
    MlflowClient().set_registered_model_alias("clf", "candidate", ref.version)
    out = run_gate(ref.uri, heldout, GateConfig(policy="block"), scan_fn=cached_scan)
    assert out.verdict == "blocked" and out.exit_code == 1 and out.final is None
    tags = version_tags(ref)
    assert tags["trojan_gate.verdict"] == "blocked" and tags["trojan_gate.gate.state"] == "done"
    assert "3" in tags["trojan_gate.scan.flagged_classes"].split(",")
    assert _aliases("clf") == {}
    assert "trojan_gate.check.threshold" not in tags
    again = run_gate(ref.uri, heldout, GateConfig(policy="block"), scan_fn=cached_scan)
    assert again.reused and again.verdict == "blocked" and again.exit_code == 1


def test_patch_policy_registers_a_patched_version_with_lineage(mlflow_store, trojan_onnx, heldout, cached_scan,
                                                               tmp_path, monkeypatch):
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(scratch))
    ref = intake_onnx(trojan_onnx, "clf")
    out = run_gate(ref.uri, heldout, GateConfig(policy="patch", max_accuracy_drop=0.03), scan_fn=cached_scan)
    assert out.verdict == "patched", (out.error, out.report.get("summary"))
    versions = {str(v.version): v for v in MlflowClient().search_model_versions("name='clf'")}
    assert set(versions) == {"1", "2"}
    new = versions["2"].tags
    assert new["trojan_gate.verdict"] == "patched" and new["trojan_gate.patched_from"] == "1"
    assert new["trojan_gate.gate.state"] == "done"
    assert float(new["trojan_gate.scan.instance_score"]) <= 2.0 and new["trojan_gate.patch.accuracy_drop"]
    assert new["trojan_gate.patch.residual.accepted"] == "true"  # the residual-risk evidence, stated
    assert new["trojan_gate.patch.residual.mask"].startswith("budget 0.05: flagged ")
    assert out.report["patch"]["residual_accepted"] and out.report["patch"]["residual"]["reasons"] == []
    src = version_tags(ref)
    assert src["trojan_gate.status"] == "superseded" and src["trojan_gate.superseded_by"] == "models:/clf/2"
    assert src["trojan_gate.verdict"] == "blocked"  # the source itself is never served
    assert _aliases("clf") == {"candidate": "2"}
    assert leftover_scratch(scratch) == []  # the source, the patched copy and the release staging are removed
    again = run_gate(ref.uri, heldout, GateConfig(policy="patch", max_accuracy_drop=0.03), scan_fn=cached_scan)
    assert again.reused and again.verdict == "patched" and again.final == "models:/clf/2" and again.exit_code == 0


def test_a_patch_the_residual_evidence_refuses_leaves_the_source_blocked(mlflow_store, trojan_onnx, heldout,
                                                                         cached_scan):
    """Settings under which every class stands out (ratio 1, no floor) refuse any patch: no new version."""
    ref = intake_onnx(trojan_onnx, "clf")
    strict = {"residual_ratio": 1.0, "residual_floor": 0.0, "residual_margin": 0.0, "soup": 1, "epochs": 10,
              "residual_steps": 10, "residual_restarts": 1}  # the rules refuse, whatever the search reaches
    out = run_gate(ref.uri, heldout, GateConfig(policy="patch", max_accuracy_drop=0.03, patch=strict),
                   scan_fn=cached_scan)
    assert out.verdict == "blocked" and out.exit_code == 1
    assert not out.report["patch"]["residual_accepted"] and out.report["patch"]["residual"]["reasons"]
    assert {str(v.version) for v in MlflowClient().search_model_versions("name='clf'")} == {"1"}
    assert _aliases("clf") == {}


def test_the_claim_comes_first_no_alias_while_the_gate_runs(mlflow_store, tmp_path, digits_benign, heldout,
                                                            cached_scan):
    ref = intake_onnx(digits_benign.save(tmp_path / "benign.onnx"), "clf")
    MlflowClient().set_registered_model_alias("clf", "production", ref.version)
    seen = {}

    def observing_scan(oracle, data, config):
        seen.update(version_tags(ref), aliases=_aliases("clf"))
        return cached_scan(oracle, data, config)

    out = run_gate(ref.uri, heldout, GateConfig(), scan_fn=observing_scan)
    assert out.verdict == "passed"
    assert seen["aliases"] == {} and seen["trojan_gate.verdict"] == "pending"
    assert seen["trojan_gate.gate.state"] == "running" and seen["trojan_gate.gate.run_id"] == out.run_id
    # the gate gives the aliases its claim removed back to a version that passed, and its own
    assert _aliases("clf") == {"candidate": ref.version, "production": ref.version}
    assert version_tags(ref)["trojan_gate.gate.removed_aliases"] == ""


def test_a_regate_that_blocks_keeps_the_aliases_away_and_revokes_the_release(mlflow_store, tmp_path, digits_benign,
                                                                              heldout, cached_scan):
    from dataclasses import replace

    from trojan_gate.plugins.guarded_pyfunc import revocation
    from trojan_gate.plugins.promotion import PromotionRefused, promote
    from trojan_gate.plugins.serving import ServingRefused, check_servable

    ref = intake_onnx(digits_benign.save(tmp_path / "benign.onnx"), "clf")
    assert run_gate(ref.uri, heldout, GateConfig(), scan_fn=cached_scan).verdict == "passed"
    promote("clf", ref.version)
    guarded = version_tags(ref)["trojan_gate.guarded_model"]
    MlflowClient().set_registered_model_alias("clf", "champion", ref.version)
    signed = {"model": ref.uri}
    assert revocation(signed) is None and check_servable(guarded) == ref.uri

    def flags(oracle, data, config):  # the same model, now found trojaned (a new scan, a new calibration)
        return replace(cached_scan(oracle, data, config), is_trojaned=True, flagged_classes=[3])

    assert run_gate(ref.uri, heldout, GateConfig(), scan_fn=flags).verdict == "passed"  # reused: no force
    assert run_gate(ref.uri, heldout, GateConfig(), scan_fn=cached_scan, force=True).verdict == "passed"
    renewed = version_tags(ref)["trojan_gate.guarded_model"]  # a passing regate signs a new release
    assert renewed != guarded and _aliases("clf-guarded") == {"production": renewed.rsplit("/", 1)[1]}
    assert _aliases("clf")["champion"] == ref.version
    out = run_gate(ref.uri, heldout, GateConfig(), scan_fn=flags, force=True)  # what a regate request runs
    assert out.verdict == "blocked" and _aliases("clf") == {}  # champion and candidate stay away
    assert "champion" in version_tags(ref)["trojan_gate.gate.removed_aliases"]
    assert _aliases("clf-guarded") == {}  # the release alias promote set is dropped
    for release in (guarded, renewed):  # every release of the version, the earlier one included
        assert "blocked by gate run" in version_tags(ref_of(release))["trojan_gate.revoked"]
    assert "revoked" in revocation(signed)
    with pytest.raises(ServingRefused, match="revoked"):
        check_servable(guarded)
    with pytest.raises(PromotionRefused, match="blocked"):
        promote("clf", ref.version)


def ref_of(uri):
    from trojan_gate.plugins.registry import resolve

    return resolve(uri)


def test_a_failure_mid_gate_fails_closed(mlflow_store, tmp_path, digits_benign, heldout, cached_scan, monkeypatch):
    ref = intake_onnx(digits_benign.save(tmp_path / "benign.onnx"), "clf")
    assert run_gate(ref.uri, heldout, GateConfig(), scan_fn=cached_scan).verdict == "passed"

    def broken(*args, **kwargs):
        raise RuntimeError("artifact store unavailable")

    monkeypatch.setattr(gate_steps, "attach_check", broken)
    out = run_gate(ref.uri, heldout, GateConfig(), force=True, scan_fn=cached_scan)
    assert out.verdict == "error" and out.exit_code == 2 and "artifact store unavailable" in out.error
    assert _aliases("clf") == {}  # the claim took the alias; an unverified version never gets it back
    tags = version_tags(ref)
    assert tags["trojan_gate.verdict"] == "error" and "artifact store unavailable" in tags["trojan_gate.verdict.error"]
    assert tags["trojan_gate.gate.state"] == "done" and tags["trojan_gate.gate.fingerprint"] == ""


def test_budget_stop_fails_closed(mlflow_store, trojan_onnx, heldout):
    ref = intake_onnx(trojan_onnx, "clf")
    out = run_gate(ref.uri, heldout, GateConfig(scan={"budget": 2000}))
    assert out.verdict == "error" and "QueryBudgetExceeded" in out.error
    assert version_tags(ref)["trojan_gate.verdict"] == "error" and _aliases("clf") == {}


def test_invalid_heldout_fails_closed(mlflow_store, trojan_onnx, heldout):
    ref = intake_onnx(trojan_onnx, "clf")
    bad = Dataset(heldout.x * 4.0, heldout.y)
    out = run_gate(ref.uri, bad, GateConfig())
    assert out.verdict == "error" and "pixel values <= 1.0" in out.error


def test_racing_gate_that_lost_its_claim_registers_and_decides_nothing(mlflow_store, tmp_path, digits_benign,
                                                                       heldout, cached_scan):
    ref = intake_onnx(digits_benign.save(tmp_path / "benign.onnx"), "clf")

    def scan_then_lose_claim(oracle, data, config):
        result = cached_scan(oracle, data, config)
        MlflowClient().set_model_version_tag("clf", ref.version, "trojan_gate.gate.run_id", "a-newer-gate")
        return result

    out = run_gate(ref.uri, heldout, GateConfig(), scan_fn=scan_then_lose_claim)
    assert out.verdict == "error" and "another gate" in out.error
    tags = version_tags(ref)
    assert tags["trojan_gate.verdict"] == "pending" and tags["trojan_gate.gate.run_id"] == "a-newer-gate"
    assert not any(k.startswith(("trojan_gate.check.", "trojan_gate.strip.")) for k in tags)  # no check tags, no guarded model
    assert MlflowClient().search_registered_models("name='clf-guarded'") == []
    assert _aliases("clf") == {}


def test_gate_cli_exit_codes(mlflow_store, trojan_onnx, heldout_npz, tmp_path, monkeypatch, cached_scan):
    from trojan_gate.pipelines.cli import main

    monkeypatch.setattr(gate_steps, "default_scan", cached_scan)
    ref = intake_onnx(trojan_onnx, "clf")
    report = tmp_path / "gate.json"
    assert main(["gate", ref.uri, "--heldout", str(heldout_npz), "--report", str(report)]) == 1
    doc = json.loads(report.read_text())
    assert doc["summary"]["verdict"] == "blocked" and doc["kind"] == "gate"
    assert main(["gate", "models:/clf/99", "--heldout", str(heldout_npz)]) == 2
