"""The gate's steps, each taking the run's `GateState`: fetch, validate, scan, patch, STRIP, report.

Every registry write a step makes (a patched version, STRIP tags, the guarded model) is
preceded by `require_claim`, so a gate that lost its claim registers nothing (see `verdict`).
"""
from __future__ import annotations

import json
from pathlib import Path

import mlflow
import numpy as np

from trojan_gate.gates import __version__
from trojan_gate.gates.data import Dataset, load_heldout
from trojan_gate.gates.faults import checkpoint
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.validation import validate_heldout

from ..calibration import attach_check, serving_settings
from ..registry import fetch_onnx, intake_onnx
from .state import GateState
from .verdict import BLOCKED, PASSED, PATCHED, require_claim


def default_scan(oracle, heldout, config):
    """DeepInspect as the gate configures it (`config.scan`), through the query oracle."""
    from trojan_gate.gates.deepinspect import DeepInspect

    s = config.scan
    return DeepInspect(cutoff=s.cutoff, seed=config.seed, budget=s.budget, progress=False,
                       **s.options).scan(oracle, heldout=heldout if s.use_heldout else None)


def log_scan(decision, prefix: str, workdir: Path):
    """The deciding verdict's metrics, both tests' results (decision.json) and DeepInspect's full result."""
    mlflow.log_metrics({f"{prefix}instance_score": decision.instance_score,
                        f"{prefix}flagged_classes": float(len(decision.flagged_classes)),
                        f"{prefix}is_trojaned": float(decision.is_trojaned),
                        f"{prefix}queries": float(decision.queries), f"{prefix}seconds": float(decision.seconds)})
    if decision.calibrated is not None:
        mlflow.log_metric(f"{prefix}false_block_probability", decision.calibrated.false_block_probability)
    if decision.paper is not None:
        mlflow.log_metrics({f"{prefix}paper_instance_score": decision.paper.instance_score,
                            f"{prefix}paper_is_trojaned": float(decision.paper.is_trojaned)})
        mlflow.log_artifact(str(decision.paper.to_json(workdir / f"{prefix}scan.json")), artifact_path="scan")
    mlflow.log_dict(decision.to_dict(), f"scan/{prefix}decision.json")


def _decide(state: GateState, oracle, scan_fn, calibration, paper_beside: bool):
    from trojan_gate.gates.metascan.decision import decide

    choice = state.calibration_choice
    return decide(oracle, state.heldout, calibration, lambda o, h: scan_fn(o, h, state.config),
                  paper_beside=paper_beside, reason=choice.reason, source=choice.source or "")


def fetch_model(state: GateState):
    """The version's ONNX, downloaded once and re-hashed against its intake tag."""
    state.onnx_path = fetch_onnx(state.ref, dst=str(state.workdir / "model"), client=state.client)
    state.oracle = ModelOracle(state.onnx_path, deadline=state.deadline,
                               call_timeout_s=state.config.call_timeout_s).probe()


def validate_data(state: GateState, heldout):
    """The held-out set (Dataset or path) passes the great-expectations checks before any use."""
    if not isinstance(heldout, Dataset):
        heldout = load_heldout(heldout, state.oracle.input_shape)
    report = validate_heldout(heldout.x, heldout.y, state.oracle.input_shape, state.oracle.n_classes,
                              min_per_class=state.config.min_per_class)
    mlflow.log_dict({"checks": report.checks}, "heldout_validation.json")
    state.heldout = heldout
    state.oracle.probe(examples=heldout.x)  # keyed probes again, mixing the held-out images in


def scan_model(state: GateState, scan_fn):
    """The calibrated decision when a calibration of this task was chosen (verified and matched
    here, refused by name otherwise), DeepInspect beside it or deciding alone (see `decision`)."""
    from . import calibration_choice

    state.calibration = calibration_choice.load(state.calibration_choice, state.client)
    state.decision = _decide(state, state.oracle, scan_fn, state.calibration, state.config.scan.paper_beside)
    state.scan = state.decision.paper
    log_scan(state.decision, "", state.workdir)
    state.verdict = PASSED if not state.decision.is_trojaned else BLOCKED


