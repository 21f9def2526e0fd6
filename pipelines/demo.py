"""`trojan-gate demo`: the whole job on a local SQLite MLflow store, in a few minutes on 2 CPU cores.

1. the lab trains two "third-party" Fashion-MNIST classifiers: a benign one and a BadNets
   trojan (white patch, target 0), and exports them as ONNX;
2. intake registers both (status pending);
3. the gate scans each with black-box DeepInspect: the benign one passes, gets its run-time
   check (student disagreement + hidden features), a guarded model and the alias; the trojan is flagged, blocked, and (policy
   `patch`) a patched copy is registered, scanned afresh and promoted in its place only if
   it is clean and within the accuracy bound;
4. `mlflow models serve` serves the guarded model of the version that holds the alias, and
   clean and trigger-stamped images go over REST.

Each step prints its verdict and where its HTML report is. `--server` runs the same flow through
a real `mlflow server` (SQLite backend, served artifacts) started on loopback, as a platform team
would run it; the MLflow UI then shows each gate run's report at the printed URL. The demo scans as the gate does by
default: the held-out images are the substitute set and train three benign reference models
(about a minute per scan on 2 cores). `--no-use-heldout` scans from model inversion alone, the
paper's data-free test, in seconds; on this 2-epoch trojan it misses the trigger (instance
score 1.57 against the threshold 2), one of the limits the README lists.
"""
from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

HELP = "end-to-end demo: lab models → intake → gate (scan, block/patch, STRIP) → serve guarded model → REST"


def add_arguments(p):
    p.add_argument("--workdir", default="trojan-gate-demo", help="where the store, artifacts and reports go")
    p.add_argument("--tracking-uri", help="default: sqlite:///WORKDIR/mlflow.db")
    p.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    p.add_argument("--epochs", type=int, default=None, help="lab training epochs (default 2; digits 30)")
    p.add_argument("--heldout-size", type=int, default=2000, help="labelled held-out images the gate gets")
    p.add_argument("--requests", type=int, default=300, help="clean and stamped images each sent over REST")
    p.add_argument("--no-use-heldout", action="store_true",
                   help="scan from model inversion alone (the paper's test; faster, misses this trojan)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", help="gate settings file (TOML, as `gate --config`); the demo sets each gate's policy")
    p.add_argument("--server", action="store_true",
                   help="run through a real `mlflow server` on loopback (SQLite backend in WORKDIR/server)")


def _say(msg):
    print(f"[demo] {msg}", flush=True)


def _report_copy(outcome, work: Path, name: str) -> Path | None:
    """A local copy of the gate's HTML report (the original is an artifact of the gate run)."""
    import mlflow

    if not outcome.report_uri:
        return None
    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=outcome.report_uri,
                                                     dst_path=str(work / "reports" / name)))
    return local / "trojan_report.html"


def _gate(label, ref, heldout, config, work):
    from trojan_gate.plugins.gate import run_gate

    _say(f"gate {label}: scanning {ref.uri} (policy {config.policy})")
    out = run_gate(ref.uri, heldout, config)
    s = out.report.get("summary", {})
    _say(f"gate {label}: verdict {out.verdict.upper()}; flagged classes {s.get('flagged_classes')}, "
         f"instance score {s.get('instance_score')} (threshold {s.get('threshold')}); "
         f"alias {config.alias} -> {out.final or 'none'}" + (f"; error: {out.error}" if out.error else ""))
    patch = out.report.get("patch")
    if patch:
        b, a = patch["before"], patch["after"]
        _say(f"gate {label}: patch {'PASSED' if patch.get('passed') else 'FAILED'}: activation of the generated "
             f"triggers {b['trojan_activation_rate']:.1%} -> {a['trojan_activation_rate']:.1%}, clean accuracy "
             f"{b['clean_accuracy']:.1%} -> {a['clean_accuracy']:.1%}, fresh scan flags "
             f"{patch.get('fresh_flagged_classes')}")
    html = _report_copy(out, work, f"{ref.name}-v{ref.version}")
    if html is not None:
        _say(f"gate {label}: report {html}")
    from trojan_gate.plugins.registry import version_tags

    ui = version_tags(ref).get("trojan_gate.report.url")
    if ui:
        _say(f"gate {label}: report in the MLflow UI: {ui}")
    return out


def _config(args, policy: str):
    """The gate settings (`--config`, else the defaults) with the demo's policy for this model."""
    from trojan_gate.plugins.gate import GateConfig

    doc = GateConfig.from_toml(args.config).to_dict() if args.config else GateConfig().to_dict()
    doc["gate"]["policy"] = policy
    if args.no_use_heldout:
        doc["scan"]["use_heldout"] = False
    return GateConfig.from_dict(doc)


def run(args) -> int:
    import contextlib

    if args.config:
        _config(args, "block")  # a bad settings file stops here, before anything is trained or written

    with contextlib.ExitStack() as stack:
        if args.server:
            from trojan_gate.plugins.automation.server import tracking_server

            args.tracking_uri = stack.enter_context(tracking_server(Path(args.workdir).resolve() / "server"))
            _say(f"`mlflow server` on {args.tracking_uri} (SQLite backend, served artifacts)")
        return _run(args)


