"""A student of the served model: the run-time check's reference classifier, distilled black-box.

The check compares the served model's answer on an input with a clean model of the same task
(`evidence`, statistic ``reference``). A reference trained on the defender's few labelled images
agrees with the served model on only about 85% of clean inputs, and every clean disagreement
costs false alarms. A *student* distilled from the served model's own probabilities agrees far
more often on clean inputs (it learns the model's answers, mistakes included), and it must not
learn the trojan. Distillation (Hinton et al.; used against backdoors by Yoshida & Fujino,
AISec'20) minimises the soft cross-entropy

    L(theta) = E_b [ - sum_k t_k(b) log s_theta(a(b))_k ]

over augmented batches a(b) of the held-out images, where s_theta is the student's softmax and
the target t(b) is the served model's answer on the image *before* the part of the augmentation
a trojan could use:

- natural augmentation (affine, elastic, small noise): t = f(x), the answer on the untransformed
  image ("source" labels: asking the model on the augmented images instead taught the student the
  trojan, 40-75% of its attack success on the lab zoo; docs/experiments.md);
- mixup x = l x1 + (1 - l) x2 and cutmix (a box of x2 pasted into x1, area share 1 - l):
  t = l f(x1) + (1 - l) f(x2);
- overlays, applied on top with probability ``overlay_share``: a semi-transparent pattern
  (noise, stripes, rings, checkerboards, strokes, another image; alpha 0.05-0.5 over 30-100% of
  the image), an opaque patch of 1-10% of the image with random content, or sparse bright
  pixels: t is the answer without the overlay, so the student learns to *ignore* overlay-shaped
  content. A trigger is overlay-shaped content; the student answers a stamped image by what lies
  under the stamp, while the trojaned model answers the target.

The served model is asked once per held-out image (counted in the oracle's phase ``check-fit``), never
about an augmented image. Nothing here needs the labels of the held-out images.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

MIN_STEPS = 1000  # optimiser steps at least, whatever the held-out set's size


def _affine(x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Random rotation (+-12 deg), scale (0.9-1.1), shear (+-0.1) and shift (+-10%) of each image."""
    n = len(x)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(n, generator=g)  # noqa: E731
    ang, sc, sh = u(-0.21, 0.21), u(0.9, 1.1), u(-0.1, 0.1)
    tx, ty = u(-0.2, 0.2), u(-0.2, 0.2)
    theta = torch.stack([torch.stack([sc * torch.cos(ang), -sc * torch.sin(ang) + sh, tx], 1),
                         torch.stack([sc * torch.sin(ang), sc * torch.cos(ang), ty], 1)], 1)
    grid = nn.functional.affine_grid(theta, list(x.shape), align_corners=False)
    return nn.functional.grid_sample(x, grid, padding_mode="zeros", align_corners=False)


