"""The registry gate: scan → decide → (patch) → STRIP → tags → alias, failing closed.

One call takes a registered model version and leaves the registry in a correct, explained
state, inside one MLflow run that logs the config, metrics, the scan result and the report:

1. the version's ONNX is fetched and re-hashed against its intake tag;
2. the held-out set passes the great-expectations checks;
3. DeepInspect scans the model through the query oracle;
4. decision: clean → `passed`; trojan suspected and policy `block` → `blocked`; policy
   `patch` → fine-tune on inverted data stamped with generated triggers (correct labels),
   scan the patched model afresh; it is registered as a new version with lineage and
   becomes `patched` only if the fresh scan is clean and the clean-accuracy drop is within
   `max_accuracy_drop`; otherwise the source is `blocked`;
5. the version that passed gets a STRIP boundary; the scan's generator stamps held-out
   images to *estimate* STRIP's FAR and to choose the blend rule and N that minimise it;
6. tags (`trojan_gate.verdict`, max deviation factor, flagged classes, queries, seconds,
   STRIP boundary, artifact hash, report location, gate version, run id); the alias moves
   only to a passed or patched version; a blocked version loses every alias it had; the
   source of a patch is marked superseded.

Fail closed: any exception, timeout or budget stop sets verdict `error` with its cause and
changes no alias. Re-running with the same config on an already decided version returns
the recorded verdict and changes nothing (`force=True` re-runs). Two gates racing on one
version: a local lock serialises gates on one machine, and each gate claims the version
(`trojan_gate.gate.run_id`) at its start and writes its verdict only if it still holds the
claim at the end, so the last gate to start decides and the other leaves the registry alone.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import tempfile
import time
import traceback
from dataclasses import asdict, dataclass, field
from pathlib import Path

import mlflow
import numpy as np
from mlflow import MlflowClient

from trojan_gate.gates import __version__
from trojan_gate.gates.data import Dataset, default_cache_dir, load_heldout
from trojan_gate.gates.errors import TrojanGateError
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.validation import validate_heldout

from .calibration import calibrate_registered
from .registry import VersionRef, ensure_experiment, fetch_onnx, intake_onnx, resolve, set_tags, tag, version_tags

PASSED, PATCHED, BLOCKED, ERROR = "passed", "patched", "blocked", "error"
EXIT_CODES = {PASSED: 0, PATCHED: 0, BLOCKED: 1, ERROR: 2}
POLICIES = ("block", "patch")
GATE_EXPERIMENT = "trojan-gate-gate"


class GateTimeout(TrojanGateError):
    """The gate ran past its time limit."""


class GateSuperseded(TrojanGateError):
    """Another gate claimed this version after this one started; it decides the verdict."""


def _scan_option_names() -> set:
    from dataclasses import fields

    from trojan_gate.gates.scan import ScanConfig

    return {f.name for f in fields(ScanConfig)}


def _patch_option_names() -> set:
    from trojan_gate.gates.patching import ModelPatcher

    # the gate sets seed itself (GateConfig.seed) and runs without a progress bar
    return set(ModelPatcher.param_names()) - {"seed", "progress"}


def check_option_names(what: str, options: dict, known_names):
    """Refuse unknown option names before a run starts (a typo would otherwise fail the
    gate after a full scan, or be silently ignored). `known_names()` imports the scan or the
    patcher, so it is called only when there are options to check. Used by the gate and by
    the patch benchmark."""
    if not options:
        return
    known = known_names()
    unknown = sorted(set(options) - known)
    if unknown:
        raise ValueError(f"{what}: unknown option(s) {', '.join(map(repr, unknown))}; "
                         f"choose from {', '.join(sorted(known))}")


@dataclass
class GateConfig:
    """Everything that decides a gate's outcome (hashed into the idempotency fingerprint)."""

    policy: str = "block"
    alias: str = "candidate"
    frr: float = 0.01
    n_perturbations: int | None = None  # None: choose N (and blend) by estimated FAR
    blend: str | None = None
    seed: int = 0
    budget: int | None = None  # oracle queries per scan
    cutoff: float = 2.0
    max_accuracy_drop: float = 0.01
    min_per_class: int = 5
    timeout_s: float | None = None
    estimate_far: bool = True
    # True: the scan takes its substitute set and its benign reference models from the held-out
    # data (clean-data variant + reference-normalised test); False: model inversion alone
    scan_uses_heldout: bool = True
    scan_options: dict = field(default_factory=dict)
    patch_options: dict = field(default_factory=dict)
    # patch again against the fresh scan's triggers while it still flags (and the accuracy drop
    # is within bound), up to this many rounds; 1 is the paper
    patch_rounds: int = 1

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {self.policy!r}")
        if self.alias in ("latest",) or (self.alias.startswith("v") and self.alias[1:].isdigit()):
            raise ValueError(f"alias {self.alias!r} is reserved by MLflow")
        if int(self.patch_rounds) != self.patch_rounds or self.patch_rounds < 1:
            raise ValueError(f"patch_rounds must be a whole number >= 1, not {self.patch_rounds!r}")
        check_option_names("scan_options", self.scan_options, _scan_option_names)
        check_option_names("patch_options", self.patch_options, _patch_option_names)

    def fingerprint(self, model_sha256: str) -> str:
        doc = {k: v for k, v in asdict(self).items() if k != "timeout_s"}
        doc["model_sha256"] = model_sha256
        doc["gate_version"] = __version__
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:16]


