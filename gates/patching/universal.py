"""Universal trigger search on a torch classifier: the perturbations a patch unlearns and acceptance measures.

Two families of universal (one for all images) targeted perturbations, each searched with the
weights of the converted model (white-box: the defender owns the patched copy):

* **mask** (Neural Cleanse's form, Wang et al., S&P'19): x' = (1 - m) * x + m * p, with a mask
  m in [0, 1]^(H x W) shared by the channels and a pattern p in [0, 1]^(C x H x W). Its budget is
  the mask's mean, the share of the image it may cover: sum(m) <= area * H * W, enforced by
  keeping the `area * H * W` largest mask entries (the rest set to 0) whenever it is exceeded.
  It covers patches, sparse patterns and semi-transparent watermarks.
* **additive** (a universal adversarial perturbation, Moosavi-Dezfooli et al., CVPR'17; I-BAU's
  inner problem, Zeng et al., ICLR'22): x' = clip(x + delta, 0, 1) with ||delta||_inf <= eps.
  It covers full-image blends, whose effective perturbation alpha * (n - x) is bounded by alpha.

For a target t the search maximises the log-probability of t over images of other classes,
    max_{m, p} mean_i log f_t(x'_i)     (mask, m projected to its budget)
    max_{delta} mean_i log f_t(x'_i)    (additive, delta projected to the eps-ball),
by Adam on unconstrained parameters (m = sigmoid(a), p = sigmoid(b), delta = eps * tanh(d)).
Its figure is the targeted attack success: the share of images of other classes that x' sends to t.
Without a target (t = UNTARGETED, I-BAU's own inner problem) it maximises
mean_i log(1 - f_{y_i}(x'_i)), the evidence against each image's own label, and its figure is the
share of images moved off their label: what a one-trigger-to-several-targets or all-to-all trojan
does, whose mass a single target sees only in part.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

KINDS = ("mask", "additive")
UNTARGETED = -1


@dataclass
class UniversalTrigger:
    """One universal perturbation found for `target`: its family and parameters."""

    kind: str
    target: int  # UNTARGETED: any class but the image's own
    mask: torch.Tensor | None = None  # (1, 1, H, W) for kind "mask"
    pattern: torch.Tensor | None = None  # (1, C, H, W) for kind "mask"
    delta: torch.Tensor | None = None  # (1, C, H, W) for kind "additive"

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """x' for a batch x (n, C, H, W) in [0, 1]."""
        if self.kind == "mask":
            return (1 - self.mask) * x + self.mask * self.pattern
        return (x + self.delta).clamp(0.0, 1.0)


def project_mask(m: torch.Tensor, area: float) -> torch.Tensor:
    """m with only its `area * H * W` largest entries kept when sum(m) exceeds that many pixels."""
    flat = m.reshape(-1)
    k = max(1, int(round(area * flat.numel())))
    if float(flat.sum()) <= k:
        return m
    keep = torch.zeros_like(flat)
    keep[torch.topk(flat, k).indices] = 1.0
    return (flat * keep).reshape(m.shape)