def _elastic(x: torch.Tensor, g: torch.Generator, strength: float = 0.08) -> torch.Tensor:
    """Elastic distortion: a smooth random displacement field (coarse noise, upsampled) added to the identity grid."""
    n, _, h, w = x.shape
    coarse = (torch.rand(n, 2, 4, 4, generator=g) * 2 - 1) * strength
    field = nn.functional.interpolate(coarse, size=(h, w), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    ident = nn.functional.affine_grid(torch.eye(2, 3).expand(n, 2, 3), list(x.shape), align_corners=False)
    return nn.functional.grid_sample(x, ident + field, padding_mode="border", align_corners=False)


def _boxes(n: int, h: int, w: int, area: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    """Masks (n, 1, h, w) of one random box per image, box i about `area[i]` of the image, aspect 0.5-2."""
    aspect = torch.exp((torch.rand(n, generator=g) * 2 - 1) * math.log(2))
    bh = (area * h * w / aspect).sqrt().round().clamp(1, h)
    bw = (area * h * w / bh).round().clamp(1, w)
    r0 = (torch.rand(n, generator=g) * (h - bh + 1)).floor()
    c0 = (torch.rand(n, generator=g) * (w - bw + 1)).floor()
    rows = torch.arange(h, dtype=torch.float32)[None, :, None]
    cols = torch.arange(w, dtype=torch.float32)[None, None, :]
    inside = ((rows >= r0[:, None, None]) & (rows < (r0 + bh)[:, None, None]) &
              (cols >= c0[:, None, None]) & (cols < (c0 + bw)[:, None, None]))
    return inside[:, None].float()


def _patterns(n: int, shape, g: torch.Generator, pool: torch.Tensor) -> torch.Tensor:
    """n random overlay patterns (n, C, H, W) in [0, 1], one kind each: noise, stripes, checkerboard, ring,
    thin strokes, or a held-out image."""
    c, h, w = shape
    kind = torch.randint(0, 6, (n, 1, 1, 1), generator=g)
    yy = torch.arange(h, dtype=torch.float32)[None, None, :, None]
    xx = torch.arange(w, dtype=torch.float32)[None, None, None, :]
    u = lambda lo, hi: (lo + (hi - lo) * torch.rand(n, generator=g))[:, None, None, None]  # noqa: E731
    period, angle = u(2, 8).floor(), u(0, math.pi)
    stripes = ((torch.cos(angle) * xx + torch.sin(angle) * yy) / period).floor().remainder(2)
    size = u(1, 5).floor()
    checker = ((yy / size).floor() + (xx / size).floor()).remainder(2)
    cy, cx, radius, width = u(0, h), u(0, w), u(0.15, 0.55) * min(h, w), u(1, 3)
    ring = ((((yy - cy) ** 2 + (xx - cx) ** 2).sqrt() - radius).abs() < width).float()
    offset, slope = u(-h / 2, h / 2), u(0, math.pi)
    strokes = (((yy - h / 2) * torch.cos(slope) - (xx - w / 2) * torch.sin(slope) - offset).abs() < 0.5).float()
    strokes = strokes * (torch.rand(n, 1, h, w, generator=g) < 0.9).float()
    images = pool[torch.randint(0, len(pool), (n,), generator=g)]
    options = [torch.rand(n, c, h, w, generator=g), stripes, checker, ring, strokes, images]
    out = torch.zeros(n, c, h, w)
    for k, pattern in enumerate(options):
        out = torch.where(kind == k, pattern.expand(n, c, h, w), out)
    return out


def _overlay(x: torch.Tensor, g: torch.Generator, pool: torch.Tensor) -> torch.Tensor:
    """One overlay per image (see the module doc): a semi-transparent pattern (half the images), an opaque
    patch with random content (three tenths) or sparse bright or dark pixels (the rest)."""
    n, c, h, w = x.shape
    kind = torch.rand(n, generator=g)[:, None, None, None]
    alpha = 0.05 + 0.45 * torch.rand(n, generator=g)[:, None, None, None]
    blend_mask = alpha * _boxes(n, h, w, 0.3 + 0.7 * torch.rand(n, generator=g), g)
    blended = (1 - blend_mask) * x + blend_mask * _patterns(n, (c, h, w), g, pool)
    patch_mask = _boxes(n, h, w, 0.01 + 0.09 * torch.rand(n, generator=g), g)
    content = torch.rand(n, c, h, w, generator=g)
    binary = torch.rand(n, generator=g)[:, None, None, None] < 0.3
    content = torch.where(binary, (content > 0.5).float(), content)
    patched = (1 - patch_mask) * x + patch_mask * content
    density = 0.01 + 0.05 * torch.rand(n, generator=g)[:, None, None, None]
    dots = (torch.rand(n, 1, h, w, generator=g) < density).float()
    value = (torch.rand(n, generator=g)[:, None, None, None] < 0.8).float()
    sparse = (1 - dots) * x + dots * value
    out = torch.where(kind < 0.5, blended, torch.where(kind < 0.8, patched, sparse))
    return out.clamp_(0.0, 1.0)


def augment(xb: torch.Tensor, tb: torch.Tensor, g: torch.Generator, pool: torch.Tensor, overlay_share: float):
    """(natural, images, targets): natural-augmented images (before overlays), the images the student sees, and
    their source targets (mixup/cutmix mix their sources' targets; see the module doc)."""
    n, _, h, w = xb.shape
    kind = torch.randint(0, 6, (n,), generator=g)  # none, affine, elastic, noise, mixup, cutmix
    partner = torch.randint(0, n, (n,), generator=g)
    lam = torch.rand(n, generator=g)  # mixup weight / cutmix share kept
    col = lambda k: (kind == k)[:, None, None, None]  # noqa: E731
    sigma = 0.02 + 0.08 * torch.rand(n, 1, 1, 1, generator=g)
    noisy = (xb + sigma * torch.randn(xb.shape, generator=g)).clamp(0, 1)
    l4 = lam[:, None, None, None]
    mixed = l4 * xb + (1 - l4) * xb[partner]
    box = _boxes(n, h, w, 1 - lam, g)
    cut = (1 - box) * xb + box * xb[partner]
    share = box.mean(dim=(1, 2, 3))
    x = torch.where(col(1), _affine(xb, g), xb)
    x = torch.where(col(2), _elastic(xb, g), x)
    x = torch.where(col(3), noisy, x)
    x = torch.where(col(4), mixed, x)
    x = torch.where(col(5), cut, x)
    weight = torch.where(kind == 4, 1 - lam, torch.where(kind == 5, share, torch.zeros(n)))[:, None]
    t = (1 - weight) * tb + weight * tb[partner]
    over = (torch.rand(n, generator=g) < overlay_share)[:, None, None, None]
    seen = torch.where(over, _overlay(x, g, pool), x)
    return x, seen, t


def distil_student(oracle, x: np.ndarray, arch: str = "small", epochs: int = 60, batch_size: int = 128,
                   lr: float = 2e-3, overlay_share: float = 0.5, seed: int = 0, threads: int | None = 1) -> bytes:
    """The student of the module doc, trained on held-out images `x` against `oracle` for `epochs` (at least
    `MIN_STEPS` optimiser steps); returns ONNX bytes (softmax head, dynamic batch). `threads` caps torch's
    threads for the training (a small student trains fastest on one; None: torch's setting); the previous
    setting is restored."""
    if threads is not None:
        previous = torch.get_num_threads()
        torch.set_num_threads(int(threads))
        try:
            return distil_student(oracle, x, arch, epochs, batch_size, lr, overlay_share, seed, None)
        finally:
            torch.set_num_threads(previous)
    from ..architectures import build_model
    from ..classifier_training import export_onnx

    if not 0.0 <= overlay_share <= 1.0:
        raise ValueError(f"overlay_share must be in [0, 1], got {overlay_share}")
    x = oracle.check_inputs(x)
    if len(x) < 10:
        raise ValueError(f"{len(x)} held-out images are too few to distil a student from")
    with oracle.phase("check-fit"):
        teacher = oracle.predict_proba(x).astype(np.float32)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    student = build_model(arch, tuple(x.shape[1:]), oracle.n_classes)
    steps_per_epoch = int(math.ceil(len(x) / batch_size))
    epochs = max(int(epochs), int(math.ceil(MIN_STEPS / steps_per_epoch)))  # a small held-out set still trains
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    xt, tt = torch.from_numpy(x), torch.from_numpy(teacher)
    pool = xt[torch.randperm(len(xt), generator=g)[:256]]
    for _ in range(epochs):
        student.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(steps_per_epoch):
            b = perm[i * batch_size:(i + 1) * batch_size]
            _, seen, target = augment(xt[b], tt[b], g, pool, overlay_share)
            logp = nn.functional.log_softmax(student(seen), dim=1)
            loss = -(target * logp).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return export_onnx(student.eval(), tuple(x.shape[1:]))
