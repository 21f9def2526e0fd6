"""Trojan mitigation by model patching (DeepInspect, Chen et al. 2019, Section 5).

The flagged model is fine-tuned on a mixture of the substitute data {X_MI, Y_MI} (plus part
of a held-out set when the user gave one) and a patching set
X_patch = X_MI^subset + Delta_t, Y_patch = Y_MI^subset: a share (`patch_fraction`, paper 15%,
default 40%) of the training images stamped with triggers Delta_t drawn for the flagged classes
t, their labels kept correct. Another share (`val_fraction`, paper 10%) is held back to choose
the retraining configuration: the learning rate when several are given, and, with
`epoch_selection="best"` (the paper), the epoch (ties go to the later one); by default the
last epoch is kept (see the parameter). Training runs `epochs` epochs (paper 10, default 40) with the
original loss (negative log-likelihood), plus, by default, a self-distillation term on the
unstamped images that keeps the patched model close to the original one where no trigger is
present.

Why more than the paper's 15% and 10 epochs: the scan's generator learns from gradients
estimated from queries (on 2x2 tiles at 28x28), so its triggers are rough copies of the real
one (a pixel off, or holding only a piece of a multi-target trojan's shared patch), and
unlearning a rough copy unlearns the real trigger only partly. Seeing more
of them for longer closes most of that gap while the distillation term holds clean accuracy.
Measured on the Fashion-MNIST zoo trojans (held-out 120 per class; true-trigger activation
rate after patching, 15% stamped/10 epochs/distillation 3 -> the defaults, 40%/40 epochs/
distillation 6, both with the jitter and background stamps below, both keeping the best
validation epoch): patch 10.7% -> 5.0%, blend
(flagged 6, 8) 57.2% -> 9.7%, multi-target 1,4,7 43.1% -> 9.8%, clean accuracy -0.5, -0.3 and
-0.8 points (see the README's patch benchmark for the lab's own models).
The patched model is the average of 4 such runs from the source weights (`soup`), which
narrows the spread between patcher seeds.
`ModelPatcher(patch_fraction=0.15, epochs=10, distill_weight=0, trigger_jitter=0,
background_fraction=0, epoch_selection="best", soup=1)` is the paper's recipe.

The ONNX model is converted to torch with onnx2torch, fine-tuned, and exported back to a
single-file ONNX with the same input/output names, a dynamic batch axis and the same kind of
output (probabilities or logits). Before/after figures are measured through ONNX Runtime
(`ModelOracle`), never with the torch module.
"""
from __future__ import annotations

import copy
import io
import json
import time
import warnings
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Callable, Sequence

import numpy as np
import onnx
import torch
from torch import nn
from tqdm.auto import tqdm

from .data import Dataset
from .errors import InputShapeError, ModelLoadError
from .hashing import sha256_bytes
from .oracle import ModelOracle, inspect_model

OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_LOGITS = "logits"

Stamp = Callable[[np.ndarray, int, int], np.ndarray]


# ----------------------------------------------------------------------------- conversion
def _softmax_axis(node, opset: int) -> int:
    for a in node.attribute:
        if a.name == "axis":
            return int(a.i)
    return -1 if opset >= 13 else 1


def _strip_final_softmax(proto: onnx.ModelProto) -> onnx.ModelProto | None:
    """The model without its trailing Softmax over the class axis, or None if it has none."""
    out = proto.graph.output[0]
    producers = [n for n in proto.graph.node if out.name in n.output]
    if len(producers) != 1 or producers[0].op_type != "Softmax":
        return None
    node = producers[0]
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=13)
    if _softmax_axis(node, opset) not in (1, -1):
        return None
    if any(out.name in n.input for n in proto.graph.node):  # the probabilities feed something else
        return None
    stripped = copy.deepcopy(proto)
    g = stripped.graph
    for i, n in enumerate(g.node):
        if n.op_type == "Softmax" and out.name in n.output:
            del g.node[i]
            break
    logits = onnx.ValueInfoProto()
    logits.CopyFrom(g.output[0])
    logits.name = node.input[0]
    for i, vi in enumerate(g.value_info):
        if vi.name == logits.name:
            del g.value_info[i]
            break
    del g.output[0]
    g.output.insert(0, logits)
    return stripped


def _probe_is_probabilities(onnx_bytes: bytes, input_shape, seed: int = 0) -> bool:
    """Do the model's rows look like probability distributions on random inputs?"""
    oracle = ModelOracle(onnx_bytes, output="logits")  # "logits" leaves the raw scores for us
    x = np.random.default_rng(seed).random((16,) + tuple(input_shape), dtype=np.float32)
    raw = oracle._run(x).astype(np.float64)
    return bool(raw.min() >= -1e-6 and np.allclose(raw.sum(axis=1), 1.0, atol=1e-3))


