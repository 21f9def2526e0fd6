"""Exploration (issue: calibrated scan, evidence): the black-box max-margin statistic of explore_mmbd.py measured
on the calibration pool's own shadows, as the per-class null a product would use, then applied to the test zoo.

Per model, rho_k = r_k / median_j r_j (r_k: class k's reachable margin, explore_mmbd.statistic); per class, the
benign shadows of one half give mean and sd of rho_k; a model's score is max_k z_k, its target argmax_k z_k; the
threshold is the 95th percentile of the other half's benign scores (false-block rate 5%).

usage: python benchmarks/explore_mmbd_shadows.py N_SPECS  (the first N specs of the benchmark's pool, seed 0)"""
import glob
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch

N = int(sys.argv[1])
sys.argv = sys.argv[:1] + ["150", "16", "3", "14"]  # explore_mmbd reads its settings from argv
sys.path.insert(0, str(Path(__file__).parent))
import explore_mmbd as mm  # noqa: E402
from trojan_gate.gates.metascan import shadows as sh  # noqa: E402
from trojan_gate.gates.metascan.triggers import FAMILIES  # noqa: E402
from trojan_gate.pipelines.benchmarks.vendor_zoo import heldout_split  # noqa: E402
from tqdm import tqdm  # noqa: E402

CACHE = Path("cache/shadows")
OUT = Path("cache/mmbd-shadows")
OUT.mkdir(parents=True, exist_ok=True)


class TorchOracle:
    def __init__(self, model):
        self.model, self.queries = model.eval(), 0

    def predict_proba(self, x):
        self.queries += len(x)
        with torch.no_grad():
            return torch.cat([torch.softmax(self.model(torch.from_numpy(x[i:i + 4096])), 1)
                              for i in range(0, len(x), 4096)]).double().numpy()


def pool(n):
    held, _ = heldout_split()
    train, evaluation = sh.split_heldout(held, 0)
    rng = np.random.default_rng([0, 7001])
    fams = [f for f in FAMILIES if f != "sparse"]
    specs = [sh.sample_shadow(rng, i % 2 == 1, 10, ["small", "deep"], fams, sh.ATTACKS, index=i, seed=0) for i in range(n)]
    data_sha = sh.heldout_sha256(held)
    keys = [sh.shadow_key(s, data_sha) for s in specs]
    CACHE.mkdir(parents=True, exist_ok=True)
    missing = [(s, k) for s, k in zip(specs, keys) if not all(p.exists() for p in sh._paths(CACHE, k))]
    bar = tqdm(total=len(missing), desc="shadows")
    sh._train_missing(missing, CACHE, train, evaluation, 10, 2, None, bar)
    bar.close()
    return keys


def shadow_rows(keys):
    rows = []
    torch.set_num_threads(2)
    for key in tqdm(keys, desc="max margins"):
        out = OUT / f"{key}.json"
        if not out.exists():
            w, m = sh._paths(CACHE, key)
            s = sh._load(w, json.loads(m.read_text()), (1, 28, 28), 10)
            t0 = time.time()
            r = mm.statistic(TorchOracle(s.model))
            tro = s.spec["trojan"]
            out.write_text(json.dumps({"r": r.tolist(), "trojaned": s.trojaned, "family": s.family,
                                       "targets": [] if tro is None else tro.get("targets", []),
                                       "attack": None if tro is None else tro.get("attack"),
                                       "asr": s.attack_success, "arch": s.spec["arch"],
                                       "seconds": round(time.time() - t0, 1)}))
        rows.append(json.loads(out.read_text()))
    return rows


def rho(r):
    r = np.mean(r, axis=1)
    return r / np.median(r)


def main():
    keys = pool(N)
    rows = [r for r in shadow_rows(keys) if not r["trojaned"] or (r["asr"] or 0) >= 0.5]
    ben = [r for r in rows if not r["trojaned"]]
    fit, cal = ben[0::2], ben[1::2]
    null = np.array([rho(r["r"]) for r in fit])
    mu, sd = null.mean(0), null.std(0) + 1e-6

    def score(r):
        z = (rho(r) - mu) / sd
        return float(z.max()), int(z.argmax())

    thr = float(np.quantile([score(r["r"])[0] for r in cal], 0.95))
    print(f"{len(ben)} benign shadows ({len(fit)} null, {len(cal)} threshold), threshold {thr:.2f}")
    tro = [r for r in rows if r["trojaned"]]
    by = {}
    for r in tro:
        s, k = score(r["r"])
        d = by.setdefault(r["family"] + "/" + str(r["attack"]), [0, 0, 0])
        d[0] += 1
        d[1] += s > thr
        d[2] += s > thr and k in r["targets"]
    print("trojaned shadows (n, flagged, flagged on a true target):", by)
    zoo = {}
    for p in sorted(glob.glob("cache/mmbd/*-150-16-3-14.json")):
        z = json.loads(Path(p).read_text())
        s, k = score(z["r"])
        zoo[z["name"]] = (s, k)
        print(f"{z['name']:24s} score {s:6.2f} class {k} targets {z['targets']} {'FLAG' if s > thr else ''}")
    Path("cache/mmbd-zoo-scores.json").write_text(json.dumps({"threshold": thr, "zoo": zoo}))


if __name__ == "__main__":
    main()
