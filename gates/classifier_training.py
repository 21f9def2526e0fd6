"""Seeded training and ONNX export of a small image classifier: the clean reference classifier of the
run-time check and the scan, and the demo lab's models, share this one loop.

`fit_classifier` minimises the cross-entropy with Adam under a one-cycle learning rate,

    theta <- Adam(theta, grad_theta CE(f_theta(x_b), y_b)),   lr_t = OneCycle(lr, epochs * ceil(n / B))

over seeded permutations of (x, y); `export_onnx` writes the model with a softmax head as a
single-file ONNX (input (batch, C, H, W), output (batch, K) probabilities); `train_reference` trains
the benign reference classifier the defender needs (never through the module that plants trojans).
"""
from __future__ import annotations

import contextlib
import io
import warnings

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .architectures import WithSoftmax, build_model
from .data import Dataset


@contextlib.contextmanager
def reproducible(device: str):
    """On CUDA, cuDNN picks deterministic kernels, so a seed gives the same model run after run."""
    if not str(device).startswith("cuda"):
        yield
        return
    with torch.backends.cudnn.flags(enabled=True, benchmark=False, deterministic=True,
                                    allow_tf32=torch.backends.cudnn.allow_tf32):
        yield


def fit_classifier(data: Dataset, n_classes: int, arch: str = "small", epochs: int = 40, batch_size: int = 64,
                   lr: float = 2e-3, seed: int = 0, device: str = "cpu", rng: np.random.Generator | None = None,
                   progress: bool = False, desc: str = "train") -> nn.Module:
    """A fresh `arch` trained on `data` (see the module's equation); returns it on the CPU in eval mode.
    `rng` draws the batch order (default: a generator of `seed`); torch is seeded with `seed`."""
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed) if rng is None else rng
    model = build_model(arch, tuple(data.x.shape[1:]), n_classes).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    steps_per_epoch = int(np.ceil(len(data) / batch_size))
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    xt, yt = torch.from_numpy(data.x).to(device), torch.from_numpy(data.y).to(device)
    bar = tqdm(total=epochs * steps_per_epoch, disable=not progress, desc=desc, leave=False)
    for _ in range(epochs):
        model.train()
        perm = torch.from_numpy(rng.permutation(len(data))).to(device)
        for i in range(steps_per_epoch):
            b = perm[i * batch_size:(i + 1) * batch_size]
            loss = nn.functional.cross_entropy(model(xt[b]), yt[b])
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
            bar.update(1)
    bar.close()
    return model.cpu().eval()


def predict_labels(model: nn.Module, x: np.ndarray, batch: int = 2048) -> np.ndarray:
    """argmax labels of a torch classifier on x, without gradients."""
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            out.append(model(torch.from_numpy(x[i:i + batch])).argmax(1).numpy())
    return np.concatenate(out) if out else np.zeros(0, np.int64)


def export_onnx(model: nn.Module, in_shape, opset: int = 17) -> bytes:
    """Export `model` (+ softmax) to a single-file ONNX: input (batch, C, H, W), output (batch, K)."""
    wrapped = WithSoftmax(model).eval()
    dummy = torch.zeros((1,) + tuple(in_shape), dtype=torch.float32)
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter keeps dynamic axes simple
        torch.onnx.export(wrapped, (dummy,), buf, input_names=["input"], output_names=["probabilities"],
                          dynamic_axes={"input": {0: "batch"}, "probabilities": {0: "batch"}},
                          opset_version=opset, dynamo=False)
    return buf.getvalue()


def train_reference(data: Dataset, n_classes: int, epochs: int = 40, batch_size: int = 64, lr: float = 2e-3,
                    seed: int = 0, device: str = "cpu") -> tuple[bytes, float]:
    """Train one benign SmallCNN on labelled held-out `data` on torch `device`; returns (ONNX bytes,
    train accuracy). Raises ValueError when `data` covers another number of classes than `n_classes`."""
    covered = int(data.y.max()) + 1
    if covered != n_classes:
        raise ValueError(f"reference training data covers {covered} classes, the model has {n_classes}")
    with reproducible(device):
        model = fit_classifier(data, n_classes, "small", epochs, batch_size, lr, seed, device)
    acc = float((predict_labels(model, data.x) == data.y).mean())
    return export_onnx(model, tuple(data.x.shape[1:])), acc
