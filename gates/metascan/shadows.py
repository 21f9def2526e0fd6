"""The shadow pool: hundreds of small benign and trojaned models trained on the defender's held-out data.

MNTD (Xu et al., S&P'21) calibrates a trojan detector on *shadow models* of the task: models the
defender trains itself, half of them trojaned with triggers drawn from a broad distribution
(`triggers`), so that their labels are known. Here every shadow is trained only on the labelled
held-out set the gate already has, with its own draw of

- architecture (``small``: widths 8-24; ``deep``: the 6-conv shape at width 8; a pool asked for
  `WIDE_ARCHITECTURES` gives `ARCH_SHARE` of its shadows, drawn from their own stream, one of
  `EXTRA_ARCHITECTURES`: a residual network with batch normalisation, an all-convolutional ELU
  network, a dense network, or the 6-conv shape at a vendor's width 16-24; a pool of two architectures read LeNet's trojans as benign:
  docs/calibrated-scan.md; the wide pool is not measured yet, so it is not the default),
- training length (250-800 optimisation steps, 250-500 for ``deep``: 4-12 epochs of 4,000
  images at batch 64; as many epochs as that takes on a smaller set; 40% of the shadows
  800-3,000 steps, log-uniform, so that the pool reaches the confidence of a vendor's model
  trained on far more data), learning rate, batch size, weight decay, augmentation,
- the share of the held-out training part it sees (60-100%), and seed,
- for `RECIPE_SHARE` of the shadows, a training recipe other than Adam + one-cycle (`recipe`:
  AdamW or SGD with momentum, cosine / constant / step schedules, label smoothing), mostly
  unaugmented and often trained to convergence, as vendors commonly train (a pool of Adam +
  one-cycle alone flagged benign models of other recipes: docs/calibrated-scan.md),

so that the pool spans the ways a vendor may have trained a model of the task. Shadows are sized
to train in seconds on one CPU core; one process per core trains them in parallel. Each is cached under the sha256 of its specification and of
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
BASE_ARCHITECTURES = ("small", "deep")
EXTRA_ARCHITECTURES = ("resnet", "allconv", "mlp")
SHADOW_ARCHITECTURES = BASE_ARCHITECTURES  # the default pool, as measured in benchmarks/detection-recipes.md
WIDE_ARCHITECTURES = BASE_ARCHITECTURES + EXTRA_ARCHITECTURES
ARCH_SHARE = 0.35  # shadows of an extra architecture (their own stream: the other draws keep their keys)
EXTRA_WIDTHS = {"resnet": (8,), "allconv": (8, 12, 16), "mlp": (128, 256, 512), "deep": (16, 24)}
CAPPED_STEPS = {"resnet": 600, "deep": 600}  # the costly extras: at most these steps (about 30-80 s on one core)
EVAL_SHARE = 0.2  # of the held-out set, never trained on: every shadow's accuracy and attack success


LONG_SHARE = 0.4  # shadows trained 800-3,000 steps: as confident as a vendor's model trained on far more data
LONG_STEPS = (800, 3000)
RECIPE_SHARE = 0.35  # shadows trained with another optimiser / schedule (their own stream: the rest keep their keys)


def sample_shadow(rng: np.random.Generator, trojaned: bool, n_classes: int, archs=SHADOW_ARCHITECTURES,
                  families=FAMILIES, attacks=ATTACKS, index: int = 0, seed: int = 0) -> dict:
    """One shadow's specification (JSON-able); `trojan` is None for a benign shadow. Whether it is
    trained long, its recipe and whether it takes an extra architecture are drawn from their own
    streams (index, seed), so the other draws do not move."""
    base = [a for a in archs if a in BASE_ARCHITECTURES] or list(archs)
    extra = [a for a in archs if a not in base]
    arch = str(rng.choice(base))
    width = int(rng.choice([8, 12, 16, 24]) if arch == "small" else 8)
    spec = {"arch": arch, "width": width, "steps": int(rng.integers(250, 800 if arch == "small" else 500)),
            "lr": float(np.exp(rng.uniform(np.log(1e-3), np.log(5e-3)))), "batch_size": int(rng.choice([32, 64, 128])),
            "weight_decay": float(rng.choice([0.0, 1e-4])), "augment": str(rng.choice(AUGMENTATIONS)),
            "fraction": float(rng.uniform(0.6, 1.0)), "seed": int(rng.integers(2**31))}
    spec["trojan"] = sample_trojan(rng, n_classes, families, attacks) if trojaned else None
    long = np.random.default_rng([seed, index, 11])
    if long.random() < LONG_SHARE:
        spec["steps"] = int(np.exp(long.uniform(np.log(LONG_STEPS[0]), np.log(LONG_STEPS[1]))))
        spec["batch_size"] = max(spec["batch_size"], 64)
    other = np.random.default_rng([seed, index, 13])
    if other.random() < RECIPE_SHARE:
        recipe = {"optimizer": str(other.choice(["adam", "adamw", "sgd"])),
                  "schedule": str(other.choice(["cosine", "constant", "step", "onecycle"])),
                  "label_smoothing": float(other.choice([0.0, 0.1]))}
        if recipe["optimizer"] == "adam" and recipe["schedule"] == "onecycle":
            recipe["schedule"] = "cosine"  # a recipe other than the default
        if recipe["optimizer"] == "sgd":
            spec["lr"] = float(spec["lr"] * 20)  # SGD's usual learning rates: 2e-2 to 1e-1
        if other.random() < 0.75:
            spec["augment"] = "none"
        if other.random() < 0.6:  # to convergence
            spec["steps"] = int(np.exp(other.uniform(np.log(LONG_STEPS[0]), np.log(LONG_STEPS[1]))))
            spec["batch_size"] = max(spec["batch_size"], 64)
        spec["recipe"] = recipe
    other_arch = np.random.default_rng([seed, index, 17])
    if extra and other_arch.random() < ARCH_SHARE:
        # a pool with extra architectures also gets 6-conv shadows at a vendor's widths (16-24, not 8)
        spec["arch"] = str(other_arch.choice(extra + (["deep"] if "deep" in base else [])))
        spec["width"] = int(other_arch.choice(EXTRA_WIDTHS.get(spec["arch"], (8,))))
        spec["steps"] = min(spec["steps"], CAPPED_STEPS.get(spec["arch"], spec["steps"]))
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
    """A shadow's cache key: the first 24 hex of sha256 over the sorted JSON of spec, held-out sha256 and format."""
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
        """Whether the shadow was trained with a trojan."""
        return self.spec["trojan"] is not None

    @property
    def targets(self) -> list:
        """The trojan's target classes ([] for a benign shadow)."""
        return [] if self.spec["trojan"] is None else list(self.spec["trojan"]["targets"])

    @property
    def family(self) -> str:
        """The trojan's stamp family, or "benign"."""
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
                             augment=spec["augment"], weight_decay=spec["weight_decay"], **spec.get("recipe", {}))
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


