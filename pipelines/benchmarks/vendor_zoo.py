"""The detection benchmark's test zoo: Fashion-MNIST models trained the way a vendor would.

Kept apart from everything the calibration sees: trained on the full 60,000-image training
split (shadows see only the defender's held-out images, drawn from the test split), 6 epochs,
lab widths (small 16, 6-conv 32), seeds 1000 and up, triggers drawn from fixed vendor-style
settings rather than the jumbo ranges. Families: a random-content patch (2-3% of the image, anywhere),
a white-noise blend (alpha 0.1-0.15), a ring watermark (alpha 0.3), a sparse bright pattern
(held out of the benchmark's calibration), one patch -> 3 random targets, one patch -> 5 random
targets; every poisoning rate 10%. ``lenet`` models are an architecture no shadow has; the
``-r`` models a training recipe no shadow has (`RECIPES`: SGD with Nesterov momentum 0.05, a step
schedule, batch 256, label smoothing 0.2, 8 epochs; shadows use batches up to 128 and smoothing up
to 0.1), so that a pool whose recipes cover the vendor's is not mistaken for one that generalises.

Every model is cached under `zoo_dir` by the sha256 of its entry, so a stopped build resumes.
The held-out split (`heldout_split`) halves the test split: the defender's 5,000 images and
5,000 images on which every zoo model's clean accuracy and attack success are measured.
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

FAMILIES = ("patch", "blend", "watermark", "sparse", "multi3", "multi5")
HELD_OUT_FAMILY = "sparse"
EPOCHS = 6
RECIPES = {"vendor": {"optimizer": "adam", "schedule": "onecycle", "lr": 2e-3, "batch_size": 128, "epochs": EPOCHS,
                      "label_smoothing": 0.0},
           "sgd-step-256": {"optimizer": "sgd", "schedule": "step", "lr": 0.05, "batch_size": 256, "epochs": 8,
                            "label_smoothing": 0.2}}


@dataclass(frozen=True)
class VendorEntry:
    name: str
    arch: str
    family: str  # "none" for a benign model
    seed: int
    recipe: str = "vendor"

    @property
    def trojaned(self) -> bool:
        return self.family != "none"


def _entries() -> list:
    out = [VendorEntry(f"benign-{a}-s{s}", a, "none", s) for a in ("small", "deep") for s in range(1000, 1006)]
    for f in FAMILIES:
        out += [VendorEntry(f"{f}-small-s{s}", "small", f, s) for s in (1100, 1101)]
        out.append(VendorEntry(f"{f}-deep-s1100", "deep", f, 1100))
    out += [VendorEntry(f"benign-lenet-s{s}", "lenet", "none", s) for s in (1000, 1001)]
    out += [VendorEntry(f"{f}-lenet-s1100", "lenet", f, 1100) for f in ("patch", "watermark", "multi3")]
    out += [VendorEntry(f"benign-small-r-s{s}", "small", "none", s, "sgd-step-256") for s in range(1010, 1014)]
    out += [VendorEntry(f"{f}-small-r-s1110", "small", f, 1110, "sgd-step-256")
            for f in ("patch", "blend", "watermark", "multi3")]
    return out


VENDOR_ZOO = {e.name: e for e in _entries()}


def vendor_trojan(family: str, seed: int, n_classes: int) -> dict:
    """The trojan of a vendor-zoo entry (a `triggers` dict): fixed-style stamps, 10% poisoning."""
    rng = np.random.default_rng([seed, 4242])
    seed_stamp = int(rng.integers(2**31))
    patch = {"family": "patch", "area": float(rng.uniform(0.02, 0.03)), "aspect": 1.0, "row": float(rng.random()),
             "col": float(rng.random()), "fill": "random", "value": 1.0, "seed": seed_stamp}
    stamps = {
        "patch": patch, "multi3": patch, "multi5": patch,
        "blend": {"family": "blend", "alpha": float(rng.uniform(0.1, 0.15)), "noise": "white", "seed": seed_stamp},
        "watermark": {"family": "watermark", "shape": "ring", "extent": 0.55, "alpha": 0.3, "bright": True,
                      "seed": seed_stamp},
        "sparse": {"family": "sparse", "density": 0.04, "shape": str(rng.choice(["dots", "strokes"])), "bright": True,
                   "seed": seed_stamp},
    }
    k = {"multi3": 3, "multi5": 5}.get(family, 1)
    targets = sorted(int(t) for t in rng.choice(n_classes, size=k, replace=False))
    return {"stamp": stamps[family], "attack": "one" if k == 1 else "multi", "targets": targets, "poison_rate": 0.1}


def heldout_split(seed: int = 0):
    """(defender's held-out set, evaluation set): the Fashion-MNIST test split halved, stratified."""
    from trojan_gate.gates.data import load_fashion_mnist

    test = load_fashion_mnist(False)
    rng = np.random.default_rng(seed)
    held = np.concatenate([rng.permutation(np.flatnonzero(test.y == c))[:500] for c in range(10)])
    rest = np.setdiff1d(np.arange(len(test)), held)
    return test.subset(np.sort(held)), test.subset(rest)


def entry_key(e: VendorEntry) -> dict:
    """The cache key of an entry (the default recipe adds nothing, so models trained before recipes keep theirs)."""
    key = {**asdict(e), "epochs": EPOCHS, "widths": "lab", "data": "fashion-mnist-train-60000", "format": 1}
    if e.recipe == "vendor":
        del key["recipe"]
    else:
        key["recipe_settings"] = RECIPES[e.recipe]
    return key


def build_vendor_zoo(names, zoo_dir, progress: bool = True) -> dict:
    """Train (or load) the named entries; returns name -> (onnx path, summary with the ground truth)."""
    import torch

    from trojan_gate.gates.data import load_fashion_mnist
    from trojan_gate.gates.classifier_training import export_onnx
    from trojan_gate.gates.metascan.training import predict_labels, train_classifier
    from trojan_gate.gates.metascan.triggers import attack_success, poison

    zoo_dir = Path(zoo_dir)
    zoo_dir.mkdir(parents=True, exist_ok=True)
    out, data = {}, None
    for name in names:
        e = VENDOR_ZOO[name]
        path, meta = zoo_dir / f"{name}.onnx", zoo_dir / f"{name}.json"
        key = entry_key(e)
        if path.exists() and meta.exists() and json.loads(meta.read_text()).get("key") == key:
            out[name] = (path, json.loads(meta.read_text())["summary"])
            continue
        if data is None:
            data = (load_fashion_mnist(True), heldout_split()[1])
        train, ev = data
        rng = np.random.default_rng(e.seed)
        x, y = train.x, train.y
        trojan = vendor_trojan(e.family, e.seed, 10) if e.trojaned else None
        if trojan is not None:
            x, y = poison(x, y, trojan, 10, rng)
        t0 = time.perf_counter()
        r = RECIPES[e.recipe]
        model = train_classifier(x, y, 10, arch=e.arch, epochs=r["epochs"], lr=r["lr"], batch_size=r["batch_size"],
                                 seed=e.seed, optimizer=r["optimizer"], schedule=r["schedule"],
                                 label_smoothing=r["label_smoothing"])
        seconds = time.perf_counter() - t0
        acc = float((predict_labels(model, ev.x) == ev.y).mean())
        asr = None if trojan is None else attack_success(lambda z: predict_labels(model, z), ev.x, ev.y, trojan, 10)
        path.write_bytes(export_onnx(model, (1, 28, 28)))
        summary = {"name": name, "arch": e.arch, "family": e.family, "seed": e.seed, "recipe": e.recipe,
                   "trojan": trojan,
                   "targets": [] if trojan is None else trojan["targets"], "clean_accuracy": round(acc, 4),
                   "attack_success": None if asr is None else round(asr, 4), "train_seconds": round(seconds, 1),
                   "torch_threads": torch.get_num_threads()}
        meta.write_text(json.dumps({"key": key, "summary": summary}, indent=2))
        out[name] = (path, summary)
        if progress:
            print(json.dumps(summary), flush=True)
    return out