class ConvertedClassifier(nn.Module):
    """A torch copy of an ONNX classifier whose forward returns log-probabilities.

    `body` is the onnx2torch GraphModule; `body_output` says what it computes ("logits"
    when it ends before the softmax, "probabilities" when the softmax is inside and could
    not be split off), `output_kind` what the original ONNX graph returned.
    """

    def __init__(self, body: nn.Module, output_kind: str, body_output: str, input_shape, n_classes: int,
                 input_name: str = "input", output_name: str = "output"):
        super().__init__()
        self.body = body
        self.output_kind = output_kind
        self.body_output = body_output
        self.input_shape = tuple(int(v) for v in input_shape)
        self.n_classes = int(n_classes)
        self.input_name = input_name
        self.output_name = output_name

    def _raw(self, x):
        out = self.body(x)
        return out[0] if isinstance(out, (tuple, list)) else out

    def forward(self, x):
        out = self._raw(x)
        if self.body_output == OUTPUT_LOGITS:
            return torch.log_softmax(out, dim=1)
        return torch.log(out.clamp_min(1e-12))

    def original_output(self, x):
        """What the source ONNX graph returned for x: probabilities or logits."""
        out = self._raw(x)
        if self.output_kind == OUTPUT_PROBABILITIES and self.body_output == OUTPUT_LOGITS:
            return torch.softmax(out, dim=1)
        return out


class _ExportView(nn.Module):
    def __init__(self, clf: ConvertedClassifier):
        super().__init__()
        self.clf = clf

    def forward(self, x):
        return self.clf.original_output(x)


def onnx_to_torch(onnx_bytes: bytes) -> ConvertedClassifier:
    """Convert an ONNX image classifier to a trainable torch module returning log-probabilities.

    A trailing Softmax node is split off (training then runs on log_softmax of the logits);
    a model whose softmax is not a separate final node but whose rows sum to 1 is trained on
    log(p); a model returning logits is trained on log_softmax(logits).
    """
    from onnx2torch import convert

    data, info = inspect_model(onnx_bytes)
    proto = onnx.load_model_from_string(data)
    stripped = _strip_final_softmax(proto)
    if stripped is not None:
        kind, body_output, source = OUTPUT_PROBABILITIES, OUTPUT_LOGITS, stripped
    else:
        kind = OUTPUT_PROBABILITIES if _probe_is_probabilities(data, info.input_shape) else OUTPUT_LOGITS
        body_output, source = kind, proto
    try:
        body = convert(source)
    except Exception as e:
        raise ModelLoadError(f"onnx2torch cannot convert the model for patching: {e}") from e
    return ConvertedClassifier(body, kind, body_output, info.input_shape, info.n_classes,
                               info.input_name, info.output_name)


def torch_to_onnx(clf: ConvertedClassifier, opset: int = 17, metadata: dict | None = None) -> bytes:
    """Export back to a single-file ONNX: (batch, C, H, W) float32 in, the original output kind out."""
    view = _ExportView(clf).eval()
    dummy = torch.zeros((2,) + clf.input_shape, dtype=torch.float32)
    buf = io.BytesIO()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter keeps dynamic axes simple
        torch.onnx.export(view, (dummy,), buf, input_names=[clf.input_name], output_names=[clf.output_name],
                          dynamic_axes={clf.input_name: {0: "batch"}, clf.output_name: {0: "batch"}},
                          opset_version=opset, dynamo=False)
    proto = onnx.load_model_from_string(buf.getvalue())
    for k, v in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = str(k), str(v)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


# ----------------------------------------------------------------------------- measuring
def trojan_activation_rates(predict, x: np.ndarray, y: np.ndarray, stamp: Stamp, targets,
                            seed: int = 0) -> dict:
    """Per target t: share of stamped images with true class != t that are predicted as t."""
    rates = {}
    for t in targets:
        keep = y != t
        if not keep.any():
            rates[int(t)] = float("nan")
            continue
        xs = np.asarray(stamp(x[keep], int(t), int(seed) + int(t)), dtype=np.float32)
        rates[int(t)] = float((predict(xs) == t).mean())
    return rates


def _pooled_rate(rates: dict, y: np.ndarray) -> float:
    """Activation rate pooled over targets (each weighted by its number of stamped images)."""
    num = den = 0.0
    for t, r in rates.items():
        n = int((y != t).sum())
        if n and np.isfinite(r):
            num += r * n
            den += n
    return float(num / den) if den else float("nan")


def measure(onnx_bytes: bytes, x_eval, y_eval, stamp: Stamp, targets, seed: int,
            x_clean=None, y_clean=None, phase: str = "patch-eval", return_correct: bool = False):
    """Clean accuracy and trojan activation rate of an ONNX model, queried through ModelOracle.
    With `return_correct` also the per-image correctness on the clean images (None without them)."""
    oracle = ModelOracle(onnx_bytes)
    with oracle.phase(phase):
        predict = oracle.predict
        rates = trojan_activation_rates(predict, x_eval, y_eval, stamp, targets, seed)
        acc = correct = None
        if x_clean is not None and len(x_clean):
            correct = predict(x_clean) == np.asarray(y_clean)
            acc = float(correct.mean())
    out = {"clean_accuracy": acc, "trojan_activation_rate": _pooled_rate(rates, y_eval),
           "trojan_activation_rates": rates, "queries": int(oracle.queries)}
    return (out, correct) if return_correct else out


