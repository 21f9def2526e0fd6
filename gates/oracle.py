"""Black-box query oracle over an ONNX Runtime session.

Everything trojan-gate learns about a model comes through `ModelOracle.predict_proba`:
batched class probabilities for float32 NCHW inputs in the declared value range (default
[0, 1]). The oracle counts every input it is asked about (per phase), can stop a scan at a
query budget or a deadline, and validates what goes in (shape, dtype, finite values inside the
range: an input outside it is refused, never clipped, so no trigger can live out of range)
and what comes out (a finite (n, K) matrix). No weights and no gradients are ever read.

Against hostile models: the file passes the static admission rules before a session exists
(see `model_file.inspect_model`), `probe()` runs the behaviour probes of `admission`, and a
watchdog (one thread for the process, `watchdog.WATCHDOG`) terminates an ONNX Runtime call that
runs past `call_timeout_s` (default `DEFAULT_CALL_TIMEOUT_S`) or the deadline (`RunOptions.terminate`).
"""
from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass, field

import numpy as np
import onnxruntime as ort

from .admission import AdmissionLimits, probe_behaviour
from .errors import (InputRangeError, InputShapeError, ModelLoadError, ModelMemoryError, ModelOutputError,
                     OracleTimeout, QueryBudgetExceeded)
from .execution_memory import capped_providers, capped_session_options, is_allocation_failure
from .model_file import ModelInfo, default_providers, inspect_model
from .watchdog import WATCHDOG

DEFAULT_CALL_TIMEOUT_S = 300.0  # one ONNX Runtime call (a batch) of a hostile model cannot hang longer
MAX_HIDDEN_FEATURES = 2048  # widest hidden layer read as evidence: its d x d covariance is inverted once per check

__all__ = ["ModelInfo", "ModelOracle", "QueryLedger", "default_providers", "inspect_model", "softmax"]


@dataclass
class PhaseStats:
    """One phase's totals: queried inputs, ONNX Runtime calls and model seconds."""

    queries: int = 0
    calls: int = 0
    seconds: float = 0.0


@dataclass
class QueryLedger:
    """Per-phase query counts and model time."""

    phases: dict = field(default_factory=dict)

    def add(self, phase: str, n: int, seconds: float):
        """Record one call of `n` inputs taking `seconds` under `phase`."""
        s = self.phases.setdefault(phase, PhaseStats())
        s.queries += n
        s.calls += 1
        s.seconds += seconds

    def to_dict(self) -> dict:
        """Phase -> {queries, calls, seconds (rounded)}, JSON-able."""
        return {k: {"queries": v.queries, "calls": v.calls, "seconds": round(v.seconds, 4)}
                for k, v in self.phases.items()}


