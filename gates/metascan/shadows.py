"""The shadow pool: hundreds of small benign and trojaned models trained on the defender's held-out data.

MNTD (Xu et al., S&P'21) calibrates a trojan detector on *shadow models* of the task: models the
defender trains itself, half of them trojaned with triggers drawn from a broad distribution
(`triggers`), so that their labels are known. Here every shadow is trained only on the labelled
held-out set the gate already has, with its own draw of

- architecture (``small``: widths 8-24; ``deep``: the 6-conv shape at width 8),
- training length (250-800 optimisation steps, 250-500 for ``deep``: 4-12 epochs of 4,000
  images at batch 64; as many epochs as that takes on a smaller set), learning rate, batch size, weight decay, augmentation,
- the share of the held-out training part it sees (60-100%), and seed,

so that the pool spans the ways a vendor may have trained a model of the task. Shadows are sized
to train in seconds on 2 CPU cores. Each is cached under the sha256 of its specification and of
the held-out set (`shadow_key`), so an interrupted pool build continues where it stopped.

A trojaned shadow whose attack success on the held-out evaluation part stays under
`min_attack_success` carries no working trojan; it is kept out of the pool (and counted).
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from ..architectures import build_model
from ..data import Dataset
from ..hashing import sha256_bytes
from .training import AUGMENTATIONS, predict_labels, train_classifier
from .triggers import ATTACKS, FAMILIES, attack_success, poison, sample_trojan

POOL_FORMAT = 1
SHADOW_ARCHITECTURES = ("small", "deep")
EVAL_SHARE = 0.2  # of the held-out set, never trained on: every shadow's accuracy and attack success


def sample_shadow(rng: np.random.Generator, trojaned: bool, n_classes: int, archs=SHADOW_ARCHITECTURES,
                  families=FAMILIES, attacks=ATTACKS) -> dict:
    """One shadow's specification (JSON-able); `trojan` is None for a benign shadow."""
    arch = str(rng.choice(list(archs)))
    width = int(rng.choice([8, 12, 16, 24]) if arch == "small" else 8)
    spec = {"arch": arch, "width": width, "steps": int(rng.integers(250, 800 if arch == "small" else 500)),
            "lr": float(np.exp(rng.uniform(np.log(1e-3), np.log(5e-3)))), "batch_size": int(rng.choice([32, 64, 128])),
            "weight_decay": float(rng.choice([0.0, 1e-4])), "augment": str(rng.choice(AUGMENTATIONS)),
            "fraction": float(rng.uniform(0.6, 1.0)), "seed": int(rng.integers(2**31))}
    spec["trojan"] = sample_trojan(rng, n_classes, families, attacks) if trojaned else None
    return spec


