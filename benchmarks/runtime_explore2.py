"""Second pass: a clean reference classifier trained on half of the held-out set (disagreement with the
served model), the purifier, continuous family statistics, and min-p combinations (FAR at FRR 1%)."""
import sys, time, json
import numpy as np
import torch
from trojan_gate.gates import ModelOracle, Strip
from trojan_gate.gates.data import load_fashion_mnist, Dataset
from trojan_gate.gates.lab import LabConfig, train_lab_model
from trojan_gate.gates.deepinspect.reference import train_reference
from trojan_gate.gates.runtime.evidence import copy_statistics, js_bits
from trojan_gate.gates.runtime.families import family_copies
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
fit_i, cal_i = held[:1000], held[1000:]
t0 = time.time()
ref_bytes, ref_acc = train_reference(test.subset(fit_i), 10, epochs=40, seed=seed)
ref = ModelOracle(ref_bytes)
print(f"reference acc(train) {ref_acc:.3f}, test acc {(ref.predict(test.x[clean_i]) == test.y[clean_i]).mean():.3f}, {time.time()-t0:.0f}s", flush=True)
res = {}
for name, (kind, targets) in TRIG.items():
    lab = train_lab_model(train, test, LabConfig(arch=arch, trigger=kind, targets=targets, epochs=epochs, seed=seed),
                          progress=False, threads=2)
    o = ModelOracle(lab.onnx_bytes)
    troj_i = rest[~np.isin(test.y[rest], targets)][:1000]
    xs = {"cal": test.x[cal_i], "clean": test.x[clean_i], "troj": lab.stamp(test.x[troj_i])}
    eff = np.isin(o.predict(xs["troj"]), targets)
    det = Strip(o, n_perturbations=10, progress=False).fit(test.x[held])
    key = detector_key(0, o.sha256)
    stats = {}
    for k, x in xs.items():
        ps = o.predict_proba(x)
        lab_ = ps.argmax(1)
        pc = o.predict_proba(det.perturb(x)).reshape(len(x), 10, -1)
        st = copy_statistics(ps, pc)
        pr = ref.predict_proba(x)
        st["ref_agree"] = pr[np.arange(len(x)), lab_]          # low = trojan
        st["ref_js"] = -js_bits(ps, pr)                         # low = trojan
        for fam in ("scale", "noise"):
            cp = family_copies(fam, x, key)
            pf = o.predict_proba(cp.reshape((-1,) + x.shape[1:])).reshape(len(x), cp.shape[1], -1)
            st[f"{fam}_keep"] = 1.0 - pf[np.arange(len(x)), :, lab_].mean(1)   # low = trojan (label kept)
        stats[k] = st
    out = {"acc": lab.clean_accuracy, "asr": lab.attack_success_rate, "eff": float(eff.mean())}
    names = list(stats["cal"])
    # p-values from the calibration set (one-sided, low = suspicious)
    def pvals(s, v):
        c = np.sort(stats["cal"][s])
        return (np.searchsorted(c, v, side="right") + 1) / (len(c) + 1)
    for s in names:
        thr = np.quantile(stats["cal"][s], 0.01)
        out[s] = (float((stats["clean"][s] <= thr).mean()), float((stats["troj"][s][eff] > thr).mean()))
    for combo in (("entropy", "ref_agree"), ("entropy", "dispersion", "ref_agree"), ("entropy", "ref_js"),
                  ("entropy", "dispersion", "ref_agree", "scale_keep")):
        mp = {k: np.min([pvals(s, stats[k][s]) for s in combo], axis=0) for k in xs}
        thr = np.quantile(mp["cal"], 0.01)
        out["+".join(combo)] = (float((mp["clean"] <= thr).mean()), float((mp["troj"][eff] > thr).mean()))
    res[name] = out
    print(name, json.dumps({k: (v if not isinstance(v, tuple) else f"{v[0]:.3f}/{v[1]:.3f}") for k, v in out.items()}), flush=True)
json.dump(res, open(f"/tmp/exp24/explore2_{arch}_{epochs}_{seed}.json", "w"), indent=1)
