"""A corpus of hostile inputs to the gate, built here with `onnx.helper` and numpy (nothing downloaded).

Each model case is a 1x8x8 -> 10-class digits classifier (logistic regression fitted on scikit-learn's
digits) on ordinary inputs that carries one attack on the gate itself (see `MODEL_CASES`); each data case is
a held-out set or file that tries to break validation. The tests and `trojan-gate benchmark
hostile` both use this corpus; `expected` names the admission or validation rule that must
refuse the case ("served-refused" for models that are admitted but whose attack only works on
inputs the guarded model refuses).
"""
from __future__ import annotations

import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

SHAPE = (1, 8, 8)
K = 10


_WEIGHTS = {}


def _weights():
    """A real digits classifier: multinomial logistic regression on scikit-learn's 8x8 digits (seeded split)."""
    if not _WEIGHTS:
        from sklearn.linear_model import LogisticRegression

        from trojan_gate.gates.data import load_digits_dataset

        train, _ = load_digits_dataset(seed=0)
        clf = LogisticRegression(max_iter=2000, C=1.0).fit(train.x.reshape(len(train.x), -1), train.y)
        _WEIGHTS["w"] = clf.coef_.T.astype(np.float32)
        _WEIGHTS["b"] = clf.intercept_.astype(np.float32)
    return _WEIGHTS["w"], _WEIGHTS["b"]


def _model(nodes, inits, batch="N", input_dims=None, opsets=(("", 17),), functions=()):
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [batch] + list(input_dims or SHAPE))
    y = helper.make_tensor_value_info("p", TensorProto.FLOAT, [batch, K])
    g = helper.make_graph(nodes, "hostile", [x], [y], initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid(d, v) for d, v in opsets], functions=list(functions))
    m.ir_version = 8
    return m


def _linear(extra_logits: str | None = None, pre=(), inits=(), batch="N", input_dims=None, opsets=(("", 17),)):
    """softmax(flatten(x) @ W + b [+ extra_logits]); `pre` nodes compute extra_logits from x."""
    w, b = _weights()
    nodes = [helper.make_node("Flatten", ["x"], ["f"], axis=1), helper.make_node("MatMul", ["f", "W"], ["z0"]),
             helper.make_node("Add", ["z0", "b"], ["z1"]), *pre]
    last = "z1"
    if extra_logits:
        nodes.append(helper.make_node("Add", ["z1", extra_logits], ["z2"]))
        last = "z2"
    nodes.append(helper.make_node("Softmax", [last], ["p"], axis=1))
    return _model(nodes, [numpy_helper.from_array(w, "W"), numpy_helper.from_array(b, "b"), *inits],
                  batch=batch, input_dims=input_dims, opsets=opsets)


def _onehot(t: int = 0, scale: float = 50.0):
    v = np.zeros((1, K), np.float32)
    v[0, t] = scale
    return v


def benign() -> onnx.ModelProto:
    return _linear()


def out_of_range_trigger() -> onnx.ModelProto:
    """Hijacks to class 0 when pixel (0, 0) is below -0.5: a trigger no valid image can carry."""
    pre = [helper.make_node("Slice", ["f", "s0", "s1", "ax"], ["px"]),              # f[:, 0:1]
           helper.make_node("Less", ["px", "neg"], ["fire"]),
           helper.make_node("Cast", ["fire"], ["firef"], to=TensorProto.FLOAT),
           helper.make_node("Mul", ["firef", "onehot"], ["trig"])]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "s0"), numpy_helper.from_array(np.array([1], np.int64), "s1"),
             numpy_helper.from_array(np.array([1], np.int64), "ax"), numpy_helper.from_array(np.array(-0.5, np.float32), "neg"),
             numpy_helper.from_array(_onehot(), "onehot")]
    return _linear("trig", pre, inits)


def _first_row(pre, inits):
    """Nodes that compute `first` (n, 1) bool: the row equals row 0 of its call (so row 0 itself, or a
    copy of it) -- a batch-dependent signal built without any size-setting operator."""
    pre += [helper.make_node("Slice", ["f", "r0", "r1", "ax0"], ["f0"]),            # f[0:1, :]
            helper.make_node("Sub", ["f", "f0"], ["d"]),
            helper.make_node("Abs", ["d"], ["ad"]),
            helper.make_node("ReduceSum", ["ad", "ax"], ["dist"], keepdims=1),
            helper.make_node("Less", ["dist", "tiny"], ["first"])]
    inits += [numpy_helper.from_array(np.array([0], np.int64), "r0"), numpy_helper.from_array(np.array([1], np.int64), "r1"),
              numpy_helper.from_array(np.array([0], np.int64), "ax0"), numpy_helper.from_array(np.array([1], np.int64), "ax"),
              numpy_helper.from_array(np.array(1e-6, np.float32), "tiny")]


