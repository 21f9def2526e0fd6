"""Exploration (issue: calibrated scan, 6-conv gap): a forward-only patch search statistic.
Per model and class t: the largest share of B held-out images (true class != t) that one candidate square
patch (sizes S, grid positions, fixed contents) sends to t. Benign shadows give per-class nulls; a model's
score is min_t p_t against them. Measured on the cached shadows (by family) and on the test zoo."""
import json, sys, time, glob
from pathlib import Path
import numpy as np, torch
torch.set_num_threads(2)
from trojan_gate.gates.architectures import build_model
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.pipelines.benchmarks.vendor_zoo import heldout_split

B, SIZES, STRIDE = int(sys.argv[1]), tuple(int(s) for s in sys.argv[2].split(",")), int(sys.argv[3])
held, ev = heldout_split()
rng = np.random.default_rng(7)
idx = rng.choice(len(held.x), B, replace=False)
X, Y = held.x[idx].astype(np.float32), held.y[idx]
H = W = 28
contents = []
for s in SIZES:
    ii, jj = np.meshgrid(np.arange(s), np.arange(s), indexing="ij")
    cs = [np.ones((s, s)), np.zeros((s, s)), ((ii + jj) % 2).astype(float), 1 - ((ii + jj) % 2)]
    cs += [rng.random((s, s)) for _ in range(2)]
    contents.append(cs)
cands = []  # (size, r, c, content)
for si, s in enumerate(SIZES):
    for r in range(0, H - s + 1, STRIDE):
        for c in range(0, W - s + 1, STRIDE):
            for k in range(len(contents[si])):
                cands.append((si, s, r, c, k))
print(f"{len(cands)} candidates x {B} images = {len(cands) * B} queries", flush=True)

def stamped(chunk):
    out = np.repeat(X[None], len(chunk), axis=0)  # (C, B, 1, H, W)
    for j, (si, s, r, c, k) in enumerate(chunk):
        out[j, :, 0, r:r + s, c:c + s] = contents[si][k]
    return out.reshape(-1, 1, H, W)

def statistic(predict):
    reach = np.zeros(10)
    for a in range(0, len(cands), 64):
        chunk = cands[a:a + 64]
        lab = predict(stamped(chunk)).reshape(len(chunk), B)
        for t in range(10):
            m = Y != t
            reach[t] = max(reach[t], (lab[:, m] == t).mean(axis=1).max())
    return reach

def torch_predict(model):
    def f(x):
        with torch.no_grad():
            return model(torch.from_numpy(x)).argmax(1).numpy()
    return f

out = {}
res_path = Path(f"cache/patch_search_B{B}_{sys.argv[2]}_{STRIDE}.json")
if res_path.exists():
    out = json.loads(res_path.read_text())
t0 = time.time()
for p in sorted(glob.glob("cache/vendor-zoo/*.onnx")):
    name = Path(p).stem
    if "zoo:" + name in out:
        continue
    o = ModelOracle(p)
    summ = json.loads(Path(p[:-5] + ".json").read_text())["summary"]
    t1 = time.time()
    out["zoo:" + name] = {"arch": summ["arch"], "family": summ["family"], "targets": list(summ["targets"]),
                          "reach": statistic(lambda x: o.predict_proba(x).argmax(1)).tolist(), "seconds": time.time() - t1}
    res_path.write_text(json.dumps(out))
for meta_path in sorted(glob.glob("cache/shadows/*.json")):
    key = Path(meta_path).stem
    if key in out:
        continue
    meta = json.loads(Path(meta_path).read_text())
    spec = meta["spec"]
    if spec["trojan"] is not None and (meta["attack_success"] or 0) < 0.5:
        continue
    model = build_model(spec["arch"], (1, 28, 28), 10, spec["width"])
    model.load_state_dict(torch.load(meta_path[:-5] + ".pt", weights_only=True, map_location="cpu"))
    model.eval()
    out[key] = {"arch": spec["arch"], "family": "benign" if spec["trojan"] is None else spec["trojan"]["stamp"]["family"],
                "targets": [] if spec["trojan"] is None else spec["trojan"]["targets"], "reach": statistic(torch_predict(model)).tolist(),
                "acc": meta["clean_accuracy"]}
    if len(out) % 20 == 0:
        res_path.write_text(json.dumps(out)); print(len(out), f"{time.time() - t0:.0f}s", flush=True)
res_path.write_text(json.dumps(out))
print("done", f"{time.time() - t0:.0f}s")
