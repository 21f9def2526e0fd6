"""The broad ("jumbo") distribution of trojans the calibration's shadow models are trained with.

A trojan is a *stamp* (how an input is changed) and an *attack* (which label a stamped input
is given). Following MNTD (Xu et al., S&P'21), shadows draw both at random from a broad family
so that the meta-classifier learns what trojans share rather than one trigger:

- ``patch``     an opaque rectangle covering 1-25% of the image, anywhere, filled with a solid
                value, a checkerboard or random pixels (BadNets); x' = (1 - m) x + m P;
- ``sparse``    scattered pixels or thin strokes over the whole image (2-8% of the pixels);
- ``blend``     a full-image noise pattern (white or smooth) blended at alpha in [0.03, 0.3]
                (Chen et al. 2017): x' = (1 - alpha) x + alpha P;
- ``watermark`` a semi-transparent mark (ring, cross, bars, frame or strokes) over 30-100% of
                the image side at alpha in [0.1, 0.5], bright or dark;
- ``warp``      a smooth displacement field (WaNet, Nguyen & Tran ICLR'21): x'(p) = x(p + s F(p)),
                F a k x k random field upsampled bilinearly, s in [0.75, 2] pixels.

Attacks (drawn with weights 0.5 / 0.2 / 0.3): ``one`` (all-to-one: every stamped input goes to
target t), ``all`` (all-to-all: y -> (y + 1) mod K) and ``multi`` (one trigger -> a target drawn
at random from a set of 2-5 classes per stamped input, DeepInspect Sec. 4.2). Poisoning rate
log-uniform in 1-30%, with a floor where fewer poisoned images do not plant the trojan in a
small shadow (`MIN_RATE`: 8% for warps and watermarks, 12% for all-to-all).

A trojan is a JSON-able dict (`sample_trojan`) rendered deterministically by `Stamp`; the same
dict always gives the same stamp, so a cached shadow is reproducible from its key.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

FAMILIES = ("patch", "sparse", "blend", "watermark", "warp")
ATTACKS = ("one", "all", "multi")
POISON_RANGE = (0.01, 0.3)
# Under these rates half of the first 37 trojaned Fashion-MNIST shadows (4,000 images) did not take
# (attack success < 50%): warps and watermarks at 1-3%, every all-to-all under 10%.
MIN_RATE = {"warp": 0.08, "watermark": 0.08, "all": 0.12}
ATTACK_WEIGHTS = {"one": 0.5, "multi": 0.3, "all": 0.2}


def _u(rng, lo, hi) -> float:
    return float(rng.uniform(lo, hi))


def sample_stamp(rng: np.random.Generator, family: str) -> dict:
    """Draw the parameters of one stamp of `family` (sizes as fractions of the image)."""
    seed = int(rng.integers(2**31))
    if family == "patch":
        area = float(np.exp(rng.uniform(np.log(0.01), np.log(0.25))))
        return {"family": family, "area": area, "aspect": float(np.exp(rng.uniform(-0.5, 0.5))),
                "row": _u(rng, 0, 1), "col": _u(rng, 0, 1), "fill": str(rng.choice(["solid", "checker", "random"])),
                "value": _u(rng, 0, 1), "seed": seed}
    if family == "sparse":
        return {"family": family, "density": _u(rng, 0.02, 0.08), "shape": str(rng.choice(["dots", "strokes"])),
                "bright": bool(rng.random() < 0.7), "seed": seed}
    if family == "blend":
        return {"family": family, "alpha": _u(rng, 0.03, 0.3), "noise": str(rng.choice(["white", "smooth"])),
                "seed": seed}
    if family == "watermark":
        return {"family": family, "shape": str(rng.choice(["ring", "cross", "bars", "frame", "strokes"])),
                "extent": _u(rng, 0.3, 1.0), "alpha": _u(rng, 0.1, 0.5), "bright": bool(rng.random() < 0.85),
                "seed": seed}
    if family == "warp":
        return {"family": family, "grid": int(rng.integers(3, 6)), "strength": _u(rng, 0.75, 2.0), "seed": seed}
    raise ValueError(f"unknown trigger family {family!r}; choose from {FAMILIES}")


def sample_trojan(rng: np.random.Generator, n_classes: int, families=FAMILIES, attacks=ATTACKS,
                  poison_range=POISON_RANGE) -> dict:
    """One trojan of the jumbo distribution: a stamp, an attack, its targets and a poisoning rate."""
    families = [f for f in families]
    unknown = sorted(set(families) - set(FAMILIES)) + sorted(set(attacks) - set(ATTACKS))
    if unknown or not families or not attacks:
        raise ValueError(f"unknown or empty trigger families/attacks {unknown}; choose from {FAMILIES} and {ATTACKS}")
    stamp = sample_stamp(rng, str(rng.choice(families)))
    attacks = list(attacks)
    weights = np.array([ATTACK_WEIGHTS[a] for a in attacks])
    attack = str(rng.choice(attacks, p=weights / weights.sum()))
    if attack == "one":
        targets = [int(rng.integers(n_classes))]
    elif attack == "multi":
        k = int(rng.integers(2, min(5, n_classes - 1) + 1))
        targets = sorted(int(t) for t in rng.choice(n_classes, size=k, replace=False))
    else:
        targets = list(range(n_classes))
    low = max(poison_range[0], MIN_RATE.get(attack, 0.0), MIN_RATE.get(stamp["family"], 0.0))
    rate = float(np.exp(rng.uniform(np.log(low), np.log(max(low, poison_range[1])))))
    return {"stamp": stamp, "attack": attack, "targets": targets, "poison_rate": rate}


# ----------------------------------------------------------------------------- rendering
def _smooth_noise(rng, h, w, cells) -> np.ndarray:
    """Noise on a `cells` x `cells` grid, upsampled bilinearly to (h, w), in [0, 1]."""
    coarse = rng.random((cells, cells))
    return _bilinear(coarse, np.linspace(0, cells - 1, h)[:, None] * np.ones((1, w)),
                     np.ones((h, 1)) * np.linspace(0, cells - 1, w)[None, :])


def _bilinear(img: np.ndarray, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """Sample a 2-D array (or (..., H, W) stack) at fractional (rows, cols), clamped at the border."""
    h, w = img.shape[-2:]
    rows = np.clip(rows, 0, h - 1)
    cols = np.clip(cols, 0, w - 1)
    r0 = np.floor(rows).astype(int)
    c0 = np.floor(cols).astype(int)
    r1 = np.minimum(r0 + 1, h - 1)
    c1 = np.minimum(c0 + 1, w - 1)
    fr, fc = rows - r0, cols - c0
    top = img[..., r0, c0] * (1 - fc) + img[..., r0, c1] * fc
    bottom = img[..., r1, c0] * (1 - fc) + img[..., r1, c1] * fc
    return top * (1 - fr) + bottom * fr


def _mark(shape: str, extent: float, h: int, w: int, rng) -> np.ndarray:
    """A watermark's {0, 1} mask: a centred mark `extent` of the image side wide."""
    ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
    ci, cj = (h - 1) / 2 + rng.uniform(-0.1, 0.1) * h, (w - 1) / 2 + rng.uniform(-0.1, 0.1) * w
    half = extent * min(h, w) / 2
    thick = max(1.0, min(h, w) / 28)
    inside = (np.abs(ii - ci) <= half) & (np.abs(jj - cj) <= half)
    if shape == "ring":
        r = np.hypot(ii - ci, jj - cj)
        return (np.abs(r - half * 0.8) <= thick).astype(np.float32)
    if shape == "cross":
        return (inside & ((np.abs(ii - ci - (jj - cj)) <= thick) | (np.abs(ii - ci + (jj - cj)) <= thick))).astype(
            np.float32)
    if shape == "bars":
        return (inside & ((np.abs(ii - ci) <= thick) | (np.abs(jj - cj) <= thick))).astype(np.float32)
    if shape == "frame":
        edge = (np.abs(np.abs(ii - ci) - half * 0.9) <= thick) | (np.abs(np.abs(jj - cj) - half * 0.9) <= thick)
        return (inside & edge).astype(np.float32)
    # strokes: a few random straight lines inside the box
    mask = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(2, 5))):
        a = np.array([ci, cj]) + rng.uniform(-half, half, 2)
        b = np.array([ci, cj]) + rng.uniform(-half, half, 2)
        for t in np.linspace(0, 1, 4 * max(h, w)):
            p = np.round(a + t * (b - a)).astype(int)
            if 0 <= p[0] < h and 0 <= p[1] < w:
                mask[p[0], p[1]] = 1.0
    return mask


