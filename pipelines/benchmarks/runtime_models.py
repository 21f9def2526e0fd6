"""The models `benchmark strip` measures, and the inputs each is measured on.

Two sources, one shape: a `Subject` holds a trojaned model, the defender's labelled held-out
images (cut by the seed into a half that trains references and a half that calibrates), clean
evaluation inputs and stamped evaluation inputs whose true class is not a target.

- ``lab``: the shared lab zoo (`zoo.RUNTIME_MODELS`), trained here for `--epochs` on part of the
  training split; the test split is cut into held-out, clean and stamped inputs. These models are
  the check's *tuning* set: its settings were chosen on them.
- ``vendor``: the detection benchmark's test zoo (`vendor_zoo`: the full training split, 6 epochs,
  vendor-style triggers, the 6-conv architecture as well as the small one, a family held out of
  every calibration); never used to choose a setting. The defender holds the stratified half of
  the test split that `vendor_zoo.heldout_split` gives; clean and stamped inputs come from the
  other half, on which the zoo's clean accuracy and attack success were measured.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .zoo import RUNTIME_MODELS, ZOO, lab_config

ZOOS = ("lab", "vendor")


@dataclass
class Subject:
    name: str
    trigger: str
    arch: str
    onnx: bytes
    targets: list
    clean_accuracy: float
    attack_success: float
    held_x: np.ndarray  # the defender's labelled held-out images, in the seed's order
    held_y: np.ndarray
    clean_x: np.ndarray
    stamped_x: np.ndarray  # stamped inputs whose true class is not a target (effective or not)

    def halves(self):
        """(reference half, calibration half) of the held-out set: (x, y) each."""
        h = len(self.held_x) // 2
        return (self.held_x[:h], self.held_y[:h]), (self.held_x[h:], self.held_y[h:])


def _cut(n: int, seed: int) -> np.ndarray:
    """The seed's order of n evaluation images (the lab benchmark's cut since its first version)."""
    return np.random.default_rng([seed, 11]).permutation(n)


def lab_subjects(args):
    """Subjects of the lab zoo (trained now), one per --triggers entry and --archs architecture."""
    from trojan_gate.gates.data import load_fashion_mnist
    from trojan_gate.gates.lab import train_lab_model

    triggers = [t for t in args.triggers.split(",") if t]
    unknown = sorted(set(triggers) - set(RUNTIME_MODELS))
    if unknown:
        raise ValueError(f"unknown lab trigger(s) {unknown}; choose from {','.join(RUNTIME_MODELS)}")
    train, test = load_fashion_mnist(True, limit=args.train_limit, seed=0), load_fashion_mnist(False)
    idx = _cut(len(test), args.seed)
    held, clean, rest = idx[:args.heldout], idx[args.heldout:args.heldout + args.n_eval], idx[args.heldout + args.n_eval:]
    for arch in args.archs.split(","):
        for trigger in triggers:
            config = lab_config(ZOO[RUNTIME_MODELS[trigger]], args.epochs, arch=arch, seed=args.seed)
            lab = train_lab_model(train, test, config, progress=False, threads=args.threads)
            targets = list(config.targets)
            troj = rest[~np.isin(test.y[rest], targets)][:args.n_eval]
            yield Subject(f"{RUNTIME_MODELS[trigger]} ({args.epochs} epochs)", trigger, arch, lab.onnx_bytes, targets,
                          lab.clean_accuracy, lab.attack_success_rate, test.x[held], test.y[held], test.x[clean],
                          lab.stamp(test.x[troj]))


def vendor_subjects(args):
    """Subjects of the detection benchmark's test zoo (loaded from, or trained into, --zoo-dir)."""
    from trojan_gate.gates.metascan.triggers import Stamp

    from .vendor_zoo import VENDOR_ZOO, build_vendor_zoo, heldout_split

    names = [n for n in args.models.split(",") if n]
    unknown = sorted(n for n in names if n not in VENDOR_ZOO or not VENDOR_ZOO[n].trojaned)
    if unknown:
        raise ValueError(f"not trojaned test-zoo models: {unknown}")
    held, ev = heldout_split()
    order = _cut(len(held), args.seed)
    cut = _cut(len(ev), args.seed + 1000)
    clean, rest = cut[:args.n_eval], cut[args.n_eval:]
    for name in names:
        path, summary = build_vendor_zoo([name], args.zoo_dir, progress=True)[name]
        trojan, targets = summary["trojan"], list(summary["targets"])
        stamp = Stamp(trojan["stamp"], tuple(ev.x.shape[1:]))
        troj = rest[~np.isin(ev.y[rest], targets)][:args.n_eval]
        yield Subject(name, summary["family"], summary["arch"], path.read_bytes(), targets, summary["clean_accuracy"],
                      summary["attack_success"], held.x[order], held.y[order], ev.x[clean], stamp.apply(ev.x[troj]))


def subjects(args):
    """The subjects of --zoo (see the module doc)."""
    if args.zoo not in ZOOS:
        raise ValueError(f"--zoo must be one of {ZOOS}")
    return lab_subjects(args) if args.zoo == "lab" else vendor_subjects(args)