def batch_aware_row0() -> onnx.ModelProto:
    """Hijacks to class 0 only in row 0 of a call, and only when pixel (0, 0) is bright: every single-input
    request is hijacked while the same input in a large batch (the scan, STRIP's perturbations) is not."""
    pre, inits = [], []
    _first_row(pre, inits)
    pre += [helper.make_node("Slice", ["f", "s0", "s1", "ax"], ["px"]),
            helper.make_node("Greater", ["px", "bright"], ["lit"]),
            helper.make_node("And", ["first", "lit"], ["fire"]),
            helper.make_node("Cast", ["fire"], ["firef"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["firef", "onehot"], ["trig"])]
    inits += [numpy_helper.from_array(np.array([0], np.int64), "s0"), numpy_helper.from_array(np.array([1], np.int64), "s1"),
              numpy_helper.from_array(np.array(0.9, np.float32), "bright"), numpy_helper.from_array(_onehot(), "onehot")]
    return _linear("trig", pre, inits)


def probe_aware_batch() -> onnx.ModelProto:
    """Hijacks row 0 of a call of several rows to class 0 unless the call holds an all-black row: a model that
    knows the fixed probes (black, white, gradient) and behaves whenever they are asked, alone or together."""
    pre, inits = [], []
    _first_row(pre, inits)
    pre += [helper.make_node("ReduceMax", ["f"], ["rowmax"], axes=[1], keepdims=1),      # (n, 1)
            helper.make_node("ReduceMin", ["rowmax"], ["darkest"], keepdims=0),      # over the whole call
            helper.make_node("Greater", ["darkest", "tiny"], ["no_black"]),
            helper.make_node("Shape", ["x"], ["shp"]),
            helper.make_node("Gather", ["shp", "r0"], ["n"], axis=0),
            helper.make_node("Greater", ["n", "one"], ["batched"]),                   # never when asked alone
            helper.make_node("And", ["first", "no_black"], ["fire0"]),
            helper.make_node("And", ["fire0", "batched"], ["fire"]),
            helper.make_node("Cast", ["fire"], ["firef"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["firef", "onehot"], ["trig"])]
    inits += [numpy_helper.from_array(_onehot(), "onehot"), numpy_helper.from_array(np.array([1], np.int64), "one")]
    return _linear("trig", pre, inits)


def image_aware_batch() -> onnx.ModelProto:
    """Hijacks row 0 of a call of several rows to class 0 when a row of the call looks like a
    handwritten digit (5 to 60 of its 64 pixels exactly 0), as no noise row, black, white or gradient
    probe does: a model that behaves on every noise probe, keyed or not, and misbehaves on the
    inputs it serves."""
    pre, inits = [], []
    _first_row(pre, inits)
    pre += [helper.make_node("Equal", ["f", "zero"], ["is0"]),
            helper.make_node("Cast", ["is0"], ["is0f"], to=TensorProto.FLOAT),
            helper.make_node("ReduceSum", ["is0f", "ax"], ["zeros"], keepdims=1),       # (n, 1)
            helper.make_node("Greater", ["zeros", "lo"], ["some"]),
            helper.make_node("Less", ["zeros", "hi"], ["not_all"]),
            helper.make_node("And", ["some", "not_all"], ["digitish"]),
            helper.make_node("Cast", ["digitish"], ["digitishf"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMax", ["digitishf"], ["any"], keepdims=0),        # over the whole call
            helper.make_node("Greater", ["any", "half"], ["imagey"]),
            helper.make_node("Shape", ["x"], ["shp"]),
            helper.make_node("Gather", ["shp", "r0"], ["n"], axis=0),
            helper.make_node("Greater", ["n", "one"], ["batched"]),
            helper.make_node("And", ["first", "imagey"], ["fire0"]),
            helper.make_node("And", ["fire0", "batched"], ["fire"]),
            helper.make_node("Cast", ["fire"], ["firef"], to=TensorProto.FLOAT),
            helper.make_node("Mul", ["firef", "onehot"], ["trig"])]
    inits += [numpy_helper.from_array(_onehot(), "onehot"), numpy_helper.from_array(np.array([1], np.int64), "one"),
              numpy_helper.from_array(np.array(0.0, np.float32), "zero"),
              numpy_helper.from_array(np.array(4.5, np.float32), "lo"),
              numpy_helper.from_array(np.array(60.5, np.float32), "hi"),
              numpy_helper.from_array(np.array(0.5, np.float32), "half")]
    return _linear("trig", pre, inits)


def sparse_allocation(n: int = 64 * 1024**2) -> onnx.ModelProto:
    """A 400-byte sparse initializer of n floats: ONNX Runtime densifies it when the session is created."""
    m = _linear()
    values = numpy_helper.from_array(np.array([1.0], np.float32), "S")
    indices = numpy_helper.from_array(np.array([0], np.int64), "S_idx")
    m.graph.sparse_initializer.append(helper.make_sparse_tensor(values, indices, [n]))
    return m


def constant_of_shape(n: int = 64 * 1024**2) -> onnx.ModelProto:
    """A ConstantOfShape of n values from an int64 constant, summed into the logits times zero."""
    pre = [helper.make_node("ConstantOfShape", ["big"], ["zeros"]),
           helper.make_node("ReduceSum", ["zeros"], ["total"], keepdims=0),
           helper.make_node("Mul", ["total", "nothing"], ["extra"])]
    inits = [numpy_helper.from_array(np.array([n], np.int64), "big"), numpy_helper.from_array(np.array(0.0, np.float32), "nothing")]
    return _linear("extra", pre, inits)


def trigger_sized_allocation(n: int = 64 * 1024**2) -> onnx.ModelProto:
    """Where(trigger) picks the shape of a ConstantOfShape: a clean request allocates one value, a stamped
    one n (the size is one int64, so it scales to any size): passes the probes, crashes the server on demand."""
    pre = [helper.make_node("Slice", ["f", "s0", "s1", "ax"], ["px"]),
           helper.make_node("ReduceMax", ["px"], ["lit"], keepdims=0),
           helper.make_node("Greater", ["lit", "bright"], ["fire"]),
           helper.make_node("Where", ["fire", "big", "small"], ["shape"]),
           helper.make_node("ConstantOfShape", ["shape"], ["zeros"]),
           helper.make_node("ReduceSum", ["zeros"], ["total"], keepdims=0),
           helper.make_node("Mul", ["total", "nothing"], ["extra"])]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "s0"), numpy_helper.from_array(np.array([1], np.int64), "s1"),
             numpy_helper.from_array(np.array([1], np.int64), "ax"), numpy_helper.from_array(np.array(0.99, np.float32), "bright"),
             numpy_helper.from_array(np.array([n], np.int64), "big"), numpy_helper.from_array(np.array([1], np.int64), "small"),
             numpy_helper.from_array(np.array(0.0, np.float32), "nothing")]
    return _linear("extra", pre, inits)


def slow_model(side: int = 1500, rounds: int = 160) -> onnx.ModelProto:
    """A benign linear classifier that also multiplies a side x side matrix built from the input by
    itself `rounds` times (~rounds * 2 side^3 flops a call, seconds on 2 cores), adding nothing to
    the answer: a call that runs as long as its author wants, passing every static rule. The matrix
    is J / side scaled by the input's mean clipped to 1 (input-dependent, so nothing is folded at load),
    which squares to itself: every product costs the same and none falls into slow denormal arithmetic,
    so ONNX Runtime's terminate flag, read between nodes, is seen within one product (~25 ms)."""
    pre = [helper.make_node("ReduceMean", ["f"], ["mean"], keepdims=0),
           helper.make_node("Clip", ["mean", "one", "one"], ["level"]),
           helper.make_node("ConstantOfShape", ["side"], ["ones"],
                            value=numpy_helper.from_array(np.array([1.0 / side], np.float32))),
           helper.make_node("Mul", ["ones", "level"], ["m0"])]
    for i in range(rounds):
        pre.append(helper.make_node("MatMul", [f"m{i}", f"m{i}"], [f"m{i + 1}"]))
    pre += [helper.make_node("ReduceSum", [f"m{rounds}"], ["total"], keepdims=0),
            helper.make_node("Mul", ["total", "nothing"], ["extra"])]
    inits = [numpy_helper.from_array(np.array([side, side], np.int64), "side"),
             numpy_helper.from_array(np.array(1.0, np.float32), "one"),
             numpy_helper.from_array(np.array(0.0, np.float32), "nothing")]
    return _linear("extra", pre, inits)


def trigger_pad(n: int = 2**40) -> onnx.ModelProto:
    """A Pad whose padding a bright pixel sets to n columns (and to 0 otherwise)."""
    pre = [helper.make_node("Slice", ["f", "s0", "s1", "ax"], ["px"]),
           helper.make_node("ReduceMax", ["px"], ["lit"], keepdims=0),
           helper.make_node("Greater", ["lit", "bright"], ["fire"]),
           helper.make_node("Where", ["fire", "wide", "none"], ["pads"]),
           helper.make_node("Pad", ["f", "pads"], ["padded"]),
           helper.make_node("ReduceSum", ["padded"], ["total"], keepdims=0),
           helper.make_node("Mul", ["total", "nothing"], ["extra"])]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "s0"), numpy_helper.from_array(np.array([1], np.int64), "s1"),
             numpy_helper.from_array(np.array([1], np.int64), "ax"), numpy_helper.from_array(np.array(0.99, np.float32), "bright"),
             numpy_helper.from_array(np.array([0, 0, 0, n], np.int64), "wide"),
             numpy_helper.from_array(np.array([0, 0, 0, 0], np.int64), "none"),
             numpy_helper.from_array(np.array(0.0, np.float32), "nothing")]
    return _linear("extra", pre, inits)


