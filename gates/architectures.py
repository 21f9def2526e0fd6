"""The image-classifier architectures the project trains: lab models, shadow models, reference models.

- ``small``: two 3x3 conv layers (ReLU, max-pool) and two dense ones; ~80k parameters at 28x28
  with width 16;
- ``deep``: six 3x3 conv layers in VGG-style blocks and a dense head (width 32 in the lab);
- ``resnet``: a small residual network with batch normalisation (a stem, two residual blocks
  with strided downsampling between them, global average pooling), as vendors commonly ship;
- ``allconv``: strided 3x3 convolutions with ELU and a 1x1 classifier convolution under global
  average pooling (Springenberg et al.'s all-convolutional shape), no dense layer;
- ``mlp``: two dense hidden layers on the flattened image (width = first hidden layer), no convolution;
- ``lenet``: LeNet-5's shape (5x5 convs, average pooling, tanh, dense 120-84), used by the
  benchmarks as an architecture no shadow model has.

The shadow pool draws ``small`` and ``deep`` and, for a share of its shadows, ``resnet``,
``allconv`` and ``mlp``, so that a scan calibration is not fitted to two architectures alone.

Every model maps (batch, C, H, W) float32 in [0, 1] to (batch, K) logits; `WithSoftmax` adds the
softmax an exported classifier carries.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

ARCHITECTURES = ("small", "deep", "resnet", "allconv", "mlp", "lenet")


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


class _Residual(nn.Module):
    """x + BN(conv(ReLU(BN(conv(x))))), then ReLU: one basic residual block at constant width."""

    def __init__(self, width):
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(),
                                  nn.Conv2d(width, width, 3, padding=1, bias=False), nn.BatchNorm2d(width))
        self.out = nn.ReLU()

    def forward(self, x):
        """ReLU(x + body(x))."""
        return self.out(x + self.body(x))


class ResNetSmall(nn.Module):
    """Stem (conv-BN-ReLU), residual block, strided conv to 2x width, residual block, strided conv to
    4x width, global average pooling, one dense layer."""

    def __init__(self, in_shape=(1, 28, 28), n_classes=10, width=12):
        super().__init__()
        c = in_shape[0]

        def down(i, o):
            return [nn.Conv2d(i, o, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(o), nn.ReLU()]

        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1, bias=False), nn.BatchNorm2d(width), nn.ReLU(), _Residual(width),
            *down(width, 2 * width), _Residual(2 * width), *down(2 * width, 4 * width),
            nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4 * width, n_classes)

    def forward(self, x):
        """Logits (n, K) for images (n, C, H, W)."""
        return self.head(self.features(x))


class AllConv(nn.Module):
    """3x3 convs (stride 1, 2, 1, 2) with ELU, a 1x1 conv to K maps, global average pooling."""

    def __init__(self, in_shape=(1, 28, 28), n_classes=10, width=12):
        super().__init__()
        c = in_shape[0]
        self.features = nn.Sequential(
            nn.Conv2d(c, width, 3, padding=1), nn.ELU(), nn.Conv2d(width, 2 * width, 3, stride=2, padding=1), nn.ELU(),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ELU(),
            nn.Conv2d(2 * width, 4 * width, 3, stride=2, padding=1), nn.ELU(),
            nn.Conv2d(4 * width, n_classes, 1), nn.AdaptiveAvgPool2d(1), nn.Flatten())

    def forward(self, x):
        """Logits (n, K) for images (n, C, H, W): the class maps' spatial means."""
        return self.features(x)


class MLP(nn.Module):
    """Flatten, dense `width` (ReLU), dense `width // 2` (ReLU), dense K."""

    def __init__(self, in_shape=(1, 28, 28), n_classes=10, width=256):
        super().__init__()
        d = int(np.prod(in_shape))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(d, width), nn.ReLU(), nn.Linear(width, width // 2), nn.ReLU(),
                                  nn.Linear(width // 2, n_classes))

    def forward(self, x):
        """Logits (n, K) for images (n, C, H, W)."""
        return self.head(x)


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
    kinds = {"small": SmallCNN, "deep": DeepCNN, "resnet": ResNetSmall, "allconv": AllConv, "mlp": MLP, "lenet": LeNet}
    if arch not in kinds:
        raise ValueError(f"unknown architecture {arch!r}; choose from {ARCHITECTURES}")
    return kinds[arch](in_shape, n_classes) if width is None else kinds[arch](in_shape, n_classes, width=int(width))
