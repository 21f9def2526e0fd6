"""Exploration (issue: run-time check, second design): an *amplified* copy as evidence. A faint bright overlay that
only tips an image to the target should tip it harder when faint structure is strengthened: per input with served
label t = argmax f(x), the statistic -(log f_t(T(x)) - log f_t(x)) (low = trojan-like) for T a gamma curve x^g
(g < 1 lifts faint pixels) or a local contrast stretch; alone, and beside the student (JS) in the min-p at FRR 1%.
Lab zoo only (the tuning set). Usage: python explore_amplified_copy.py SEED ARCHS TRIGGERS OUT.jsonl"""
import json, sys
from types import SimpleNamespace
import numpy as np

TRANSFORMS = {"gamma0.5": lambda x: np.sqrt(x), "gamma0.7": lambda x: x ** 0.7, "gamma2": lambda x: x ** 2}

if __name__ == "__main__":
    import torch
    from trojan_gate.gates import ModelOracle
    from trojan_gate.gates.runtime.activations import ClassFeatureNull
    from trojan_gate.gates.runtime.evidence import js_bits
    from trojan_gate.gates.runtime.student import distil_student
    from trojan_gate.pipelines.benchmarks.runtime_models import lab_subjects
    torch.set_num_threads(1)
    seed, archs, trig, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]
    args = SimpleNamespace(triggers=trig, archs=archs, epochs=2, train_limit=30000, heldout=4000, n_eval=2000,
                           seed=seed, threads=1)
    for s in lab_subjects(args):
        o = ModelOracle(s.onnx)
        (rx, _), (cx, _) = s.halves()
        eff = np.isin(o.predict(s.stamped_x), s.targets)
        st = ModelOracle(distil_student(o, rx, seed=seed))
        p0, h0 = o.proba_and_hidden(rx)
        null = ClassFeatureNull().fit(h0, p0.argmax(1), o.n_classes)
        def stats(x):
            p, h = o.proba_and_hidden(x); t = p.argmax(1); lp = np.log(np.clip(p[np.arange(len(t)), t], 1e-12, 1))
            out = {"ref": -js_bits(p, st.predict_proba(x)), "act": null.statistic(h, t)}
            for name, T in TRANSFORMS.items():
                q = o.predict_proba(T(x).astype(np.float32))
                out[name] = -(np.log(np.clip(q[np.arange(len(t)), t], 1e-12, 1)) - lp)
            return out
        cal, clean, stamped = stats(cx), stats(s.clean_x), stats(s.stamped_x[eff])
        row = {"trigger": s.trigger, "arch": s.arch, "seed": seed, "n_stamped": int(eff.sum())}
        def pv(k, v): return (np.searchsorted(np.sort(cal[k]), v, side="right") + 1) / (len(cal[k]) + 1)
        combos = [("ref",), ("ref", "act")] + [(k,) for k in TRANSFORMS] + [("ref", "act", k) for k in TRANSFORMS] \
            + [("ref", k) for k in TRANSFORMS] + [("ref", "act", "gamma0.5", "gamma2")]
        for combo in combos:
            mp = lambda d: np.min([pv(k, d[k]) for k in combo], 0)
            thr = np.quantile(mp(cal), 0.01)
            row["+".join(combo)] = [round(float((mp(clean) <= thr).mean()), 4), round(float(1 - (mp(stamped) <= thr).mean()), 4)]
        print(json.dumps(row), flush=True)
        open(out_path, "a").write(json.dumps(row) + "\n")
