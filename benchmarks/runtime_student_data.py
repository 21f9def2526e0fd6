"""Research: is the student's clean agreement bounded by its distillation data? Lab zoo (tuning set)."""
import sys, time, numpy as np, torch
torch.set_num_threads(1)
from trojan_gate.gates import ModelOracle
from trojan_gate.gates.data import load_fashion_mnist, default_cache_dir
from trojan_gate.gates.lab import make_trigger
from trojan_gate.gates.runtime.detector import RuntimeCheck
from trojan_gate.gates.runtime.student import distil_student
from trojan_gate.pipelines.benchmarks.zoo import RUNTIME_MODELS, ZOO
CACHE = default_cache_dir() / "runtime-students"
test, train = load_fashion_mnist(False), load_fashion_mnist(True)
idx = np.random.default_rng([0, 11]).permutation(len(test))
held, clean, rest = idx[:4000], idx[4000:6000], idx[6000:]
ref_part, cal = held[:2000], held[2000:]
extra = train.x[np.random.default_rng(5).permutation(len(train.x))[:8000]]
for trig in sys.argv[1].split(","):
    e = ZOO[RUNTIME_MODELS[trig]]
    m = ModelOracle(open(CACHE / f'lab-{trig}-e2.onnx','rb').read())
    t = make_trigger(e.trigger, (1, 28, 28)); targets = list(e.targets)
    troj = rest[~np.isin(test.y[rest], targets)][:2000]
    xt = t.apply(test.x[troj]); xt = xt[np.isin(m.predict(xt), targets)]
    for n_extra in (0, 2000, 6000):
        x = np.concatenate([test.x[ref_part], extra[:n_extra]])
        t0 = time.perf_counter(); st = distil_student(m, x, seed=0); secs = time.perf_counter() - t0
        so = ModelOracle(st)
        rc = RuntimeCheck(m, reference=st, stages=(), seed=0, progress=False).fit(test.x[cal], test.y[cal]).infer_threshold(0.01)
        c, tr = rc.predict(test.x[clean], False), rc.predict(xt, False)
        print(trig, len(x), "s %.0f agree %.3f sASR %.3f check FRR %.4f FAR %.4f" % (secs, (so.predict(test.x[clean]) == m.predict(test.x[clean])).mean(), np.isin(so.predict(xt), targets).mean(), c["data"]["is_trojaned"].mean(), 1 - tr["data"]["is_trojaned"].mean()), flush=True)