def patch_model(state: GateState, scan_fn):
    """Fine-tune against the scan's triggers, scan the patched model afresh, and register it as a
    new version (with lineage) only if the fresh scan is clean, accuracy is within bound and the
    residual-risk evidence (a fresh universal-trigger search, `patching.acceptance`) accepts it."""
    from trojan_gate.gates.patching import Patcher

    cfg, scan = state.config, state.scan
    with state.oracle.phase("patch"):
        patch = Patcher(**cfg.patch, seed=cfg.seed, progress=False).fit(
            state.oracle.model_bytes, scan.inverted_x, scan.inverted_y, scan.generator.stamp,
            state.decision.flagged_classes,
            heldout=(state.heldout.x, state.heldout.y), deadline=state.deadline).result_
    state.patch = patch
    checkpoint("patch.fitted")
    patched_path = patch.save(state.workdir / "patched" / "model.onnx")
    state.check_deadline("the patched model's scan")
    # the patched model is scanned afresh by both tests: each must find it clean
    fresh_oracle = ModelOracle(patch.onnx_bytes, deadline=state.deadline, call_timeout_s=state.config.call_timeout_s)
    state.fresh_decision = _decide(state, fresh_oracle, scan_fn,
                                   state.calibration, paper_beside=True)
    state.fresh = state.fresh_decision.paper
    checkpoint("patch.rescanned")
    log_scan(state.fresh_decision, "patched_", state.workdir)
    drop, drop_se = patch.accuracy_drop, patch.accuracy_drop_se
    mlflow.log_metrics({"patch_activation_rate_before": patch.before["trojan_activation_rate"],
                        "patch_activation_rate_after": patch.after["trojan_activation_rate"],
                        **({"patch_accuracy_drop": drop} if drop is not None else {}),
                        **({"patch_accuracy_drop_se": drop_se} if drop_se is not None else {})})
    mlflow.log_dict(patch.to_dict(), "patch/patch.json")
    if patch.residual is not None:
        mlflow.log_metrics({f"patch_residual_{kind}_{key}": v for kind, d in patch.residual.summary().items()
                            for key, v in d.items() if v is not None})
        if patch.residual.areas:
            mlflow.log_metric("patch_residual_area_anomaly_max", max(patch.residual.anomaly_index().values()))
    if state.fresh_decision.is_trojaned or state.fresh.is_trojaned or not patch.within_accuracy_drop(
            cfg.max_accuracy_drop) or not patch.residual_accepted:
        state.verdict = BLOCKED
        return
    require_claim(state.client, state.ref, state.run_id)
    ref = state.ref
    state.new_ref = intake_onnx(patched_path, ref.name, source=f"patch of {ref.uri}",
                                description=f"patched by trojan-gate from version {ref.version}", extra_tags={
                                    "patched_from": ref.version, "patch.run_id": state.run_id,
                                    "patch.activation_rate_before": f"{patch.before['trojan_activation_rate']:.4f}",
                                    "patch.activation_rate_after": f"{patch.after['trojan_activation_rate']:.4f}",
                                    "patch.accuracy_drop": "" if drop is None else f"{drop:.4f}",
                                    "patch.accuracy_drop_se": "" if drop_se is None else f"{drop_se:.4f}",
                                    "patch.source_instance_score": f"{state.decision.instance_score:.4f}",
                                    **residual_tags(patch.residual)})
    checkpoint("patch.registered")
    state.verdict = PATCHED


def residual_tags(residual) -> dict:
    """Tags stating a patched version's residual-risk evidence: per trigger family its budget and
    the highest attack success found afresh for flagged classes, other classes and untargeted."""
    if residual is None:
        return {"patch.residual.accepted": "not measured"}
    tags = {"patch.residual.accepted": str(residual.accepted).lower()}
    for kind, d in residual.summary().items():
        tags[f"patch.residual.{kind}"] = (f"budget {residual.budgets[kind]:g}: flagged {_fmt(d['max_flagged'])}, "
                                          f"other {_fmt(d['max_unflagged'])}, untargeted {_fmt(d['untargeted'])}")
    if residual.areas:
        ai = residual.anomaly_index()
        top = max(ai, key=ai.get)
        med = float(np.exp(np.median(np.log([float(v) for v in residual.areas.values()]))))
        tags["patch.residual.area"] = (f"smallest mask area for half the images: class {top} {residual.areas[top]:.4f}, "
                                       f"median {med:.4f}, anomaly index {ai[top]:.2f} (bound {residual.anomaly:g})")
    return tags


def _fmt(v) -> str:
    return "-" if v is None else f"{v:.3f}"


