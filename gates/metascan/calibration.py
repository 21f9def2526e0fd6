"""A task's scan calibration: shadow pool -> query-tuned meta-classifier -> conformal decision.

`ScanCalibration(...).fit(heldout)` builds the shadow pool from the defender's labelled held-out
data (see `shadows`), splits it into a *fitting* part, on which the meta-classifier and its
queries are trained (see `meta`), and a *calibration* part never trained on. The benign
calibration shadows' scores v_1..v_n are the null: for a scanned model with score s,

    p(s) = (1 + #{i : v_i >= s}) / (n + 1)

is how often a benign model of this task scores as high (split-conformal p-value; valid for a
benign model exchangeable with the shadows). The model is flagged when p(s) <= alpha, the
stated false-block rate (default 5%); equivalently when s exceeds `threshold_`, the
(j + 1)-th largest benign score with j = floor(alpha (n + 1) - 1). Per class t the target
score s_t has its own null (the same benign shadows' s_t) and p-value p_t. A flagged model's
target classes come from its reachable margins (see `margins`): z_k against `margin_shadows`
benign fitting shadows, a class is a target when z_k exceeds the (1 - class_alpha) conformal
threshold of max_k z_k over the benign calibration shadows, and the class with the largest z_k
always is. Without margins (`margin_shadows=0`, or a calibration saved before them) the targets
are the classes with p_t <= `class_alpha`, and at least the class with the smallest p_t. The
trojaned calibration shadows give the measured power (share flagged, share whose targets are
all among the flagged) reported with the calibration.

The fitted calibration is matched to a model by input shape, number of classes and the
held-out set's sha256 (`check_task`); each trained meta-classifier is cached beside the shadows (`member_cache`), so a
stopped fit resumes after its last member. It is saved as `calibration.json` + `meta.npz` (no
pickles), both pinned by sha256 (see `artifact`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..data import Dataset
from ..errors import CalibrationMismatchError, DeadlineExceeded, TrojanGateError
from .ensemble import MetaEnsemble
from .meta import QueryMetaClassifier
from .probes import StampProbeMeta
from .margins import ReachableMargins, cached_margins, relative
from .member_cache import load_member, member_key, save_member
from .shadows import SHADOW_ARCHITECTURES, build_pool, heldout_sha256, shadow_key, split_heldout
from .triggers import ATTACKS, FAMILIES


def conformal_p_value(null: np.ndarray, score) -> np.ndarray:
    """(1 + #{null >= s}) / (n + 1), for a scalar or an array of scores."""
    null = np.sort(np.asarray(null, np.float64))
    s = np.asarray(score, np.float64)
    above = len(null) - np.searchsorted(null, s, side="left")
    return (1.0 + above) / (len(null) + 1.0)


def conformal_threshold(null: np.ndarray, alpha: float) -> float:
    """The score above which p(s) <= alpha: the (j + 1)-th largest null value, j = floor(alpha (n + 1) - 1)."""
    null = np.sort(np.asarray(null, np.float64))
    j = math.floor(alpha * (len(null) + 1) - 1 + 1e-9)
    if j < 0:
        raise TrojanGateError(f"{len(null)} benign calibration shadows cannot support a false-block rate of "
                              f"{alpha:g}: at least {math.ceil(1 / alpha - 1)} are needed")
    return float(null[len(null) - 1 - j])


@dataclass
class CalibratedVerdict:
    """The calibrated decision on one model. Higher scores mean more trojan-like."""

    is_trojaned: bool
    instance_score: float
    threshold: float
    false_block_probability: float
    flagged_classes: list
    class_scores: list
    class_p_values: list
    queries: int
    seconds: float
    calibration_sha256: str | None = None
    decision: str = "calibrated"
    extra: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """The fields as a JSON-able dict, rounded, with `extra` merged in."""
        return {"decision": self.decision, "is_trojaned": bool(self.is_trojaned),
                "instance_score": round(float(self.instance_score), 6), "threshold": round(float(self.threshold), 6),
                "false_block_probability": round(float(self.false_block_probability), 6),
                "flagged_classes": [int(c) for c in self.flagged_classes],
                "class_scores": [round(float(v), 6) for v in self.class_scores],
                "class_p_values": [round(float(v), 6) for v in self.class_p_values],
                "queries": int(self.queries), "seconds": round(float(self.seconds), 4),
                "calibration_sha256": self.calibration_sha256, **self.extra}

    def to_detector_output(self) -> dict:
        """Alibi Detect's output shape for the model as one instance."""
        return {"data": {"instance_score": float(self.instance_score), "is_trojaned": bool(self.is_trojaned),
                         "threshold": float(self.threshold)},
                "meta": {"name": "CalibratedScan", "detector_type": "trojan", "data_type": "model",
                         "flagged_classes": [int(c) for c in self.flagged_classes],
                         "false_block_probability": float(self.false_block_probability),
                         "calibration_sha256": self.calibration_sha256, "queries": int(self.queries)}}


def _split(shadows: list, share: float, seed: int) -> tuple[list, list]:
    """Stratified (benign / trojaned) split of the pool: (fitting part, calibration part)."""
    rng = np.random.default_rng([seed, 31])
    fit, cal = [], []
    for group in ([s for s in shadows if not s.trojaned], [s for s in shadows if s.trojaned]):
        order = rng.permutation(len(group))
        n_cal = int(round(share * len(group)))
        cal += [group[i] for i in order[:n_cal]]
        fit += [group[i] for i in order[n_cal:]]
    return fit, cal


PROBES = ("stamp", "free")


def probe_images(heldout: Dataset, n_images: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """`n_images` held-out images from the shadows' training part, spread evenly over the classes."""
    train, _ = split_heldout(heldout, seed)
    rng = np.random.default_rng([seed, 17])
    classes = np.unique(train.y)
    per = [n_images // len(classes) + (i < n_images % len(classes)) for i in range(len(classes))]
    idx = np.concatenate([rng.choice(np.flatnonzero(train.y == c), min(k, int((train.y == c).sum())), replace=False)
                          for c, k in zip(classes, per)])
    return train.x[idx], train.y[idx]


def target_matrix(shadows: list, n_classes: int) -> np.ndarray:
    """Multi-hot attack targets (n_shadows, n_classes) float32: T[i, t] = 1 when t is a target of shadow i."""
    t = np.zeros((len(shadows), n_classes), np.float32)
    for i, s in enumerate(shadows):
        t[i, s.targets] = 1.0
    return t


class ScanCalibration:
    """Calibrated scan decision for one task (see the module's equations).

    Parameters
    ----------
    n_shadows : int
        Shadow models to train (half trojaned).
    false_block_rate : float
        alpha: the share of benign models of the task the decision may flag.
    class_alpha : float
        Per-class p-value at or under which a flagged model's class is reported as a target.
    calibration_share : float
        Share of the pool kept out of meta-training for the null and the power estimate.
    families, attacks, architectures : sequences of names
        The jumbo distribution the trojaned shadows are drawn from (see `triggers`, `shadows`).
    probes : str
        ``stamp``: learned stamps on held-out images (see `probes`, the default); ``free``: MNTD's
        free-form learned queries (see `meta`).
    n_queries : int
        Learned stamps (``stamp``, applied to `n_images` held-out images) or free queries (``free``).
    hidden, epochs, lr, target_weight, scale : meta-classifier settings (see `probes` and `meta`).
    n_meta : int
        Meta-classifiers trained with their own seeds and probe images, scores averaged (see `ensemble`).
    margin_shadows : int
        Benign fitting shadows whose reachable margins give the target rule's per-class null (0: the
        meta-classifier's class p-values name the targets).
    margin_steps : int
        NES steps of the margin search (see `margins`).
    seed : int
        Seed of the pool, the split and the meta-classifier.
    cache_dir : path
        Where shadows are cached (required to fit).
    """

    def __init__(self, n_shadows: int = 400, false_block_rate: float = 0.05, class_alpha: float = 0.05,
                 calibration_share: float = 0.3, families=FAMILIES, attacks=ATTACKS,
                 architectures=SHADOW_ARCHITECTURES, probes: str = "stamp", n_queries: int = 8, n_images: int = 20,
                 hidden: int = 32, epochs: int = 60, lr: float = 1e-2, target_weight: float = 1.0, scale: float = 3.0,
                 n_meta: int = 3, margin_shadows: int = 60, margin_steps: int = 150, seed: int = 0, cache_dir=None,
                 progress: bool = True, workers: int | None = None):
        self.n_shadows = n_shadows
        self.false_block_rate = false_block_rate
        self.class_alpha = class_alpha
        self.calibration_share = calibration_share
        self.families = tuple(families)
        self.attacks = tuple(attacks)
        self.architectures = tuple(architectures)
        self.probes = probes
        self.n_queries = n_queries
        self.n_images = n_images
        self.hidden = hidden
        self.epochs = epochs
        self.lr = lr
        self.target_weight = target_weight
        self.scale = scale
        self.n_meta = n_meta
        self.margin_shadows = margin_shadows
        self.margin_steps = margin_steps
        self.seed = seed
        self.cache_dir = cache_dir
        self.progress = progress
        self.workers = workers

    def get_params(self) -> dict:
        """The constructor's settings by name, less cache_dir, progress and workers (they do not change the fit)."""
        import inspect

        return {name: getattr(self, name) for name in inspect.signature(type(self).__init__).parameters
                if name not in ("self", "cache_dir", "progress", "workers")}

    def fit(self, heldout: Dataset, deadline: float | None = None) -> "ScanCalibration":
        """Build the pool, train the meta-classifier on its fitting part, set the null and the threshold.

        `deadline` (a time.monotonic() value) stops the work between shadows and between meta-classifiers
        with DeadlineExceeded; what was trained is cached, so the same call resumes where it stopped."""
        if self.cache_dir is None:
            raise ValueError("ScanCalibration.fit needs a cache_dir for its shadow models")
        t0 = time.perf_counter()
        in_shape = tuple(int(v) for v in heldout.x.shape[1:])
        n_classes = int(heldout.y.max()) + 1
        if self.probes not in PROBES:
            raise ValueError(f"probes must be one of {PROBES}, not {self.probes!r}")
        from ..architectures import ARCHITECTURES

        if not self.architectures or not set(self.architectures) <= set(ARCHITECTURES):
            raise ValueError(f"architectures must be names from {ARCHITECTURES}, not {self.architectures!r}")
        shadows, pool = build_pool(heldout, self.n_shadows, self.cache_dir, self.seed, self.families, self.attacks,
                                   self.architectures, progress=self.progress, workers=self.workers,
                                   deadline=deadline)
        if deadline is not None and pool["present"] < self.n_shadows:
            raise DeadlineExceeded(f"the deadline passed with {pool['present']} of {self.n_shadows} shadow models "
                                   f"trained and cached in {self.cache_dir}; run the calibration again to resume")
        t_pool = time.perf_counter() - t0
        fit, cal = _split(shadows, self.calibration_share, self.seed)
        models, labels, targets = [s.model for s in fit], [s.trojaned for s in fit], target_matrix(fit, n_classes)
        members, data_sha = [], heldout_sha256(heldout)
        fit_keys = [shadow_key(s.spec, data_sha) for s in fit]
        settings = {k: getattr(self, k) for k in ("n_queries", "n_images", "hidden", "epochs", "lr", "target_weight",
                                                  "scale")}
        kind = QueryMetaClassifier if self.probes == "free" else StampProbeMeta
        for i in range(self.n_meta):
            if deadline is not None and time.monotonic() > deadline:
                raise DeadlineExceeded(f"the deadline passed with {i} of {self.n_meta} meta-classifiers trained and "
                                       f"cached in {self.cache_dir}; run the calibration again to resume")
            seed = self.seed + 1000 * i
            key = member_key(fit_keys, self.probes, settings, seed)
            member = load_member(self.cache_dir, key, kind, n_classes, self.hidden, self.scale)
            if member is not None:  # trained before this calibration was stopped
                members.append(member)
                continue
            if self.probes == "free":
                member = QueryMetaClassifier(self.n_queries, self.hidden, self.epochs, self.lr, self.target_weight,
                                             seed=seed, progress=self.progress).fit(models, labels, targets, in_shape)
            else:
                base_x, base_y = probe_images(heldout, self.n_images, seed)
                member = StampProbeMeta(self.n_queries, len(base_y), self.hidden, self.epochs, self.lr,
                                        self.target_weight, scale=self.scale, seed=seed, progress=self.progress).fit(
                    models, labels, targets, base_x, base_y)
            save_member(self.cache_dir, key, member)
            members.append(member)
        meta = MetaEnsemble(members)
        scores, class_scores = meta.score_answers(meta.answers_of([s.model for s in cal]))
        benign = np.array([not s.trojaned for s in cal])
        self.meta_ = meta
        self.null_ = np.sort(scores[benign])
        self.class_null_ = class_scores[benign]
        self.threshold_ = conformal_threshold(self.null_, self.false_block_rate)
        self._fit_margins(fit, cal, scores, data_sha, in_shape, n_classes, deadline)
        self.task_ = {"input_shape": list(in_shape), "n_classes": n_classes, "heldout_sha256": heldout_sha256(heldout),
                      "heldout_images": int(len(heldout))}
        self.pool_ = {**pool, "fitting": len(fit), "calibration": len(cal), "calibration_benign": int(benign.sum())}
        trojaned = [(s, scores[i], class_scores[i], self._shadow_z(s, scores[i], data_sha, in_shape, n_classes))
                    for i, s in enumerate(cal) if s.trojaned]
        self.power_ = self._power(trojaned)
        self.seconds_ = {"pool": round(t_pool, 1), "total": round(time.perf_counter() - t0, 1)}
        return self

    def margin_probe(self) -> ReachableMargins:
        """The margin search this calibration uses (seeded by the calibration: no draw at scan time)."""
        return ReachableMargins(steps=self.margin_steps, seed=self.seed)

    def margin_z(self, r: np.ndarray) -> np.ndarray:
        """z_k = (rho_k - mu_k) / s_k for reachable margins r (see `margins`)."""
        return (relative(r) - self.margin_mean_) / self.margin_sd_

    def _fit_margins(self, fit: list, cal: list, scores, data_sha: str, in_shape, n_classes: int, deadline) -> None:
        """Per-class null of the benign fitting shadows' margins; threshold from the benign calibration shadows."""
        self.margin_mean_ = self.margin_sd_ = self.margin_null_ = self.margin_threshold_ = None
        if self.margin_shadows <= 0:
            return
        fit_benign = [s for s in fit if not s.trojaned][:self.margin_shadows]
        cal_benign = [s for s in cal if not s.trojaned]
        need = math.ceil(1 / self.class_alpha - 1 - 1e-9)
        if len(fit_benign) < 2 or len(cal_benign) < need:
            raise TrojanGateError(f"{len(fit_benign)} benign fitting and {len(cal_benign)} benign calibration shadows "
                                  f"cannot give the margin target rule a null at class_alpha {self.class_alpha:g} (at "
                                  f"least 2 and {need} are needed): train more shadows, raise class_alpha or set "
                                  "margin_shadows=0")
        from tqdm.auto import tqdm

        with tqdm(total=len(fit_benign) + len(cal_benign), desc="shadow margins", disable=not self.progress) as bar:
            def measured(s):
                r = self._margins(s, data_sha, in_shape, n_classes, deadline)
                bar.update(1)
                return r

            rho = relative(np.array([measured(s) for s in fit_benign]))
            self.margin_mean_, self.margin_sd_ = rho.mean(axis=0), rho.std(axis=0, ddof=1) + 1e-6
            z = np.array([self.margin_z(measured(s)) for s in cal_benign])
        self.margin_null_ = np.sort(z.max(axis=1))
        self.margin_threshold_ = conformal_threshold(self.margin_null_, self.class_alpha)

    def _margins(self, shadow, data_sha: str, in_shape, n_classes: int, deadline) -> np.ndarray:
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceeded(f"the deadline passed while measuring the shadows' margins (cached in "
                                   f"{self.cache_dir}); run the calibration again to resume")
        return cached_margins(self.cache_dir, shadow_key(shadow.spec, data_sha), self.margin_probe(), shadow.model,
                              in_shape, n_classes)

    def _shadow_z(self, shadow, score: float, data_sha: str, in_shape, n_classes: int):
        """A trojaned calibration shadow's margin z, measured only where the decision flags it (the power's targets)."""
        if self.margin_null_ is None or not score > self.threshold_:
            return None
        return self.margin_z(self._margins(shadow, data_sha, in_shape, n_classes, None))

    def _power(self, trojaned: list) -> dict:
        """Share of the trojaned calibration shadows flagged, and whose targets are all among the flagged."""
        flagged = [self._decide(s, cs, z) for _, s, cs, z in trojaned]
        hit = [f[0] and set(sh.targets) <= set(f[1]) for (sh, _, _, _), f in zip(trojaned, flagged)]
        by_family = {}
        for (sh, _, _, _), f in zip(trojaned, flagged):
            by_family.setdefault(sh.family, []).append(f[0])
        return {"n": len(trojaned), "flagged": round(float(np.mean([f[0] for f in flagged])), 4) if flagged else None,
                "targets_among_flagged": round(float(np.mean(hit)), 4) if hit else None,
                "flagged_by_family": {k: round(float(np.mean(v)), 4) for k, v in sorted(by_family.items())}}

    def _decide(self, score: float, class_scores: np.ndarray, margin_z=None) -> tuple[bool, list, float, np.ndarray]:
        p = float(conformal_p_value(self.null_, score))
        p_t = np.array([conformal_p_value(self.class_null_[:, t], class_scores[t]) for t in range(len(class_scores))])
        is_trojaned = bool(score > self.threshold_)
        flagged = []
        if is_trojaned and margin_z is not None:
            flagged = sorted({int(np.argmax(margin_z))} | {int(t) for t in np.flatnonzero(
                margin_z > self.margin_threshold_)})
        elif is_trojaned:
            z = (class_scores - np.median(self.class_null_, 0)) / (self.class_null_.std(0) + 1e-9)
            best = int(np.lexsort((-z, p_t))[0])
            flagged = sorted({best} | {int(t) for t in np.flatnonzero(p_t <= self.class_alpha)})
        return is_trojaned, flagged, p, p_t

    def check_task(self, input_shape, n_classes: int, heldout_sha: str | None = None) -> None:
        """Refuse (CalibrationMismatchError, naming the field) a model or held-out set of another task."""
        task = self.task_
        if tuple(int(v) for v in input_shape) != tuple(task["input_shape"]):
            raise CalibrationMismatchError(f"the calibration is for inputs of shape {tuple(task['input_shape'])}, "
                                           f"the model takes {tuple(input_shape)}")
        if int(n_classes) != task["n_classes"]:
            raise CalibrationMismatchError(f"the calibration is for {task['n_classes']} classes, the model has "
                                           f"{n_classes}")
        if heldout_sha is not None and heldout_sha != task["heldout_sha256"]:
            raise CalibrationMismatchError(f"the calibration was built on held-out data with sha256 "
                                           f"{task['heldout_sha256']}, the held-out data given hashes to {heldout_sha}")

    def decide(self, oracle, heldout: Dataset | None = None) -> CalibratedVerdict:
        """Send the learned queries to `oracle` (one batch) and decide; checks the task first."""
        self.check_task(oracle.input_shape, oracle.n_classes, None if heldout is None else heldout_sha256(heldout))
        t0 = time.perf_counter()
        q0 = oracle.queries
        with oracle.phase("calibrated"):
            answers = oracle.predict_proba(self.meta_.queries_)
        score, class_scores = self.meta_.score_answers(answers[None])
        extra = {"benign_null": [round(float(v), 4) for v in self.null_]}
        z = None
        if score[0] > self.threshold_ and getattr(self, "margin_null_", None) is not None:
            with oracle.phase("margins"):  # the target rule: only where the decision flags
                r = self.margin_probe().measure(oracle.predict_proba, oracle.input_shape, oracle.n_classes)
            z = self.margin_z(r)
            extra.update(margin_z=[round(float(v), 4) for v in z], margins=[round(float(v), 4) for v in r],
                         margin_threshold=round(float(self.margin_threshold_), 6),
                         margin_p_value=round(float(conformal_p_value(self.margin_null_, z.max())), 6))
        is_trojaned, flagged, p, p_t = self._decide(float(score[0]), class_scores[0], z)
        extra["target_rule"] = "margins" if z is not None else "class p-values"
        return CalibratedVerdict(is_trojaned, float(score[0]), self.threshold_, p, flagged, class_scores[0].tolist(),
                                 p_t.tolist(), oracle.queries - q0, time.perf_counter() - t0,
                                 getattr(self, "sha256_", None), extra=extra)
