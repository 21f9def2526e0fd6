"""Universal adversarial unlearning: fine-tuning that does not rely on the recovered trigger's shape.

I-BAU (Zeng et al., ICLR'22) states backdoor removal as a minimax problem on the defender's
small clean set D:
    min_theta max_{delta in budget} (1/|D|) sum_{(x, y) in D} L(f_theta(x + delta), y),
the inner maximum being a universal perturbation: a trojan's trigger is one by construction, so
a model that keeps its labels under every universal perturbation of the budget has no trigger
inside it. I-BAU solves the outer step with an implicit hypergradient; here the two steps
alternate (the common practical form): each round first moves, from where the last round left
them, one targeted universal trigger per class t and family (`universal.search`, mask and
additive), then trains one epoch on D and on copies of D stamped with the triggers of classes
other than their own, labels kept:
    L = NLL(f(x), y) + NLL(f(x'), y) + w * KL(f_0(x) || f(x)),
the last term (self-distillation toward the source model f_0 on the unstamped images) holding
clean accuracy. The recovered triggers of the scan, when given, are unlearned beside them.
"""
from __future__ import annotations

import copy

import numpy as np
import torch
from torch import nn

from .universal import KINDS, UNTARGETED, UniversalTrigger, attack_success, search


def unlearn(clf: nn.Module, x: np.ndarray, y: np.ndarray, budgets: dict, rounds: int = 10,
            search_steps: int = 10, first_steps: int = 40, lr: float = 5e-4, batch_size: int = 128,
            distill_weight: float = 6.0, stamp_share: float = 1.0, extra=None, seed: int = 0,
            train_mode=None, on_round=None, untargeted: bool = True) -> list:
    """Run `rounds` of universal adversarial unlearning on clf in place; returns the last triggers.

    budgets : {"mask": area share, "additive": eps}; one targeted trigger per class and family
    search_steps / first_steps : Adam steps per trigger and round (first round: first_steps)
    stamp_share : share of each epoch's images that get a stamped copy
    untargeted : also one untargeted trigger per family (I-BAU's inner problem), for trojans that
        send one trigger to several targets or all-to-all
    extra : optional callable (x_np, y_np, rng) -> x_np stamped with other triggers (the scan's),
        whose copies are added with their labels kept
    train_mode : callable(clf) that puts clf in training mode (e.g. BatchNorm frozen)
    on_round : callable(round, stats) after every round
    """
    for kind in budgets:
        if kind not in KINDS:
            raise ValueError(f"unknown universal-trigger family {kind!r}; choose from {KINDS}")
    n_classes = int(clf.n_classes) if hasattr(clf, "n_classes") else int(y.max()) + 1
    gen = torch.Generator().manual_seed(int(seed))
    rng = np.random.default_rng([int(seed), 31])
    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    yt = torch.from_numpy(np.asarray(y, dtype=np.int64))
    teacher = copy.deepcopy(clf).eval()
    for p in teacher.parameters():
        p.requires_grad_(False)
    opt = torch.optim.Adam(clf.parameters(), lr=lr)
    triggers: dict = {}
    others = {t: torch.from_numpy(np.flatnonzero(np.asarray(y) != t)) for t in range(n_classes)}
    for r in range(int(rounds)):
        steps = first_steps if r == 0 else search_steps
        for kind, budget in budgets.items():
            for t in range(n_classes):
                if len(others[t]) == 0:
                    continue
                triggers[kind, t] = search(clf, xt[others[t]], t, kind, budget, steps=steps, gen=gen,
                                           start=triggers.get((kind, t)))
            if untargeted:
                triggers[kind, UNTARGETED] = search(clf, xt, UNTARGETED, kind, budget, steps=steps, gen=gen,
                                                    start=triggers.get((kind, UNTARGETED)), y=yt)
        keys = list(triggers)
        # stamps go to the triggers in proportion to how well they work now (I-BAU trains on the
        # worst perturbation only): a trojan's trigger takes most of them while it still works
        sample = torch.from_numpy(rng.choice(len(xt), size=min(512, len(xt)), replace=False))
        strength = np.array([attack_success(clf, triggers[k], xt[sample][yt[sample] != triggers[k].target],
                                            y=yt[sample][yt[sample] != triggers[k].target]) for k in keys])
        weights = np.nan_to_num(strength) ** 2 + 0.01
        weights = weights / weights.sum()
        (train_mode or (lambda m: m.train()))(clf)
        perm = torch.from_numpy(rng.permutation(len(xt)))
        losses = []
        for i in range(0, len(perm), batch_size):
            b = perm[i:i + batch_size]
            xb, yb = xt[b], yt[b]
            xs_parts, ys_parts = [xb], [yb]
            n_st = int(round(stamp_share * len(b)))
            if n_st and keys:
                pick = rng.choice(len(keys), size=n_st, p=weights)
                xs = xb[:n_st].clone()
                for j, k in enumerate(pick):
                    trig: UniversalTrigger = triggers[keys[k]]
                    if trig.target == int(yb[j]):  # a class's own trigger teaches nothing
                        trig = triggers[keys[(k + 1) % len(keys)]]
                    xs[j:j + 1] = trig.apply(xb[j:j + 1])
                xs_parts.append(xs)
                ys_parts.append(yb[:n_st])
            if extra is not None:
                xe = torch.from_numpy(np.asarray(extra(xb.numpy(), yb.numpy(), rng), dtype=np.float32))
                xs_parts.append(xe)
                ys_parts.append(yb)
            xa, ya = torch.cat(xs_parts), torch.cat(ys_parts)
            logp = clf(xa)
            loss = nn.functional.nll_loss(logp, ya)
            if distill_weight > 0:
                loss = loss + distill_weight * nn.functional.kl_div(logp[:len(b)], teacher(xb), log_target=True,
                                                                    reduction="batchmean")
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        if on_round is not None:
            on_round(r, {"loss": float(np.mean(losses)), "strongest": float(strength.max())})
    clf.eval()
    return list(triggers.values())