def split_heldout(heldout: Dataset, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(training part, evaluation part): a seeded stratified split, `EVAL_SHARE` for evaluation."""
    rng = np.random.default_rng(seed)
    train, ev = [], []
    for c in np.unique(heldout.y):
        idx = rng.permutation(np.flatnonzero(heldout.y == c))
        n_eval = int(round(EVAL_SHARE * len(idx)))
        ev.append(idx[:n_eval])
        train.append(idx[n_eval:])
    return heldout.subset(np.sort(np.concatenate(train))), heldout.subset(np.sort(np.concatenate(ev)))


def heldout_sha256(heldout: Dataset) -> str:
    """The held-out set's identity: sha256 over its images (float32) and labels (int64)."""
    x = np.ascontiguousarray(heldout.x, np.float32)
    y = np.ascontiguousarray(heldout.y, np.int64)
    return sha256_bytes(str(x.shape).encode() + x.tobytes() + y.tobytes())


def shadow_key(spec: dict, data_sha256: str) -> str:
    return sha256_bytes(json.dumps({"spec": spec, "heldout": data_sha256, "format": POOL_FORMAT},
                                   sort_keys=True).encode())[:24]


@dataclass
class Shadow:
    """One trained shadow: its specification, the torch model (logits) and measured figures."""

    spec: dict
    model: nn.Module = field(repr=False)
    clean_accuracy: float
    attack_success: float | None
    seconds: float

    @property
    def trojaned(self) -> bool:
        return self.spec["trojan"] is not None

    @property
    def targets(self) -> list:
        return [] if self.spec["trojan"] is None else list(self.spec["trojan"]["targets"])

    @property
    def family(self) -> str:
        return "benign" if self.spec["trojan"] is None else self.spec["trojan"]["stamp"]["family"]


def train_shadow(spec: dict, train: Dataset, evaluation: Dataset, n_classes: int) -> Shadow:
    """Train one shadow of `spec` on its share of `train`; measure it on `evaluation`."""
    rng = np.random.default_rng(spec["seed"])
    idx = rng.permutation(len(train))[:max(n_classes, int(round(spec["fraction"] * len(train))))]
    x, y = train.x[idx], train.y[idx]
    trojan = spec["trojan"]
    if trojan is not None:
        x, y = poison(x, y, trojan, n_classes, rng)
    t0 = time.perf_counter()
    epochs = max(1, int(round(spec["steps"] / np.ceil(len(x) / spec["batch_size"]))))
    model = train_classifier(x, y, n_classes, arch=spec["arch"], width=spec["width"], epochs=epochs,
                             lr=spec["lr"], batch_size=spec["batch_size"], seed=spec["seed"],
                             augment=spec["augment"], weight_decay=spec["weight_decay"])
    seconds = time.perf_counter() - t0
    acc = float((predict_labels(model, evaluation.x) == evaluation.y).mean())
    asr = None if trojan is None else attack_success(lambda z: predict_labels(model, z), evaluation.x,
                                                     evaluation.y, trojan, n_classes)
    return Shadow(spec, model, acc, asr, seconds)


def _load(path: Path, meta: dict, in_shape, n_classes) -> Shadow:
    spec = meta["spec"]
    model = build_model(spec["arch"], in_shape, n_classes, spec["width"])
    model.load_state_dict(torch.load(path, weights_only=True, map_location="cpu"))
    return Shadow(spec, model.eval(), meta["clean_accuracy"], meta["attack_success"], meta["seconds"])


def build_pool(heldout: Dataset, n_shadows: int, cache_dir, seed: int = 0, families=FAMILIES, attacks=ATTACKS,
               archs=SHADOW_ARCHITECTURES, min_attack_success: float = 0.5, progress: bool = True,
               deadline: float | None = None) -> tuple[list, dict]:
    """Train (or load from `cache_dir`) `n_shadows` shadows, half of them trojaned, alternating.

    Returns (shadows kept, summary). Shadows are drawn in a fixed order from `seed`, so a larger
    `n_shadows` extends a smaller pool and a stopped build resumes from its cache. A
    `deadline` (time.monotonic()) stops training new shadows and returns what exists.
    """
    in_shape = tuple(heldout.x.shape[1:])
    n_classes = int(heldout.y.max()) + 1
    train, evaluation = split_heldout(heldout, seed)
    data_sha = heldout_sha256(heldout)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7001])
    specs = [sample_shadow(rng, i % 2 == 1, n_classes, archs, families, attacks) for i in range(n_shadows)]
    kept, failed, trained, seconds = [], 0, 0, 0.0
    bar = tqdm(specs, desc="shadow models", disable=not progress)
    for spec in bar:
        key = shadow_key(spec, data_sha)
        weights, meta_path = cache / f"{key}.pt", cache / f"{key}.json"
        if weights.exists() and meta_path.exists():
            shadow = _load(weights, json.loads(meta_path.read_text()), in_shape, n_classes)
        else:
            if deadline is not None and time.monotonic() > deadline:
                break
            shadow = train_shadow(spec, train, evaluation, n_classes)
            torch.save(shadow.model.state_dict(), weights.with_suffix(".tmp"))
            weights.with_suffix(".tmp").replace(weights)
            meta_path.write_text(json.dumps({"spec": spec, "clean_accuracy": shadow.clean_accuracy,
                                             "attack_success": shadow.attack_success, "seconds": shadow.seconds}))
            trained += 1
            seconds += shadow.seconds
        seconds_total = seconds / max(trained, 1)
        bar.set_postfix(trained=trained, s_per_shadow=f"{seconds_total:.1f}")
        if shadow.trojaned and not shadow.attack_success >= min_attack_success:
            failed += 1
            continue
        kept.append(shadow)
    summary = {"requested": n_shadows, "kept": len(kept), "benign": sum(not s.trojaned for s in kept),
               "trojaned": sum(s.trojaned for s in kept), "failed_trojans": failed, "trained_now": trained,
               "train_seconds_now": round(seconds, 1),
               "mean_clean_accuracy": round(float(np.mean([s.clean_accuracy for s in kept])), 4) if kept else None,
               "heldout_sha256": data_sha, "seed": seed, "families": list(families), "attacks": list(attacks),
               "architectures": list(archs)}
    return kept, summary
