"""Black-box query oracle over an ONNX Runtime session.

Everything trojan-gate learns about a model comes through `ModelOracle.predict_proba`:
batched class probabilities for float32 NCHW inputs in [0, 1]. The oracle counts every
input it is asked about (per phase), can stop a scan at a query budget, and validates
both what goes in (shape, dtype, finiteness) and what comes out (a finite (n, K) matrix).
No weights and no gradients are ever read from the model.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from .errors import InputShapeError, ModelLoadError, ModelOutputError, QueryBudgetExceeded
from .hashing import sha256_bytes

MAX_MODEL_BYTES = 2 * 1024**3  # protobuf's own limit for a single-file model


def default_providers() -> list[str]:
    """CUDA when ONNX Runtime offers it, CPU always as the fallback."""
    available = ort.get_available_providers()
    return [p for p in ("CUDAExecutionProvider", "CPUExecutionProvider") if p in available]


@dataclass
class ModelInfo:
    """What intake reads off an ONNX classifier."""

    input_name: str
    output_name: str
    input_shape: tuple  # (C, H, W)
    n_classes: int
    sha256: str
    opset: int


@dataclass
class PhaseStats:
    queries: int = 0
    calls: int = 0
    seconds: float = 0.0


@dataclass
class QueryLedger:
    """Per-phase query counts and model time."""

    phases: dict = field(default_factory=dict)

    def add(self, phase: str, n: int, seconds: float):
        s = self.phases.setdefault(phase, PhaseStats())
        s.queries += n
        s.calls += 1
        s.seconds += seconds

    def to_dict(self) -> dict:
        return {k: {"queries": v.queries, "calls": v.calls, "seconds": round(v.seconds, 4)}
                for k, v in self.phases.items()}


def _static_dims(value_info) -> list:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else None)
    return dims


def inspect_model(model: str | Path | bytes) -> tuple[bytes, ModelInfo]:
    """Load and check an ONNX classifier; return its bytes and what it expects.

    Raises ModelLoadError naming the problem: unreadable protobuf, failing onnx.checker,
    not exactly one float input of rank 4 with static (C, H, W), or no rank-2 output with a
    static class count.
    """
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        if path.stat().st_size > MAX_MODEL_BYTES:
            raise ModelLoadError(f"model file is larger than {MAX_MODEL_BYTES} bytes: {path}")
        data = path.read_bytes()
    else:
        data = bytes(model)
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelLoadError(f"not a readable ONNX model: {e}") from e
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ModelLoadError(f"ONNX checker rejected the model: {e}") from e
    for init in proto.graph.initializer:
        if init.data_location == onnx.TensorProto.EXTERNAL:
            raise ModelLoadError("model keeps weights in external data files; "
                                 "intake needs a single self-contained .onnx file")
    init_names = {i.name for i in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in init_names]
    if len(inputs) != 1:
        raise ModelLoadError(f"expected exactly one graph input, found {len(inputs)}")
    inp = inputs[0]
    if inp.type.tensor_type.elem_type != onnx.TensorProto.FLOAT:
        raise ModelLoadError(f"input '{inp.name}' must be float32, got elem_type "
                             f"{onnx.TensorProto.DataType.Name(inp.type.tensor_type.elem_type)}")
    dims = _static_dims(inp)
    if len(dims) != 4 or any(d is None or d <= 0 for d in dims[1:]):
        raise ModelLoadError(f"input '{inp.name}' must be (batch, C, H, W) with static C, H, W; got {dims}")
    if len(proto.graph.output) < 1:
        raise ModelLoadError("model has no output")
    out = proto.graph.output[0]
    odims = _static_dims(out)
    if len(odims) != 2 or odims[1] is None or odims[1] < 2:
        raise ModelLoadError(f"output '{out.name}' must be (batch, n_classes) with static n_classes >= 2; got {odims}")
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    info = ModelInfo(input_name=inp.name, output_name=out.name, input_shape=tuple(int(d) for d in dims[1:]),
                     n_classes=int(odims[1]), sha256=sha256_bytes(data), opset=int(opset))
    return data, info


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


class ModelOracle:
    """Query access to an ONNX classifier: probabilities in, nothing else out.

    Parameters
    ----------
    model : path or bytes of a self-contained .onnx file
    batch_size : inputs per ONNX Runtime call (large batches amortise the call overhead)
    budget : optional cap on the total number of queried inputs; exceeding it raises
        QueryBudgetExceeded before the offending batch is sent
    output : "auto" (probabilities if rows are non-negative and sum to 1, softmax otherwise),
        "probabilities" or "logits"
    providers : ONNX Runtime execution providers; default CUDA when present, else CPU
    """

    def __init__(self, model, batch_size: int = 2048, budget: int | None = None, output: str = "auto",
                 providers: list[str] | None = None, intra_op_threads: int = 0):
        self._bytes, self.info = inspect_model(model)
        if output not in ("auto", "probabilities", "logits"):
            raise ValueError(f"output must be auto, probabilities or logits, not {output!r}")
        self.batch_size = int(batch_size)
        self.budget = None if budget is None else int(budget)
        self.output = output
        so = ort.SessionOptions()
        so.log_severity_level = 3
        if intra_op_threads:
            so.intra_op_num_threads = int(intra_op_threads)
        self.providers = providers or default_providers()
        try:
            self._session = ort.InferenceSession(self._bytes, sess_options=so, providers=self.providers)
        except Exception as e:
            raise ModelLoadError(f"ONNX Runtime cannot load the model: {e}") from e
        self.queries = 0
        self.ledger = QueryLedger()
        self._phase = "default"

    # -- descriptive ----------------------------------------------------------------
    @property
    def input_shape(self) -> tuple:
        return self.info.input_shape

    @property
    def n_classes(self) -> int:
        return self.info.n_classes

    @property
    def sha256(self) -> str:
        return self.info.sha256

    @property
    def model_bytes(self) -> bytes:
        return self._bytes

    @property
    def device(self) -> str:
        return "cuda" if "CUDAExecutionProvider" in self._session.get_providers() else "cpu"

    @contextlib.contextmanager
    def phase(self, name: str):
        """Attribute the queries made inside the block to `name` in the ledger."""
        previous, self._phase = self._phase, name
        try:
            yield self
        finally:
            self._phase = previous

    # -- querying -------------------------------------------------------------------
    def check_inputs(self, x) -> np.ndarray:
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
        return x

    def remaining(self) -> int | None:
        return None if self.budget is None else self.budget - self.queries

    def _run(self, x: np.ndarray) -> np.ndarray:
        out = self._session.run([self.info.output_name], {self.info.input_name: x})[0]
        return np.asarray(out)

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

    def predict_proba(self, x) -> np.ndarray:
        """Class probabilities (n, K) float64 for inputs (n, C, H, W); counted and batched."""
        x = self.check_inputs(x)
        n = len(x)
        if self.budget is not None and self.queries + n > self.budget:
            raise QueryBudgetExceeded(f"query budget of {self.budget} inputs exhausted "
                                      f"({self.queries} used, {n} more requested in phase '{self._phase}')")
        outs = []
        t0 = time.perf_counter()
        for i in range(0, n, self.batch_size):
            chunk = x[i:i + self.batch_size]
            outs.append(self._to_proba(self._run(chunk), len(chunk)))
        self.queries += n
        self.ledger.add(self._phase, n, time.perf_counter() - t0)
        if not outs:
            return np.zeros((0, self.n_classes))
        return np.concatenate(outs, axis=0)

    def raw_scores(self, x) -> np.ndarray:
        """The model's own output rows for inputs (n, C, H, W), unconverted (probabilities or logits
        as the graph computes them); counted like any query. Used to tell what a graph returns."""
        x = self.check_inputs(x)
        if self.budget is not None and self.queries + len(x) > self.budget:
            raise QueryBudgetExceeded(f"query budget of {self.budget} inputs exhausted")
        t0 = time.perf_counter()
        out = self._run(x)
        self.queries += len(x)
        self.ledger.add(self._phase, len(x), time.perf_counter() - t0)
        return out

    def predict(self, x) -> np.ndarray:
        """Class labels (argmax of `predict_proba`)."""
        return self.predict_proba(x).argmax(axis=1)

    __call__ = predict_proba
