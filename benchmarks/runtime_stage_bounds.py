"""Research: adaptive-N stage sets and stage-bound rules on the lab zoo (tuning set), with the students of
`runtime_student_variants.py` (its cache). Prints FRR / FAR / model calls per clean input for each."""
import numpy as np, torch, json, sys
from trojan_gate.gates.data import default_cache_dir
CACHE = default_cache_dir() / "runtime-students"
torch.set_num_threads(1)
from trojan_gate.gates import ModelOracle
from trojan_gate.gates.data import load_fashion_mnist
from trojan_gate.gates.lab import make_trigger
from trojan_gate.gates.runtime.detector import RuntimeCheck
from trojan_gate.gates.runtime.check import calibrate
from trojan_gate.pipelines.benchmarks.zoo import RUNTIME_MODELS, ZOO
test = load_fashion_mnist(False)
idx = np.random.default_rng([0, 11]).permutation(len(test))
held, clean, rest = idx[:4000], idx[4000:6000], idx[6000:]
cal = held[2000:]
settings = [("max x1.5", 1.0, 1.5), ("max", 1.0, 1.0), ("q.9", .9, 1.0), ("q.75", .75, 1.0), ("q.5", .5, 1.0)]
stage_sets = [(2, 4), (2,), (1, 3)]
for trig in RUNTIME_MODELS:
    e = ZOO[RUNTIME_MODELS[trig]]
    m = ModelOracle(open(CACHE / f'lab-{trig}-e2.onnx','rb').read())
    stud = open(CACHE / f'stud-src-{trig}-e2.onnx','rb').read()
    trig_obj = make_trigger(e.trigger, (1, 28, 28))
    targets = list(e.targets)
    troj = rest[~np.isin(test.y[rest], targets)][:2000]
    xt = trig_obj.apply(test.x[troj]); xt = xt[np.isin(m.predict(xt), targets)]
    for st in stage_sets:
        rc = RuntimeCheck(m, reference=stud, stages=st, seed=0, progress=False).fit(test.x[cal], test.y[cal]).infer_threshold(0.01)
        full_c = rc.predict(test.x[clean], adaptive=False)["data"]["is_trojaned"].mean()
        for name, q, mg in settings:
            rc.calibration_ = calibrate(rc.stage_values_, 0.01, rc.stages, margin=mg, stage_quantile=q)
            c = rc.predict(test.x[clean]); t = rc.predict(xt)
            print(trig, st, name, "FRR %.4f FAR %.4f calls %.2f (full-N FRR %.4f)" % (c["data"]["is_trojaned"].mean(), 1 - t["data"]["is_trojaned"].mean(), c["data"]["model_calls"].mean(), full_c), flush=True)