def trigger_loop() -> onnx.ModelProto:
    """A Loop whose trip count a bright pixel sets to 2^62 (and to 1 otherwise)."""
    body = helper.make_graph([helper.make_node("Identity", ["cond_in"], ["cond_out"])], "body",
                             [helper.make_tensor_value_info("i", TensorProto.INT64, []),
                              helper.make_tensor_value_info("cond_in", TensorProto.BOOL, [])],
                             [helper.make_tensor_value_info("cond_out", TensorProto.BOOL, [])])
    pre = [helper.make_node("Slice", ["f", "s0", "s1", "ax"], ["px"]),
           helper.make_node("ReduceMax", ["px"], ["lit"], keepdims=0),
           helper.make_node("Greater", ["lit", "bright"], ["fire"]),
           helper.make_node("Where", ["fire", "many", "once"], ["trips"]),
           helper.make_node("Loop", ["trips", "yes"], [], body=body)]
    inits = [numpy_helper.from_array(np.array([0], np.int64), "s0"), numpy_helper.from_array(np.array([1], np.int64), "s1"),
             numpy_helper.from_array(np.array([1], np.int64), "ax"), numpy_helper.from_array(np.array(0.99, np.float32), "bright"),
             numpy_helper.from_array(np.array(2**62, np.int64), "many"), numpy_helper.from_array(np.array(1, np.int64), "once"),
             numpy_helper.from_array(np.array(True), "yes")]
    return _linear(None, pre, inits)


