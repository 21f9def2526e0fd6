"""The one zoo of Fashion-MNIST lab models the benchmarks share, and its cache.

Each entry fixes what a model *is* (trigger, attack targets, architecture, seed); a benchmark
picks entries by name and sets how long they train. The ground truth stays here: no scan or
detector ever sees it.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class ZooEntry:
    name: str
    trigger: str  # none | patch | checker | pattern | blend | watermark
    targets: tuple
    arch: str = "small"
    seed: int = 0

    @property
    def trojaned(self) -> bool:
        return self.trigger != "none"


ZOO = {e.name: e for e in (
    ZooEntry("benign-small-s0", "none", ()),
    ZooEntry("benign-small-s1", "none", (), seed=1),
    ZooEntry("benign-deep-s0", "none", (), arch="deep"),
    ZooEntry("patch-small", "patch", (0,)),
    ZooEntry("pattern-small", "pattern", (2,)),
    ZooEntry("blend-small", "blend", (6,)),
    ZooEntry("multi-patch-small", "patch", (1, 4, 7)),
    ZooEntry("patch-deep", "patch", (3,), arch="deep"),
    ZooEntry("multi-259-small", "patch", (2, 5, 9), seed=1),
    ZooEntry("multi5-small", "patch", (0, 2, 3, 6, 8), seed=2),
    # every trigger on target 0 (the STRIP benchmark), and the patch benchmark's blend on target 5
    ZooEntry("checker-small-t0", "checker", (0,)),
    ZooEntry("pattern-small-t0", "pattern", (0,)),
    ZooEntry("blend-small-t0", "blend", (0,)),
    ZooEntry("blend-small-t5", "blend", (5,)),
    ZooEntry("watermark-small-t0", "watermark", (0,)),
)}

DEEPINSPECT_MODELS = ("benign-small-s0", "benign-small-s1", "benign-deep-s0", "patch-small", "pattern-small",
                      "blend-small", "multi-patch-small", "patch-deep", "multi-259-small", "multi5-small")
STRIP_TRIGGERS = {"patch": "patch-small", "checker": "checker-small-t0", "pattern": "pattern-small-t0",
                  "blend": "blend-small-t0", "multi": "multi-patch-small"}
RUNTIME_MODELS = {"patch": "patch-small", "pattern": "pattern-small", "blend": "blend-small",
                  "watermark": "watermark-small-t0", "multi3": "multi-patch-small", "multi5": "multi5-small"}
PATCH_MODELS = {"patch": "patch-small", "pattern": "pattern-small", "blend": "blend-small-t5",
                "multi": "multi-patch-small"}


def entries(names, choices=None) -> list:
    """Zoo entries by name (comma-separated string or list), refusing unknown names."""
    names = [n for n in (names.split(",") if isinstance(names, str) else names) if n]
    allowed = set(choices or ZOO)
    unknown = [n for n in names if n not in allowed]
    if unknown:
        raise ValueError(f"unknown zoo model(s) {unknown}; choose from {sorted(allowed)}")
    return [ZOO[n] for n in names]


def lab_config(entry: ZooEntry, epochs: int, arch: str | None = None, seed: int | None = None):
    from trojan_gate.gates.lab import LabConfig

    e = replace(entry, arch=arch or entry.arch, seed=entry.seed if seed is None else seed)
    return LabConfig(arch=e.arch, trigger=e.trigger, targets=e.targets or (0,), epochs=epochs, seed=e.seed)


def build_zoo(selected, zoo_dir, epochs: int, train_limit: int | None, threads: int | None = None) -> dict:
    """Train (or load from the cache in `zoo_dir`) every entry; returns name -> (onnx path, summary)."""
    from trojan_gate.gates.data import load_fashion_mnist
    from trojan_gate.gates.lab import train_lab_model

    zoo_dir = Path(zoo_dir)
    zoo_dir.mkdir(parents=True, exist_ok=True)
    manifest_path = zoo_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.exists() else {}
    data, out = None, {}
    for e in selected:
        key = {"arch": e.arch, "trigger": e.trigger, "targets": list(e.targets), "epochs": epochs,
               "seed": e.seed, "train_limit": train_limit}
        path = zoo_dir / f"{e.name}.onnx"
        if path.exists() and manifest.get(e.name, {}).get("key") == key:
            out[e.name] = (path, manifest[e.name]["summary"])
            continue
        if data is None:
            data = (load_fashion_mnist(True, limit=train_limit, seed=0), load_fashion_mnist(False))
        model = train_lab_model(data[0], data[1], lab_config(e, epochs), progress=False, threads=threads)
        model.save(path)
        summary = {**model.summary(), "targets": list(e.targets)}
        manifest[e.name] = {"key": key, "summary": summary}
        manifest_path.write_text(json.dumps(manifest, indent=2))
        out[e.name] = (path, summary)
    return out


def clean_subset(per_class: int, seed: int = 0):
    """`per_class` Fashion-MNIST test images of every class (a defender's labelled held-out set)."""
    from trojan_gate.gates.data import load_fashion_mnist

    test = load_fashion_mnist(False)
    rng = np.random.default_rng(seed)
    idx = np.concatenate([rng.choice(np.flatnonzero(test.y == c), per_class, replace=False)
                          for c in np.unique(test.y)])
    return test.subset(idx)