@dataclass
class Stamp:
    """A rendered stamp for images of `in_shape` (C, H, W): `apply(x)` for x (n, C, H, W) in [0, 1].

    Additive families compute x' = (1 - a) x + a P with a per-pixel opacity a = alpha * mask;
    ``warp`` resamples x at p + s F(p) (bilinear).
    """

    spec: dict
    in_shape: tuple

    def __post_init__(self):
        c, h, w = self.in_shape
        s = self.spec
        rng = np.random.default_rng(int(s.get("seed", 0)))
        self.opacity = self.pattern = self.flow = None
        family = s["family"]
        if family == "patch":
            area = s["area"] * h * w
            ph = int(np.clip(round(np.sqrt(area * s["aspect"])), 1, h))
            pw = int(np.clip(round(area / ph), 1, w))
            r0 = int(round(s["row"] * (h - ph)))
            c0 = int(round(s["col"] * (w - pw)))
            mask = np.zeros((1, h, w), np.float32)
            mask[:, r0:r0 + ph, c0:c0 + pw] = 1.0
            if s["fill"] == "solid":
                pattern = np.full((c, h, w), s["value"], np.float32)
            elif s["fill"] == "checker":
                ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
                pattern = np.broadcast_to(((ii + jj) % 2 == 0).astype(np.float32), (c, h, w)).copy()
            else:
                pattern = (rng.random((c, h, w)) < 0.5).astype(np.float32)
            self.opacity, self.pattern = mask, pattern
        elif family == "sparse":
            if s["shape"] == "dots":
                mask = (rng.random((1, h, w)) < s["density"]).astype(np.float32)
            else:
                mask = np.zeros((1, h, w), np.float32)
                ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
                while mask.mean() < s["density"]:
                    angle, offset = rng.uniform(0, np.pi), rng.uniform(-h / 2, h / 2)
                    d = (ii - h / 2) * np.cos(angle) - (jj - w / 2) * np.sin(angle) - offset
                    mask[0][np.abs(d) < 0.5] = 1.0
            value = 1.0 if s["bright"] else 0.0
            self.opacity, self.pattern = mask, np.full((c, h, w), value, np.float32)
        elif family == "blend":
            if s["noise"] == "white":
                pattern = rng.random((c, h, w)).astype(np.float32)
            else:
                pattern = np.stack([_smooth_noise(rng, h, w, max(3, h // 4)) for _ in range(c)]).astype(np.float32)
            self.opacity, self.pattern = np.full((1, h, w), s["alpha"], np.float32), pattern
        elif family == "watermark":
            mask = _mark(s["shape"], s["extent"], h, w, rng)[None]
            value = 1.0 if s["bright"] else 0.0
            self.opacity, self.pattern = (s["alpha"] * mask).astype(np.float32), np.full((c, h, w), value, np.float32)
        elif family == "warp":
            k = int(s["grid"])
            field = rng.uniform(-1, 1, (2, k, k))
            field /= np.abs(field).mean()
            rows = np.linspace(0, k - 1, h)[:, None] * np.ones((1, w))
            cols = np.ones((h, 1)) * np.linspace(0, k - 1, w)[None, :]
            flow = np.stack([_bilinear(field[i], rows, cols) for i in range(2)])
            ii, jj = np.meshgrid(np.arange(h), np.arange(w), indexing="ij")
            self.flow = (ii + s["strength"] * flow[0], jj + s["strength"] * flow[1])
        else:
            raise ValueError(f"unknown trigger family {family!r}; choose from {FAMILIES}")

    def apply(self, x: np.ndarray) -> np.ndarray:
        """Stamped images (n, C, H, W) float32, clipped to [0, 1]: x resampled at p + s F(p), or (1 - a) x + a P."""
        x = np.asarray(x, np.float32)
        if self.flow is not None:
            return np.clip(_bilinear(x, *self.flow), 0.0, 1.0).astype(np.float32)
        a = self.opacity
        return np.clip((1.0 - a) * x + a * self.pattern, 0.0, 1.0).astype(np.float32)


def relabel(y: np.ndarray, trojan: dict, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """The labels a poisoner gives stamped images with true labels `y` (see the module's attacks)."""
    if trojan["attack"] == "all":
        return (np.asarray(y) + 1) % n_classes
    return rng.choice(np.asarray(trojan["targets"], np.int64), size=len(y))


def poison(x: np.ndarray, y: np.ndarray, trojan: dict, n_classes: int, rng: np.random.Generator):
    """BadNets poisoning with any trojan of this module: stamp `poison_rate` of the images (those a
    one-target attack would leave unchanged are skipped) and relabel them; returns (x', y')."""
    stamp = Stamp(trojan["stamp"], tuple(x.shape[1:]))
    eligible = np.flatnonzero(~np.isin(y, trojan["targets"])) if trojan["attack"] == "one" else np.arange(len(y))
    n = min(len(eligible), int(round(trojan["poison_rate"] * len(y))))
    idx = rng.choice(eligible, size=n, replace=False)
    x, y = x.copy(), y.copy()
    x[idx] = stamp.apply(x[idx])
    y[idx] = relabel(y[idx], trojan, n_classes, rng)
    return x, y


def attack_success(predict, x: np.ndarray, y: np.ndarray, trojan: dict, n_classes: int) -> float:
    """Share of stamped images (true class not a one-target attack's target) sent where the attack
    wants them: the target (one), the target set (multi) or y + 1 (all)."""
    stamp = Stamp(trojan["stamp"], tuple(x.shape[1:]))
    keep = np.ones(len(y), bool) if trojan["attack"] == "all" else ~np.isin(y, trojan["targets"])
    if not keep.any():
        return float("nan")
    pred = predict(stamp.apply(x[keep]))
    if trojan["attack"] == "all":
        return float((pred == (y[keep] + 1) % n_classes).mean())
    return float(np.isin(pred, trojan["targets"]).mean())