@dataclass
class GateOutcome:
    verdict: str
    source: str
    final: str | None  # the version holding the alias, if any
    run_id: str | None
    report: dict = field(default_factory=dict)
    report_dir: str | None = None
    error: str | None = None
    reused: bool = False

    @property
    def exit_code(self) -> int:
        return EXIT_CODES[self.verdict]

    def as_dict(self) -> dict:
        return {"verdict": self.verdict, "source": self.source, "final": self.final, "run_id": self.run_id,
                "report_dir": self.report_dir, "error": self.error, "reused": self.reused,
                "exit_code": self.exit_code, "summary": self.report.get("summary", {})}


# ----------------------------------------------------------------------------- helpers
def _scan(oracle, heldout: Dataset | None, config: GateConfig):
    from trojan_gate.gates.scan import scan

    return scan(oracle, heldout=heldout if config.scan_uses_heldout else None, seed=config.seed,
                cutoff=config.cutoff, progress=False, **config.scan_options)


@contextlib.contextmanager
def _local_lock(ref: VersionRef):
    """Serialise gates on one version within this machine (fcntl lock keyed by store + version)."""
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{ref.name}|{ref.version}".encode()).hexdigest()[:24]
    lock_dir = default_cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(lock_dir / f"{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _aliases_of(client, ref: VersionRef) -> list:
    return list(client.get_model_version(ref.name, ref.version).aliases or [])


def _drop_aliases(client, ref: VersionRef):
    for a in _aliases_of(client, ref):
        client.delete_registered_model_alias(ref.name, a)


def _strip_view(det, selection=None, trojan_scores=None) -> dict:
    d = {"benign_scores": np.asarray(det.benign_scores_), "mean": float(det.mean_), "std": float(det.std_),
         "threshold": float(det.threshold_), "empirical_threshold": float(det.empirical_threshold_),
         "frr": float(det.frr_), "rule": det.rule, "n_perturbations": int(det.n_perturbations), "blend": det.blend}
    if selection is not None:
        d["estimated_far"] = selection.estimated_far
        d["selection"] = selection.table
    if trojan_scores is not None:
        d["trojan_scores"] = np.asarray(trojan_scores)
    return d


def _log_scan(result, prefix: str, workdir: Path):
    mlflow.log_metrics({f"{prefix}max_deviation_factor": result.max_deviation_factor,
                        f"{prefix}flagged_classes": float(len(result.flagged_classes)),
                        f"{prefix}trojan_suspected": float(result.trojan_suspected),
                        f"{prefix}queries": float(result.queries), f"{prefix}seconds": float(result.seconds)})
    path = result.to_json(workdir / f"{prefix}scan.json")
    mlflow.log_artifact(str(path), artifact_path="scan")


# ----------------------------------------------------------------------------- the gate
def run_gate(model_uri: str, heldout, config: GateConfig | None = None, force: bool = False,
             experiment: str = GATE_EXPERIMENT, _scan_fn=None) -> GateOutcome:
    """Gate one registered version (`models:/NAME/VERSION` or `@ALIAS`); see the module docstring."""
    config = config or GateConfig()
    scan_fn = _scan_fn or _scan
    client = MlflowClient()
    ref = resolve(model_uri, client=client)
    tags = version_tags(ref, client)
    fp = config.fingerprint(tags.get(tag("sha256"), ""))
    if not force and tags.get(tag("verdict")) in (PASSED, PATCHED, BLOCKED) and tags.get(tag("gate.fingerprint")) == fp:
        final = tags.get(tag("superseded_by")) or (ref.uri if tags[tag("verdict")] == PASSED else None)
        return GateOutcome(tags[tag("verdict")], ref.uri, final, tags.get(tag("gate.run_id")),
                           report={"summary": {k[len("trojan_gate."):]: v for k, v in tags.items()}},
                           report_dir=tags.get(tag("report")), reused=True)

    ensure_experiment(experiment)
    workdir = Path(tempfile.mkdtemp(prefix="trojan-gate-gate-"))
    t0 = time.perf_counter()

    def check_deadline(step: str):
        if config.timeout_s is not None and time.perf_counter() - t0 > config.timeout_s:
            raise GateTimeout(f"gate exceeded its {config.timeout_s:.0f} s limit before {step}")

    with _local_lock(ref), mlflow.start_run(run_name=f"gate-{ref.name}-v{ref.version}") as run:
        run_id = run.info.run_id
        set_tags(ref, {"gate.run_id": run_id, "gate.state": "running"}, client)  # claim the version
        mlflow.set_tags({"trojan_gate.model": ref.uri, "trojan_gate.version": __version__,
                         "trojan_gate.policy": config.policy})
        mlflow.log_params({k: (json.dumps(v) if isinstance(v, dict) else v) for k, v in asdict(config).items()})
        mlflow.log_params({"model_uri": ref.uri, "fingerprint": fp})
        verdict, final, error, superseded = ERROR, None, None, False
        scan_result = fresh = patch = det = selection = None
        new_ref = None
        errors = []
        try:
            onnx_path = fetch_onnx(ref, dst=str(workdir / "model"), client=client)
            oracle = ModelOracle(onnx_path, budget=config.budget)
            if not isinstance(heldout, Dataset):
                heldout = load_heldout(heldout, oracle.input_shape)
            validation = validate_heldout(heldout.x, heldout.y, oracle.input_shape, oracle.n_classes,
                                          min_per_class=config.min_per_class)
            mlflow.log_dict({"checks": validation.checks}, "heldout_validation.json")
            check_deadline("the scan")
            scan_result = scan_fn(oracle, heldout, config)
            _log_scan(scan_result, "", workdir)
            check_deadline("the decision")
            if not scan_result.trojan_suspected:
                verdict, final = PASSED, ref
            elif config.policy == "block":
                verdict = BLOCKED
            else:
                patch, fresh, new_ref, verdict = _patch(ref, oracle, scan_result, heldout, config, scan_fn, workdir,
                                                        client)
                if verdict == PATCHED:
                    final = new_ref
            if final is not None:
                check_deadline("STRIP calibration")
                det, selection, trojan_scores = _calibrate(final, heldout, scan_result, config, client,
                                                           suspect_classes=scan_result.flagged_classes,
                                                           onnx_path=onnx_path if final is ref else None)
                mlflow.log_metrics({"strip_boundary": float(det.threshold_), "strip_n": float(det.n_perturbations),
                                    **({"strip_estimated_far": selection.estimated_far}
                                       if selection is not None and np.isfinite(selection.estimated_far) else {})})
            check_deadline("writing the verdict")
            if version_tags(ref, client).get(tag("gate.run_id")) != run_id:
                raise GateSuperseded(f"another gate claimed {ref.uri} while this one ran; it decides the verdict")
            _write_verdict(client, ref, new_ref, verdict, scan_result, fresh, patch, det, run_id, fp, config)
        except GateSuperseded as e:
            verdict, final, error, superseded = ERROR, None, str(e), True
            errors.append({"type": type(e).__name__, "message": str(e)})
            mlflow.set_tag("trojan_gate.superseded", "true")
        except Exception as e:  # fail closed
            verdict, final, error = ERROR, None, f"{type(e).__name__}: {e}"
            errors.append({"type": type(e).__name__, "message": str(e), "traceback": traceback.format_exc()})
            _write_error(client, ref, new_ref, error, run_id, config)
        seconds = time.perf_counter() - t0
        report, report_dir = _report(ref, verdict, scan_result, det, selection, patch, fresh, new_ref, errors, config,
                                     run_id, seconds, workdir)
        mlflow.log_metrics({"gate_seconds": seconds, "gate_exit_code": float(EXIT_CODES[verdict])})
        mlflow.set_tag("trojan_gate.verdict", verdict)
        if not superseded:
            with contextlib.suppress(Exception):
                set_tags(ref, {"report": report_dir, "gate.state": "done"}, client)
    return GateOutcome(verdict, ref.uri, final.uri if final else None, run_id, report, report_dir, error)


def _accuracy_within_bound(patch, config) -> bool:
    """The gate's accuracy condition on a patch (`PatchResult.within_accuracy_drop`, the comparison
    the patch rounds use too)."""
    return patch.within_accuracy_drop(config.max_accuracy_drop)


def _patch(ref, oracle, scan_result, heldout, config, scan_fn, workdir, client):
    from trojan_gate.gates.patching import combine_rounds, patch_in_rounds

    with oracle.phase("patch"):
        results, scans = patch_in_rounds(
            oracle.model_bytes, scan_result,
            lambda onnx_bytes: scan_fn(ModelOracle(onnx_bytes, budget=config.budget), heldout, config),
            (heldout.x, heldout.y), config.patch_rounds, config.max_accuracy_drop, seed=config.seed,
            **config.patch_options)
    fresh = scans[-1]
    patch = combine_rounds(results)
    patched_path = patch.save(workdir / "patched" / "model.onnx")
    _log_scan(fresh, "patched_", workdir)
    drop, drop_se = patch.accuracy_drop, patch.accuracy_drop_se
    mlflow.log_metrics({"patch_activation_rate_before": patch.before["trojan_activation_rate"],
                        "patch_activation_rate_after": patch.after["trojan_activation_rate"],
                        **({"patch_accuracy_drop": drop} if drop is not None else {}),
                        **({"patch_accuracy_drop_se": drop_se} if drop_se is not None else {})})
    mlflow.log_dict(patch.to_dict(), "patch/patch.json")
    ok = (not fresh.trojan_suspected) and _accuracy_within_bound(patch, config)
    if not ok:
        return patch, fresh, None, BLOCKED
    new_ref = intake_onnx(patched_path, ref.name, source=f"patch of {ref.uri}",
                          description=f"patched by trojan-gate from version {ref.version}",
                          extra_tags={"patched_from": ref.version, "patch.run_id": mlflow.active_run().info.run_id,
                                      "patch.activation_rate_before": f"{patch.before['trojan_activation_rate']:.4f}",
                                      "patch.activation_rate_after": f"{patch.after['trojan_activation_rate']:.4f}",
                                      "patch.accuracy_drop": "" if drop is None else f"{drop:.4f}",
                                      "patch.accuracy_drop_se": "" if drop_se is None else f"{drop_se:.4f}",
                                      "patch.source_max_deviation_factor": f"{scan_result.max_deviation_factor:.4f}",
                                      "patch.fresh_max_deviation_factor": f"{fresh.max_deviation_factor:.4f}",
                                      "patch.rounds": str(max(1, len(patch.rounds)))})
    return patch, fresh, new_ref, PATCHED


def _calibrate(final: VersionRef, heldout: Dataset, source_scan, config: GateConfig, client, suspect_classes=(),
               onnx_path=None):
    """STRIP for the version that passed; the source scan's generated triggers estimate FAR and pick blend and N.

    For a patched version the triggers of the source's flagged classes are used: the stand-ins
    are the suspected trojan's own inputs that still hijack the patched model. `onnx_path` is
    the version's ONNX when the gate already fetched it (a passing source version); otherwise
    it is fetched once here. Either way the file is checked against the registered sha256.
    """
    onnx_path = fetch_onnx(final, client=client) if onnx_path is None else onnx_path
    selection = trojan_scores = None
    blend, n = config.blend, config.n_perturbations or 10
    extra = {}
    if config.estimate_far and getattr(source_scan, "generator", None) is not None:
        from trojan_gate.gates.far_estimate import hijacking_inputs, select_strip_config
        from trojan_gate.gates.strip import BLEND_RULES

        oracle = ModelOracle(onnx_path)
        # the suspected trojan's own triggers when the source was flagged (patched); every class otherwise
        classes = suspect_classes or None
        stamped = hijacking_inputs(oracle, source_scan.generator.stamp, heldout.x, heldout.y, seed=config.seed,
                                   classes=classes)
        blends = (config.blend,) if config.blend else tuple(BLEND_RULES)
        ns = (config.n_perturbations,) if config.n_perturbations else (5, 10, 20)
        selection = select_strip_config(oracle, heldout.x, stamped, frr=config.frr, blends=blends, ns=ns,
                                        seed=config.seed)
        blend, n = selection.blend, selection.n_perturbations
        extra = {"estimated_far": selection.estimated_far, "estimated_far_inputs": selection.n_stamped,
                 "estimated_far_source": "DeepInspect generator triggers that hijack the model",
                 "estimated_far_classes": "all" if classes is None else [int(c) for c in classes],
                 "selection": selection.table}
        if len(stamped.x):
            trojan_scores = stamped
    outcome = calibrate_registered(final, heldout, frr=config.frr, n_perturbations=n, blend=blend, seed=config.seed,
                                   min_per_class=config.min_per_class, extra=extra, onnx_path=onnx_path,
                                   extra_metrics={"strip_estimated_far": selection.estimated_far} if selection else None)
    det = outcome.detector
    det.trojan_scores_ = det.score(trojan_scores.x) if trojan_scores is not None else None
    det.artifact_sha256_ = outcome.artifact_sha256
    det.guarded_uri_ = outcome.guarded.uri
    return det, selection, trojan_scores


def _write_verdict(client, ref, new_ref, verdict, scan_result, fresh, patch, det, run_id, fp, config):
    common = {"gate.version": __version__, "gate.run_id": run_id, "gate.fingerprint": fp,
              "gate.policy": config.policy, "verdict.error": ""}
    src = {**common, "verdict": verdict if verdict != PATCHED else BLOCKED,
           "max_deviation_factor": f"{scan_result.max_deviation_factor:.4f}",
           "flagged_classes": ",".join(map(str, scan_result.flagged_classes)),
           "queries": scan_result.queries, "seconds": f"{scan_result.seconds:.1f}"}
    if verdict == PASSED:
        src.update(status=PASSED, **{"strip.boundary": f"{det.threshold_:.6f}",
                                     "strip.artifact_sha256": det.artifact_sha256_})
    elif verdict == BLOCKED:
        src.update(status=BLOCKED)
    else:  # patched: the source is superseded by the new version
        src.update(status="superseded", superseded_by=new_ref.uri)
    set_tags(ref, src, client)
    if verdict == PATCHED:
        set_tags(new_ref, {**common, "verdict": PATCHED, "status": PATCHED, "patched_from": ref.version,
                           "max_deviation_factor": f"{fresh.max_deviation_factor:.4f}",
                           "flagged_classes": ",".join(map(str, fresh.flagged_classes)),
                           "queries": fresh.queries, "seconds": f"{fresh.seconds:.1f}",
                           "strip.boundary": f"{det.threshold_:.6f}",
                           "strip.artifact_sha256": det.artifact_sha256_}, client)
    # aliases last: only a passed or patched version gets one; blocked/superseded lose theirs
    if verdict == PASSED:
        client.set_registered_model_alias(ref.name, config.alias, ref.version)
    elif verdict == PATCHED:
        _drop_aliases(client, ref)
        client.set_registered_model_alias(new_ref.name, config.alias, new_ref.version)
    else:
        _drop_aliases(client, ref)


def _write_error(client, ref, new_ref, error, run_id, config):
    """Fail closed: verdict error with its cause; aliases untouched."""
    with contextlib.suppress(Exception):
        if version_tags(ref, client).get(tag("gate.run_id")) not in (None, run_id):
            return  # a newer gate owns the version
        for r in filter(None, (ref, new_ref)):
            set_tags(r, {"verdict": ERROR, "verdict.error": error[:4000], "gate.run_id": run_id,
                         "gate.version": __version__, "gate.policy": config.policy, "gate.fingerprint": ""}, client)


def _report(ref, verdict, scan_result, det, selection, patch, fresh, new_ref, errors, config, run_id, seconds, workdir):
    from trojan_gate.gates.report import write_report

    strip = _strip_view(det, selection, getattr(det, "trojan_scores_", None)) if det is not None else None
    patch_view = None
    if patch is not None:
        patch_view = {"before": {**patch.before, "max_deviation_factor": scan_result.max_deviation_factor},
                      "after": {**patch.after, "max_deviation_factor": fresh.max_deviation_factor if fresh else None},
                      "source_version": ref.version, "new_version": new_ref.version if new_ref else None,
                      "passed": verdict == PATCHED, "accuracy_drop": patch.accuracy_drop,
                      "accuracy_drop_se": patch.accuracy_drop_se, "n_eval": patch.n_eval,
                      "max_accuracy_drop": config.max_accuracy_drop,
                      "accuracy_within_bound": _accuracy_within_bound(patch, config),
                      "fresh_flagged_classes": list(fresh.flagged_classes) if fresh else None}
    meta = {"run_id": run_id, "gate_version": __version__, "seconds": round(seconds, 2), "policy": config.policy,
            "alias": config.alias, "tracking_uri": mlflow.get_tracking_uri()}
    out = workdir / "report"
    json_path, html_path = write_report(out, model_name=ref.name, version=ref.version, verdict=verdict,
                                        scan=scan_result, strip=strip, patch=patch_view, errors=errors, meta=meta)
    mlflow.log_artifacts(str(out), artifact_path="report")
    report = json.loads(Path(json_path).read_text())
    return report, mlflow.get_artifact_uri("report")