def paired_drop_standard_error(correct_before, correct_after) -> float | None:
    """Standard error of the accuracy drop acc_before - acc_after measured on the same n images.

    With d_i = correct_before_i - correct_after_i in {-1, 0, 1}, b images right only before and
    c right only after: Var(d) = (b + c)/n - ((b - c)/n)^2 and SE = sqrt(Var(d) / n). Only the
    images on which the two models disagree carry noise (McNemar's pairing); None without data.
    """
    if correct_before is None or correct_after is None:
        return None
    cb, ca = np.asarray(correct_before, bool), np.asarray(correct_after, bool)
    if cb.shape != ca.shape or not cb.size:
        return None
    n = cb.size
    b, c = float((cb & ~ca).sum()), float((ca & ~cb).sum())
    return float(np.sqrt(max((b + c) / n - ((b - c) / n) ** 2, 0.0) / n))


# ----------------------------------------------------------------------------- result
_RATIO_EPS = 1e-9  # tolerance for comparing ratios of counts with a bound


@dataclass
class PatchResult:
    """What a patch produced and what it changed, measured with ONNX Runtime.

    before/after: {"clean_accuracy" (held-out evaluation split, None without held-out data),
    "trojan_activation_rate" (pooled over flagged classes), "trojan_activation_rates"
    ({class: rate}), "queries"}. `history` holds the validation figures of every epoch
    (epoch 0 = the unpatched model) for every learning rate tried.
    """

    onnx_bytes: bytes = field(repr=False)
    sha256: str
    source_sha256: str
    flagged_classes: list
    before: dict
    after: dict
    output_kind: str
    best_epoch: int
    best_lr: float
    epochs_run: int
    history: list
    n_train: int
    n_patch: int
    n_val: int
    n_eval: int
    eval_source: str  # "heldout" or "validation"
    config: dict
    seconds: float
    rounds: list = field(default_factory=list)  # per-round figures when several rounds were combined
    # per-image correctness on the clean evaluation images, before and after (None without them)
    correct_before: np.ndarray | None = field(default=None, repr=False)
    correct_after: np.ndarray | None = field(default=None, repr=False)

    @property
    def accuracy_drop(self) -> float | None:
        a, b = self.before.get("clean_accuracy"), self.after.get("clean_accuracy")
        return None if a is None or b is None else float(a - b)

    @property
    def accuracy_drop_se(self) -> float | None:
        """Paired standard error of `accuracy_drop` (`paired_drop_standard_error`): how much of
        the measured drop the evaluation images' draw alone could move. Reported, not used in
        the bound, which stays on the measured drop (the gate fails closed)."""
        return paired_drop_standard_error(self.correct_before, self.correct_after)

    def within_accuracy_drop(self, max_accuracy_drop: float) -> bool:
        """No measured drop, or one within `max_accuracy_drop`. The one comparison the gate, the
        patch rounds and `meets` share: accuracies are ratios of counts, so 0.901 - 0.891 (which
        floating point makes 0.010000000000000009) must count as one point."""
        drop = self.accuracy_drop
        return bool(drop is None or drop <= max_accuracy_drop + _RATIO_EPS)

    def meets(self, max_activation_rate: float = 0.10, max_accuracy_drop: float = 0.01) -> bool:
        """The issue's target: activation rate <= 10% and clean accuracy drop <= 1 point."""
        if not np.isfinite(self.after["trojan_activation_rate"]):
            return False
        ok = self.after["trojan_activation_rate"] <= max_activation_rate + _RATIO_EPS
        return bool(ok and self.within_accuracy_drop(max_accuracy_drop))

    def to_dict(self) -> dict:
        def clean(d):
            return {k: ({str(kk): vv for kk, vv in v.items()} if isinstance(v, dict) else v) for k, v in d.items()}

        return {"sha256": self.sha256, "source_sha256": self.source_sha256,
                "flagged_classes": [int(c) for c in self.flagged_classes],
                "before": clean(self.before), "after": clean(self.after),
                "accuracy_drop": self.accuracy_drop, "accuracy_drop_se": self.accuracy_drop_se,
                "output_kind": self.output_kind,
                "best_epoch": int(self.best_epoch), "best_lr": float(self.best_lr),
                "epochs_run": int(self.epochs_run), "history": self.history,
                "n_train": self.n_train, "n_patch": self.n_patch, "n_val": self.n_val, "n_eval": self.n_eval,
                "eval_source": self.eval_source, "config": self.config, "seconds": round(self.seconds, 3),
                "rounds": self.rounds}

    def save(self, path) -> Path:
        """Write the patched model to `path` and its figures next to it as `<path>.json`."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(self.onnx_bytes)
        path.with_suffix(path.suffix + ".json").write_text(json.dumps(self.to_dict(), indent=2))
        return path


# ----------------------------------------------------------------------------- patcher
def _as_xy(data) -> tuple[np.ndarray, np.ndarray]:
    if isinstance(data, Dataset):
        return data.x, data.y
    x, y = data
    return np.asarray(x), np.asarray(y)


def _checked(x, y, shape, n_classes, what) -> tuple[np.ndarray, np.ndarray]:
    """float32 images of the model's (C, H, W) with int64 labels in range; None means empty."""
    x = np.zeros((0,) + shape, np.float32) if x is None else np.asarray(x)
    y = np.zeros(0, np.int64) if y is None else np.asarray(y).reshape(-1)
    if len(x) and tuple(x.shape[1:]) != shape:
        raise InputShapeError(f"{what}: images must be (n, {', '.join(map(str, shape))}); got {tuple(x.shape)}")
    if len(x) != len(y):
        raise InputShapeError(f"{what}: {len(x)} images but {len(y)} labels")
    x = np.ascontiguousarray(x, dtype=np.float32).reshape((-1,) + shape)
    if not np.isfinite(x).all():
        raise InputShapeError(f"{what}: images contain NaN or infinite values")
    if len(y) and (not np.all(y == np.round(y)) or y.min() < 0 or y.max() >= n_classes):
        raise InputShapeError(f"{what}: labels must be integers in 0..{n_classes - 1}")
    return x, y.astype(np.int64)


