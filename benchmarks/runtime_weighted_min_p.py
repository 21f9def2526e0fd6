"""Research: weighted min-p (FRR budget split between entropy and the student), lab zoo (tuning set), full N."""
import numpy as np, torch
torch.set_num_threads(1)
from trojan_gate.gates import ModelOracle
from trojan_gate.gates.data import load_fashion_mnist, default_cache_dir
from trojan_gate.gates.lab import make_trigger
from trojan_gate.gates.runtime.detector import RuntimeCheck
from trojan_gate.pipelines.benchmarks.zoo import RUNTIME_MODELS, ZOO
CACHE = default_cache_dir() / "runtime-students"
test = load_fashion_mnist(False)
idx = np.random.default_rng([0, 11]).permutation(len(test))
held, clean, rest = idx[:4000], idx[4000:6000], idx[6000:]
cal = held[2000:]
def pv(ref, v):
    ref = np.sort(ref); return (np.searchsorted(ref, v, side="right") + 1) / (len(ref) + 1)
for trig in RUNTIME_MODELS:
    e = ZOO[RUNTIME_MODELS[trig]]
    m = ModelOracle(open(CACHE / f'lab-{trig}-e2.onnx','rb').read())
    stud = open(CACHE / f'stud-src-{trig}-e2.onnx','rb').read()
    t = make_trigger(e.trigger, (1, 28, 28)); targets = list(e.targets)
    troj = rest[~np.isin(test.y[rest], targets)][:2000]
    xt = t.apply(test.x[troj]); xt = xt[np.isin(m.predict(xt), targets)]
    rc = RuntimeCheck(m, reference=stud, stages=(), seed=0, progress=False).fit(test.x[cal], test.y[cal])
    b = rc.stage_values_[10]
    ev = {n: rc._stage_statistics(z)[10] for n, z in (("clean", test.x[clean]), ("troj", xt))}
    res = []
    for w in (0.5, 0.7, 0.8, 0.9, 1.0):
        def score(v):
            pr = pv(b["reference"], v["reference"]) / w
            pe = pv(b["entropy"], v["entropy"]) / (1 - w) if w < 1 else np.full(len(pr), np.inf)
            return np.minimum(pe, pr)
        thr = np.quantile(score(b), 0.01, method="lower")
        res.append("w_ref %.1f FRR %.4f FAR %.4f" % (w, (score(ev["clean"]) <= thr).mean(), (score(ev["troj"]) > thr).mean()))
    print(trig, " | ".join(res), flush=True)
