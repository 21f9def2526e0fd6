"""Exploration (not part of the product): MNTD free queries vs stamp probes on the cached shadow pool, scored on the vendor-zoo models that exist. Usage: python benchmarks/metascan_explore.py N_SHADOWS stamp|mntd EPOCHS [scale=S] [short=1]"""
import json, sys, time, glob, numpy as np, torch
torch.set_num_threads(1)
from trojan_gate.pipelines.benchmarks.vendor_zoo import heldout_split
from trojan_gate.gates.metascan.shadows import build_pool, split_heldout
from trojan_gate.gates.metascan.calibration import _split, target_matrix, conformal_threshold, conformal_p_value
from trojan_gate.gates.metascan.meta import QueryMetaClassifier
from trojan_gate.gates.metascan.probes import StampProbeMeta
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.pipelines.benchmarks.detection import roc_auc
from trojan_gate.gates.data import default_cache_dir
CACHE = default_cache_dir()
held, _ = heldout_split()
n = int(sys.argv[1]); kind = sys.argv[2]; epochs = int(sys.argv[3]); extra = dict(a.split("=") for a in sys.argv[4:])
pool, summ = build_pool(held, n, str(CACHE / "shadows"), families=("patch", "blend", "watermark", "warp"), progress=False, deadline=time.monotonic())
if extra.get("short"): extra.pop("short"); pool = [s for s in pool if s.spec["steps"] <= 800]
print(summ["kept"], "shadows", summ["benign"], summ["trojaned"], "failed", summ["failed_trojans"])
fit, cal = _split(pool, 0.3, 0)
t = time.perf_counter()
if kind == "mntd":
    meta = QueryMetaClassifier(epochs=epochs, progress=False, **{k: int(v) for k, v in extra.items()}).fit([s.model for s in fit], [s.trojaned for s in fit], target_matrix(fit, 10), (1, 28, 28))
else:
    tr, _ = split_heldout(held, 0)
    rng = np.random.default_rng(0)
    per = int(extra.pop("per_class", 2))
    idx = np.concatenate([rng.choice(np.flatnonzero(tr.y == c), per, replace=False) for c in range(10)])
    meta = StampProbeMeta(epochs=epochs, progress=False, n_images=len(idx), **{k: int(v) for k, v in extra.items()}).fit([s.model for s in fit], [s.trojaned for s in fit], target_matrix(fit, 10), tr.x[idx], tr.y[idx])
print(kind, "meta fit", round(time.perf_counter() - t, 1), "s; loss", [round(l, 3) for l in meta.loss_[::10]], "queries", len(meta.queries_))
sc, csc = meta.score_answers(meta.answers_of([s.model for s in cal]))
lab = np.array([s.trojaned for s in cal])
null = np.sort(sc[~lab]); alpha = 0.05 if len(null) >= 19 else 0.1; thr = conformal_threshold(null, alpha)
print("cal AUC", round(roc_auc(sc[~lab], sc[lab]), 3), "alpha", alpha, "thr", round(thr, 2), "power", round(float((sc[lab] > thr).mean()), 3))
fams = {}
for s, v in zip(cal, sc):
    if s.trojaned: fams.setdefault(s.family + "/" + s.spec["trojan"]["attack"], []).append(v > thr)
print({k: f"{sum(v)}/{len(v)}" for k, v in sorted(fams.items())})
cnull = csc[~lab]
hits, top = [], []
for i, s in enumerate(cal):
    if not s.trojaned or s.spec["trojan"]["attack"] == "all": continue
    z = (csc[i] - np.median(cnull, 0)) / (cnull.std(0) + 1e-9)
    order = np.argsort(-z)
    top.append(set(s.targets) <= set(order[:len(s.targets)]))
print("cal shadows: true targets = top-|T| classes by z", f"{sum(top)}/{len(top)}")
vz = []
for path in sorted(glob.glob(str(CACHE / "vendor-zoo" / "*.onnx"))):
    m = json.loads(open(path[:-5] + ".json").read())["summary"]
    a = ModelOracle(path).predict_proba(meta.queries_)
    s, cs = meta.score_answers(a[None])
    z = (cs[0] - np.median(cnull, 0)) / (cnull.std(0) + 1e-9)
    p = float(conformal_p_value(null, s[0]))
    vz.append((m, s[0]))
    print(f"{m['name']:24s} acc {m['clean_accuracy']:.3f} asr {m['attack_success']} score {s[0]:7.2f} p {p:.3f} {'FLAG' if s[0] > thr else '    '} targets {m['targets']} top-z {list(np.argsort(-z)[:3])}")
b = [s for m, s in vz if not m["targets"]]; t = [s for m, s in vz if m["targets"]]
print("vendor AUC", round(roc_auc(b, t), 3), len(b), len(t))
