"""Which per-input statistics separate trigger-stamped from clean inputs (FAR at FRR 1%, one stat at a time)."""
import sys, time, json
import numpy as np
import torch
from trojan_gate.gates import ModelOracle, Strip
from trojan_gate.gates.data import load_fashion_mnist
from trojan_gate.gates.lab import LabConfig, train_lab_model
from trojan_gate.gates.runtime.evidence import copy_statistics, family_flip, js_bits
from trojan_gate.gates.runtime.families import FAMILIES, family_copies
from trojan_gate.gates.runtime.purifier import Purifier, train_purifier
from trojan_gate.gates.strip.draws import detector_key

torch.set_num_threads(2)
arch = sys.argv[1] if len(sys.argv) > 1 else "small"
epochs = int(sys.argv[2]) if len(sys.argv) > 2 else 2
seed = int(sys.argv[3]) if len(sys.argv) > 3 else 0
TRIG = {"patch": ("patch", (0,)), "pattern": ("pattern", (0,)), "blend": ("blend", (0,)),
        "watermark": ("watermark", (0,)), "multi3": ("patch", (1, 4, 7)), "multi5": ("patch", (0, 2, 3, 6, 8))}
train = load_fashion_mnist(True, limit=30000, seed=0); test = load_fashion_mnist(False)
idx = np.random.default_rng([seed, 11]).permutation(len(test))
held, clean_i, rest = idx[:2000], idx[2000:3000], idx[3000:]
t0 = time.time()
pur = Purifier(train_purifier(test.x[held], epochs=15, seed=seed, threads=2))
print(f"purifier trained {time.time()-t0:.0f}s", flush=True)
res = {}
for name, (kind, targets) in TRIG.items():
    lab = train_lab_model(train, test, LabConfig(arch=arch, trigger=kind, targets=targets, epochs=epochs, seed=seed),
                          progress=False, threads=2)
    o = ModelOracle(lab.onnx_bytes)
    troj_i = rest[~np.isin(test.y[rest], targets)][:1000]
    xs = {"held": test.x[held], "clean": test.x[clean_i], "troj": lab.stamp(test.x[troj_i])}
    eff = np.isin(o.predict(xs["troj"]), targets)
    det = Strip(o, n_perturbations=10, progress=False).fit(test.x[held])
    key = detector_key(0, o.sha256)
    stats = {}
    for k, x in xs.items():
        ps = o.predict_proba(x)
        pc = o.predict_proba(det.perturb(x)).reshape(len(x), 10, -1)
        st = copy_statistics(ps, pc)
        for fam in FAMILIES:
            cp = family_copies(fam, x, key)
            pf = o.predict_proba(cp.reshape((-1,) + x.shape[1:])).reshape(len(x), cp.shape[1], -1)
            st[f"{fam}_flip"] = family_flip(ps, pf)
        st["purify_js"] = -js_bits(ps, o.predict_proba(pur.purify(x)))
        # flips: high = benign?  orientation: low = trojan for all; flip stats are high for benign -> ok
        stats[k] = st
    out = {"acc": lab.clean_accuracy, "asr": lab.attack_success_rate, "eff": float(eff.mean())}
    for s in stats["held"]:
        thr = np.quantile(stats["held"][s], 0.01)
        out[s] = (float((stats["clean"][s] <= thr).mean()), float((stats["troj"][s][eff] > thr).mean()))
    res[name] = out
    print(name, json.dumps({k: (v if not isinstance(v, tuple) else f"FRR {v[0]:.3f} FAR {v[1]:.3f}") for k, v in out.items()}), flush=True)
json.dump(res, open(f"/tmp/exp24/explore_{arch}_{epochs}_{seed}.json", "w"), indent=1)
