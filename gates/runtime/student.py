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
  image ("source" labels; ``labels="query"`` asks the model on the transformed image instead);
- mixup x = l x1 + (1 - l) x2 and cutmix (a box of x2 pasted into x1, area share 1 - l):
  t = l f(x1) + (1 - l) f(x2);
- overlays, applied on top with probability ``overlay_share``: a semi-transparent pattern
  (noise, stripes, rings, checkerboards, strokes, another image; alpha 0.05-0.5 over 30-100% of
  the image), an opaque patch of 1-10% of the image with random content, or sparse bright
  pixels: t is the answer without the overlay, so the student learns to *ignore* overlay-shaped
  content. A trigger is overlay-shaped content; the student answers a stamped image by what lies
  under the stamp, while the trojaned model answers the target.

The served model is asked once per held-out image ("source" labels; counted in the oracle's
phase ``check-fit``). Nothing here needs the labels of the held-out images.
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

LABEL_MODES = ("source", "query")


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


def _box(h: int, w: int, area: float, g: torch.Generator) -> tuple[int, int, int, int]:
    """A random box (r0, r1, c0, c1) of about `area` of an h x w image, aspect 0.5-2."""
    aspect = math.exp((torch.rand(1, generator=g).item() * 2 - 1) * math.log(2))
    bh = max(1, min(h, int(round(math.sqrt(area * h * w / aspect)))))
    bw = max(1, min(w, int(round(area * h * w / bh))))
    r0 = int(torch.randint(0, h - bh + 1, (1,), generator=g))
    c0 = int(torch.randint(0, w - bw + 1, (1,), generator=g))
    return r0, r0 + bh, c0, c0 + bw