def _draw_targets(y: np.ndarray, flagged: np.ndarray, rng) -> np.ndarray:
    """A flagged target per image, different from its true class whenever possible."""
    t = rng.choice(flagged, size=len(y))
    if len(flagged) > 1:
        same = t == y
        while same.any():
            t[same] = rng.choice(flagged, size=int(same.sum()))
            same = t == y
    return t


def _stamp_by_target(stamp: Stamp, x: np.ndarray, t: np.ndarray, seed: int) -> np.ndarray:
    out = np.empty_like(x)
    for c in np.unique(t):
        idx = np.flatnonzero(t == c)
        stamped = np.asarray(stamp(x[idx], int(c), int(seed) + int(c)), dtype=np.float32)
        if stamped.shape != x[idx].shape:
            raise InputShapeError(f"stamp returned shape {stamped.shape} for inputs of shape {x[idx].shape}")
        out[idx] = stamped
    return out


def uniform_soup(states: list[dict]) -> dict:
    """The uniform model soup (Wortsman et al., ICML'22): theta = (1/m) * sum_i theta_i over m
    fine-tuning runs from the same source weights; integer buffers are taken from the first run.
    Runs that start from one set of weights stay in one basin, so their average is a model of the
    same architecture whose clean accuracy is at least the runs' mean, usually above it."""
    if not states:
        raise ValueError("a soup needs at least one state")
    keys = list(states[0])
    if any(list(s) != keys for s in states[1:]):
        raise ValueError("soup members must share one architecture (same state keys)")
    out = {}
    for k in keys:
        v = states[0][k]
        out[k] = torch.stack([s[k] for s in states]).mean(0) if v.is_floating_point() else v.clone()
    return out


def _stamped_share(x: np.ndarray, y: np.ndarray, n: int, classes: np.ndarray, stamp: Stamp, jitter: int,
                   rng) -> tuple[np.ndarray, np.ndarray]:
    """n images drawn from (x, y), each stamped with a trigger for one of `classes` (not its own
    class where possible) and jittered; returned with their true labels."""
    idx = rng.choice(len(x), size=n, replace=False)
    t = _draw_targets(y[idx], classes, rng)
    stamped = _stamp_by_target(stamp, x[idx], t, seed=int(rng.integers(2**31)))
    return jitter_stamps(x[idx], stamped, jitter, rng), y[idx]


def shift_image(a: np.ndarray, dy: int, dx: int) -> np.ndarray:
    """a (C, H, W) moved by dy rows and dx columns, zero-filled (no wrap-around)."""
    out = np.zeros_like(a)
    h, w = a.shape[-2:]
    out[..., max(dy, 0):h + min(dy, 0), max(dx, 0):w + min(dx, 0)] = \
        a[..., max(-dy, 0):h + min(-dy, 0), max(-dx, 0):w + min(-dx, 0)]
    return out


def jitter_stamps(x: np.ndarray, stamped: np.ndarray, max_shift: int, rng) -> np.ndarray:
    """Move each stamped image's effective trigger clip(x + Delta) - x by a random (dy, dx) in
    [-max_shift, max_shift]^2 and stamp it again: clip(x + shift(stamped - x), 0, 1)."""
    if max_shift <= 0:
        return stamped
    delta = stamped - x
    shifts = rng.integers(-max_shift, max_shift + 1, size=(len(x), 2))
    out = np.stack([shift_image(d, int(dy), int(dx)) for d, (dy, dx) in zip(delta, shifts)]) if len(x) else delta
    return np.clip(x + out, 0.0, 1.0).astype(np.float32)


