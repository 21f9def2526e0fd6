"""The image-classifier architectures the project trains: lab models, shadow models, reference models.

- ``small``: two 3x3 conv layers (ReLU, max-pool) and two dense ones; ~80k parameters at 28x28
  with width 16;
- ``deep``: six 3x3 conv layers in VGG-style blocks and a dense head (width 32 in the lab);
- ``lenet``: LeNet-5's shape (5x5 convs, average pooling, tanh, dense 120-84), used by the
  benchmarks as an architecture no shadow model has.

Every model maps (batch, C, H, W) float32 in [0, 1] to (batch, K) logits; `WithSoftmax` adds the
softmax an exported classifier carries.
"""
from __future__ import annotations

import torch
from torch import nn

ARCHITECTURES = ("small", "deep", "lenet")


class SmallCNN(nn.Module):
    """Two conv layers and two dense ones; ~80k parameters at 28x28."""

    def __init__(self, in_shape=(1, 28, 28), n_classes=10, width=16, hidden=48):
        super().__init__()
        c, h, w = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        flat = 2 * width * (h // 4) * (w // 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, x):
        """Logits (n, K) for images (n, C, H, W)."""
        return self.head(self.features(x))


class DeepCNN(nn.Module):
    """Six conv layers (VGG-style blocks) and a dense head."""

    def __init__(self, in_shape=(1, 28, 28), n_classes=10, width=32, hidden=128):
        super().__init__()
        c, h, w = in_shape

        def block(i, o):
            return [nn.Conv2d(i, o, 3, padding=1), nn.ReLU(), nn.Conv2d(o, o, 3, padding=1), nn.ReLU()]

        self.features = nn.Sequential(
            *block(c, width), nn.MaxPool2d(2),
            *block(width, 2 * width), nn.MaxPool2d(2),
            *block(2 * width, 2 * width),
        )
        flat = 2 * width * (h // 4) * (w // 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, hidden), nn.ReLU(), nn.Linear(hidden, n_classes))

    def forward(self, x):
        """Logits (n, K) for images (n, C, H, W)."""
        return self.head(self.features(x))


class LeNet(nn.Module):
    """LeNet-5's shape: 5x5 convs (6 and 16 maps), average pooling, tanh, dense 120-84."""

    def __init__(self, in_shape=(1, 28, 28), n_classes=10, width=6):
        super().__init__()
        c, h, w = in_shape
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
            nn.Conv2d(width, 16 * width // 6, 5, padding=2), nn.Tanh(), nn.AvgPool2d(2),
        )
        flat = (16 * width // 6) * (h // 4) * (w // 4)
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(flat, 120), nn.Tanh(), nn.Linear(120, 84), nn.Tanh(),
                                  nn.Linear(84, n_classes))

    def forward(self, x):
        """Logits (n, K) for images (n, C, H, W)."""
        return self.head(self.features(x))


class WithSoftmax(nn.Module):
    """The classifier followed by a softmax: what an exported model returns."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        """Class probabilities (n, K), softmax of the wrapped net's logits, for images (n, C, H, W)."""
        return torch.softmax(self.net(x), dim=1)


def build_model(arch: str, in_shape, n_classes, width: int | None = None) -> nn.Module:
    """A fresh model of architecture `arch`; `width` (conv channels) defaults to the lab's."""
    kinds = {"small": SmallCNN, "deep": DeepCNN, "lenet": LeNet}
    if arch not in kinds:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    return kinds[arch](in_shape, n_classes) if width is None else kinds[arch](in_shape, n_classes, width=int(width))