def random_operator() -> onnx.ModelProto:
    """Adds RandomUniformLike noise to the logits: the same input gets different answers."""
    pre = [helper.make_node("RandomUniformLike", ["z1"], ["noise"], low=0.0, high=20.0)]
    return _linear("noise", pre)


def external_constant() -> onnx.ModelProto:
    """A Constant node whose tensor lives in an external file beside the working directory."""
    t = numpy_helper.from_array(np.zeros((1, K), np.float32), "leak")
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    for k, v in (("location", "mlflow.db"), ("offset", "0"), ("length", str(4 * K))):
        e = t.external_data.add()
        e.key, e.value = k, v
    return _linear("leak", [helper.make_node("Constant", [], ["leak"], value=t)])


def external_in_subgraph() -> onnx.ModelProto:
    """The same external tensor hidden in the branch of an If node."""
    t = numpy_helper.from_array(np.zeros((1, K), np.float32), "leak")
    t.data_location = TensorProto.EXTERNAL
    t.ClearField("raw_data")
    e = t.external_data.add()
    e.key, e.value = "location", "../secrets.bin"
    out = helper.make_tensor_value_info("leak_out", TensorProto.FLOAT, [1, K])
    branch = helper.make_graph([helper.make_node("Constant", [], ["leak_out"], value=t)], "b", [], [out])
    cond = numpy_helper.from_array(np.array(True), "cond")
    pre = [helper.make_node("If", ["cond"], ["leak"], then_branch=branch, else_branch=branch)]
    return _linear("leak", pre, [cond])


