"""Exploration (run-time check, second design): does a statistic from the model's answer on a copy of x whose
faint, thin structure is suppressed (T) add to the check? On the lab zoo (the check's tuning set), seed 0:
per model and T, clean agreement of f(T(x)) with f(x), the trojan's ASR on T(stamped), and FRR / FAR at preset
FRR 1% of the min-p of {entropy, reference} (today), {entropy, reference, T}, {reference, T} and T alone."""
import sys, os, pickle
import numpy as np, torch
torch.set_num_threads(2)
from scipy.ndimage import median_filter, grey_opening
from trojan_gate.gates.data import load_fashion_mnist
from trojan_gate.gates.lab import train_lab_model
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.runtime import RuntimeCheck
from trojan_gate.gates.runtime.check import calibrate
from trojan_gate.gates.runtime.evidence import js_bits
from trojan_gate.pipelines.benchmarks.zoo import RUNTIME_MODELS, ZOO, lab_config

def floor(t):
    return lambda x: np.clip((x - t) / (1 - t), 0, 1).astype(np.float32)
T = {"median3": lambda x: median_filter(x, size=(1, 1, 3, 3)).astype(np.float32),
     "open2": lambda x: grey_opening(x, size=(1, 1, 2, 2)).astype(np.float32),
     "gamma2": lambda x: (x ** 2).astype(np.float32), "floor0.3": floor(0.3)}
cache = "cache/lab-models.pkl"
models = pickle.load(open(cache, "rb")) if os.path.exists(cache) else {}
train, test = load_fashion_mnist(True, limit=30000, seed=0), load_fashion_mnist(False)
idx = np.random.default_rng([0, 11]).permutation(len(test))
held, clean, rest = idx[:4000], idx[4000:6000], idx[6000:]
N = 10
for trig in sys.argv[1].split(","):
    if trig not in models:
        cfg = lab_config(ZOO[RUNTIME_MODELS[trig]], 2, arch="small", seed=0)
        lab = train_lab_model(train, test, cfg, progress=False, threads=2)
        models[trig] = (lab.onnx_bytes, list(cfg.targets), lab.trigger)
        pickle.dump(models, open(cache, "wb"))
    onnx, targets, trigger = models[trig]
    o = ModelOracle(onnx)
    troj = rest[~np.isin(test.y[rest], targets)][:2000]
    st = trigger.apply(test.x[troj])
    hij = np.isin(o.predict(st), targets)
    st = st[hij]
    chk = RuntimeCheck(o, seed=0).fit(test.x[held], test.y[held])
    cal_vals = chk.stage_values_[N]
    clean_vals = chk._stage_statistics(test.x[clean])[N]
    st_vals = chk._stage_statistics(st)[N]
    bank = chk.bank_
    print(f"{trig}: ASR {hij.mean():.3f}, student agreement {chk.reference_agreement_:.3f}", flush=True)
    for name, t in [("none", None)] + list(T.items()):
        sets = [("entropy", "reference")]
        if t is not None:
            for vals, x in ((cal_vals, bank), (clean_vals, test.x[clean]), (st_vals, st)):
                vals[name] = -js_bits(o.predict_proba(x), o.predict_proba(t(x)))
            agree = (o.predict(t(test.x[clean])) == o.predict(test.x[clean])).mean()
            asr_t = np.isin(o.predict(t(st)), targets).mean()
            sets = [("entropy", "reference", name), ("reference", name), (name,)]
            print(f"  {name}: clean agreement {agree:.3f}, ASR on T(stamped) {asr_t:.3f}", flush=True)
        for s in sets:
            c = calibrate({N: {k: cal_vals[k] for k in s}}, 0.01, ())
            frr = np.mean(c.combined(N, {k: clean_vals[k] for k in s}) <= c.threshold)
            far = np.mean(c.combined(N, {k: st_vals[k] for k in s}) > c.threshold)
            print(f"    {'+'.join(s):28s} FRR {frr:.4f} FAR {far:.4f}", flush=True)
