"""Purify-and-compare: a small masked denoising autoencoder trained on the held-out images.

A trigger is something clean images do not contain. An autoencoder trained only on clean
images (FtC / BDMAE style: Sun et al., "Mask and Restore", 2023) rebuilds an input from what
clean images look like, so it rebuilds a triggered input *without* its trigger; the model's
answer on the rebuilt input then moves away from the hijacked one, while a clean input's
answer stays. The statistic is the Jensen-Shannon divergence between the model's answers on
x and on AE(x) (oriented like the others: `-js`, low = trojan-like).

Training masks random blocks of the input and adds noise (the network must fill in from
context, not copy), seeded, on the CPU or GPU; the network is exported to ONNX and runs
through ONNX Runtime at serving time like everything else.
"""
from __future__ import annotations

import io
import warnings

import numpy as np
import onnxruntime as ort
import torch
from torch import nn


class DenoisingAutoencoder(nn.Module):
    """Conv encoder (two stride-2 steps) and decoder back to the input shape, sigmoid output."""

    def __init__(self, channels: int, width: int = 32):
        super().__init__()
        self.encode = nn.Sequential(
            nn.Conv2d(channels, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, width, 3, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ReLU())
        self.decode = nn.Sequential(
            nn.ConvTranspose2d(2 * width, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.ConvTranspose2d(width, width, 4, stride=2, padding=1), nn.ReLU(),
            nn.Conv2d(width, channels, 3, padding=1), nn.Sigmoid())

    def forward(self, x):
        h, w = x.shape[-2:]
        ph, pw = (-h) % 4, (-w) % 4
        y = self.decode(self.encode(nn.functional.pad(x, (0, pw, 0, ph))))
        return y[..., :h, :w]


def _corrupt(x: torch.Tensor, gen: torch.Generator, block: int, noise: float) -> torch.Tensor:
    n, _, h, w = x.shape
    out = x + noise * torch.randn(x.shape, generator=gen)
    for _ in range(2):  # two random blocks per image masked to mid-grey
        r = torch.randint(0, max(1, h - block + 1), (n,), generator=gen)
        c = torch.randint(0, max(1, w - block + 1), (n,), generator=gen)
        rows = (torch.arange(h)[None, :] >= r[:, None]) & (torch.arange(h)[None, :] < r[:, None] + block)
        cols = (torch.arange(w)[None, :] >= c[:, None]) & (torch.arange(w)[None, :] < c[:, None] + block)
        m = (rows[:, :, None] & cols[:, None, :])[:, None].to(x.dtype)
        out = out * (1 - m) + 0.5 * m
    return out.clamp(0.0, 1.0)


def train_purifier(x: np.ndarray, epochs: int = 15, batch_size: int = 64, lr: float = 2e-3, seed: int = 0,
                   noise: float = 0.1, threads: int | None = None) -> bytes:
    """Fit the autoencoder to rebuild clean held-out images x (n, C, H, W) from masked, noisy copies;
    returns it as ONNX bytes (input `x`, output `x_hat`, dynamic batch)."""
    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(int(threads))
    try:
        torch.manual_seed(seed)
        gen = torch.Generator().manual_seed(seed)
        xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
        model = DenoisingAutoencoder(xt.shape[1])
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        block = max(2, xt.shape[-2] // 5)
        for _ in range(epochs):
            perm = torch.randperm(len(xt), generator=gen)
            for i in range(0, len(xt), batch_size):
                clean = xt[perm[i:i + batch_size]]
                loss = nn.functional.mse_loss(model(_corrupt(clean, gen, block, noise)), clean)
                opt.zero_grad()
                loss.backward()
                opt.step()
        model.eval()
        buf = io.BytesIO()
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.onnx.export(model, (xt[:2],), buf, input_names=["x"], output_names=["x_hat"],
                              dynamic_axes={"x": {0: "n"}, "x_hat": {0: "n"}}, opset_version=17, dynamo=False)
        return buf.getvalue()
    finally:
        torch.set_num_threads(previous)


class Purifier:
    """ONNX Runtime session of a trained autoencoder: `purify(x)` returns the rebuilt inputs."""

    def __init__(self, onnx_bytes: bytes):
        so = ort.SessionOptions()
        so.log_severity_level = 3
        self.onnx_bytes = onnx_bytes
        self._session = ort.InferenceSession(onnx_bytes, sess_options=so, providers=["CPUExecutionProvider"])

    def purify(self, x: np.ndarray) -> np.ndarray:
        out = self._session.run(["x_hat"], {"x": np.ascontiguousarray(x, dtype=np.float32)})[0]
        return np.clip(out, 0.0, 1.0).astype(np.float32)
