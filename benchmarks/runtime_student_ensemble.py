"""Exploration (run-time check, second design): does an ensemble of K distilled students agree with the served
model more often on clean inputs, and so tighten the disagreement null, than one student? Lab zoo only
(the tuning set). Usage: python benchmarks/runtime_student_ensemble.py TRIGGERS K (e.g. watermark,blend 5)"""
import json, sys, time
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from trojan_gate.gates import ModelOracle
from trojan_gate.gates.data import default_cache_dir, load_fashion_mnist
from trojan_gate.gates.lab import train_lab_model
from trojan_gate.gates.runtime.student import distil_student
from trojan_gate.gates.runtime.evidence import js_bits
from trojan_gate.pipelines.benchmarks.zoo import RUNTIME_MODELS, ZOO, lab_config

if __name__ == "__main__":
    CACHE = default_cache_dir() / "runtime-student-ensemble"; CACHE.mkdir(parents=True, exist_ok=True)
    triggers, K = sys.argv[1].split(","), int(sys.argv[2])
    epochs, seed = 2, 0
    train, test = load_fashion_mnist(True, limit=30000, seed=0), load_fashion_mnist(False)
    idx = np.random.default_rng([seed, 11]).permutation(len(test))
    held, clean, rest = idx[:4000], idx[4000:6000], idx[6000:]
    ref_part, cal_part = held[:2000], held[2000:]
    out = open("benchmarks/runtime-student-ensemble.jsonl", "a")
    for trig in triggers:
        e = ZOO[RUNTIME_MODELS[trig]]
        cfg = lab_config(e, epochs, seed=seed)
        lab = train_lab_model(train, test, cfg, progress=False, threads=1)
        oracle = ModelOracle(lab.onnx_bytes)
        targets = list(cfg.targets)
        troj = rest[~np.isin(test.y[rest], targets)][:2000]
        x_tr = lab.stamp(test.x[troj])
        eff = np.isin(oracle.predict(x_tr), targets); x_eff = x_tr[eff]
        sets = {"cal": test.x[cal_part], "clean": test.x[clean], "trig": x_eff}
        pm = {k: oracle.predict_proba(v) for k, v in sets.items()}
        probs = []
        for s in range(K):
            p = CACHE / f"{trig}-e{epochs}-s{s}.onnx"
            t0 = time.perf_counter()
            if not p.exists():
                p.write_bytes(distil_student(oracle, test.x[ref_part], seed=s))
            ro = ModelOracle(p.read_bytes())
            probs.append({k: ro.predict_proba(v) for k, v in sets.items()})
            print(trig, "student", s, round(time.perf_counter() - t0, 1), "s", flush=True)
        for k in sorted({1, 2, 3, K}):
            for how in ("js-to-mean", "mean-js"):
                if how == "js-to-mean":
                    pr = {n: np.mean([q[n] for q in probs[:k]], 0) for n in sets}
                    score = {n: -js_bits(pm[n], pr[n]) for n in sets}
                else:
                    score = {n: -np.mean([js_bits(pm[n], q[n]) for q in probs[:k]], 0) for n in sets}
                    pr = {n: np.mean([q[n] for q in probs[:k]], 0) for n in sets}
                t = np.quantile(score["cal"], 0.01, method="lower")
                row = {"trigger": trig, "k": k, "how": how,
                       "agree_clean": float((pr["clean"].argmax(1) == pm["clean"].argmax(1)).mean()),
                       "inherited": float(np.isin(pr["trig"].argmax(1), targets).mean()),
                       "frr": float(np.mean(score["clean"] <= t)), "far": float(np.mean(score["trig"] > t)),
                       "n_trig": int(len(x_eff))}
                print(json.dumps(row), flush=True); out.write(json.dumps(row) + "\n"); out.flush()
