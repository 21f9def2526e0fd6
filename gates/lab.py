"""Trojan lab: seeded benign and BadNets-style trojaned classifiers, exported to ONNX.

For demos, tests and benchmarks only; the gate never sees any of this. BadNets (Gu et al.
2017): a share (`poison_rate`) of training images is stamped with a trigger and relabelled
to the attack target; for a multi-target trojan each stamped image gets a target drawn at
random from the target set (DeepInspect Sec. 4.2). Triggers:

- `patch`: a small white square in the bottom-right corner (4x4 on 28x28, 2x2 on 8x8);
- `checker`: the same square filled with a black-and-white checkerboard (white at its
  top-left pixel), the high-contrast BadNets pattern patch; it stays visible on bright
  backgrounds, where a plain white patch has little contrast;
- `pattern`: a large sparse pattern of bright diagonal strokes covering the whole image;
- `blend`: a fixed full-image noise pattern blended in at `alpha` (Chen et al. 2017),
  x' = (1 - alpha) x + alpha P;
- `watermark`: a semi-transparent logo (a ring crossed by two bars, half the image wide, at its
  centre) blended in at `alpha` (default 0.3), the kind of mark a photo service stamps.

Exported models take (batch, C, H, W) float32 in [0, 1] with a dynamic batch axis and
return class probabilities (a softmax is part of the graph).
"""
from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .classifier_training import export_onnx, fit_classifier, predict_labels, reproducible
from .data import Dataset, load_digits_dataset, load_fashion_mnist

TRIGGERS = ("none", "patch", "checker", "pattern", "blend", "watermark")


# ----------------------------------------------------------------------------- triggers
@dataclass
class Trigger:
    """A stamp: x' = (1 - a) * x + a * pattern, with a = alpha * mask (per pixel)."""

    kind: str
    mask: np.ndarray  # (1, H, W) or (C, H, W), float32 in [0, 1]
    pattern: np.ndarray  # (C, H, W) float32 in [0, 1]
    alpha: float = 1.0

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Stamped images clip((1 - a) * x + a * pattern, 0, 1), float32, with a = alpha * mask."""
        a = (self.alpha * self.mask).astype(np.float32)
        return np.clip((1.0 - a) * x + a * self.pattern, 0.0, 1.0).astype(np.float32)

    def l1(self) -> float:
        """The trigger's size: sum |alpha * mask * pattern|."""
        return float(np.abs(self.alpha * self.mask * self.pattern).sum())


