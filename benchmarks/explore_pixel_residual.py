"""Exploration (issue: run-time check, second design): is a low-contrast overlay visible in pixel space?

PCA residual energy of an input, fitted on 2,000 clean Fashion-MNIST test images: global, under the
labelled class (target class for stamped inputs) and the minimum over classes; share of stamped inputs
under the clean 99th percentile (FAR at FRR 1%). Triggers: the lab watermark and six watermark draws of
the shadow family (tuning set only). No model is queried."""
import numpy as np, sys
from trojan_gate.gates.data import load_fashion_mnist
from trojan_gate.gates.lab import make_trigger
from trojan_gate.gates.metascan.triggers import Stamp, sample_stamp
te = load_fashion_mnist(False)
rng = np.random.default_rng(0)
idx = rng.permutation(len(te.y)); fit, ev = idx[:2000], idx[2000:6000]
X = te.x.reshape(len(te.y), -1).astype(np.float64); y = te.y
Xf, yf = X[fit], y[fit]
def stats(k):
    mu = Xf.mean(0); U = np.linalg.svd(Xf - mu, full_matrices=False)[2][:k]
    cls = []
    for c in range(10):
        Z = Xf[yf == c]; m = Z.mean(0); V = np.linalg.svd(Z - m, full_matrices=False)[2][:k]; cls.append((m, V))
    def glob(Z):
        R = (Z - mu) - (Z - mu) @ U.T @ U; return (R**2).sum(1)
    def percls(Z, lab):
        out = np.empty(len(Z))
        for c in range(10):
            s = lab == c
            if s.any():
                m, V = cls[c]; R = (Z[s]-m) - (Z[s]-m) @ V.T @ V; out[s] = (R**2).sum(1)
        return out
    def minc(Z):
        return np.min([percls(Z, np.full(len(Z), c)) for c in range(10)], 0)
    return glob, percls, minc
triggers = {"lab-wm": make_trigger("watermark", (1, 28, 28)).apply}
r = np.random.default_rng(5)
for i in range(6):
    s = sample_stamp(r, "watermark"); triggers[f"sh-{s['shape']}-a{s['alpha']:.2f}-e{s['extent']:.2f}-{'b' if s['bright'] else 'd'}"] = Stamp(s, (1, 28, 28)).apply
for k in (10, 30, 60):
    g, p, mn = stats(k)
    Xe, ye = X[ev], y[ev]
    for name, fn in triggers.items():
        tgt = 0
        src = ye != tgt
        Xt = fn(te.x[ev][src]).reshape(src.sum(), -1).astype(np.float64)
        res = []
        for sname, f, fl in (("global", g, lambda Z, l: g(Z)), ("class", p, p), ("min", mn, lambda Z, l: mn(Z))):
            c = fl(Xe, ye); t = fl(Xt, np.full(len(Xt), tgt))
            thr = np.quantile(c, 0.99); res.append(f"{sname} {100*(t<=thr).mean():5.1f}%")
        print(k, name, " | ".join(res), flush=True)
