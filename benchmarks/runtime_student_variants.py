"""Research (issue: run-time check, second design): distilled students against the labels reference on the
lab zoo, the tuning set. Usage: python benchmarks/runtime_student_variants.py EPOCHS TRIGGERS VARIANTS
(variants: ref = labels reference, src = student on source labels, query = student on the model's answers
on augmented images, noover = source labels without overlays). Per variant: agreement with the model on
clean inputs, the reference's own attack success (inheritance), FRR/FAR of each disagreement score alone
(js, pm_ref = log f(x)[argmax r(x)], pr_model = log r(x)[argmax f(x)]) and of the check at full N."""
import json, sys, time, hashlib
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(1)
from trojan_gate.gates import ModelOracle, Strip
from trojan_gate.gates.data import Dataset, load_fashion_mnist
from trojan_gate.gates.classifier_training import train_reference
from trojan_gate.gates.lab import train_lab_model
from trojan_gate.gates.runtime.student import distil_student
from trojan_gate.gates.runtime.detector import RuntimeCheck
from trojan_gate.gates.runtime.evidence import js_bits
from trojan_gate.pipelines.benchmarks.zoo import RUNTIME_MODELS, ZOO, lab_config

from trojan_gate.gates.data import default_cache_dir
CACHE = default_cache_dir() / "runtime-students"; CACHE.mkdir(parents=True, exist_ok=True)
epochs = int(sys.argv[1]) if len(sys.argv) > 1 else 2
triggers = sys.argv[2].split(",") if len(sys.argv) > 2 else list(RUNTIME_MODELS)
variants = sys.argv[3].split(",") if len(sys.argv) > 3 else ["ref", "src", "query", "noover"]
seed = 0
train, test = load_fashion_mnist(True, limit=30000, seed=0), load_fashion_mnist(False)
idx = np.random.default_rng([seed, 11]).permutation(len(test))
held, clean, rest = idx[:4000], idx[4000:6000], idx[6000:]
ref_part, cal_part = held[:2000], held[2000:]

def cached(name, fn):
    p = CACHE / name
    if p.exists(): return p.read_bytes()
    b = fn(); p.write_bytes(b); return b

def thr_rates(cal, cl, tr, frr=0.01):  # low = trojan-like
    t = np.quantile(cal, frr, method="lower")
    return float(np.mean(cl <= t)), float(np.mean(tr > t))

out = open("benchmarks/runtime-student-variants.jsonl", "a")
for trig in triggers:
    e = ZOO[RUNTIME_MODELS[trig]]
    mp = CACHE / f"lab-{trig}-e{epochs}.onnx"
    cfg = lab_config(e, epochs, seed=seed)
    lab = train_lab_model(train, test, cfg, progress=False, threads=1)
    if not mp.exists(): mp.write_bytes(lab.onnx_bytes)
    oracle = ModelOracle(lab.onnx_bytes)
    targets = list(cfg.targets)
    troj = rest[~np.isin(test.y[rest], targets)][:2000]
    x_cl, x_tr = test.x[clean], lab.stamp(test.x[troj])
    eff = np.isin(oracle.predict(x_tr), targets); x_eff = x_tr[eff]
    pm_cal, pm_cl, pm_tr = (oracle.predict_proba(z) for z in (test.x[cal_part], x_cl, x_eff))
    for v in variants:
        t0 = time.perf_counter()
        if v == "ref":
            ref = cached(f"ref-s{seed}.onnx", lambda: train_reference(Dataset(test.x[ref_part], test.y[ref_part]), 10, epochs=40, seed=seed)[0])
        else:
            kw = {"src": {}, "query": {"labels": "query"}, "noover": {"overlay_share": 0.0}}[v]
            ref = cached(f"stud-{v}-{trig}-e{epochs}.onnx", lambda: distil_student(oracle, test.x[ref_part], seed=seed, **kw))
        secs = time.perf_counter() - t0
        ro = ModelOracle(ref)
        pr_cal, pr_cl, pr_tr = (ro.predict_proba(z) for z in (test.x[cal_part], x_cl, x_eff))
        agree = float((pr_cl.argmax(1) == pm_cl.argmax(1)).mean())
        inherit = float(np.isin(pr_tr.argmax(1), targets).mean())
        row = {"trigger": trig, "epochs": epochs, "variant": v, "train_s": round(secs, 1), "agree_clean": agree,
               "student_asr": inherit, "ref_acc": float((pr_cl.argmax(1) == test.y[clean]).mean()),
               "model_acc": float((pm_cl.argmax(1) == test.y[clean]).mean()), "n_eff": int(eff.sum())}
        def pm_of_ref(pm, pr): return np.log(pm[np.arange(len(pm)), pr.argmax(1)] + 1e-12)
        for name, f in {"js": lambda pm, pr: -js_bits(pm, pr), "pm_ref": pm_of_ref,
                        "pr_model": lambda pm, pr: np.log(pr[np.arange(len(pr)), pm.argmax(1)] + 1e-12)}.items():
            row[name] = thr_rates(f(pm_cal, pr_cal), f(pm_cl, pr_cl), f(pm_tr, pr_tr))
        rc = RuntimeCheck(oracle, reference=ref, seed=seed, progress=False).fit(test.x[cal_part], test.y[cal_part]).infer_threshold(0.01)
        c, t = rc.predict(x_cl, adaptive=False), rc.predict(x_eff, adaptive=False)
        row["check"] = (float(c["data"]["is_trojaned"].mean()), float(1 - t["data"]["is_trojaned"].mean()))
        print(json.dumps(row), flush=True); out.write(json.dumps(row) + "\n"); out.flush()
