"""`run_gate`: one registered version through scan -> decide -> (patch) -> STRIP -> verdict, failing closed.

One call leaves the registry in a correct, explained state inside one MLflow run (experiment
`trojan-gate-gate`) that logs the resolved configuration, metrics, the scan results and the
report. The registry writes follow the protocol in `verdict`; any exception, time-out or
budget stop ends with `verdict=error` and no alias on the version.
"""
from __future__ import annotations

import tempfile
import traceback
from dataclasses import dataclass, field
from pathlib import Path

import mlflow
from mlflow import MlflowClient

from trojan_gate.gates import __version__

from trojan_gate.gates.faults import checkpoint

from ..registry import ensure_experiment, resolve, set_tags, tag
from . import steps
from .calibration_choice import choose_calibration, heldout_digest
from .config import GateConfig
from .state import GateState
from .verdict import (BLOCKED, ERROR, EXIT_CODES, PASSED, PATCHED, GateSuperseded, claim, fail, finish,
                      recorded_outcome, version_lock)

GATE_EXPERIMENT = "trojan-gate-gate"


@dataclass
class GateOutcome:
    """What a gate decided: the verdict, the version that holds the alias (if any), the report."""

    verdict: str
    source: str
    final: str | None
    run_id: str | None
    report: dict = field(default_factory=dict)
    report_uri: str | None = None
    error: str | None = None
    reused: bool = False

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def to_dict(self) -> dict:
        return {"verdict": self.verdict, "source": self.source, "final": self.final, "run_id": self.run_id,
                "report_uri": self.report_uri, "error": self.error, "reused": self.reused,
                "exit_code": self.exit_code, "summary": self.report.get("summary", {})}


def run_gate(model_uri: str, heldout, config: GateConfig | None = None, force: bool = False,
             experiment: str = GATE_EXPERIMENT, scan_fn=None) -> GateOutcome:
    """Gate one registered version (`models:/NAME/VERSION` or `models:/NAME@ALIAS`).

    heldout : labelled clean data (Dataset, or a path to .npz / an image folder)
    force : gate again even when a complete record for this configuration exists
    scan_fn : scan_fn(oracle, heldout, config) -> DeepInspect ScanResult (the paper's test); default
        `steps.default_scan`. Whether it decides or is reported beside the calibrated decision is
        `config.scan`'s choice (see `calibration_choice`).
    """
    config = config or GateConfig()
    scan_fn = scan_fn or steps.default_scan
    client = MlflowClient()
    ref = resolve(model_uri, client=client)
    with version_lock(ref):
        model_tags = dict(client.get_model_version(ref.name, ref.version).tags)
        choice = choose_calibration(config.scan, model_tags, heldout, client)
        data_sha = heldout_digest(heldout, model_tags)
        fingerprint = config.fingerprint(model_tags.get(tag("sha256"), ""), choice.sha256, data_sha)
        if not force:
            record = recorded_outcome(client, ref, fingerprint, config.alias)
            if record is not None:
                tags = record["tags"]
                return GateOutcome(record["verdict"], ref.uri, record["final"], tags.get(tag("gate.run_id")),
                                   report={"summary": {k[len(tag("")):]: v for k, v in tags.items()}},
                                   report_uri=tags.get(tag("report")), reused=True)
        ensure_experiment(experiment)
        with mlflow.start_run(run_name=f"gate-{ref.name}-v{ref.version}") as run, \
                tempfile.TemporaryDirectory(prefix="trojan-gate-gate-", ignore_cleanup_errors=True) as workdir:
            # the downloaded, patched and packaged files live in `workdir` and go with it
            state = GateState(ref=ref, config=config, client=client, run_id=run.info.run_id,
                              fingerprint=fingerprint, workdir=Path(workdir),
                              calibration_choice=choice, heldout_sha256=data_sha)
            return _run(state, heldout, scan_fn)


def _run(state: GateState, heldout, scan_fn) -> GateOutcome:
    client, ref, config = state.client, state.ref, state.config
    mlflow.set_tags({"trojan_gate.model": ref.uri, "trojan_gate.version": __version__,
                     "trojan_gate.policy": config.policy})
    mlflow.log_dict(config.resolved(), "gate_config.json")
    mlflow.log_params({"model_uri": ref.uri, "fingerprint": state.fingerprint, "policy": config.policy,
                       "alias": config.alias, "seed": config.seed})
    error, report, report_uri = None, None, None
    try:
        claim(client, ref, state.run_id)
        checkpoint("gate.claimed")
        steps.fetch_model(state)
        checkpoint("gate.fetched")
        steps.validate_data(state, heldout)
        checkpoint("gate.validated")
        state.check_deadline("the scan")
        steps.scan_model(state, scan_fn)
        checkpoint("gate.scanned")
        state.check_deadline("the decision")
        if state.decision.is_trojaned and config.policy == "patch":
            steps.patch_model(state, scan_fn)
        if state.verdict in (PASSED, PATCHED):
            state.check_deadline("STRIP calibration")
            steps.calibrate(state)
        state.check_deadline("writing the verdict")
        # the report and its link go with the verdict, so a record complete enough to reuse links its own report
        report, report_uri = steps.write_gate_report(state)
        links = {"report": report_uri, **report_link(state.run_id)}
        source_tags = {**state.decision.tags(), "gate.policy": config.policy, **links,
                       **(steps.check_tags(state) if state.verdict == PASSED else {})}
        new_tags = None
        if state.verdict == PATCHED:
            new_tags = {**state.fresh_decision.tags(), **steps.check_tags(state), "gate.policy": config.policy,
                        **links}
        new_fp = state.patched_fingerprint if state.verdict == PATCHED else ""
        finish(client, ref, state.run_id, state.verdict, state.fingerprint, config.alias, source_tags,
               new_ref=state.new_ref, new_tags=new_tags, new_fingerprint=new_fp)
    except GateSuperseded as e:
        state.verdict, state.superseded, error = ERROR, True, str(e)
        state.errors.append({"type": type(e).__name__, "message": str(e)})
        mlflow.set_tag("trojan_gate.superseded", "true")
    except BaseException as e:  # fail closed, SIGTERM and Ctrl-C included
        state.verdict, error = ERROR, f"{type(e).__name__}: {e}"
        state.errors.append({"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()})
        fail(client, ref, state.run_id, error, state.new_ref)
        if not isinstance(e, Exception):
            raise
    mlflow.log_metrics({"gate_seconds": state.seconds, "gate_exit_code": float(EXIT_CODES[state.verdict])})
    mlflow.set_tag("trojan_gate.verdict", state.verdict)
    if error is not None:  # the report of the failure replaces any written before it
        report, report_uri = steps.write_gate_report(state)
    if error is not None and not state.superseded:
        try:
            set_tags(ref, {"report": report_uri, **report_link(state.run_id)}, client)
        except Exception as e:  # the verdict stands; only the report link is missing
            mlflow.set_tag("trojan_gate.report_tag_error", f"{type(e).__name__}: {e}")
    final = state.final
    return GateOutcome(state.verdict, ref.uri, final.uri if final else None, state.run_id, report, report_uri, error)


def report_link(run_id: str) -> dict:
    """On a tracking server, the run page where the MLflow UI shows the HTML report: {"report.url": URL}."""
    uri = mlflow.get_tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return {}
    exp = mlflow.get_run(run_id).info.experiment_id
    return {"report.url": f"{uri.rstrip('/')}/#/experiments/{exp}/runs/{run_id}/artifacts"}


__all__ = ["BLOCKED", "ERROR", "GATE_EXPERIMENT", "GateOutcome", "PASSED", "PATCHED", "run_gate"]