def _run(args) -> int:
    import numpy as np

    from trojan_gate.gates.data import Dataset
    from trojan_gate.gates.lab import LabConfig, load_lab_data, train_lab_model
    from trojan_gate.plugins.registry import configure_tracking, ensure_experiment, intake_onnx, resolve, version_tags
    from trojan_gate.plugins.serving import invoke, served_model

    t_start = time.perf_counter()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(work / "reports", ignore_errors=True)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(var, None)  # under `mlflow run` the demo keeps its own store
    from trojan_gate.plugins.signing import SIGNING_KEY_ENV, VERIFY_KEY_ENV, generate_keypair, keypair_paths

    if not os.environ.get(SIGNING_KEY_ENV):  # the demo signs its releases with a key pair of its own
        private, public = keypair_paths(work / "keys")
        if not (private.is_file() and public.is_file()):
            private, public = generate_keypair(work / "keys")
        os.environ[SIGNING_KEY_ENV], os.environ[VERIFY_KEY_ENV] = str(private), str(public)
        _say(f"signing releases with {private} (verified with {public})")
    uri = configure_tracking(args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}")
    for exp in ("trojan-gate-intake", "trojan-gate-gate"):  # a server keeps the artifacts itself
        ensure_experiment(exp, artifact_location=None if args.server else (work / "mlartifacts" / exp).as_uri())
    _say(f"MLflow store: {uri}")

    # 1. two third-party models
    train, test = load_lab_data(args.dataset, args.seed)
    digits = args.dataset == "digits"
    common = dict(arch="small", epochs=args.epochs or (30 if digits else 2), batch_size=64 if digits else 128)
    labs = {}
    for label, cfg in (("benign", LabConfig(trigger="none", seed=args.seed + 1, **common)),
                       ("trojaned", LabConfig(trigger="patch", targets=(0,), seed=args.seed, **common))):
        _say(f"lab: training a {label} {args.dataset} classifier")
        labs[label] = train_lab_model(train, test, cfg, progress=False)
        asr = labs[label].attack_success_rate
        _say(f"lab: {label}: clean accuracy {labs[label].clean_accuracy:.3f}"
             + (f", attack success rate {asr:.3f} (white patch -> class 0)" if asr is not None else ""))

    rng = np.random.default_rng(args.seed)
    idx = rng.permutation(len(test))
    n_held = min(args.heldout_size, len(test) // 2)
    heldout = test.subset(idx[:n_held])
    heldout.save_npz(work / "heldout.npz")
    rest = idx[n_held:]

    # 2. intake, 3. gate
    refs = {label: intake_onnx(labs[label].save(work / f"{label}.onnx"), f"vendor-{label}",
                               source=f"trojan-gate lab ({label}, demo third party)") for label in labs}
    for label, ref in refs.items():
        _say(f"intake: registered {ref.uri} (status {version_tags(ref)['trojan_gate.status']})")
    outcomes = {"benign": _gate("benign", refs["benign"], heldout, _config(args, "block"), work),
                "trojaned": _gate("trojaned", refs["trojaned"], heldout, _config(args, "patch"), work)}

    # 4. serve the guarded model of the version the alias points at, and talk REST to it
    served = outcomes["trojaned"].final or outcomes["benign"].final
    summary = {"tracking_uri": uri, "verdicts": {k: o.verdict for k, o in outcomes.items()},
               "final": {k: o.final for k, o in outcomes.items()}}
    if served is not None:
        guarded = version_tags(resolve(served))["trojan_gate.guarded_model"]
        clean = test.subset(rest[:args.requests])
        victims = rest[~np.isin(test.y[rest], (0,))][:args.requests]
        stamped = Dataset(labs["trojaned"].stamp(test.x[victims]), test.y[victims])
        _say(f"serve: `mlflow models serve -m {guarded}` on 127.0.0.1 (the guarded model of {served})")
        with served_model(guarded, tracking_uri=uri, log_path=str(work / "serve.log")) as url:
            preds = {k: [p for i in range(0, len(d), 100) for p in invoke(url, d.x[i:i + 100])]
                     for k, d in (("clean", clean), ("stamped", stamped))}
        flags = {k: np.array([p["is_trojaned"] for p in v]) for k, v in preds.items()}
        hijacked = float(np.mean([p["label"] == 0 for p in preds["stamped"]]))
        _say(f"REST: {len(flags['clean'])} clean inputs, {int(flags['clean'].sum())} flagged "
             f"(measured FRR {flags['clean'].mean():.2%})")
        _say(f"REST: {len(flags['stamped'])} inputs stamped with the true trigger: {hijacked:.1%} still reach "
             f"class 0, {int(flags['stamped'].sum())} flagged by the run-time check")
        summary.update(served=guarded, frr_measured=float(flags["clean"].mean()), stamped_hijacked=hijacked,
                       stamped_flagged=float(flags["stamped"].mean()))
    else:
        _say("serve: no version holds the alias, nothing to serve")
    summary["seconds"] = round(time.perf_counter() - t_start, 1)
    (work / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0
