"""Seeded classifier training for shadow models (and the benchmarks' vendor-like models).

`train_classifier` fits a fresh architecture (see `architectures`) on (x, y) with Adam and a
one-cycle learning rate by default, or another of `OPTIMIZERS` (AdamW; SGD with Nesterov momentum
0.9) and `SCHEDULES` (cosine annealing to 0, constant, step: x0.1 after each third), optionally
with label smoothing and light augmentation, and returns the torch module (logits) in eval mode. It never plants anything itself: a trojaned shadow is trained on data
that `triggers.poison` changed first.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..architectures import build_model

AUGMENTATIONS = ("none", "shift", "noise", "flip")
OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("onecycle", "cosine", "constant", "step")


def _augment(xb: torch.Tensor, kind: str, gen: torch.Generator) -> torch.Tensor:
    """shift: roll by up to 2 px; noise: + N(0, 0.03^2) clipped to [0, 1]; flip: left-right on half."""
    if kind == "shift":
        dy, dx = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
        return torch.roll(xb, shifts=(dy, dx), dims=(2, 3))
    if kind == "noise":
        return (xb + 0.03 * torch.randn(xb.shape, generator=gen)).clamp(0.0, 1.0)
    if kind == "flip":
        flip = torch.rand(len(xb), generator=gen) < 0.5
        return torch.where(flip[:, None, None, None], xb.flip(3), xb)
    return xb


def train_classifier(x: np.ndarray, y: np.ndarray, n_classes: int, arch: str = "small", width: int | None = None,
                     epochs: int = 6, lr: float = 2e-3, batch_size: int = 64, seed: int = 0, augment: str = "none",
                     weight_decay: float = 0.0, device: str = "cpu", optimizer: str = "adam",
                     schedule: str = "onecycle", label_smoothing: float = 0.0) -> nn.Module:
    """Train `arch` on (x, y) (Adam + one-cycle unless asked otherwise); returns the model (logits) on
    the CPU, in eval mode. The defaults train exactly as before the other recipes existed."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; choose from {AUGMENTATIONS}")
    if optimizer not in OPTIMIZERS or schedule not in SCHEDULES:
        raise ValueError(f"optimizer must be one of {OPTIMIZERS} and schedule one of {SCHEDULES}, "
                         f"not {optimizer!r} / {schedule!r}")
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = build_model(arch, tuple(x.shape[1:]), n_classes, width).to(device)
    if optimizer == "sgd":
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, nesterov=True, weight_decay=weight_decay)
    else:
        kind = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
        opt = kind(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps = int(np.ceil(len(x) / batch_size))
    total = max(1, epochs * steps)
    sched = {"onecycle": lambda: torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=total),
             "cosine": lambda: torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=total),
             "constant": lambda: torch.optim.lr_scheduler.LambdaLR(opt, lambda _: 1.0),
             "step": lambda: torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, total // 3), gamma=0.1)}[schedule]()
    xt, yt = torch.from_numpy(np.ascontiguousarray(x, np.float32)), torch.from_numpy(np.asarray(y, np.int64))
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(steps):
            b = perm[i * batch_size:(i + 1) * batch_size]
            xb = _augment(xt[b], augment, gen).to(device)
            loss = nn.functional.cross_entropy(model(xb), yt[b].to(device), label_smoothing=label_smoothing)
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return model.cpu().eval()


def predict_labels(model: nn.Module, x: np.ndarray, batch: int = 4096) -> np.ndarray:
    """argmax labels of a torch classifier on x (no gradients)."""
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy()
                               for i in range(0, len(x), batch)]) if len(x) else np.zeros(0, np.int64)