def _log_probs(clf: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return clf(x)


def _objective(logp: torch.Tensor, target: int, yb: torch.Tensor | None) -> torch.Tensor:
    """The loss the search minimises: -log f_t(x') (targeted) or -log(1 - f_y(x')) (untargeted)."""
    if target == UNTARGETED:
        p_own = logp.gather(1, yb[:, None]).exp().squeeze(1)
        return -torch.log1p(-p_own.clamp(max=1 - 1e-6)).mean()
    return -logp[:, int(target)].mean()


def search(clf: nn.Module, x: torch.Tensor, target: int, kind: str, budget: float, steps: int = 60,
           lr: float = 0.1, batch_size: int = 256, gen: torch.Generator | None = None,
           start: UniversalTrigger | None = None, y: torch.Tensor | None = None,
           init: str = "diffuse") -> UniversalTrigger:
    """The universal perturbation of family `kind` that best sends images `x` (none of class
    `target`) to `target` under `budget` (mask: area share; additive: eps), after `steps` Adam steps
    on mini-batches; `start` warm-starts it. With target UNTARGETED it moves images off their labels
    `y` instead. A mask starts `diffuse` (every pixel near the budget's share) or as a `square` of the
    budget's area at a random place (a patch-like start finds local triggers a diffuse one misses).
    The classifier's weights are not changed."""
    if target == UNTARGETED and y is None:
        raise ValueError("an untargeted search needs the images' labels")
    if kind not in KINDS:
        raise ValueError(f"unknown universal-trigger family {kind!r}; choose from {KINDS}")
    c, h, w = x.shape[1:]
    gen = gen or torch.Generator().manual_seed(0)
    if kind == "mask":
        if start is not None:
            a = torch.logit(start.mask.clamp(1e-3, 1 - 1e-3)).clone()
            b = torch.logit(start.pattern.clamp(1e-3, 1 - 1e-3)).clone()
        elif init == "square":
            side = max(1, int(round((budget * h * w) ** 0.5)))
            r0 = int(torch.randint(h - side + 1, (1,), generator=gen))
            c0 = int(torch.randint(w - side + 1, (1,), generator=gen))
            a = torch.full((1, 1, h, w), -6.0)
            a[..., r0:r0 + side, c0:c0 + side] = 2.0
            b = torch.randn((1, c, h, w), generator=gen)
        else:
            a = torch.randn((1, 1, h, w), generator=gen) - 3.0
            b = torch.randn((1, c, h, w), generator=gen)
        params = [a.requires_grad_(), b.requires_grad_()]
    else:
        d = (torch.atanh((start.delta / budget).clamp(-0.99, 0.99)).clone() if start is not None
             else 0.1 * torch.randn((1, c, h, w), generator=gen))
        params = [d.requires_grad_()]
    opt = torch.optim.Adam(params, lr=lr)
    was_training = clf.training
    clf.eval()
    req = [p.requires_grad for p in clf.parameters()]
    for p in clf.parameters():
        p.requires_grad_(False)
    try:
        for _ in range(int(steps)):
            idx = torch.randint(len(x), (min(batch_size, len(x)),), generator=gen)
            xb, yb = x[idx], (None if y is None else y[idx])
            if kind == "mask":
                m = torch.sigmoid(a)
                xs = (1 - m) * xb + m * torch.sigmoid(b)
                excess = torch.relu(m.mean() - budget)
                loss = _objective(_log_probs(clf, xs), target, yb) + 50.0 * excess
            else:
                xs = (xb + budget * torch.tanh(d)).clamp(0.0, 1.0)
                loss = _objective(_log_probs(clf, xs), target, yb)
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        for p, r in zip(clf.parameters(), req):
            p.requires_grad_(r)
        clf.train(was_training)
    with torch.no_grad():
        if kind == "mask":
            return UniversalTrigger("mask", int(target), mask=project_mask(torch.sigmoid(a), budget),
                                    pattern=torch.sigmoid(b))
        return UniversalTrigger("additive", int(target), delta=budget * torch.tanh(d))


def attack_success(clf: nn.Module, trigger: UniversalTrigger, x: torch.Tensor, batch: int = 1024,
                   y: torch.Tensor | None = None) -> float:
    """Share of images x (none of the trigger's target class) that the trigger sends to its target;
    for an untargeted trigger, the share of images x (labels y) it moves off their label."""
    if len(x) == 0:
        return float("nan")
    was_training = clf.training
    clf.eval()
    hits = 0
    with torch.no_grad():
        for i in range(0, len(x), batch):
            pred = _log_probs(clf, trigger.apply(x[i:i + batch])).argmax(1)
            hits += int((pred != y[i:i + batch]).sum() if trigger.target == UNTARGETED
                        else (pred == trigger.target).sum())
    clf.train(was_training)
    return hits / len(x)


def strongest(clf: nn.Module, x: np.ndarray, y: np.ndarray, budgets: dict, steps: int = 200, restarts: int = 2,
              seed: int = 0, classes=None, untargeted: bool = True) -> dict:
    """Per family and target class (and UNTARGETED), the highest attack success of `restarts` fresh
    searches (masks alternately diffuse and square at the start) under `budgets` ({"mask": area, "additive": eps}), each searched on half of the eligible
    images and measured on the other half. Returns {kind: {target: success}}."""
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    y = np.asarray(y, dtype=np.int64)
    yt = torch.from_numpy(y)
    gen = torch.Generator().manual_seed(int(seed))
    rng = np.random.default_rng(seed)
    n_classes = int(y.max()) + 1
    targets = list(range(n_classes) if classes is None else classes) + ([UNTARGETED] if untargeted else [])
    out = {}
    for kind, budget in budgets.items():
        out[kind] = {}
        for t in targets:
            eligible = rng.permutation(np.flatnonzero(y != t) if t != UNTARGETED else np.arange(len(y)))
            fit = torch.from_numpy(eligible[: len(eligible) // 2])
            held = torch.from_numpy(eligible[len(eligible) // 2:])
            best = 0.0
            for r in range(int(restarts)):
                trig = search(clf, xt[fit], int(t), kind, budget, steps=steps, gen=gen, y=yt[fit],
                              init="square" if r % 2 else "diffuse")
                best = max(best, attack_success(clf, trig, xt[held], y=yt[held]))
            out[kind][int(t)] = best
    return out


def smallest_area(clf: nn.Module, x_fit: torch.Tensor, x_held: torch.Tensor, target: int,
                  areas=(0.08, 0.04, 0.02, 0.01, 0.005), success: float = 0.5, steps: int = 80,
                  refine_steps: int = 60, gen: torch.Generator | None = None, with_trigger: bool = False):
    """Neural Cleanse's statistic under a budget ladder: the smallest mask area a that still sends a
    share `success` of held-out images x_held to `target`.

    Masks are searched on x_fit at the descending `areas`, the first from a diffuse and a square
    start, each later one warm-started from the previous trigger projected to its budget; s(a_i)
    is the held-out success. With i the first rung where s falls below `success`, the area is
    interpolated on the log scale between the last rung that reached it and that one,
        log A = log a_{i-1} + (log a_i - log a_{i-1}) * (s_{i-1} - success) / (s_{i-1} - s_i);
    A = a_last when every rung reaches it (reported as that rung: the ladder's floor), and
    A = 2 * a_0 when none does (censored: no trigger of the largest area works).
    Returns (A, [s(a) per rung]), and with `with_trigger` also the trigger of the smallest rung that
    reached `success` (of the largest rung when none did): the reverse-engineered trigger that
    Neural Cleanse unlearns."""
    gen = gen or torch.Generator().manual_seed(0)
    areas = [float(a) for a in areas]
    if not areas or any(a <= 0 or a > 1 for a in areas) or sorted(areas, reverse=True) != areas:
        raise ValueError("areas must be a descending list of shares in (0, 1]")
    curve, start, found = [], None, None
    for a in areas:
        best, best_trig = -1.0, None
        for init in (("diffuse", "square") if start is None else ("warm",)):
            trig = search(clf, x_fit, target, "mask", a, steps=steps if start is None else refine_steps, gen=gen,
                          init="diffuse" if init == "warm" else init, start=start)
            s = attack_success(clf, trig, x_held)
            if s > best:
                best, best_trig = s, trig
        start = UniversalTrigger("mask", int(target), mask=project_mask(best_trig.mask, a), pattern=best_trig.pattern)
        curve.append(best)
        if found is None or best >= success:
            found = start
    logs = np.log(areas)
    area = areas[-1]
    if curve[0] < success:
        area = 2.0 * areas[0]
    else:
        for i in range(1, len(curve)):
            if curve[i] < success:
                frac = (curve[i - 1] - success) / max(curve[i - 1] - curve[i], 1e-9)
                area = float(np.exp(logs[i - 1] + (logs[i] - logs[i - 1]) * frac))
                break
    return (area, curve, found) if with_trigger else (area, curve)

