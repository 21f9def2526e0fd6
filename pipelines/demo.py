"""`trojan-gate demo`: the whole STRIP job end to end on a local SQLite MLflow store.

1. the lab trains a BadNets-trojaned Fashion-MNIST classifier (white patch, target 0) and
   exports ONNX (the "third-party model");
2. intake registers it (status pending);
3. calibrate validates held-out data, fits the STRIP boundary at the preset FRR, attaches
   it to the version and registers the guarded pyfunc;
4. `mlflow models serve` serves the guarded model on loopback;
5. clean and trigger-stamped test images go over REST; the demo prints FRR / FAR and
   which inputs the server flagged.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

HELP = "end-to-end demo: lab trojan → intake → STRIP calibrate → serve guarded model → REST checks"


def add_arguments(p):
    p.add_argument("--workdir", default="trojan-gate-demo", help="where the store, artifacts and files go")
    p.add_argument("--tracking-uri", help="default: sqlite:///WORKDIR/mlflow.db")
    p.add_argument("--dataset", choices=["fashion-mnist", "digits"], default="fashion-mnist")
    p.add_argument("--trigger", choices=["patch", "checker", "pattern", "blend"], default="patch")
    p.add_argument("--target", type=int, default=0)
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--frr", type=float, default=0.01)
    p.add_argument("--n", type=int, default=10)
    p.add_argument("--heldout-size", type=int, default=2000)
    p.add_argument("--requests", type=int, default=500, help="clean and stamped images each sent over REST")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--name", default=None, help="registered model name (default: DATASET-classifier)")


def _say(msg):
    print(f"[demo] {msg}", flush=True)


def run(args) -> int:
    import numpy as np

    from trojan_gate.gates.data import Dataset
    from trojan_gate.gates.lab import LabConfig, train_lab_model
    from trojan_gate.pipelines.lab import load_lab_data
    from trojan_gate.plugins.calibration import calibrate_registered
    from trojan_gate.plugins.registry import configure_tracking, ensure_experiment, intake_onnx
    from trojan_gate.plugins.serving import invoke, served_model

    t_start = time.perf_counter()
    work = Path(args.workdir).resolve()
    work.mkdir(parents=True, exist_ok=True)
    for var in ("MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID", "MLFLOW_EXPERIMENT_NAME"):
        os.environ.pop(var, None)  # under `mlflow run` the demo keeps its own store
    uri = configure_tracking(args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}")
    for exp in ("trojan-gate-intake", "trojan-gate-calibrate"):
        ensure_experiment(exp, artifact_location=(work / "mlartifacts" / exp).as_uri())
    _say(f"MLflow store: {uri}")

    # 1. the third-party model
    train, test = load_lab_data(args.dataset, args.seed)
    digits = args.dataset == "digits"
    cfg = LabConfig(arch="small", trigger=args.trigger, targets=(args.target,), seed=args.seed,
                    epochs=args.epochs or (30 if digits else 2), batch_size=64 if digits else 128)
    _say(f"lab: training a {args.trigger}-trojaned {args.dataset} classifier (target {args.target})")
    lab = train_lab_model(train, test, cfg)
    onnx_path = lab.save(work / "third_party_model.onnx")
    _say(f"lab: clean accuracy {lab.clean_accuracy:.3f}, attack success rate {lab.attack_success_rate:.3f}")

    rng = np.random.default_rng(args.seed)
    idx = rng.permutation(len(test))
    n_held = min(args.heldout_size, len(test) // 2)
    heldout = test.subset(idx[:n_held])
    rest = idx[n_held:]
    clean = test.subset(rest[:args.requests])
    victims = rest[~np.isin(test.y[rest], cfg.targets)][:args.requests]
    stamped = Dataset(lab.stamp(test.x[victims]), test.y[victims], test.classes, "stamped")
    heldout.save_npz(work / "heldout.npz")

    # 2. intake, 3. calibrate
    ref = intake_onnx(onnx_path, args.name or f"{args.dataset}-classifier", source="trojan-gate lab (demo third party)")
    _say(f"intake: registered {ref.uri} (status pending)")
    outcome = calibrate_registered(ref, heldout, frr=args.frr, n_perturbations=args.n, seed=args.seed)
    d = outcome.detector
    _say(f"calibrate: boundary {d.threshold_:.4f} (benign entropy mean {d.mean_:.3f}, std {d.std_:.3f}, "
         f"FRR {args.frr:.2%}, N={d.n_perturbations}, blend {d.blend}); guarded model {outcome.guarded.uri}")

    # 4. serve, 5. REST
    _say(f"serve: starting `mlflow models serve -m {outcome.guarded.uri}` on 127.0.0.1")
    with served_model(outcome.guarded.uri, tracking_uri=uri, log_path=str(work / "serve.log")) as url:
        _say(f"serve: answering at {url}")
        flags = {}
        for label, ds in (("clean", clean), ("stamped", stamped)):
            preds = []
            for i in range(0, len(ds), 100):
                preds += invoke(url, ds.x[i:i + 100])
            flags[label] = preds
        reject = invoke(url, stamped.x[:5], params={"policy": "reject"})
    clean_flag = np.array([p["trojan_suspected"] for p in flags["clean"]])
    stamp_flag = np.array([p["trojan_suspected"] for p in flags["stamped"]])
    stamp_label = np.array([p["label"] for p in flags["stamped"]])
    frr, far = float(clean_flag.mean()), float(1 - stamp_flag.mean())
    hijacked = float(np.isin(stamp_label, cfg.targets).mean())
    _say(f"REST: {len(clean_flag)} clean inputs, {int(clean_flag.sum())} flagged → measured FRR {frr:.2%}")
    _say(f"REST: {len(stamp_flag)} trigger-stamped inputs ({hijacked:.1%} hijacked to the target), "
         f"{int(stamp_flag.sum())} flagged → measured FAR {far:.2%}")
    _say("first flagged inputs: " + ", ".join(
        f"stamped#{i} (label {flags['stamped'][i]['label']}, entropy {flags['stamped'][i]['entropy']:.3f})"
        for i in np.flatnonzero(stamp_flag)[:5]))
    _say("policy=reject on 5 stamped inputs → labels " + str([p["label"] for p in reject]))
    summary = {"model_uri": ref.uri, "guarded_model": outcome.guarded.uri, "tracking_uri": uri,
               "clean_accuracy": lab.clean_accuracy, "attack_success_rate": lab.attack_success_rate,
               "boundary": float(d.threshold_), "frr_preset": args.frr, "frr_measured": frr, "far_measured": far,
               "n_clean": int(len(clean_flag)), "n_stamped": int(len(stamp_flag)),
               "seconds": round(time.perf_counter() - t_start, 1)}
    (work / "demo_summary.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))
    return 0
