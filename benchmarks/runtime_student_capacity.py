"""Research: does a longer-trained or larger student agree better with the lab watermark model and catch more?
Usage: python benchmarks/runtime_student_capacity.py TRIGGERS JSON_KWARGS... (students cached by runtime_student_variants.py)."""
import json, sys, time
import numpy as np, torch
torch.set_num_threads(1)
from trojan_gate.gates import ModelOracle
from trojan_gate.gates.data import load_fashion_mnist, default_cache_dir
from trojan_gate.gates.lab import make_trigger
from trojan_gate.gates.runtime.detector import RuntimeCheck
from trojan_gate.gates.runtime.evidence import js_bits
from trojan_gate.gates.runtime.student import distil_student
from trojan_gate.pipelines.benchmarks.zoo import RUNTIME_MODELS, ZOO
CACHE = default_cache_dir() / "runtime-students"
test = load_fashion_mnist(False)
idx = np.random.default_rng([0, 11]).permutation(len(test))
held, clean, rest = idx[:4000], idx[4000:6000], idx[6000:]
ref_part, cal = held[:2000], held[2000:]
for trig in sys.argv[1].split(","):
    e = ZOO[RUNTIME_MODELS[trig]]
    m = ModelOracle(open(CACHE / f'lab-{trig}-e2.onnx','rb').read())
    t = make_trigger(e.trigger, (1, 28, 28)); targets = list(e.targets)
    troj = rest[~np.isin(test.y[rest], targets)][:2000]
    xt = t.apply(test.x[troj]); xt = xt[np.isin(m.predict(xt), targets)]
    for name, kw in [(v, json.loads(v)) for v in sys.argv[2:]]:
        t0 = time.perf_counter(); st = distil_student(m, test.x[ref_part], seed=0, **kw); secs = time.perf_counter() - t0
        so = ModelOracle(st)
        agree = (so.predict(test.x[clean]) == m.predict(test.x[clean])).mean()
        jc = js_bits(m.predict_proba(test.x[cal]), so.predict_proba(test.x[cal])); thr = np.quantile(-jc, 0.01, method="lower")
        far_js = np.mean(-js_bits(m.predict_proba(xt), so.predict_proba(xt)) > thr)
        rc = RuntimeCheck(m, reference=st, seed=0, progress=False).fit(test.x[cal], test.y[cal]).infer_threshold(0.01)
        c, tr = rc.predict(test.x[clean], False), rc.predict(xt, False)
        print(trig, name, "s %.0f agree %.3f sASR %.3f js FAR %.3f check FRR %.4f FAR %.4f" % (secs, agree, np.isin(so.predict(xt), targets).mean(), far_js, c["data"]["is_trojaned"].mean(), 1 - tr["data"]["is_trojaned"].mean()), flush=True)