def _pattern(shape, g: torch.Generator, pool: torch.Tensor) -> torch.Tensor:
    """One random overlay pattern (C, H, W) in [0, 1]: noise, stripes, checkerboard, ring, strokes, or an image."""
    c, h, w = shape
    kind = int(torch.randint(0, 6, (1,), generator=g))
    yy, xx = torch.meshgrid(torch.arange(h, dtype=torch.float32), torch.arange(w, dtype=torch.float32), indexing="ij")
    if kind == 0:
        return torch.rand(c, h, w, generator=g)
    if kind == 1:
        period = 2 + int(torch.randint(0, 6, (1,), generator=g))
        ang = torch.rand(1, generator=g).item() * math.pi
        p = ((torch.cos(torch.tensor(ang)) * xx + torch.sin(torch.tensor(ang)) * yy) // period) % 2
        return p.expand(c, h, w).clone()
    if kind == 2:
        size = 1 + int(torch.randint(0, 4, (1,), generator=g))
        return (((yy // size) + (xx // size)) % 2).expand(c, h, w).clone()
    if kind == 3:
        cy, cx = torch.rand(2, generator=g) * torch.tensor([h, w], dtype=torch.float32)
        r = (0.15 + 0.4 * torch.rand(1, generator=g)) * min(h, w)
        width = 1.0 + 2.0 * torch.rand(1, generator=g)
        return ((((yy - cy) ** 2 + (xx - cx) ** 2).sqrt() - r).abs() < width).float().expand(c, h, w).clone()
    if kind == 4:
        p = torch.zeros(c, h, w)
        for _ in range(int(torch.randint(1, 5, (1,), generator=g))):
            r0, r1, c0, c1 = _box(h, w, 0.02, g)
            if torch.rand(1, generator=g).item() < 0.5:
                p[:, r0, c0:c1 + 6] = 1.0
            else:
                p[:, r0:r1 + 6, c0] = 1.0
        return p
    return pool[int(torch.randint(0, len(pool), (1,), generator=g))].clone()


def _overlay(x: torch.Tensor, g: torch.Generator, pool: torch.Tensor) -> torch.Tensor:
    """One overlay per image (see the module doc): semi-transparent pattern, opaque patch or sparse pixels."""
    out = x.clone()
    _, c, h, w = x.shape
    for i in range(len(x)):
        kind = torch.rand(1, generator=g).item()
        if kind < 0.5:  # semi-transparent pattern over 30-100% of the image
            alpha = 0.05 + 0.45 * torch.rand(1, generator=g).item()
            mask = torch.zeros(1, h, w)
            r0, r1, c0, c1 = _box(h, w, 0.3 + 0.7 * torch.rand(1, generator=g).item(), g)
            mask[:, r0:r1, c0:c1] = alpha
            out[i] = (1 - mask) * x[i] + mask * _pattern((c, h, w), g, pool)
        elif kind < 0.8:  # opaque patch of 1-10% of the image, random content
            r0, r1, c0, c1 = _box(h, w, 0.01 + 0.09 * torch.rand(1, generator=g).item(), g)
            content = torch.rand(c, r1 - r0, c1 - c0, generator=g)
            if torch.rand(1, generator=g).item() < 0.3:
                content = (content > 0.5).float()
            out[i, :, r0:r1, c0:c1] = content
        else:  # sparse bright (or dark) pixels, 1-6% of the image
            density = 0.01 + 0.05 * torch.rand(1, generator=g).item()
            m = (torch.rand(1, h, w, generator=g) < density).float()
            value = 1.0 if torch.rand(1, generator=g).item() < 0.8 else 0.0
            out[i] = (1 - m) * x[i] + m * value
    return out.clamp_(0.0, 1.0)


def augment(xb: torch.Tensor, tb: torch.Tensor, g: torch.Generator, pool: torch.Tensor, overlay_share: float):
    """(natural, images, targets): natural-augmented images (before overlays), the images the student sees, and
    their source targets (mixup/cutmix mix their sources' targets; see the module doc)."""
    n, _, h, w = xb.shape
    x, t = xb.clone(), tb.clone()
    kind = torch.randint(0, 6, (n,), generator=g)  # none, affine, elastic, noise, mixup, cutmix
    partner = torch.randint(0, n, (n,), generator=g)
    lam = torch.rand(n, generator=g)  # mixup weight / cutmix share kept
    for k, fn in ((1, _affine), (2, _elastic)):
        sel = kind == k
        if sel.any():
            x[sel] = fn(xb[sel], g)
    sel = kind == 3
    if sel.any():
        sigma = 0.02 + 0.08 * torch.rand(int(sel.sum()), 1, 1, 1, generator=g)
        x[sel] = (xb[sel] + sigma * torch.randn(xb[sel].shape, generator=g)).clamp(0, 1)
    for i in torch.nonzero(kind == 4).flatten().tolist():
        j, l = int(partner[i]), float(lam[i])
        x[i] = l * xb[i] + (1 - l) * xb[j]
        t[i] = l * tb[i] + (1 - l) * tb[j]
    for i in torch.nonzero(kind == 5).flatten().tolist():
        j = int(partner[i])
        r0, r1, c0, c1 = _box(h, w, 1 - float(lam[i]), g)
        x[i, :, r0:r1, c0:c1] = xb[j, :, r0:r1, c0:c1]
        share = (r1 - r0) * (c1 - c0) / (h * w)
        t[i] = (1 - share) * tb[i] + share * tb[j]
    natural = x
    over = torch.rand(n, generator=g) < overlay_share
    seen = x.clone()
    if over.any():
        seen[over] = _overlay(x[over], g, pool)
    return natural, seen, t


def distil_student(oracle, x: np.ndarray, arch: str = "small", epochs: int = 60, batch_size: int = 128,
                   lr: float = 2e-3, overlay_share: float = 0.5, labels: str = "source", seed: int = 0) -> bytes:
    """The student of the module doc, trained on held-out images `x` against `oracle`; returns ONNX bytes
    (softmax head, dynamic batch). ``labels="query"`` asks the model on every natural-augmented batch too."""
    from ..architectures import build_model
    from ..classifier_training import export_onnx

    if labels not in LABEL_MODES:
        raise ValueError(f"labels must be one of {LABEL_MODES}, not {labels!r}")
    if not 0.0 <= overlay_share <= 1.0:
        raise ValueError(f"overlay_share must be in [0, 1], got {overlay_share}")
    x = oracle.check_inputs(x)
    with oracle.phase("check-fit"):
        teacher = oracle.predict_proba(x).astype(np.float32)
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    student = build_model(arch, tuple(x.shape[1:]), oracle.n_classes)
    steps_per_epoch = int(math.ceil(len(x) / batch_size))
    opt = torch.optim.Adam(student.parameters(), lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=epochs * steps_per_epoch)
    xt, tt = torch.from_numpy(x), torch.from_numpy(teacher)
    pool = xt[torch.randperm(len(xt), generator=g)[:256]]
    for _ in range(epochs):
        student.train()
        perm = torch.randperm(len(xt), generator=g)
        for i in range(steps_per_epoch):
            b = perm[i * batch_size:(i + 1) * batch_size]
            natural, seen, target = augment(xt[b], tt[b], g, pool, overlay_share)
            if labels == "query":
                with oracle.phase("check-fit"):
                    target = torch.from_numpy(oracle.predict_proba(natural.numpy()).astype(np.float32))
            logp = nn.functional.log_softmax(student(seen), dim=1)
            loss = -(target * logp).sum(1).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return export_onnx(student.eval(), tuple(x.shape[1:]))
