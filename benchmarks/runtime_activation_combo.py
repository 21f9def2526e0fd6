"""Penultimate-activation Mahalanobis beside the distilled student's JS (students cached by benchmarks/runtime_student_ensemble.py at 3b6493d):
each alone and min-p of the two, FAR at FRR 1% (lab zoo)."""
import json, sys
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from trojan_gate.gates import ModelOracle
from trojan_gate.gates.data import default_cache_dir, load_fashion_mnist
from trojan_gate.gates.lab import train_lab_model
from trojan_gate.gates.runtime.evidence import js_bits
from trojan_gate.pipelines.benchmarks.zoo import RUNTIME_MODELS, ZOO, lab_config
from runtime_activation_check import hidden_session, feats, Maha

def pvals(cal, x):  # high score = suspicious; p = share of calibration at least as high
    cal = np.sort(cal)
    return (1 + len(cal) - np.searchsorted(cal, x, side="left")) / (len(cal) + 1)

if __name__ == "__main__":
    epochs, seed = 2, 0
    train, test = load_fashion_mnist(True, limit=30000, seed=0), load_fashion_mnist(False)
    idx = np.random.default_rng([seed, 11]).permutation(len(test))
    held, clean, rest = idx[:4000], idx[4000:6000], idx[6000:]
    fit_part, cal_part = held[:2000], held[2000:]
    cal_a, cal_b = cal_part[:1000], cal_part[1000:]  # a: the p-value nulls, b: the min-p threshold
    out = open("benchmarks/runtime-activation-combo.jsonl", "a")
    for trig in sys.argv[1].split(","):
        cfg = lab_config(ZOO[RUNTIME_MODELS[trig]], epochs, seed=seed)
        lab = train_lab_model(train, test, cfg, progress=False, threads=1)
        oracle = ModelOracle(lab.onnx_bytes)
        stud = ModelOracle((default_cache_dir() / "runtime-student-ensemble" / f"{trig}-e{epochs}-s0.onnx").read_bytes())
        targets = list(cfg.targets)
        troj = rest[~np.isin(test.y[rest], targets)][:2000]
        x_tr = lab.stamp(test.x[troj]); eff = np.isin(oracle.predict(x_tr), targets)
        sets = {"fit": test.x[fit_part], "a": test.x[cal_a], "b": test.x[cal_b], "clean": test.x[clean], "trig": x_tr[eff]}
        s, outs = hidden_session(lab.onnx_bytes)
        pm = {k: oracle.predict_proba(v) for k, v in sets.items()}
        pr = {k: stud.predict_proba(v) for k, v in sets.items()}
        F = {k: feats(s, outs, v)[-1] for k, v in sets.items()}
        m = Maha().fit(F["fit"], pm["fit"].argmax(1), 10)
        act = {k: m.score(F[k], pm[k].argmax(1)) for k in sets}
        ref = {k: js_bits(pm[k], pr[k]) for k in sets}
        row = {"trigger": trig, "n_trig": int(eff.sum())}
        for name, sc in (("activation", act), ("reference", ref)):
            t = np.quantile(np.concatenate([sc["a"], sc["b"]]), 0.99, method="higher")
            row[name] = (float(np.mean(sc["clean"] > t)), float(np.mean(sc["trig"] > t)))
        mp = {k: np.minimum(pvals(act["a"], act[k]), pvals(ref["a"], ref[k])) for k in ("b", "clean", "trig")}
        q = np.quantile(mp["b"], 0.01, method="lower")
        row["min_p"] = (float(np.mean(mp["clean"] < q)), float(np.mean(mp["trig"] < q)))
        print(json.dumps(row), flush=True); out.write(json.dumps(row) + "\n"); out.flush()
