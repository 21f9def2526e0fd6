"""Experiment: do other reference models remove the zoo's false positives? (results: reference-variants.md)

The scan's reference models are small CNNs trained on the held-out images' labels (~100 per
class). Models trained on the full training set find some classes (bag) much easier to reach,
so a benign model can look trojaned on that class. This script scans a zoo model as the gate
does, then trains three *other* reference models on the same held-out split and re-runs the
double-MAD test on the scanned model's statistics normalised by them:

- labels ``oracle``: distilled from the scanned model's probabilities (queried through ONNX
  Runtime and counted like every query); ``hard``: its argmax; ``true``: the held-out labels;
- augment ``mixup``: 30k mixups (30% plain) of the held-out images, shifted by up to 2 px and
  flipped; ``shift``: shifts and flips only.

Usage (zoo from `trojan-gate benchmark deepinspect`, cached in runs/zoo):
    python benchmarks/reference_variants.py MODEL SEED [SEED ...] --labels oracle --augment mixup
Prints one JSON line per seed with the plain and the variant's deviation factors (the df
test alone; the scan's co-target links are not re-run for the variant).
"""
import argparse
import json
import time

import numpy as np
import torch

from trojan_gate.gates.anomaly import double_mad_test
from trojan_gate.gates.lab import build_model, export_onnx
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.reference import normalised_levels, split_heldout
from trojan_gate.gates.scan import ScanConfig, _measure, scan
from trojan_gate.pipelines.benchmark_deepinspect import clean_subset


def augmented_pool(x, y, n, rng, mixup: bool):
    ia, ib = rng.integers(len(x), size=n), rng.integers(len(x), size=n)
    lam = rng.uniform(0, 1, size=(n, 1, 1, 1)).astype(np.float32)
    lam = np.where(rng.uniform(size=(n, 1, 1, 1)) < 0.3, 1.0, lam).astype(np.float32)
    if not mixup:
        lam = np.ones_like(lam)
    out = lam * x[ia] + (1 - lam) * x[ib]
    eye = np.eye(int(y.max()) + 1, dtype=np.float32)
    labels = lam[:, :, 0, 0] * eye[y[ia]] + (1 - lam[:, :, 0, 0]) * eye[y[ib]]
    shifts = rng.integers(-2, 3, size=(n, 2))
    for i in range(n):
        out[i] = np.roll(out[i], tuple(shifts[i]), axis=(1, 2))
    flip = rng.uniform(size=n) < 0.5
    out[flip] = out[flip][..., ::-1]
    return np.ascontiguousarray(out, np.float32), labels.astype(np.float32)


def variant_reference(oracle, train, seed, labels, augment, pool=30000, epochs=6, lr=2e-3, batch=64):
    """One SmallCNN trained with soft cross-entropy on the held-out split plus its augmentations."""
    rng = np.random.default_rng(seed)
    torch.manual_seed(seed)
    aug, aug_targets = augmented_pool(train.x, train.y, pool, rng, augment == "mixup")
    x = np.concatenate([train.x, aug])
    if labels == "true":
        targets = np.concatenate([np.eye(aug_targets.shape[1], dtype=np.float32)[train.y], aug_targets])
    else:
        targets = oracle.predict_proba(x).astype(np.float32)
        if labels == "hard":
            targets = np.eye(targets.shape[1], dtype=np.float32)[targets.argmax(1)]
    model = build_model("small", tuple(x.shape[1:]), targets.shape[1])
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps = int(np.ceil(len(x) / batch))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps)
    xt, pt = torch.from_numpy(x), torch.from_numpy(targets)
    for _ in range(epochs):
        perm = torch.from_numpy(rng.permutation(len(x)))
        for i in range(steps):
            b = perm[i * batch:(i + 1) * batch]
            loss = -(pt[b] * torch.log_softmax(model(xt[b]), 1)).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return export_onnx(model.eval(), tuple(x.shape[1:]))


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model")
    p.add_argument("seeds", nargs="+", type=int)
    p.add_argument("--labels", choices=("oracle", "hard", "true"), default="oracle")
    p.add_argument("--augment", choices=("mixup", "shift"), default="mixup")
    p.add_argument("--heldout", type=int, default=120)
    p.add_argument("--zoo-dir", default="runs/zoo")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    held = clean_subset(args.heldout)
    path = f"{args.zoo_dir}/{args.model}.onnx"
    for seed in args.seeds:
        r = scan(path, heldout=held, seed=seed, progress=False, heldout_mode="replace")
        cfg = ScanConfig(heldout_mode="replace").resolved(r.input_shape)
        substitute, train = split_heldout(held, cfg.n_per_class, r.n_classes, seed=seed + 5)
        oracle, stats, t0 = ModelOracle(path), [], time.perf_counter()
        for j in range(cfg.reference_models):
            ref = ModelOracle(variant_reference(oracle, train, seed + 100 + j, args.labels, args.augment))
            stats.append(_measure(ref, substitute, seed, None, cfg, False, {})[2].statistics)
        test = double_mad_test(normalised_levels(r.statistics, stats), r.cutoff, min_mad=cfg.min_mad)
        print(json.dumps({"model": args.model, "seed": seed, "heldout": args.heldout, "labels": args.labels,
                          "augment": args.augment, "statistics": r.statistics,
                          "plain_references": r.reference_statistics, "plain_df": r.deviation_factors,
                          "plain_flagged": r.flagged_classes, "variant_references": np.asarray(stats).tolist(),
                          "variant_df": test.deviation_factors.tolist(), "variant_flagged": list(test.flagged),
                          "oracle_queries_for_labels": oracle.queries, "variant_seconds": time.perf_counter() - t0}),
              flush=True)


if __name__ == "__main__":
    main()
