"""Research: one- vs two-sided entropy beside the student disagreement, lab zoo (tuning set), full N."""
import numpy as np, torch
torch.set_num_threads(1)
from trojan_gate.gates import ModelOracle
from trojan_gate.gates.data import load_fashion_mnist, default_cache_dir
from trojan_gate.gates.lab import make_trigger
from trojan_gate.gates.runtime.detector import RuntimeCheck
from trojan_gate.gates.runtime.check import leave_one_out_min_p
from trojan_gate.pipelines.benchmarks.zoo import RUNTIME_MODELS, ZOO
CACHE = default_cache_dir() / "runtime-students"
test = load_fashion_mnist(False)
idx = np.random.default_rng([0, 11]).permutation(len(test))
held, clean, rest = idx[:4000], idx[4000:6000], idx[6000:]
cal = held[2000:]
def pv(ref, v, high=False):
    ref = np.sort(ref)
    if high: return (len(ref) - np.searchsorted(ref, v, side="left") + 1) / (len(ref) + 1)
    return (np.searchsorted(ref, v, side="right") + 1) / (len(ref) + 1)
for trig in RUNTIME_MODELS:
    e = ZOO[RUNTIME_MODELS[trig]]
    m = ModelOracle(open(CACHE / f'lab-{trig}-e2.onnx','rb').read())
    stud = open(CACHE / f'stud-src-{trig}-e2.onnx','rb').read()
    t = make_trigger(e.trigger, (1, 28, 28)); targets = list(e.targets)
    troj = rest[~np.isin(test.y[rest], targets)][:2000]
    xt = t.apply(test.x[troj]); xt = xt[np.isin(m.predict(xt), targets)]
    rc = RuntimeCheck(m, reference=stud, stages=(), seed=0, progress=False).fit(test.x[cal], test.y[cal])
    b = rc.stage_values_[10]
    out = {}
    for name, z in (("clean", test.x[clean]), ("troj", xt)):
        out[name] = rc._stage_statistics(z)[10]
    res = []
    for two in (False, True):
        # calibration: leave-one-out approximated by the full benign set (n=2000)
        def score(v):
            pe = pv(b["entropy"], v["entropy"])
            if two: pe = np.minimum(1, 2 * np.minimum(pe, pv(b["entropy"], v["entropy"], high=True)))
            return np.minimum(pe, pv(b["reference"], v["reference"]))
        thr = np.quantile(score(b), 0.01, method="lower")
        res.append("%s FRR %.4f FAR %.4f" % ("two-sided" if two else "one-sided", (score(out["clean"]) <= thr).mean(), (score(out["troj"]) > thr).mean()))
    print(trig, " | ".join(res), flush=True)