def softmax(z: np.ndarray) -> np.ndarray:
    """Row-wise softmax exp(z - max z) / sum exp(z - max z) of logits z (n, K)."""
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class ModelOracle:
    """Query access to an ONNX classifier: probabilities in, nothing else out.

    Parameters
    ----------
    model : path or bytes of a self-contained .onnx file
    batch_size : inputs per ONNX Runtime call (large batches amortise the call overhead; a graph
        with a fixed batch of 1 is asked one row per call)
    budget : optional cap on the total number of queried inputs; exceeding it raises
        QueryBudgetExceeded before the offending batch is sent
    output : "auto" (probabilities if rows are non-negative and sum to 1, softmax otherwise),
        "probabilities" or "logits"
    providers : ONNX Runtime execution providers; default CUDA when present, else CPU
    limits : AdmissionLimits (file size, input size, probe settings)
    value_range : the inputs' declared range; values outside it are refused
    call_timeout_s : one ONNX Runtime call longer than this is terminated (OracleTimeout); default
        `DEFAULT_CALL_TIMEOUT_S`, None for no limit
    deadline : time.monotonic() value after which no call starts and running ones are terminated
    spinning : whether ONNX Runtime's worker threads spin between calls (its default); False for a
        session that alternates with another on the same cores (the run-time check's reference and
        hidden-output sessions: spinning threads of one slow the other, 7.8 against 4.8 ms per 256 rows)
    """

    def __init__(self, model, batch_size: int = 2048, budget: int | None = None, output: str = "auto",
                 providers: list[str] | None = None, intra_op_threads: int = 0,
                 limits: AdmissionLimits = AdmissionLimits(), value_range: tuple = (0.0, 1.0),
                 call_timeout_s: float | None = DEFAULT_CALL_TIMEOUT_S, deadline: float | None = None,
                 spinning: bool = True):
        self._bytes, self.info = inspect_model(model, limits)
        if output not in ("auto", "probabilities", "logits"):
            raise ValueError(f"output must be auto, probabilities or logits, not {output!r}")
        self.batch_size = 1 if self.info.fixed_batch == 1 else int(batch_size)
        self.budget = None if budget is None else int(budget)
        self.output = output
        self.limits = limits
        self.value_range = (float(value_range[0]), float(value_range[1]))
        self.call_timeout_s = call_timeout_s
        self.deadline = deadline
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if intra_op_threads:
            so.intra_op_num_threads = int(intra_op_threads)
        if not spinning:
            so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.providers = providers or default_providers()
        self.memory_cap = capped_session_options(so, limits.max_memory_bytes)
        self._options = so
        try:
            self._session = ort.InferenceSession(self._bytes, sess_options=so,
                                                 providers=capped_providers(self.providers, self.memory_cap))
        except Exception as e:
            raise ModelLoadError(f"ONNX Runtime cannot load the model: {e}") from e
        self.queries = 0
        self.ledger = QueryLedger()
        self._phase = "default"
        self._hidden = None  # (session, output name) of the hidden-output graph, built on first use

    # -- descriptive ----------------------------------------------------------------
    @property
    def input_shape(self) -> tuple:
        """The model's input shape (C, H, W)."""
        return self.info.input_shape

    @property
    def n_classes(self) -> int:
        """The number of classes K."""
        return self.info.n_classes

    @property
    def sha256(self) -> str:
        """sha256 of the model file's bytes, hex."""
        return self.info.sha256

    @property
    def model_bytes(self) -> bytes:
        """The model file's bytes."""
        return self._bytes

    @property
    def device(self) -> str:
        """The device the session runs on: "cuda" with the CUDA provider, else "cpu"."""
        return "cuda" if "CUDAExecutionProvider" in self._session.get_providers() else "cpu"

    @contextlib.contextmanager
    def phase(self, name: str):
        """Attribute the queries made inside the block to `name` in the ledger."""
        previous, self._phase = self._phase, name
        try:
            yield self
        finally:
            self._phase = previous

    def probe(self, seed: int | None = None, examples=None) -> "ModelOracle":
        """The behaviour probes of `admission` (determinism, batch independence; keyed from OS entropy unless
        `seed` is given; with `examples`, held-out-like images mixed into a keyed batch); raises
        AdmissionError. Uncounted: they ask about probes, not about anything the scan measures."""
        probe_behaviour(self._run_batched, self.input_shape, self.n_classes, self.limits, seed=seed,
                        examples=examples)
        return self

    # -- querying -------------------------------------------------------------------
    def check_inputs(self, x) -> np.ndarray:
        """Inputs as float32 (n, C, H, W); refuses a wrong shape or dtype, NaN/inf, and values
        outside `value_range` (InputRangeError)."""
        x = np.asarray(x)
        if x.ndim == 3 and x.shape == self.input_shape[1:] and self.input_shape[0] == 1:
            x = x[:, None]
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise InputShapeError(f"inputs must have shape (n, {', '.join(map(str, self.input_shape))}); "
                                  f"got {tuple(x.shape)}")
        if not np.issubdtype(x.dtype, np.floating):
            raise InputShapeError(f"inputs must be floating point in [0, 1], got dtype {x.dtype}")
        x = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x).all():
            raise InputShapeError("inputs contain NaN or infinite values")
        lo, hi = self.value_range
        if x.size and (x.min() < lo or x.max() > hi):
            raise InputRangeError(f"inputs must lie in [{lo:g}, {hi:g}]; got values from {x.min():.4g} to "
                                  f"{x.max():.4g}")
        return x

    def remaining(self) -> int | None:
        """Queries left in the budget: budget - queries (None without a budget)."""
        return None if self.budget is None else self.budget - self.queries

    def _time_left(self) -> float | None:
        limits = [t for t in (self.call_timeout_s,
                              None if self.deadline is None else self.deadline - time.monotonic()) if t is not None]
        return min(limits) if limits else None

    def _run(self, x: np.ndarray) -> np.ndarray:
        return self._call(self._session, {self.info.input_name: x})

    def _call(self, session, feeds: dict, outputs: list | None = None):
        """The model's answer (one array) from one bounded session call; with `outputs`, a list of those outputs."""
        names = outputs or [self.info.output_name]
        left = self._time_left()
        if left is None:
            try:
                res = [np.asarray(r) for r in session.run(names, feeds)]
                return res if outputs else res[0]
            except Exception as e:
                self._raise_named(e)
                raise
        if left <= 0:
            raise OracleTimeout(f"the oracle's deadline passed before a call in phase '{self._phase}'")
        options = ort.RunOptions()
        token = WATCHDOG.arm(left, options)
        try:
            res = [np.asarray(r) for r in session.run(names, feeds, options)]
            return res if outputs else res[0]
        except Exception as e:
            if options.terminate:
                raise OracleTimeout(f"an ONNX Runtime call ran past its {left:.1f} s limit in phase "
                                    f"'{self._phase}' and was terminated") from e
            self._raise_named(e)
            raise
        finally:
            WATCHDOG.disarm(token)

    def _raise_named(self, error: Exception):
        if is_allocation_failure(error):
            raise ModelMemoryError(f"the model asked ONNX Runtime for more memory than the cap of "
                                   f"{self.memory_cap / 1024**2:.0f} MiB in phase '{self._phase}' and was "
                                   "stopped") from error

    def _run_batched(self, x: np.ndarray) -> np.ndarray:
        outs = [self._run(x[i:i + self.batch_size]) for i in range(0, len(x), self.batch_size)]
        return np.concatenate(outs, axis=0) if outs else np.zeros((0, self.n_classes), np.float32)

    def _to_proba(self, out: np.ndarray, n: int) -> np.ndarray:
        if out.ndim != 2 or out.shape != (n, self.n_classes):
            raise ModelOutputError(f"model returned shape {out.shape}, expected ({n}, {self.n_classes})")
        out = out.astype(np.float64)
        if not np.isfinite(out).all():
            raise ModelOutputError("model returned NaN or infinite class scores")
        if self.output == "logits":
            return softmax(out)
        is_prob = (out.min() >= -1e-6) and np.allclose(out.sum(axis=1), 1.0, atol=1e-3)
        if self.output == "probabilities":
            if not is_prob:
                raise ModelOutputError("model output is not a probability distribution per row")
            return np.clip(out, 0.0, 1.0)
        return np.clip(out, 0.0, 1.0) if is_prob else softmax(out)

    def _checked_raw(self, out: np.ndarray, n: int) -> np.ndarray:
        if out.ndim != 2 or out.shape != (n, self.n_classes):
            raise ModelOutputError(f"model returned shape {out.shape}, expected ({n}, {self.n_classes})")
        return out

    def _counted(self, x, convert) -> np.ndarray:
        x = self.check_inputs(x)
        n = len(x)
        if self.budget is not None and self.queries + n > self.budget:
            raise QueryBudgetExceeded(f"query budget of {self.budget} inputs exhausted "
                                      f"({self.queries} used, {n} more requested in phase '{self._phase}')")
        t0 = time.perf_counter()
        outs = [convert(self._run(chunk), len(chunk)) for chunk in (x[i:i + self.batch_size]
                                                                    for i in range(0, n, self.batch_size))]
        self.queries += n
        self.ledger.add(self._phase, n, time.perf_counter() - t0)
        if not outs:
            return np.zeros((0, self.n_classes))
        return np.concatenate(outs, axis=0)

    def wrapper_session(self, graph: bytes, spinning: bool = True):
        """An ONNX Runtime session on a graph the project built around this model (`copies_graph`), with
        this oracle's providers, threads and memory cap (`spinning` False: its threads do not spin)."""
        options = self._options
        if not spinning:
            options = ort.SessionOptions()
            options.log_severity_level = 3
            options.intra_op_num_threads = self._options.intra_op_num_threads
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            capped_session_options(options, self.limits.max_memory_bytes)
        return ort.InferenceSession(graph, sess_options=options,
                                    providers=capped_providers(self.providers, self.memory_cap))

    def ask_wrapped(self, session, feeds: dict, n_rows: int, counted: bool = True) -> np.ndarray:
        """Probabilities (n_rows, K) from one call of a wrapper session whose output is this model's answer on
        n_rows rows it builds; counted, budgeted, time-bounded and converted like `predict_proba`
        (`counted` False: the project's own check of the wrapper, uncounted like the admission probes)."""
        if counted and self.budget is not None and self.queries + n_rows > self.budget:
            raise QueryBudgetExceeded(f"query budget of {self.budget} inputs exhausted "
                                      f"({self.queries} used, {n_rows} more requested in phase '{self._phase}')")
        t0 = time.perf_counter()
        out = self._to_proba(self._call(session, feeds), n_rows)
        if counted:
            self.queries += n_rows
            self.ledger.add(self._phase, n_rows, time.perf_counter() - t0)
        return out

    def hidden_session(self):
        """(session, output name) of the model with its last dense layer's input exposed, built once (refused
        with ModelLoadError where there is no such layer: `runtime.activations.hidden_output_graph`)."""
        from .runtime.activations import hidden_output_graph

        if self._hidden is None:
            graph, name = hidden_output_graph(self._bytes)
            self._hidden = (self.wrapper_session(graph, spinning=False), name)  # alternates with the reference
        return self._hidden

    def proba_and_hidden(self, x, max_features: int = MAX_HIDDEN_FEATURES) -> tuple[np.ndarray, np.ndarray]:
        """(probabilities (n, K), hidden features (n, d)) from the same calls: the model with the input of its
        last dense layer exposed as a second output (`runtime.activations.hidden_output_graph`; the answers
        are the model's own). Counted, budgeted and time-bounded like `predict_proba`; refuses (ModelOutputError)
        features that are not one row per input or wider than `max_features`."""
        x = self.check_inputs(x)
        n = len(x)
        session, name = self.hidden_session()
        if self.budget is not None and self.queries + n > self.budget:
            raise QueryBudgetExceeded(f"query budget of {self.budget} inputs exhausted "
                                      f"({self.queries} used, {n} more requested in phase '{self._phase}')")
        t0 = time.perf_counter()
        probas, feats = [], []
        for i in range(0, n, self.batch_size):
            chunk = x[i:i + self.batch_size]
            y, h = self._call(session, {self.info.input_name: chunk}, [self.info.output_name, name])
            probas.append(self._to_proba(y, len(chunk)))
            if h.size % len(chunk) or not 0 < h.size // len(chunk) <= max_features or \
                    (h.ndim and h.shape[0] != len(chunk)):
                raise ModelOutputError(f"the hidden layer {name!r} returned shape {h.shape} for {len(chunk)} inputs: "
                                       f"not one row of at most {max_features} features per input")
            feats.append(h.reshape(len(chunk), -1).astype(np.float64))
        self.queries += n
        self.ledger.add(self._phase, n, time.perf_counter() - t0)
        if not probas:
            return np.zeros((0, self.n_classes)), np.zeros((0, 0))
        return np.concatenate(probas), np.concatenate(feats)

    def uncounted_proba(self, x: np.ndarray) -> np.ndarray:
        """Probabilities for checked inputs x, uncounted: the project's own checks (like the admission probes)."""
        return self._to_proba(self._run_batched(x), len(x))

    def predict_proba(self, x) -> np.ndarray:
        """Class probabilities (n, K) float64 for inputs (n, C, H, W); counted and batched."""
        return self._counted(x, self._to_proba)

    def raw_scores(self, x) -> np.ndarray:
        """The model's own output rows for inputs (n, C, H, W), unconverted (probabilities or logits
        as the graph computes them); counted like any query. Used to tell what a graph returns."""
        return self._counted(x, self._checked_raw)

    def predict(self, x) -> np.ndarray:
        """Class labels (argmax of `predict_proba`)."""
        return self.predict_proba(x).argmax(axis=1)

    __call__ = predict_proba