def combine_rounds(results: Sequence["PatchResult"]) -> "PatchResult":
    """Several patch rounds (each against a fresh scan's triggers) as one result.

    `before` is the first round's (its triggers on the source model), `after` the last round's
    (its triggers on the final model); with the same seed and held-out set every round keeps
    the same evaluation split, so the accuracy drop is the total one. `rounds` keeps each
    round's before/after figures.
    """
    results = list(results)
    if not results:
        raise ValueError("no patch rounds to combine")
    if len(results) == 1:
        return results[0]
    first, last = results[0], results[-1]
    flagged = sorted({int(c) for r in results for c in r.flagged_classes})
    rounds = [{"flagged_classes": [int(c) for c in r.flagged_classes], "before": r.before, "after": r.after,
               "accuracy_drop": r.accuracy_drop, "sha256": r.sha256} for r in results]
    return replace(last, source_sha256=first.source_sha256, flagged_classes=flagged, before=first.before,
                   correct_before=first.correct_before,
                   history=[h for r in results for h in r.history],
                   epochs_run=sum(r.epochs_run for r in results), seconds=sum(r.seconds for r in results),
                   config={**last.config, "rounds": len(results)}, rounds=rounds)


def patch_in_rounds(onnx_bytes: bytes, scan_result, rescan: Callable, heldout, rounds: int = 1,
                    max_accuracy_drop: float | None = None, **patcher_options) -> tuple[list, list]:
    """Patch against `scan_result`'s triggers, re-scan, and while the fresh scan still flags
    (and the total accuracy drop stays within `max_accuracy_drop`, when given) patch the patched
    model again against the fresh scan's own triggers, up to `rounds` rounds.

    rescan(onnx_bytes) -> a scan result of the patched model. Returns (patch results, fresh scans),
    one of each per round run; `combine_rounds` makes the results one.
    """
    current, current_scan, results, scans = onnx_bytes, scan_result, [], []
    for _ in range(max(1, int(rounds))):
        results.append(ModelPatcher(**patcher_options).fit(
            current, current_scan.inverted_x, current_scan.inverted_y, current_scan.generator.stamp,
            current_scan.flagged_classes, heldout=heldout))
        scans.append(rescan(results[-1].onnx_bytes))
        if not scans[-1].trojan_suspected or (max_accuracy_drop is not None and
                                              not combine_rounds(results).within_accuracy_drop(max_accuracy_drop)):
            break
        current, current_scan = results[-1].onnx_bytes, scans[-1]
    return results, scans