def calibrate(state: GateState):
    """The run-time check for the version that passed: fit the configured kind (the run-time check
    beyond STRIP by default, or STRIP as in the paper) at the configured FRR and N, estimate its FAR
    with the scan's generated triggers (reported only), then sign it into the guarded model."""
    from trojan_gate.gates.runtime import calibrate_check, describe
    from trojan_gate.gates.far_estimate import hijacking_inputs

    cfg, final = state.config, state.final
    onnx_path = state.onnx_path if final == state.ref else fetch_onnx(final, dst=str(state.workdir / "final"),
                                                                       client=state.client)
    oracle = ModelOracle(onnx_path, deadline=state.deadline, call_timeout_s=state.config.call_timeout_s)
    s = cfg.check
    det = calibrate_check(oracle, state.heldout, kind=s.kind, frr=s.frr, n_perturbations=s.n_perturbations,
                          blend=s.blend, statistics=s.statistics, stages=s.stages, seed=cfg.seed,
                          min_per_class=cfg.min_per_class)
    checkpoint("check.fitted")
    view = describe(det)
    view["benign_scores"] = np.asarray(det.benign_scores_)
    if s.estimate_far and state.scan is not None and state.scan.generator is not None:
        classes = state.decision.flagged_classes or None  # the suspected trojan's own triggers when patched
        stamped = hijacking_inputs(oracle, state.scan.generator.stamp, state.heldout.x, state.heldout.y,
                                   seed=cfg.seed, classes=classes)
        if len(stamped.x):
            data = det.predict(stamped.x)["data"]
            view["trojan_scores"] = np.asarray(data["instance_score"])
            view["estimated_far"] = float(1.0 - np.mean(data["is_trojaned"]))
            det.extra.update({"estimated_far": view["estimated_far"], "estimated_far_inputs": int(len(stamped.x)),
                              "estimated_far_source": "DeepInspect generator triggers that hijack the model",
                              "estimated_far_classes": "all" if classes is None else [int(c) for c in classes]})
    require_claim(state.client, state.ref, state.run_id)
    verdict = {"verdict": state.verdict, "gate_run_id": state.run_id, "source": state.ref.uri,
               "fingerprint": state.fingerprint if final == state.ref else state.patched_fingerprint,
               "flagged_classes": list(state.decision.flagged_classes), "config": cfg.resolved(),
               "serving": serving_settings(s.policy)}
    outcome = attach_check(final, det, onnx_path, verdict, client=state.client)
    checkpoint("check.attached")
    metrics = {"check_threshold": float(det.threshold_), "check_n": float(det.n_perturbations),
               "check_calibration_images": float(len(det.bank_))}
    if view.get("estimated_far") is not None:
        metrics["check_estimated_far"] = view["estimated_far"]
    mlflow.log_metrics(metrics)
    view.update(artifact_sha256=outcome.artifact_sha256, guarded_model=outcome.guarded.uri)
    state.check, state.check_report = det, view


def check_tags(state: GateState) -> dict:
    det = state.check
    return {} if det is None else {"check.threshold": f"{det.threshold_:.6f}",
                                   "check.artifact_sha256": state.check_report["artifact_sha256"]}


def patch_view(state: GateState) -> dict | None:
    patch, fresh = state.patch, state.fresh
    if patch is None:
        return None
    fresh_decision = state.fresh_decision
    return {"before": {**patch.before, "instance_score": state.decision.instance_score},
            "after": {**patch.after, "instance_score": fresh_decision.instance_score if fresh_decision else None},
            "source_version": state.ref.version, "new_version": state.new_ref.version if state.new_ref else None,
            "passed": state.verdict == PATCHED, "accuracy_drop": patch.accuracy_drop,
            "accuracy_drop_se": patch.accuracy_drop_se, "n_eval": patch.n_eval,
            "max_accuracy_drop": state.config.max_accuracy_drop,
            "accuracy_within_bound": patch.within_accuracy_drop(state.config.max_accuracy_drop),
            "residual": None if patch.residual is None else patch.residual.to_dict(),
            "residual_accepted": patch.residual_accepted,
            "fresh_flagged_classes": list(fresh_decision.flagged_classes) if fresh_decision else None,
            "fresh_paper_flagged_classes": list(fresh.flagged_classes) if fresh else None,
            "sha256": patch.sha256, "epochs_run": patch.epochs_run, "seconds": round(patch.seconds, 1),
            "n_train": patch.n_train, "eval_source": patch.eval_source}


def write_gate_report(state: GateState) -> tuple[dict, str]:
    """The gate's JSON + HTML report, logged under the run's `report/`; returns (document, its URI)."""
    from ..report import write_report

    meta = {"run_id": state.run_id, "gate_version": __version__, "seconds": round(state.seconds, 2),
            "policy": state.config.policy, "alias": state.config.alias, "config": state.config.resolved()}
    out = state.workdir / "report"
    json_path, _ = write_report(out, kind="gate", model_name=state.ref.name, version=state.ref.version,
                                verdict=state.verdict, scan=state.scan, decision=state.decision,
                                check=state.check_report,
                                patch=patch_view(state), errors=state.errors, meta=meta)
    mlflow.log_artifacts(str(out), artifact_path="report")
    return json.loads(Path(json_path).read_text()), mlflow.get_artifact_uri("report")