def reverse_engineer(clf: nn.Module, x: np.ndarray, y: np.ndarray, ladder, anomaly: float = 2.0,
                     fallback=(), steps: int = 80, seed: int = 0) -> tuple[dict, dict, list]:
    """Neural Cleanse's reverse engineering on the source model: per class t the smallest mask
    trigger that still sends half of the images of other classes to t (`universal.smallest_area`
    down `ladder`), and the classes whose anomaly index (`acceptance.area_anomaly`) exceeds
    `anomaly`; when none does, the `fallback` classes (the scan's flagged ones).
    Returns ({t: trigger}, {t: area}, chosen classes)."""
    from .acceptance import area_anomaly
    from .universal import smallest_area

    xt = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32))
    y = np.asarray(y)
    gen = torch.Generator().manual_seed(int(seed))
    triggers, areas = {}, {}
    for t in range(int(y.max()) + 1):
        el = np.random.default_rng([int(seed), 11, t]).permutation(np.flatnonzero(y != t))
        half = len(el) // 2
        if half == 0:
            continue
        areas[t], _, triggers[t] = smallest_area(clf, xt[el[:half]], xt[el[half:]], t, areas=tuple(ladder),
                                                 steps=int(steps), refine_steps=max(1, int(steps) * 3 // 4), gen=gen,
                                                 with_trigger=True)
    ai = area_anomaly(areas)
    chosen = sorted(t for t, v in ai.items() if v > anomaly) or sorted(int(c) for c in fallback if int(c) in triggers)
    return triggers, areas, chosen


def reversed_stamps(triggers: dict, chosen: list):
    """extra(x, y, rng) for `unlearn`: every image stamped with the reverse-engineered trigger of a
    chosen class other than its own (its label kept: Neural Cleanse's unlearning)."""
    chosen = [int(t) for t in chosen]

    def extra(xb: np.ndarray, yb: np.ndarray, rng) -> np.ndarray:
        out = np.array(xb, dtype=np.float32, copy=True)
        for i, lab in enumerate(yb):
            cands = [t for t in chosen if t != int(lab)]
            if cands:
                trig = triggers[cands[int(rng.integers(len(cands)))]]
                out[i:i + 1] = trig.apply(torch.from_numpy(out[i:i + 1])).numpy()
        return out
    return extra


def scan_stamps(stamp, flagged, jitter: int):
    """extra(x, y, rng) for `unlearn`: every image stamped with the scan's generated trigger of a
    flagged class other than its own, shifted by up to `jitter` pixels (labels kept)."""
    from .stamps import draw_targets, jitter_stamps, stamp_by_target

    def extra(xb, yb, rng):
        t = draw_targets(yb, flagged, rng)
        return jitter_stamps(xb, stamp_by_target(stamp, xb, t, seed=int(rng.integers(2**31))), jitter, rng)
    return extra