class ModelPatcher:
    """Fine-tune a trojaned ONNX classifier on stamped-but-correctly-labelled data (Sec. 5).

    Parameters
    ----------
    epochs : fine-tuning epochs (paper: 10; default 40, see the module doc)
    lr : Adam learning rate, or a sequence of them to choose from on the validation split
    batch_size : mini-batch size
    patch_fraction : share of training images, redrawn each epoch, stamped with a trigger
        for a flagged class while keeping the true label (paper: 15%; default 40%, see the module doc)
    val_fraction : share of the fine-tuning pool held back to choose the epoch / lr (paper: 10%)
    heldout_fraction : share of the held-out set added to the fine-tuning pool; the rest is
        kept apart to measure clean accuracy and activation rate before/after
    distill_weight : weight of a KL term keeping the patched model's class distribution on
        unstamped training images close to the original model's (self-distillation; not in the
        paper, which fine-tunes on labels alone: 0 reproduces that). It limits the loss of clean
        accuracy when fine-tuning on a small pool for many epochs (Fashion-MNIST patch trojan,
        40 epochs: -1.9 points at weight 3, -1.6 at 6; blend -1.5 and -1.0).
    freeze_batchnorm : keep BatchNorm running statistics fixed while fine-tuning
    trigger_jitter : move each fine-tuning trigger by up to this many pixels in each direction
        (0: the paper; None: 0 up to 16 px inputs, where the scan estimates gradients per pixel,
        else 2, where it uses 2x2 tiles). A recovered trigger is only located up to the query
        estimator's tile, so the real one may sit a pixel or two away; unlearning the trigger
        over that neighbourhood covers it. Jitter costs an exactly recovered trigger its exact
        spot (with the true trigger as the stamp on 8x8 digits, 1 px of jitter left 63% ASR
        instead of under 25%), hence none where the tile is a pixel
        (measured on the 6-epoch Fashion-MNIST patch trojan: true-trigger ASR after patching
        17.3% without, 12.9% with 2 px). Validation and the before/after figures use the
        triggers as generated.
    background_fraction : share of training images, redrawn each epoch, stamped with the
        generated trigger of a random *unflagged* class other than their own, label kept
        (0: the paper). Fine-tuning on the flagged classes' triggers alone makes the model
        robust to perturbations toward those classes only; a fresh scan then sees every other
        class's trigger unchanged and the flagged class's grown, which skews the per-class
        profile the double-MAD test reads (a fresh scan of the patched 6-epoch Fashion-MNIST
        trojan flagged the never-flagged bag class). Stamping every class keeps the profile
        level (same model, 15%: fresh scan clean, max df 0.72; true-trigger ASR 9.4%).
        Needs a stamp that serves every class (the scan's generator does).
    epoch_selection : "last" (default) keeps the model after the last epoch; "best" keeps the epoch
        with the best validation score (mean of clean and stamped accuracy; ties to the later
        epoch), the paper's use of its validation split. With several learning rates the
        validation score of the kept epoch chooses among them either way. Why "last": the split
        is 10% of a small pool (120 images on the lab benchmark, one image = 0.8 points), too
        small to rank epochs, and the generated triggers read 0% activation long before the real
        trigger's activation stops falling. Over the lab's patch, blend and multi-target trojans
        and four patcher seeds the last epoch left less true-trigger activation in 11 of 12 runs
        (means 3.7%, 2.0%, 12.2% against 4.4%, 3.0%, 14.4%) at the same mean accuracy change
        (-1.25, -1.32, -0.73 against -1.28, -1.19, -0.68 points).
    soup : number of fine-tuning runs averaged into the patched model (uniform model soup,
        Wortsman et al. 2022; 1: a single run, the paper). Every run starts from the source
        weights on the same split and draws its own batches, stamps and jitter; each keeps its
        epoch by `epoch_selection` and the weights are averaged. It costs `soup` times the
        fine-tuning time. Measured on the lab's small Fashion-MNIST trojans over patcher seeds
        0-3 (accuracy change / true-trigger activation): patch -0.92 / 2.9% with one run,
        -0.51 / 2.5% with 4 (seed spread 1.25 points -> 0.30); blend -1.10 / 0.75% and
        -1.09 / 0.7%; multi-target -0.98 / 19.7% and -0.75 / 18.4%.
    seed : seeds splits, stamping and torch
    progress : show a tqdm bar
    """

    def __init__(self, epochs: int = 40, lr: float | Sequence[float] = 1e-3, batch_size: int = 64,
                 patch_fraction: float = 0.40, val_fraction: float = 0.10, heldout_fraction: float = 0.5,
                 distill_weight: float = 6.0, freeze_batchnorm: bool = True, trigger_jitter: int | None = None,
                 background_fraction: float = 0.15, epoch_selection: str = "last", soup: int = 4, seed: int = 0,
                 progress: bool = True):
        self.epochs = epochs
        self.lr = lr
        self.batch_size = batch_size
        self.patch_fraction = patch_fraction
        self.val_fraction = val_fraction
        self.heldout_fraction = heldout_fraction
        self.distill_weight = distill_weight
        self.freeze_batchnorm = freeze_batchnorm
        self.trigger_jitter = trigger_jitter
        self.background_fraction = background_fraction
        self.epoch_selection = epoch_selection
        self.soup = soup
        self.seed = seed
        self.progress = progress

    @classmethod
    def param_names(cls) -> list[str]:
        """The constructor's parameter names, sorted (scikit-learn's `_get_param_names` habit):
        the one list the gate and the patch benchmark check user options against."""
        import inspect

        return sorted(n for n in inspect.signature(cls.__init__).parameters if n != "self")

    def get_params(self) -> dict:
        lrs = [float(v) for v in np.atleast_1d(self.lr)]
        return {"epochs": int(self.epochs), "lr": lrs if len(lrs) > 1 else lrs[0],
                "batch_size": int(self.batch_size), "patch_fraction": float(self.patch_fraction),
                "val_fraction": float(self.val_fraction), "heldout_fraction": float(self.heldout_fraction),
                "distill_weight": float(self.distill_weight), "freeze_batchnorm": bool(self.freeze_batchnorm),
                "trigger_jitter": None if self.trigger_jitter is None else int(self.trigger_jitter),
                "background_fraction": float(self.background_fraction),
                "epoch_selection": str(self.epoch_selection), "soup": int(self.soup), "seed": int(self.seed)}

    def _check(self):
        if self.epochs < 1:
            raise ValueError("epochs must be >= 1")
        if int(self.soup) != self.soup or self.soup < 1:
            raise ValueError("soup must be a whole number of fine-tuning runs >= 1")
        if not 0.0 <= self.patch_fraction <= 1.0:
            raise ValueError("patch_fraction must lie in [0, 1]")
        if not 0.0 <= self.background_fraction <= 1.0:
            raise ValueError("background_fraction must lie in [0, 1]")
        if not 0.0 < self.val_fraction < 1.0:
            raise ValueError("val_fraction must lie in (0, 1)")
        if not 0.0 <= self.heldout_fraction < 1.0:
            raise ValueError("heldout_fraction must lie in [0, 1)")
        if self.epoch_selection not in ("last", "best"):
            raise ValueError(f"epoch_selection must be 'last' or 'best', not {self.epoch_selection!r}")
        if self.trigger_jitter is not None and (int(self.trigger_jitter) != self.trigger_jitter
                                                or self.trigger_jitter < 0):
            raise ValueError("trigger_jitter must be a non-negative whole number of pixels")

    def jitter_for(self, hw) -> int:
        """The trigger jitter in pixels for inputs of height/width `hw` (resolves None)."""
        if self.trigger_jitter is not None:
            return int(self.trigger_jitter)
        return 0 if int(hw[0]) <= 16 else 2

    # -- helpers ------------------------------------------------------------------------
    def _train_mode(self, clf: nn.Module):
        clf.train()
        if self.freeze_batchnorm:
            for m in clf.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()

    @staticmethod
    def _predict(clf: nn.Module, x: np.ndarray, batch: int = 2048) -> np.ndarray:
        clf.eval()
        out = []
        with torch.no_grad():
            for i in range(0, len(x), batch):
                out.append(clf(torch.from_numpy(np.ascontiguousarray(x[i:i + batch]))).argmax(1).numpy())
        return np.concatenate(out) if out else np.zeros(0, np.int64)

    def _validate(self, clf, xv, yv, xv_st, tv) -> dict:
        clean = float((self._predict(clf, xv) == yv).mean())
        pred = self._predict(clf, xv_st)
        stamped = float((pred == yv).mean())
        mask = tv != yv
        tar = float((pred[mask] == tv[mask]).mean()) if mask.any() else float("nan")
        return {"val_clean_accuracy": clean, "val_stamped_accuracy": stamped, "val_activation_rate": tar,
                "score": 0.5 * (clean + stamped)}

    def _finetune(self, clf, lr, xt, yt, xv, yv, xv_st, tv, stamp, flagged, bar, member: int = 0):
        """One fine-tuning run at learning rate `lr` (soup member `member` draws its own batches,
        stamps and torch randomness); returns (kept state, kept epoch, its score, history)."""
        jitter = self.jitter_for(xt.shape[-2:])
        tag = {"member": member} if self.soup > 1 else {}  # which run of a soup a history row belongs to
        torch.manual_seed(self.seed + 7919 * member)
        rng = np.random.default_rng([self.seed, 1] + ([member] if member else []))
        opt = torch.optim.Adam(clf.parameters(), lr=lr)
        teacher = None
        if self.distill_weight > 0:
            teacher = copy.deepcopy(clf).eval()
            for p in teacher.parameters():
                p.requires_grad_(False)
        first = self._validate(clf, xv, yv, xv_st, tv)
        history = [{"lr": lr, "epoch": 0, **first, **tag}]
        best_state, best_epoch, best_score = None, 0, -np.inf
        n_patch = int(round(self.patch_fraction * len(xt)))
        n_background = int(round(self.background_fraction * len(xt)))
        background = np.setdiff1d(np.arange(clf.n_classes), flagged)
        for epoch in range(1, self.epochs + 1):
            xp, yp = _stamped_share(xt, yt, n_patch, flagged, stamp, jitter, rng)
            xs, ys = [xt, xp], [yt, yp]
            if n_background and len(background):
                xb, yb = _stamped_share(xt, yt, n_background, background, stamp, jitter, rng)
                xs.append(xb)
                ys.append(yb)
            x_ep = torch.from_numpy(np.concatenate(xs))
            y_ep = torch.from_numpy(np.concatenate(ys).astype(np.int64))
            perm = torch.from_numpy(rng.permutation(len(x_ep)))
            self._train_mode(clf)
            losses = []
            for i in range(0, len(perm), self.batch_size):
                b = perm[i:i + self.batch_size]
                logp = clf(x_ep[b])
                loss = nn.functional.nll_loss(logp, y_ep[b])
                if teacher is not None:
                    clean = b < len(xt)
                    if clean.any():
                        with torch.no_grad():
                            ref = teacher(x_ep[b[clean]])
                        kl = nn.functional.kl_div(logp[clean], ref, log_target=True, reduction="batchmean")
                        loss = loss + self.distill_weight * kl
                opt.zero_grad()
                loss.backward()
                opt.step()
                losses.append(loss.item())
            v = self._validate(clf, xv, yv, xv_st, tv)
            history.append({"lr": lr, "epoch": epoch, "train_loss": float(np.mean(losses)), **v, **tag})
            keep = v["score"] >= best_score if self.epoch_selection == "best" else epoch == self.epochs
            if keep:
                best_state = copy.deepcopy(clf.state_dict())
                best_epoch, best_score = epoch, v["score"]
            bar.update(1)
            bar.set_postfix(lr=lr, clean=f"{v['val_clean_accuracy']:.3f}", tar=f"{v['val_activation_rate']:.3f}")
        return best_state, best_epoch, best_score, history

    # -- fitting ------------------------------------------------------------------------
    def fit(self, onnx_bytes: bytes, x_inv, y_inv, stamp: Stamp, flagged_classes, heldout=None) -> PatchResult:
        """Patch the model against the flagged classes' triggers and measure before/after.

        x_inv, y_inv : the substitute data set {X_MI, Y_MI} (may be empty when held-out data is given)
        stamp : stamp(x, t, seed) -> x' stamps images with a trigger for target class t
        flagged_classes : the suspected attack targets
        heldout : optional Dataset or (x, y) of clean labelled images
        """
        self._check()
        t0 = time.perf_counter()
        data, info = inspect_model(onnx_bytes)
        flagged = np.asarray(sorted({int(c) for c in flagged_classes}), dtype=np.int64)
        if len(flagged) == 0:
            raise ValueError("no flagged classes to patch against")
        if flagged.min() < 0 or flagged.max() >= info.n_classes:
            raise ValueError(f"flagged classes {flagged.tolist()} outside 0..{info.n_classes - 1}")
        shape = tuple(info.input_shape)

        rng = np.random.default_rng(self.seed)
        x_inv, y_inv = _checked(x_inv, y_inv, shape, info.n_classes, "inverted set")
        pool_x, pool_y = [x_inv], [y_inv]
        x_eval = y_eval = None
        if heldout is not None:
            hx, hy = _as_xy(heldout)
            hx, hy = _checked(hx, hy, shape, info.n_classes, "held-out set")
            perm = rng.permutation(len(hy))
            n_ft = int(round(self.heldout_fraction * len(hy)))
            pool_x.append(hx[perm[:n_ft]])
            pool_y.append(hy[perm[:n_ft]])
            x_eval, y_eval = hx[perm[n_ft:]], hy[perm[n_ft:]]
            if len(y_eval) == 0:
                x_eval = y_eval = None
        px, py = np.concatenate(pool_x), np.concatenate(pool_y)
        if len(py) < 10:
            raise ValueError(f"only {len(py)} images to fine-tune on; give a larger inverted or held-out set")
        perm = rng.permutation(len(py))
        n_val = max(1, int(round(self.val_fraction * len(py))))
        xv, yv = px[perm[:n_val]], py[perm[:n_val]]
        xt, yt = px[perm[n_val:]], py[perm[n_val:]]
        tv = _draw_targets(yv, flagged, rng)
        xv_st = _stamp_by_target(stamp, xv, tv, seed=self.seed + 10_000)

        eval_source = "heldout" if x_eval is not None else "validation"
        ex, ey = (x_eval, y_eval) if x_eval is not None else (xv, yv)
        eval_seed = self.seed + 20_000  # triggers never seen in fine-tuning or validation
        before, correct_before = measure(data, ex, ey, stamp, flagged, eval_seed, x_eval, y_eval, return_correct=True)

        lrs = [float(v) for v in np.atleast_1d(self.lr)]
        n_members = int(self.soup)
        bar = tqdm(total=n_members * len(lrs) * self.epochs, desc="patch", disable=not self.progress, leave=False)
        history, kept = [], []
        for member in range(n_members):
            best = None
            for lr in lrs:
                clf = onnx_to_torch(data)
                state, epoch, score, hist = self._finetune(clf, lr, xt, yt, xv, yv, xv_st, tv, stamp, flagged, bar,
                                                           member=member)
                history.extend(hist)
                if best is None or score > best[0]:
                    best = (score, lr, epoch, state, clf)
            kept.append(best)
        bar.close()
        _, best_lr, best_epoch, state, clf = kept[0]
        if n_members > 1:
            state = uniform_soup([k[3] for k in kept])
        clf.load_state_dict(state)
        clf.eval()
        new_bytes = torch_to_onnx(clf, metadata={"trojan_gate.patched_from": info.sha256,
                                                 "trojan_gate.patched_classes": ",".join(map(str, flagged.tolist()))})
        self._check_export(new_bytes, clf, info, xv)
        after, correct_after = measure(new_bytes, ex, ey, stamp, flagged, eval_seed, x_eval, y_eval,
                                       return_correct=True)
        return PatchResult(
            onnx_bytes=new_bytes, sha256=sha256_bytes(new_bytes), source_sha256=info.sha256,
            flagged_classes=flagged.tolist(), before=before, after=after, output_kind=clf.output_kind,
            best_epoch=int(best_epoch), best_lr=float(best_lr), epochs_run=n_members * len(lrs) * self.epochs,
            history=history, n_train=int(len(yt)), n_patch=int(round(self.patch_fraction * len(yt))),
            n_val=int(len(yv)), n_eval=int(len(ey)), eval_source=eval_source,
            config={**self.get_params(), "trigger_jitter": self.jitter_for(shape[-2:])},
            seconds=time.perf_counter() - t0, correct_before=correct_before, correct_after=correct_after)

    @staticmethod
    def _check_export(new_bytes: bytes, clf: ConvertedClassifier, info, x_probe: np.ndarray):
        """The exported graph must keep the interface and agree with the torch module."""
        _, new_info = inspect_model(new_bytes)
        if (new_info.input_shape, new_info.n_classes) != (tuple(info.input_shape), info.n_classes):
            raise ModelLoadError(f"patched model changed its interface: {new_info.input_shape}/{new_info.n_classes} "
                                 f"instead of {info.input_shape}/{info.n_classes}")
        x = np.ascontiguousarray(x_probe[:3], dtype=np.float32)
        raw = ModelOracle(new_bytes, output="logits")._run(x)
        with torch.no_grad():
            ref = clf.original_output(torch.from_numpy(x)).numpy()
        if not np.allclose(raw, ref, atol=1e-4, rtol=1e-3):
            raise ModelLoadError(f"exported patched model disagrees with its torch source "
                                 f"(max |diff| {np.abs(raw - ref).max():.2e})")
