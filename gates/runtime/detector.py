"""`RuntimeCheck`: STRIP's entropy plus dispersion and reference disagreement, one calibrated min-p test.

Alibi Detect's contract: `fit(x, y)` on labelled held-out images, `infer_threshold(frr)`,
`predict(x)` -> {"data": {"instance_score", "is_trojaned", "threshold", ...}, "meta": {...}}, and
`save(dir)` / `load(dir, model)` (the contract of `detector_base`). The method is in `check`; the
evidence in `evidence`. The instance score is the negated combined p-value, s(x) = -min_k p_k(x):
higher means more trojan-like, and x is flagged when s(x) >= threshold = -p*, i.e. min p <= p*.

fit splits the held-out set (seeded): `reference_fraction` of it trains the reference classifier,
the rest is the STRIP bank and the benign calibration set. The reference is by default a
*student* distilled from the served model's probabilities on that share (`student`: it agrees
with the model on clean inputs and ignores overlay-shaped content, so a trigger is answered
differently); ``reference_training="labels"`` trains it on the held-out labels instead (the
check's first design, a small CNN as the scan's reference models). With the ``activation`` statistic the
same share fits the class means and covariance of the model's last hidden features (`activations`); the
input's own call then returns its features with its answer (`ModelOracle.proba_and_hidden`), so the
statistic costs no model call. All model answers go through `ModelOracle`s; the rows of every call are
shuffled (the row order tells a batch-aware model nothing).
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from ..copies import DEFAULT_BLEND, KeyedCopies
from ..detector_base import SCORE_DIRECTION, RuntimeDetector
from ..errors import ArtifactIntegrityError
from ..hashing import sha256_bytes, sha256_file
from ..artifact_files import content_sha256, load_bank, utc_now, versions
from .activations import ClassFeatureNull
from .check import DEFAULT_STAGES, DEFAULT_STATISTICS, STATISTICS, Calibration, calibrate, check_weights, statistics_at

CHECK_FILE, BANK_FILE, REFERENCE_FILE, ACTIVATION_FILE = "check.json", "bank.npy", "reference.onnx", "activation.npz"
FORMAT = "trojan-gate/runtime-check"
FORMAT_VERSION = 2  # 2: scores higher for more trojan-like inputs (s = -min p); version 1 scored min p
REFERENCE_TRAINING = ("student", "labels")


def _attach_bank(check: "RuntimeCheck", bank: np.ndarray):
    """Give a check (in fit and load) the held-out images its copies are superimposed on, and the keyed
    draws over them (`copies`)."""
    check.bank_ = bank
    check.copies_ = KeyedCopies(bank, check.n_perturbations, check.blend, check.seed, check.model.sha256)


class RuntimeCheck(RuntimeDetector):
    """Run-time trojan input detector over a black-box ModelOracle (see the module doc).

    Parameters
    ----------
    model : ModelOracle of the served model
    n_perturbations : N, the most superimposed copies per input
    blend : superimposition rule (STRIP's; default max)
    statistics : which evidence to combine (subset of "entropy", "dispersion", "reference", "activation";
        default `check.DEFAULT_STATISTICS`)
    stages : copies asked before each early-stopping decision (empty: always N)
    reference_fraction : share of the held-out set that trains the reference classifier
    reference_training : "student" (distilled from the model's answers, no labels needed) or "labels"
    reference_epochs : its training epochs (default 60 for a student, 40 on labels)
    weights : {statistic: weight}, the share of the FRR budget each statistic gets in the min-p test
        (None: equal shares; see `check.weighted_min`)
    reference : an already trained reference classifier (ONNX bytes) to use instead of training one;
        then the whole held-out set calibrates (unless an activation null must be fitted), and the
        reference must not have seen it
    activation_null : an already fitted `ClassFeatureNull` of this model's hidden features, fitted on
        images the check does not calibrate on (like `reference`)
    seed : seeds the split, the reference's training and the draws
    """

    kind = "runtime"

    def __init__(self, model, n_perturbations: int = 10, blend: str = DEFAULT_BLEND, statistics=DEFAULT_STATISTICS,
                 stages=DEFAULT_STAGES, reference_fraction: float = 0.5, reference_training: str = "student",
                 reference_epochs: int | None = None, reference=None, activation_null=None, weights=None,
                 seed: int = 0, progress: bool = True):
        unknown = sorted(set(statistics) - set(STATISTICS))
        if unknown:
            raise ValueError(f"unknown statistic(s) {unknown}; choose from {STATISTICS}")
        if reference_training not in REFERENCE_TRAINING:
            raise ValueError(f"reference_training must be one of {REFERENCE_TRAINING}, not {reference_training!r}")
        self.model = model
        self.n_perturbations = int(n_perturbations)
        self.blend = blend
        self.statistics = tuple(statistics)
        self.stages = tuple(sorted(int(s) for s in stages if 0 < int(s) < int(n_perturbations))) \
            if self.asks_copies else ()
        self.reference_fraction = float(reference_fraction)
        self.reference_training = reference_training
        self.reference_epochs = None if reference_epochs is None else int(reference_epochs)
        self.reference = reference
        self.activation_null = activation_null
        self.weights = check_weights(weights, self.statistics)
        self.seed = int(seed)
        self.progress = progress
        self.threshold_ = None
        self.extra = {}  # notes recorded with the artifact (e.g. the gate's estimated FAR)
        self._order = np.random.default_rng()

    @property
    def asks_copies(self) -> bool:
        """Whether a statistic reads superimposed copies (entropy, dispersion); without one the model is asked
        once per input and N and the stages play no part."""
        return bool({"entropy", "dispersion"} & set(self.statistics))

    @property
    def rule(self) -> str:
        """The decision rule, as tags and reports name it."""
        return "min-p(" + ",".join(self.statistics) + ")"

    @property
    def frr_(self) -> float | None:
        """The preset false rejection rate (None before infer_threshold)."""
        cal = getattr(self, "calibration_", None)
        return None if cal is None else cal.frr

    @property
    def benign_scores_(self) -> np.ndarray | None:
        """Leave-one-out instance scores of the calibration images at full N (what the threshold is a
        quantile of); Strip's attribute of the same name. None after `load` (the pairing is not saved)."""
        from .check import leave_one_out_min_p

        values = getattr(self, "stage_values_", None)  # per image, paired across statistics (fit only)
        return None if values is None else -leave_one_out_min_p(values[self.n_perturbations], self.weights)

    # -- answers ------------------------------------------------------------------------
    def _self_answers(self, x):
        """(p_self (n, K), activation statistic (n,) or None) from one counted call on x (with the hidden output
        for the activation statistic), or (None, None) where x is asked together with its copies."""
        if "activation" in self.statistics:
            p_self, h = self.model.proba_and_hidden(x)
            return p_self, self.activation_null_.statistic(h, p_self.argmax(axis=1))
        return (None, None) if self.asks_copies else (self.model.predict_proba(x), None)

    def _stage_statistics(self, x, exclude=None) -> dict:
        """{stage: {statistic: (n,)}} for every stage and N, asking every copy (calibration)."""
        big_n = self.n_perturbations
        p_self, act = self._self_answers(x)
        p_ref = self.reference_.predict_proba(x) if "reference" in self.statistics else None
        if not self.asks_copies:
            return {big_n: statistics_at(p_self, None, p_ref, self.statistics, act)}
        idx = self.copies_.draw_indices(x, exclude)
        p_first, p_copies = self.copies_.ask(self.model, x, idx, self._order, with_self=p_self is None)
        p_self = p_first if p_self is None else p_self
        return {s: statistics_at(p_self, p_copies[:, :s], p_ref, self.statistics, act) for s in (*self.stages, big_n)}

    # -- estimator ----------------------------------------------------------------------
    def fit(self, heldout_x, heldout_y=None) -> "RuntimeCheck":
        """Train the reference on a share of the labelled held-out set (labels required with the reference
        statistic), keep the rest as the bank and its benign statistics at every stage."""
        from ..data import Dataset
        from ..classifier_training import train_reference
        from ..oracle import ModelOracle
        from .student import distil_student

        x = self.model.check_inputs(heldout_x)
        if heldout_y is None and "reference" in self.statistics and self.reference is None and \
                self.reference_training == "labels":
            raise ValueError("a reference trained on labels needs labelled held-out images: give heldout_y")
        y = np.zeros(len(x), np.int64) if heldout_y is None else np.asarray(heldout_y).reshape(-1)
        perm = np.random.default_rng([self.seed, 3]).permutation(len(x))
        train_ref = "reference" in self.statistics and self.reference is None
        fit_null = "activation" in self.statistics and self.activation_null is None
        n_ref = int(round(self.reference_fraction * len(x))) if train_ref or fit_null else 0
        ref_idx, cal_idx = perm[:n_ref], perm[n_ref:]
        if len(cal_idx) < max(50, self.n_perturbations + 1):
            raise ValueError(f"{len(cal_idx)} calibration images are too few; give a larger held-out set")
        self.reference_bytes_ = None
        if "reference" in self.statistics and not train_ref:
            self.reference_bytes_ = bytes(self.reference)
            self.reference_ = ModelOracle(self.reference_bytes_, spinning=False)
        if train_ref and self.reference_training == "student":
            self.reference_bytes_ = distil_student(self.model, x[ref_idx], epochs=self.reference_epochs or 60,
                                                   seed=self.seed)
            self.reference_ = ModelOracle(self.reference_bytes_, spinning=False)
        elif train_ref:
            self.reference_bytes_, self.reference_train_accuracy_ = train_reference(
                Dataset(x[ref_idx], y[ref_idx].astype(np.int64)), self.model.n_classes,
                epochs=self.reference_epochs or 40, seed=self.seed)
            self.reference_ = ModelOracle(self.reference_bytes_, spinning=False)
        if "activation" in self.statistics:
            self.activation_null_ = self.activation_null
            if fit_null:  # the model's features on the reference share, under its own labels
                with self.model.phase("check-fit"):
                    p_fit, h_fit = self.model.proba_and_hidden(x[ref_idx])
                self.activation_null_ = ClassFeatureNull().fit(h_fit, p_fit.argmax(axis=1), self.model.n_classes)
        _attach_bank(self, np.ascontiguousarray(x[cal_idx]))
        self.model_sha256_ = self.model.sha256
        self.created_at_ = utc_now()
        with self.model.phase("check-fit"):
            self.stage_values_ = self._stage_statistics(self.bank_, exclude=np.arange(len(self.bank_)))
            if "reference" in self.statistics:  # how often the reference answers a calibration image as the model does
                self.reference_agreement_ = float(np.mean(self.reference_.predict(self.bank_) ==
                                                          self.model.predict(self.bank_)))
        self.threshold_ = None
        return self

    def infer_threshold(self, frr: float = 0.01) -> "RuntimeCheck":
        """Calibrate the min-p test at preset FRR (see `check.calibrate`); threshold_ = -p*."""
        self.check_fitted()
        if not 0.0 < frr < 1.0:
            raise ValueError(f"frr must be in (0, 1), got {frr}")
        self.calibration_ = calibrate(self.stage_values_, frr, self.stages, weights=self.weights)
        self.threshold_ = -self.calibration_.threshold
        return self

    def score(self, x, adaptive: bool = True) -> np.ndarray:
        """s(x) = -min_k p_k(x), the negated combined p-value: higher means more trojan-like."""
        return self._answer(x, adaptive)["instance_score"]

    def predict(self, x, adaptive: bool = True) -> dict:
        """The contract's result (`detector_base`); `adaptive` False asks every input all N copies."""
        return super().predict(x, adaptive=adaptive)

    def _answer(self, x, adaptive: bool = True) -> dict:
        """The model's own answers on x (`proba`), the instance scores and the served model's inputs per
        input (itself and the copies asked); the first call of a batch carries the inputs with their first
        copies, so labels cost no extra call."""
        self.check_threshold()
        x = self.model.check_inputs(x)
        n, big_n, cal = len(x), self.n_perturbations, self.calibration_
        p_ref = self.reference_.predict_proba(x) if "reference" in self.statistics else None
        with self.model.phase("check"):
            p_known, act = self._self_answers(x)  # with the activation statistic, x's own call returns its features
        if not self.asks_copies:  # one call per input: its answer (and features) and the reference's
            values = statistics_at(p_known, None, p_ref, self.statistics, act)
            return {"proba": p_known, "instance_score": -cal.combined(big_n, values),
                    "model_calls": np.ones(n, dtype=np.int64),
                    "reference_calls": np.full(n, int(p_ref is not None), dtype=np.int64)}
        idx = self.copies_.draw_indices(x)  # copies are built stage by stage, only for inputs still asked
        answers = {}
        score = np.ones(n)
        used = np.zeros(n, dtype=np.int64)
        proba = np.zeros((n, self.model.n_classes))
        live = np.arange(n)
        asked = 0
        with self.model.phase("check"):
            for stage in (*(self.stages if adaptive else ()), big_n):
                first = asked == 0
                xs = x if first else x[live]  # every input is live at the first stage
                p_self, p_copies = self.copies_.ask(self.model, xs, idx[live, asked:stage], self._order,
                                                    with_self=first and p_known is None)
                if first:
                    p_self = p_self if p_known is None else p_known
                    answers["self"], answers["copies"] = p_self, p_copies
                    proba[:] = p_self
                else:
                    answers["copies"] = np.concatenate([answers["copies"], p_copies], axis=1)
                asked, used[live] = stage, stage
                values = statistics_at(answers["self"], answers["copies"], None if p_ref is None else p_ref[live],
                                       self.statistics, None if act is None else act[live])
                partial = cal.combined(stage, values)
                score[live] = partial
                if stage == big_n:
                    break
                keep = partial <= cal.stage_bounds[stage]  # not clearly benign yet: ask more copies
                live, answers["self"], answers["copies"] = live[keep], answers["self"][keep], answers["copies"][keep]
                if not len(live):
                    break
        return {"proba": proba, "instance_score": -score, "model_calls": used + 1,
                "reference_calls": np.full(n, int(p_ref is not None), dtype=np.int64)}

    def meta(self) -> dict:
        """The contract's meta plus the statistics, stages and the realised FRR with its interval."""
        cal = getattr(self, "calibration_", None)
        return {**super().meta(), "statistics": list(self.statistics), "n_perturbations": self.n_perturbations,
                "reference_training": self.reference_training if "reference" in self.statistics else None,
                "weights": self.weights, "blend": self.blend, "stages": list(self.stages),
                "frr": None if cal is None else cal.frr,
                "realised_frr": None if cal is None else cal.realised_frr,
                "frr_interval": None if cal is None else list(cal.frr_interval)}

    def describe(self) -> dict:
        """The settings and threshold of the fitted check, as the gate logs, tags and reports them."""
        self.check_threshold()
        cal = self.calibration_
        return {"kind": self.kind, "threshold": float(self.threshold_), "frr": float(cal.frr), "rule": self.rule,
                "n_perturbations": self.n_perturbations, "blend": self.blend, "seed": self.seed,
                "n_calibration": int(len(self.bank_)), "score_direction": SCORE_DIRECTION,
                "statistics": list(self.statistics), "stages": list(self.stages), "realised_frr": cal.realised_frr,
                "reference_training": self.reference_training if "reference" in self.statistics else None,
                "weights": self.weights, "frr_interval": list(cal.frr_interval), "stage_bounds": {str(k): v for k, v in cal.stage_bounds.items()},
                **({"activation": self.extra["activation"]} if "activation" in self.extra else {})}

    # -- artifact -----------------------------------------------------------------------
    def save(self, directory) -> Path:
        """check.json (everything the decision uses) + bank.npy + reference.onnx + activation.npz (the class
        means and precision of the hidden features, plain arrays), hashed like STRIP's artifact."""
        self.check_threshold()
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        np.save(directory / BANK_FILE, self.bank_, allow_pickle=False)
        doc = {"format": FORMAT, "format_version": FORMAT_VERSION, **{k: v for k, v in self.meta().items() if k != "name"},
               "seed": self.seed, "reference_fraction": self.reference_fraction, "created_at": self.created_at_,
               "threshold": self.threshold_, "n_calibration": self.calibration_.n_calibration,
               "stage_bounds": {str(k): v for k, v in self.calibration_.stage_bounds.items()},
               "benign": {str(s): {k: [float(v) for v in vals] for k, vals in d.items()}
                          for s, d in self.calibration_.benign.items()},
               "bank_sha256": sha256_file(directory / BANK_FILE), "versions": versions(), "extra": dict(self.extra)}
        if self.reference_bytes_ is not None:
            (directory / REFERENCE_FILE).write_bytes(self.reference_bytes_)
            doc["reference_sha256"] = sha256_bytes(self.reference_bytes_)
        if "activation" in self.statistics:
            with (directory / ACTIVATION_FILE).open("wb") as f:
                np.savez(f, **self.activation_null_.to_arrays())
            doc["activation_sha256"] = sha256_file(directory / ACTIVATION_FILE)
        doc["integrity"] = {"content_sha256": content_sha256(doc)}
        (directory / CHECK_FILE).write_text(json.dumps(doc, sort_keys=True))
        return directory

    @classmethod
    def load(cls, directory, model) -> "RuntimeCheck":
        """Restore a saved check for `model`, refusing any hash mismatch (ArtifactIntegrityError)."""
        from ..oracle import ModelOracle

        directory = Path(directory)
        try:
            doc = json.loads((directory / CHECK_FILE).read_text())
        except (OSError, ValueError) as e:
            raise ArtifactIntegrityError(f"{CHECK_FILE} is missing or not JSON: {e}") from e
        if not isinstance(doc, dict):
            raise ArtifactIntegrityError(f"runtime check artifact refused: {CHECK_FILE} is not a JSON object")

        def intact(name, recorded):  # the file is there and hashes to what check.json recorded
            return (directory / name).is_file() and sha256_file(directory / name) == recorded

        checks = [(doc.get("format") == FORMAT, "not a runtime-check artifact"),
                  (doc.get("format_version") == FORMAT_VERSION,
                   f"{CHECK_FILE} has format version {doc.get('format_version')}; this trojan-gate reads version "
                   f"{FORMAT_VERSION}, which scores higher for more trojan-like inputs (calibrate the model again)"),
                  ((doc.get("integrity") or {}).get("content_sha256") == content_sha256(doc), "check.json was modified"),
                  (doc.get("model_sha256") == model.sha256, "calibrated on another model"),
                  (intact(BANK_FILE, doc.get("bank_sha256")), "bank.npy is missing or was modified")]
        if "reference" in (doc.get("statistics") or ()):
            checks.append((intact(REFERENCE_FILE, doc.get("reference_sha256")), "reference.onnx was modified"))
        if "activation" in (doc.get("statistics") or ()):
            checks.append((intact(ACTIVATION_FILE, doc.get("activation_sha256")), f"{ACTIVATION_FILE} was modified"))
        for ok, why in checks:
            if not ok:
                raise ArtifactIntegrityError(f"runtime check artifact refused: {why}")
        try:
            det = cls(model, n_perturbations=doc["n_perturbations"], blend=doc["blend"], statistics=doc["statistics"],
                      stages=doc["stages"], reference_fraction=doc["reference_fraction"], seed=doc["seed"],
                      reference_training=doc.get("reference_training") or "labels", weights=doc.get("weights"),
                      progress=False)
            det.model_sha256_, det.created_at_ = doc["model_sha256"], doc.get("created_at")
            det.extra = dict(doc.get("extra") or {})
            det.calibration_ = Calibration(
                benign={int(s): {k: np.asarray(v) for k, v in d.items()} for s, d in doc["benign"].items()},
                threshold=-float(doc["threshold"]),
                stage_bounds={int(k): float(v) for k, v in doc["stage_bounds"].items()}, frr=float(doc["frr"]),
                realised_frr=float(doc["realised_frr"]), frr_interval=tuple(doc["frr_interval"]),
                n_calibration=int(doc["n_calibration"]), weights=det.weights)
        except (KeyError, TypeError, ValueError, AttributeError) as e:
            raise ArtifactIntegrityError(f"runtime check artifact refused: {CHECK_FILE} lacks or mangles a field: "
                                         f"{e!r}") from e
        _attach_bank(det, load_bank(directory / BANK_FILE, model.input_shape))
        det.reference_bytes_ = None
        if "reference" in det.statistics:
            det.reference_bytes_ = (directory / REFERENCE_FILE).read_bytes()
            det.reference_ = ModelOracle(det.reference_bytes_, spinning=False)
        if "activation" in det.statistics:
            det.activation_null_ = _load_activation_null(directory / ACTIVATION_FILE, model.n_classes)
        det.threshold_ = -det.calibration_.threshold
        return det


def _load_activation_null(path: Path, n_classes: int) -> ClassFeatureNull:
    """The saved class means and precision (plain arrays, no pickles), refused unless one mean per class."""
    try:
        with np.load(path, allow_pickle=False) as arrays:
            null = ClassFeatureNull.from_arrays({k: arrays[k] for k in arrays.files})
    except (OSError, KeyError, ValueError) as e:
        raise ArtifactIntegrityError(f"runtime check artifact refused: {ACTIVATION_FILE} is unreadable: {e}") from e
    if null.means_.shape[0] != n_classes:
        raise ArtifactIntegrityError(f"runtime check artifact refused: {ACTIVATION_FILE} has {null.means_.shape[0]} "
                                     f"class means for a model of {n_classes} classes")
    return null
