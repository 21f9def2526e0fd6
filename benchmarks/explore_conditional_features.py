"""Exploration (issue: run-time check, second design): the served model's hidden features judged against what a
clean model sees. Lab zoo only (the tuning set). Per lab model: the student is distilled on the reference half
(as the product's check), the served model's hidden features h(x) and the student's hidden features g(x) are read
on the reference half, and candidate statistics (low = trojan-like) are joined with the student's disagreement in
a min-p test whose threshold is the 1% quantile on the calibration half. FAR on the stamped inputs the model sends
to a target, FRR on 2,000 other clean inputs.
  act     -d(h, mu_f)   Mahalanobis from the class mean of the served model's label (today's statistic)
  act_r   -d(h, mu_r)   ... from the class mean of the *student's* label
  resid   -Mahalanobis of h - A [g, 1] (ridge regression of the served features on the student's)
  resid_p -Mahalanobis of h - A [log r, 1]
Usage: python explore_conditional_features.py SEED ARCHS OUT.jsonl"""
import json, sys
from types import SimpleNamespace
import numpy as np

def mahal_fit(e):
    cov = e.T @ e / len(e); cov += 1e-3 * np.trace(cov) / len(cov) * np.eye(len(cov)); return np.linalg.inv(cov)

def ridge(X, Y, lam=1e-2):
    X1 = np.hstack([X, np.ones((len(X), 1))]); G = X1.T @ X1
    return np.linalg.solve(G + lam * np.trace(G) / len(G) * np.eye(len(G)), X1.T @ Y)

def app(X, A): return np.hstack([X, np.ones((len(X), 1))]) @ A

if __name__ == "__main__":
    import torch
    from trojan_gate.gates import ModelOracle
    from trojan_gate.gates.runtime.activations import ClassFeatureNull, HiddenFeatures
    from trojan_gate.gates.runtime.evidence import js_bits
    from trojan_gate.gates.runtime.student import distil_student
    from trojan_gate.pipelines.benchmarks.runtime_models import lab_subjects
    from trojan_gate.pipelines.benchmarks.zoo import RUNTIME_MODELS
    torch.set_num_threads(2)
    seed, archs, out_path = int(sys.argv[1]), sys.argv[2], sys.argv[3]
    trig = sys.argv[4] if len(sys.argv) > 4 else ",".join(RUNTIME_MODELS)
    args = SimpleNamespace(triggers=trig, archs=archs, epochs=2, train_limit=30000, heldout=4000,
                           n_eval=2000, seed=seed, threads=2)
    for s in lab_subjects(args):
        oracle = ModelOracle(s.onnx)
        (ref_x, _), (cal_x, _) = s.halves()
        eff = np.isin(oracle.predict(s.stamped_x), s.targets)
        student = HiddenFeatures(distil_student(oracle, ref_x, seed=seed))
        def feats(x):
            p, h = oracle.proba_and_hidden(x); r, g = student(x); return p, h, r, g
        p0, h0, r0, g0 = feats(ref_x)
        null = ClassFeatureNull().fit(h0, p0.argmax(1), oracle.n_classes)
        A = ridge(g0, h0); P = mahal_fit(h0 - app(g0, A))
        lr0 = np.log(np.clip(r0, 1e-6, 1)); B = ridge(lr0, h0); Q = mahal_fit(h0 - app(lr0, B))
        def stats(x):
            p, h, r, g = feats(x); lr = np.log(np.clip(r, 1e-6, 1))
            e, u = h - app(g, A), h - app(lr, B)
            return {"ref": -js_bits(p, r), "act": null.statistic(h, p.argmax(1)), "act_r": null.statistic(h, r.argmax(1)),
                    "resid": -np.sum((e @ P) * e, 1), "resid_p": -np.sum((u @ Q) * u, 1)}
        cal, clean, stamped = stats(cal_x), stats(s.clean_x), stats(s.stamped_x[eff])
        row = {"trigger": s.trigger, "arch": s.arch, "seed": seed, "n_stamped": int(eff.sum()),
               "agreement": float((p0.argmax(1) == r0.argmax(1)).mean())}
        def pv(name, v): return (np.searchsorted(np.sort(cal[name]), v, side="right") + 1) / (len(cal[name]) + 1)
        for combo in (("ref",), ("act",), ("act_r",), ("resid",), ("resid_p",), ("ref", "act"), ("ref", "act_r"),
                      ("ref", "resid"), ("ref", "resid_p"), ("ref", "act", "resid"), ("ref", "act", "act_r")):
            mp = lambda d: np.min([pv(k, d[k]) for k in combo], 0)
            thr = np.quantile(mp(cal), 0.01)
            row["+".join(combo)] = [round(float((mp(clean) <= thr).mean()), 4), round(float(1 - (mp(stamped) <= thr).mean()), 4)]
        print(json.dumps(row), flush=True)
        open(out_path, "a").write(json.dumps(row) + "\n")
