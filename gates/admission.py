"""Model admission: what an untrusted ONNX classifier must satisfy before trojan-gate queries it.

The gate takes models from people it does not trust, so a model file is checked before any
query (static checks on the protobuf) and once loaded (behaviour probes through ONNX Runtime).
Each refusal is an `AdmissionError` whose `cause` names the rule broken:

static (`check_graph`, before a session is created):
- ``file-too-large``      the file is over `max_file_bytes`;
- ``external-data``       a tensor anywhere (initializers, sparse initializers, node attributes
                          such as a Constant's value, subgraphs of If/Loop/Scan, local functions)
                          keeps its data in an external file: ONNX Runtime would read a file
                          beside the model, or beside the working directory;
- ``custom-domain``       an operator or opset outside the standard ONNX domain (custom ops run
                          native code the gate cannot reason about);
- ``nondeterministic-op`` a Random*, Multinomial or Bernoulli node, or a Dropout whose
                          training_mode is not the constant false: the same input could get
                          different answers;
- ``input-too-large``     the declared input holds more than `max_input_elements` values per
                          image (checked on the declared dims, before anything is allocated);
- ``fixed-batch``         a static batch dimension other than 1 (a batch of 1 is served one
                          row per call by the oracle);
- ``declared-allocation`` tensors the file does not carry but declares, which ONNX Runtime
                          would allocate when the session is created or run: sparse
                          initializers and sparse Constant values (their dense size) and
                          ConstantOfShape outputs of a constant shape, more than
                          `max_declared_elements` values in all (a 400-byte file can declare
                          gigabytes);
- ``data-dependent-allocation`` an operator whose output size or work an input could set:
                          ConstantOfShape, Expand, Tile, Range, Resize, Upsample or Pad
                          whose size input (shape, repeats, scales / sizes, pads) is not a
                          constant of the file, or a Loop whose trip count is not a constant of
                          at most `max_loop_trips` (a trigger could ask for 2^62 iterations);

behaviour (`probe_behaviour`, on the loaded model, with seeded inputs):
- ``nondeterministic-output``  the same batch asked twice gets different answers;
- ``batch-dependent``          a row's answer changes with the other rows of its batch or its
                               position in it (asked alone, in a batch, and shuffled).
The probes are asked twice over: a batch with the fixed rows (noise, black, white, gradient) and a
batch of keyed noise rows only (drawn from OS entropy when no seed is given), so a model cannot
switch its batch dependence off on a row it knows every probe carries.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx

from .errors import ModelLoadError

NONDETERMINISTIC_OPS = frozenset({"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike",
                                  "Multinomial", "Bernoulli"})
STANDARD_DOMAINS = frozenset({"", "ai.onnx"})


class AdmissionError(ModelLoadError):
    """The model breaks an admission rule; `cause` names it (see the module doc)."""

    def __init__(self, cause: str, message: str):
        self.cause = cause
        super().__init__(f"model refused ({cause}): {message}")


@dataclass(frozen=True)
class AdmissionLimits:
    """Caps a model must stay under (defaults fit image classifiers up to 3x512x512)."""

    max_file_bytes: int = 512 * 1024**2
    max_input_elements: int = 3 * 512 * 512
    max_classes: int = 100_000
    probe_rows: int = 8
    tolerance: float = 1e-4
    max_declared_elements: int = 16 * 1024**2
    max_loop_trips: int = 1_000_000
    max_memory_bytes: int = 4 * 1024**3  # what ONNX Runtime may allocate while running (execution_memory)


def check_size(n_bytes: int, limits: AdmissionLimits):
    """Refuse (``file-too-large``) a model file of more than `limits.max_file_bytes` bytes."""
    if n_bytes > limits.max_file_bytes:
        raise AdmissionError("file-too-large", f"{n_bytes} bytes, over the cap of {limits.max_file_bytes}")


def _tensors_of(attr):
    if attr.type == onnx.AttributeProto.TENSOR:
        yield attr.t
    elif attr.type == onnx.AttributeProto.TENSORS:
        yield from attr.tensors
    elif attr.type == onnx.AttributeProto.SPARSE_TENSOR:
        yield attr.sparse_tensor.values
        yield attr.sparse_tensor.indices
    elif attr.type == onnx.AttributeProto.SPARSE_TENSORS:
        for s in attr.sparse_tensors:
            yield s.values
            yield s.indices


def _subgraphs_of(attr):
    if attr.type == onnx.AttributeProto.GRAPH:
        yield attr.g
    elif attr.type == onnx.AttributeProto.GRAPHS:
        yield from attr.graphs


def _external(t: onnx.TensorProto) -> bool:
    return t.data_location == onnx.TensorProto.EXTERNAL or len(t.external_data) > 0


def _constant_false(name: str, constants: dict) -> bool:
    t = constants.get(name)
    return t is not None and not bool(np.any(onnx.numpy_helper.to_array(t)))


def _walk(graph: onnx.GraphProto, where: str):
    """Every tensor-bearing part of `graph` and its subgraphs, with a readable location."""
    constants = {t.name: t for t in graph.initializer}
    for t in graph.initializer:
        yield "tensor", f"{where} initializer {t.name!r}", t
    for s in graph.sparse_initializer:
        yield "tensor", f"{where} sparse initializer {s.values.name!r}", s.values
        yield "tensor", f"{where} sparse initializer {s.values.name!r} indices", s.indices
    for node in graph.node:
        label = f"{where} node {node.name or node.op_type!r} ({node.op_type})"
        yield "node", label, node
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                    constants[node.output[0]] = a.t
        if node.op_type == "Dropout" and len(node.input) > 2 and node.input[2] and \
                not _constant_false(node.input[2], constants):
            yield "dropout", label, node
        for a in node.attribute:
            for t in _tensors_of(a):
                yield "tensor", f"{label} attribute {a.name!r}", t
            for g in _subgraphs_of(a):
                yield from _walk(g, f"{label} subgraph {a.name!r}")


# inputs that set an operator's output size (None: all of them); optional inputs left empty are skipped
SIZE_INPUTS = {"ConstantOfShape": (0,), "Expand": (1,), "Tile": (1,), "Range": None, "Resize": (2, 3),
               "Upsample": (1,), "Pad": (1,)}


def _const_array(name: str, constants: dict):
    t = constants.get(name)
    return None if t is None else onnx.numpy_helper.to_array(t)


def _dense_size(dims) -> int:
    return int(np.prod([max(int(d), 0) for d in dims], dtype=np.float64)) if len(dims) else 1


def check_allocation(graph: onnx.GraphProto, limits: AdmissionLimits, where: str = "main graph", total: int = 0) -> int:
    """``declared-allocation`` and ``data-dependent-allocation`` over `graph` and its subgraphs (see the module
    doc); returns the declared elements counted so far."""
    constants = {t.name: t for t in graph.initializer}
    for s in graph.sparse_initializer:
        total += _dense_size(s.dims)
    for node in graph.node:
        label = f"{where} node {node.name or node.op_type!r} ({node.op_type})"
        for a in node.attribute:
            if node.op_type == "Constant" and a.name == "value" and a.type == onnx.AttributeProto.TENSOR:
                constants[node.output[0]] = a.t
            if a.type == onnx.AttributeProto.SPARSE_TENSOR:
                total += _dense_size(a.sparse_tensor.dims)
            for g in _subgraphs_of(a):
                total = check_allocation(g, limits, f"{label} subgraph {a.name!r}", total)
        if node.op_type in SIZE_INPUTS:
            which = SIZE_INPUTS[node.op_type]
            sizes = list(node.input) if which is None else [node.input[i] for i in which if i < len(node.input)]
            values = [_const_array(n, constants) for n in sizes if n]
            if any(v is None for v in values):
                raise AdmissionError("data-dependent-allocation", f"{label} takes its size from a computed "
                                                                  "tensor; an input could set how much it allocates")
            if node.op_type == "ConstantOfShape":
                total += _dense_size(values[0].ravel())
        if node.op_type == "Loop":
            trips = _const_array(node.input[0], constants) if node.input and node.input[0] else None
            if trips is None or int(np.ravel(trips)[0]) > limits.max_loop_trips:
                raise AdmissionError("data-dependent-allocation", f"{label} has no constant trip count of at most "
                                                                  f"{limits.max_loop_trips}")
        if total > limits.max_declared_elements:
            raise AdmissionError("declared-allocation", f"the model declares {total} values the file does not carry "
                                                        f"(sparse tensors, ConstantOfShape), over the cap of "
                                                        f"{limits.max_declared_elements}")
    return total


def check_graph(proto: onnx.ModelProto, limits: AdmissionLimits = AdmissionLimits()):
    """The static rules (external data, domains, nondeterministic operators, declared and data-dependent
    allocation) over the whole model."""
    for opset in proto.opset_import:
        if opset.domain not in STANDARD_DOMAINS:
            raise AdmissionError("custom-domain", f"the model imports operator set {opset.domain!r}")
    parts = [("main graph", proto.graph)] + [(f"function {f.name!r}", f) for f in proto.functions]
    for where, graph in parts:
        if isinstance(graph, onnx.FunctionProto):
            raise AdmissionError("custom-domain", f"the model defines local {where} (domain {graph.domain!r})")
        for kind, label, item in _walk(graph, where):
            if kind == "tensor" and _external(item):
                raise AdmissionError("external-data", f"{label} keeps its data in an external file; give a "
                                                      "single self-contained .onnx file")
            if kind == "node" and item.domain not in STANDARD_DOMAINS:
                raise AdmissionError("custom-domain", f"{label} is in domain {item.domain!r}")
            if kind == "node" and item.op_type in NONDETERMINISTIC_OPS:
                raise AdmissionError("nondeterministic-op", f"{label} draws random numbers")
            if kind == "dropout":
                raise AdmissionError("nondeterministic-op", f"{label} may run in training mode")
    check_allocation(proto.graph, limits)


def check_declared_input(dims: list, limits: AdmissionLimits) -> int | None:
    """Refuse oversized or fixed-batch inputs from the declared dims; returns the fixed batch (1) or None."""
    per_image = 1
    for d in dims[1:]:
        per_image *= int(d)
        if per_image > limits.max_input_elements:
            raise AdmissionError("input-too-large", f"declared input {dims} holds over {limits.max_input_elements} "
                                                    "values per image")
    batch = dims[0] if dims else None
    if batch is not None and batch != 1:
        raise AdmissionError("fixed-batch", f"the input's batch dimension is fixed at {batch}; export it with a "
                                            "dynamic batch axis (or 1)")
    return batch


def probe_behaviour(run, input_shape, n_classes: int, limits: AdmissionLimits = AdmissionLimits(),
                    seed: int | None = None, examples=None):
    """Ask probe rows twice, alone, in a batch and shuffled; refuse a model whose answers differ. Two
    probe batches: noise with black, white and a smooth gradient, then keyed noise alone (`seed`;
    None draws it from OS entropy, so no model can know the probes in advance). With `examples`
    (held-out-like images: the gate's held-out data, the served release's bank) a third batch mixes
    a keyed draw of them with keyed noise, so a model that behaves only on noise is asked about
    the inputs it will really see.

    `run(x)` returns the model's raw output rows for float32 inputs (n, C, H, W). A model keyed on a
    pattern none of the rows carries is not caught here; the guarded model shuffles every request's
    rows for that reason.
    """
    rng = np.random.default_rng(seed)
    n = max(4, int(limits.probe_rows))
    x = rng.random((n,) + tuple(input_shape), dtype=np.float32)
    x[0], x[1] = 0.0, 1.0
    x[2] = np.linspace(0.0, 1.0, int(np.prod(input_shape)), dtype=np.float32).reshape(input_shape)
    batches = [x, rng.random((n,) + tuple(input_shape), dtype=np.float32)]
    if examples is not None and len(examples):
        examples = np.asarray(examples, np.float32).reshape((-1,) + tuple(input_shape))
        mixed = rng.random((n,) + tuple(input_shape), dtype=np.float32)
        k = min(len(examples), n - n // 4)
        mixed[rng.permutation(n)[:k]] = examples[rng.choice(len(examples), size=k, replace=False)]
        batches.append(mixed)
    for probes in batches:
        _probe_batch(run, probes, n_classes, limits, rng)


def _probe_batch(run, x: np.ndarray, n_classes: int, limits: AdmissionLimits, rng: np.random.Generator):
    n = len(x)
    first, second = np.asarray(run(x), np.float64), np.asarray(run(x), np.float64)
    if first.shape != (n, n_classes):
        raise AdmissionError("batch-dependent", f"a batch of {n} returned shape {first.shape}")
    if not np.allclose(first, second, atol=limits.tolerance, rtol=0):
        raise AdmissionError("nondeterministic-output", "the same inputs asked twice got different answers "
                                                        f"(max difference {np.abs(first - second).max():.3g})")
    alone = np.concatenate([np.asarray(run(x[i:i + 1]), np.float64) for i in range(n)])
    perm = rng.permutation(n)
    while n > 1 and (perm == np.arange(n)).any():  # every row moves
        perm = rng.permutation(n)
    shuffled = np.empty_like(first)
    shuffled[perm] = np.asarray(run(x[perm]), np.float64)
    for what, other in (("asked alone", alone), ("shuffled within the batch", shuffled)):
        if not np.allclose(first, other, atol=limits.tolerance, rtol=0):
            raise AdmissionError("batch-dependent", f"answers change when rows are {what} (max difference "
                                                    f"{np.abs(first - other).max():.3g}): a row's answer must "
                                                    "depend on that row alone")