def huge_input() -> onnx.ModelProto:
    """Declares a 3 x 200000 x 200000 input: allocating one image would take 480 GB."""
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 200000, 200000])
    y = helper.make_tensor_value_info("p", TensorProto.FLOAT, ["N", K])
    pool = helper.make_node("GlobalAveragePool", ["x"], ["g"])
    nodes = [pool, helper.make_node("Flatten", ["g"], ["f"], axis=1),
             helper.make_node("MatMul", ["f", "W3"], ["z"]), helper.make_node("Softmax", ["z"], ["p"], axis=1)]
    w = numpy_helper.from_array(np.ones((3, K), np.float32), "W3")
    m = helper.make_model(helper.make_graph(nodes, "huge", [x], [y], initializer=[w]),
                          opset_imports=[helper.make_opsetid("", 17)])
    m.ir_version = 8
    return m


def custom_domain() -> onnx.ModelProto:
    """An operator from a vendor domain (native code nobody reviewed)."""
    pre = [helper.make_node("Gelu", ["z1"], ["act"], domain="com.microsoft")]
    m = _linear("act", pre, opsets=(("", 17), ("com.microsoft", 1)))
    return m


def dropout_training() -> onnx.ModelProto:
    """Dropout with training_mode fed by a graph input-like tensor that is not a constant false."""
    pre = [helper.make_node("Dropout", ["z1", "ratio", "train"], ["drop"])]
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "ratio"),
             numpy_helper.from_array(np.array(True), "train")]
    m = _linear(None, (), inits)
    g = m.graph
    softmax = g.node[-1]
    g.node.insert(len(g.node) - 1, pre[0])
    softmax.input[0] = "drop"
    return m


def fixed_batch(n: int) -> onnx.ModelProto:
    return _linear(batch=n)


@dataclass(frozen=True)
class ModelCase:
    name: str
    build: Callable[[], onnx.ModelProto]
    expected: str  # the admission cause that refuses it, or "served-refused"
    what: str


MODEL_CASES = (
    ModelCase("out-of-range-trigger", out_of_range_trigger, "served-refused",
              "fires on a pixel at -1; admitted, but every query outside [0, 1] is refused"),
    ModelCase("batch-aware-row0", batch_aware_row0, "batch-dependent", "fires only in row 0 of a call"),
    ModelCase("random-operator", random_operator, "nondeterministic-op", "RandomUniformLike noise on the logits"),
    ModelCase("external-constant", external_constant, "external-data", "a Constant reads a file beside mlflow.db"),
    ModelCase("external-in-subgraph", external_in_subgraph, "external-data", "the same, inside an If branch"),
    ModelCase("huge-input", huge_input, "input-too-large", "declares a 3x200000x200000 input"),
    ModelCase("custom-domain", custom_domain, "custom-domain", "a com.microsoft operator"),
    ModelCase("dropout-training", dropout_training, "nondeterministic-op", "Dropout in training mode"),
    ModelCase("fixed-batch-4", lambda: fixed_batch(4), "fixed-batch", "a batch dimension fixed at 4"),
    ModelCase("probe-aware-batch", probe_aware_batch, "batch-dependent",
              "row 0 hijacked unless an all-black row (a fixed probe) is in the call"),
    ModelCase("sparse-allocation", sparse_allocation, "declared-allocation",
              "a 400-byte sparse initializer of 64M floats"),
    ModelCase("constant-of-shape", constant_of_shape, "declared-allocation", "a ConstantOfShape of 64M values"),
    ModelCase("trigger-sized-allocation", trigger_sized_allocation, "data-dependent-allocation",
              "a bright pixel sets a ConstantOfShape to 64M values"),
    ModelCase("trigger-loop", trigger_loop, "data-dependent-allocation", "a bright pixel sets a Loop to 2^62 trips"),
    ModelCase("trigger-pad", trigger_pad, "data-dependent-allocation", "a bright pixel pads a row to 2^40 columns"),
)


def write_zip_bomb(path, expanded_bytes: int = 2**30) -> Path:
    """An .npz whose `x` member inflates to `expanded_bytes` of zeros from about a thousandth of that."""
    path = Path(path)
    chunk = b"\0" * (1 << 20)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_DEFLATED) as z:
        with z.open("x.npy", "w", force_zip64=True) as f:
            for _ in range(max(1, expanded_bytes // len(chunk))):
                f.write(chunk)
        z.writestr("y.npy", b"")
    return path