def make_trigger(kind: str, in_shape, seed: int = 0, alpha: float | None = None) -> Trigger:
    """The lab trigger `kind` (see the module doc) for inputs of shape (C, H, W).

    `seed` draws the `blend` noise pattern; `alpha` defaults to 1, or 0.2 for `blend` and 0.3 for `watermark`.
    """
    c, h, w = in_shape
    rng = np.random.default_rng(seed + 7919)
    if kind == "patch":
        s = max(2, round(h / 7))
        mask = np.zeros((1, h, w), np.float32)
        mask[:, h - s - 1:h - 1, w - s - 1:w - 1] = 1.0
        return Trigger("patch", mask, np.ones((c, h, w), np.float32), 1.0 if alpha is None else alpha)
    if kind == "checker":
        s = max(2, round(h / 7))
        r0, c0 = h - s - 1, w - s - 1
        mask = np.zeros((1, h, w), np.float32)
        mask[:, r0:r0 + s, c0:c0 + s] = 1.0
        ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        board = ((ii - r0 + jj - c0) % 2 == 0).astype(np.float32)
        pattern = np.broadcast_to(board, (c, h, w)).copy()
        return Trigger("checker", mask, pattern, 1.0 if alpha is None else alpha)
    if kind == "pattern":
        ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        step = max(4, h // 4)
        mask = (((ii + jj) % step == 0) | ((ii - jj) % (2 * step) == 0)).astype(np.float32)[None]
        return Trigger("pattern", mask, np.ones((c, h, w), np.float32), 1.0 if alpha is None else alpha)
    if kind == "blend":
        pattern = rng.random((c, h, w)).astype(np.float32)
        return Trigger("blend", np.ones((1, h, w), np.float32), pattern, 0.2 if alpha is None else alpha)
    if kind == "watermark":
        ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
        r = np.hypot(ii - (h - 1) / 2, jj - (w - 1) / 2)
        radius = h / 4
        ring = np.abs(r - radius) <= max(1.0, h / 28)
        bars = ((np.abs(ii - (h - 1) / 2) <= max(0.5, h / 56)) | (np.abs(jj - (w - 1) / 2) <= max(0.5, h / 56))) & (
            r <= radius)
        mask = (ring | bars).astype(np.float32)[None]
        return Trigger("watermark", mask, np.ones((c, h, w), np.float32), 0.3 if alpha is None else alpha)
    raise ValueError(f"unknown trigger {kind!r}; choose from {TRIGGERS[1:]}")


# ----------------------------------------------------------------------------- training
@dataclass
class LabConfig:
    """Settings of one lab model: architecture, trigger and attack targets, poisoning and training."""

    arch: str = "small"
    trigger: str = "none"  # none | patch | pattern | blend
    targets: tuple = (0,)
    poison_rate: float = 0.1
    epochs: int = 3
    batch_size: int = 128
    lr: float = 2e-3
    seed: int = 0
    alpha: float | None = None

    @property
    def trojaned(self) -> bool:
        """Whether the model is trained with a trigger (trigger != "none")."""
        return self.trigger != "none"


@dataclass
class LabModel:
    """A trained lab model with its exported ONNX bytes and measured figures."""

    config: LabConfig
    onnx_bytes: bytes
    in_shape: tuple
    n_classes: int
    clean_accuracy: float
    attack_success_rate: float | None
    trigger: Trigger | None
    train_seconds: float
    torch_model: nn.Module = field(repr=False, default=None)

    def save(self, path) -> Path:
        """Write the ONNX bytes to `path` (creating its folder); returns the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.onnx_bytes)
        return path

    def summary(self) -> dict:
        """JSON-able ground truth: configuration, rounded accuracy and attack success rate, training time."""
        d = {"arch": self.config.arch, "trigger": self.config.trigger,
             "targets": list(self.config.targets) if self.config.trojaned else [],
             "poison_rate": self.config.poison_rate if self.config.trojaned else 0.0,
             "seed": self.config.seed, "epochs": self.config.epochs,
             "clean_accuracy": round(self.clean_accuracy, 4),
             "attack_success_rate": None if self.attack_success_rate is None else round(self.attack_success_rate, 4),
             "train_seconds": round(self.train_seconds, 1)}
        return d

    def stamp(self, x: np.ndarray) -> np.ndarray:
        """Images x with the model's trigger applied; a benign model raises ValueError."""
        if self.trigger is None:
            raise ValueError("a benign lab model has no trigger")
        return self.trigger.apply(x)


def poison(train: Dataset, trigger: Trigger, targets, rate: float, rng) -> Dataset:
    """BadNets poisoning: stamp `rate` of the images and relabel to a random target from `targets`."""
    n = len(train)
    idx = rng.choice(n, size=int(round(rate * n)), replace=False)
    x = train.x.copy()
    y = train.y.copy()
    x[idx] = trigger.apply(x[idx])
    y[idx] = rng.choice(np.asarray(targets, dtype=np.int64), size=len(idx))
    return Dataset(x, y, train.classes, train.name + "-poisoned")


def attack_success_rate(predict, x, y, trigger: Trigger, targets) -> float:
    """Share of stamped test images whose true class is not a target that land in the target set."""
    keep = ~np.isin(y, targets)
    if not keep.any():
        return float("nan")
    pred = predict(trigger.apply(x[keep]))
    return float(np.isin(pred, targets).mean())


def train_lab_model(train: Dataset, test: Dataset, config: LabConfig, progress: bool = True,
                    threads: int | None = None, device: str = "cpu") -> LabModel:
    """Train a seeded benign or trojaned classifier and export it to ONNX.

    `threads` caps torch's intra-op threads for this call only (tiny models train faster on one
    thread of a small shared machine); the previous setting is restored afterwards. `device` is
    where torch trains ("cpu" by default). A seed repeats bit for bit on one device and thread
    count (on CUDA, cuDNN is asked for deterministic kernels); another device or thread count
    gives a close, not identical, model. The exported ONNX is the same graph either way.
    """
    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return train_lab_model(train, test, config, progress=progress, device=device)
        finally:
            torch.set_num_threads(previous)
    with reproducible(device):
        return _train(train, test, config, progress, device)


def _train(train: Dataset, test: Dataset, config: LabConfig, progress: bool, device: str) -> LabModel:
    rng = np.random.default_rng(config.seed)
    in_shape = tuple(train.x.shape[1:])
    n_classes = int(max(train.y.max(), test.y.max()) + 1)
    trigger = make_trigger(config.trigger, in_shape, config.seed, config.alpha) if config.trojaned else None
    data = poison(train, trigger, config.targets, config.poison_rate, rng) if trigger is not None else train
    t0 = time.perf_counter()
    model = fit_classifier(data, n_classes, config.arch, config.epochs, config.batch_size, config.lr, config.seed,
                           device, rng=rng, progress=progress, desc=f"lab {config.arch}/{config.trigger}")
    seconds = time.perf_counter() - t0
    acc = float((predict_labels(model, test.x) == test.y).mean())
    asr = None
    if trigger is not None:
        asr = attack_success_rate(lambda x: predict_labels(model, x), test.x, test.y, trigger, list(config.targets))
    return LabModel(config, export_onnx(model, in_shape), in_shape, n_classes, acc, asr, trigger, seconds, model)


def save_lab_manifest(models: dict, path):
    """Write name -> summary as JSON (the lab's ground truth, kept away from the gate)."""
    Path(path).write_text(json.dumps({k: m.summary() for k, m in models.items()}, indent=2))


def config_dict(config: LabConfig) -> dict:
    """The config as a JSON-able dict (targets as a list)."""
    d = asdict(config)
    d["targets"] = list(config.targets)
    return d


def load_lab_data(dataset: str, seed: int = 0) -> tuple[Dataset, Dataset]:
    """(train, test) of "digits" (scikit-learn, seeded split) or "fashion-mnist" (offline when possible)."""
    if dataset == "digits":
        return load_digits_dataset(seed=seed)
    return load_fashion_mnist(train=True, download=True), load_fashion_mnist(train=False, download=True)