def _paths(cache: Path, key: str) -> tuple[Path, Path]:
    return cache / f"{key}.pt", cache / f"{key}.json"


def _train_and_cache(spec: dict, key: str, cache: Path, train: Dataset, evaluation: Dataset, n_classes: int) -> dict:
    """Train one shadow and write it to the cache (weights first, then the record that completes it)."""
    shadow = train_shadow(spec, train, evaluation, n_classes)
    weights, meta_path = _paths(cache, key)
    torch.save(shadow.model.state_dict(), weights.with_suffix(".tmp"))
    weights.with_suffix(".tmp").replace(weights)
    record = {"spec": spec, "clean_accuracy": shadow.clean_accuracy, "attack_success": shadow.attack_success,
              "seconds": shadow.seconds}
    meta_path.with_suffix(".part").write_text(json.dumps(record))
    meta_path.with_suffix(".part").replace(meta_path)
    return record


_WORKER = {}


def _worker_init(cache: str, train: Dataset, evaluation: Dataset, n_classes: int):
    torch.set_num_threads(1)  # tiny models: one thread per process trains fastest on a small machine
    _WORKER.update(cache=Path(cache), train=train, evaluation=evaluation, n_classes=n_classes)


def _worker_task(spec: dict, key: str) -> dict:
    w = _WORKER
    return _train_and_cache(spec, key, w["cache"], w["train"], w["evaluation"], w["n_classes"])


def _train_missing(missing: list, cache: Path, train, evaluation, n_classes, workers: int, deadline, bar) -> float:
    """Train every (spec, key) in `missing`, `workers` processes at once; returns the summed train seconds."""
    seconds = 0.0
    if workers <= 1:
        for spec, key in missing:
            if deadline is not None and time.monotonic() > deadline:
                break
            seconds += _train_and_cache(spec, key, cache, train, evaluation, n_classes)["seconds"]
            bar.update(1)
        return seconds
    import multiprocessing
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(workers, mp_context=ctx, initializer=_worker_init,
                             initargs=(str(cache), train, evaluation, n_classes)) as pool:
        todo, running = list(missing), set()
        while todo or running:
            while todo and len(running) < 2 * workers and (deadline is None or time.monotonic() < deadline):
                running.add(pool.submit(_worker_task, *todo.pop(0)))
            if not running:
                break
            done, running = wait(running, return_when=FIRST_COMPLETED)
            for f in done:
                seconds += f.result()["seconds"]
                bar.update(1)
    return seconds


def build_pool(heldout: Dataset, n_shadows: int, cache_dir, seed: int = 0, families=FAMILIES, attacks=ATTACKS,
               archs=SHADOW_ARCHITECTURES, min_attack_success: float = 0.5, progress: bool = True,
               deadline: float | None = None, workers: int | None = None) -> tuple[list, dict]:
    """Train (or load from `cache_dir`) `n_shadows` shadows, half of them trojaned, alternating.

    Returns (shadows kept, summary). Shadows are drawn in a fixed order from `seed`, so a larger
    `n_shadows` extends a smaller pool and a stopped build resumes from its cache. `workers`
    processes train at once (default: one per CPU core). A `deadline` (time.monotonic()) stops
    training new shadows and returns the cached ones.
    """
    import os

    in_shape = tuple(heldout.x.shape[1:])
    n_classes = int(heldout.y.max()) + 1
    train, evaluation = split_heldout(heldout, seed)
    data_sha = heldout_sha256(heldout)
    cache = Path(cache_dir)
    cache.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7001])
    specs = [sample_shadow(rng, i % 2 == 1, n_classes, archs, families, attacks, index=i, seed=seed)
             for i in range(n_shadows)]
    keys = [shadow_key(spec, data_sha) for spec in specs]
    missing = [(spec, key) for spec, key in zip(specs, keys) if not all(p.exists() for p in _paths(cache, key))]
    bar = tqdm(total=len(missing), desc="shadow models", disable=not progress or not missing)
    seconds = _train_missing(missing, cache, train, evaluation, n_classes,
                             workers or max(1, min(len(missing), os.cpu_count() or 1)), deadline, bar)
    bar.close()
    kept, failed, present = [], 0, 0
    for key in keys:
        weights, meta_path = _paths(cache, key)
        if not (weights.exists() and meta_path.exists()):
            continue
        present += 1
        shadow = _load(weights, json.loads(meta_path.read_text()), in_shape, n_classes)
        if shadow.trojaned and not shadow.attack_success >= min_attack_success:
            failed += 1
            continue
        kept.append(shadow)
    summary = {"requested": n_shadows, "present": present, "kept": len(kept),
               "benign": sum(not s.trojaned for s in kept), "trojaned": sum(s.trojaned for s in kept),
               "failed_trojans": failed, "trained_now": len(missing) if deadline is None else None,
               "train_seconds_now": round(seconds, 1),
               "mean_train_seconds": round(float(np.mean([s.seconds for s in kept])), 2) if kept else None,
               "mean_clean_accuracy": round(float(np.mean([s.clean_accuracy for s in kept])), 4) if kept else None,
               "heldout_sha256": data_sha, "seed": seed, "families": list(families), "attacks": list(attacks),
               "architectures": list(archs)}
    return kept, summary
