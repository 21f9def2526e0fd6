"""Superimposed copies built where the model runs: a wrapper graph around the admitted model.

The run-time detectors ask the served model about an input x and its keyed copies (`copies`).
Built in numpy, the copies of a batch are gathered from the bank, blended, checked and sent to
ONNX Runtime: N + 1 images of memory traffic per input before the model sees a row. Here one
ONNX Runtime call takes the inputs, the keyed bank indices and a row order, and computes

    drawn  = bank[idx]                                   Gather, (n, k, C, H, W)
    copies = blend(drawn, x[:, None])                    `copies.BLEND_RULES`, in the graph:
             max -> Max;  average -> 0.5 (drawn + x);  sum -> min(max(drawn + x, 0), 1)
    rows   = concat(x, copies.reshape(n k, C, H, W))     input i's copies in rows n + i k .. n + i k + k - 1
    answer = model(rows[order])                          the admitted model's own graph, unchanged

`order` is a fresh random permutation of the rows asked (every row, or only the copies when the
inputs' own answers are already known), so the model sees the rows in an order it cannot predict,
as `copies.ask_shuffled` sends them. The draws stay those of `KeyedCopies`; the rows the model
sees are bit-identical to the numpy copies, so the scores are the same.

The wrapper is built only when it can be trusted to mean the same thing: a model whose graph takes
a dynamic batch, imports the standard operator set at version 8 or later (broadcasting Max/Min)
and uses no name under the wrapper's prefix. It is checked once against the numpy copies on a
keyed batch of bank images before use; any refusal falls back to the numpy copies.
"""
from __future__ import annotations

import logging

import numpy as np

PREFIX = "trojan_gate.copies/"
MIN_OPSET = 8
log = logging.getLogger(__name__)


def _names(graph) -> set:
    """Every tensor name a graph (and its subgraphs) defines or reads."""
    names = {v.name for v in (*graph.input, *graph.output, *graph.value_info)}
    names |= {t.name for t in graph.initializer}
    for node in graph.node:
        names.update(node.input)
        names.update(node.output)
        for attr in node.attribute:
            for sub in (*([attr.g] if attr.HasField("g") else []), *attr.graphs):
                names |= _names(sub)
    return names


def wrapper_graph(model_bytes: bytes, info, bank: np.ndarray, blend: str) -> bytes | None:
    """The wrapper model of the module doc around `model_bytes` (ModelInfo `info`), or None where it
    cannot be built faithfully (fixed batch, opset before 8, IR before 4, a name under the prefix)."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if info.fixed_batch == 1 or info.opset < MIN_OPSET or blend not in ("max", "average", "sum"):
        return None
    proto = onnx.load_model_from_string(model_bytes)
    if proto.ir_version < 4 or any(name.startswith(PREFIX) for name in _names(proto.graph)):
        return None
    graph = proto.graph
    c, h, w = info.input_shape
    p = PREFIX
    consts = {"bank": np.ascontiguousarray(bank, np.float32), "shape5": np.array([-1, 1, c, h, w], np.int64),
              "shape4": np.array([-1, c, h, w], np.int64), "half": np.array(0.5, np.float32),
              "zero": np.array(0.0, np.float32), "one": np.array(1.0, np.float32)}
    blend_nodes = {
        "max": [helper.make_node("Max", [p + "drawn", p + "x5"], [p + "blended"])],
        "average": [helper.make_node("Add", [p + "drawn", p + "x5"], [p + "sum"]),
                    helper.make_node("Mul", [p + "sum", p + "half"], [p + "blended"])],
        "sum": [helper.make_node("Add", [p + "drawn", p + "x5"], [p + "sum"]),
                helper.make_node("Max", [p + "sum", p + "zero"], [p + "floor"]),
                helper.make_node("Min", [p + "floor", p + "one"], [p + "blended"])],
    }[blend]
    nodes = [helper.make_node("Gather", [p + "bank", p + "idx"], [p + "drawn"], axis=0),
             helper.make_node("Reshape", [p + "x", p + "shape5"], [p + "x5"]),
             *blend_nodes,
             helper.make_node("Reshape", [p + "blended", p + "shape4"], [p + "copies"]),
             helper.make_node("Concat", [p + "x", p + "copies"], [p + "rows"], axis=0),
             helper.make_node("Gather", [p + "rows", p + "order"], [info.input_name], axis=0)]
    inputs = [helper.make_tensor_value_info(p + "x", TensorProto.FLOAT, ["n", c, h, w]),
              helper.make_tensor_value_info(p + "idx", TensorProto.INT64, ["n", "k"]),
              helper.make_tensor_value_info(p + "order", TensorProto.INT64, ["rows"])]
    kept_inputs = [v for v in graph.input if v.name != info.input_name]  # initializers listed as inputs stay
    kept_outputs = [v for v in graph.output if v.name == info.output_name]
    old_nodes = list(graph.node)
    del graph.input[:], graph.output[:], graph.node[:]
    graph.input.extend(inputs + kept_inputs)
    graph.output.extend(kept_outputs)
    graph.node.extend(nodes + old_nodes)
    graph.initializer.extend(numpy_helper.from_array(v, p + k) for k, v in consts.items())
    return proto.SerializeToString()


class GraphCopies:
    """Asks an oracle's model about inputs and their keyed copies (`copies`, a KeyedCopies: its bank, blend
    rule and numpy copies) through the wrapper graph.

    `session` is None when the wrapper could not be built or failed its check; callers then build
    the copies in numpy (`KeyedCopies.ask` does both).
    """

    def __init__(self, oracle, copies):
        self.oracle = oracle
        self.session = None
        try:
            graph = wrapper_graph(oracle.model_bytes, oracle.info, copies.bank, copies.blend)
            if graph is not None:
                self.session = oracle.wrapper_session(graph)
                self._verify(copies)
        except Exception as e:  # an exotic graph ONNX Runtime will not wrap: the numpy copies serve it
            log.warning("copies are built in numpy for this model: the wrapper graph was refused (%s: %s)",
                        type(e).__name__, e)
            self.session = None

    def _verify(self, copies):
        """The wrapper's answers equal those on the numpy copies (`copies.copies_at`) on a batch of bank images
        (uncounted, like the admission probes); raises ValueError otherwise."""
        bank = copies.bank
        m = min(8, len(bank))
        x = np.ascontiguousarray(bank[:m], np.float32)
        idx = (np.arange(m)[:, None] + np.arange(1, 3)[None, :]) % len(bank)
        order = np.random.default_rng([m, 7]).permutation(m + 2 * m)
        oracle = self.oracle
        got = np.empty((3 * m, oracle.n_classes))
        got[order] = oracle.ask_wrapped(self.session, {PREFIX + "x": x, PREFIX + "idx": idx, PREFIX + "order": order},
                                        3 * m, counted=False)
        want = oracle.uncounted_proba(np.concatenate([x, copies.copies_at(x, idx)]))
        if not np.allclose(got, want, rtol=0, atol=1e-6):
            self.session = None
            raise ValueError(f"the wrapper's answers differ from the numpy copies' by up to "
                             f"{float(np.abs(got - want).max()):.3g}")

    def rows_per_call(self, k: int, with_self: bool) -> int:
        """Inputs per ONNX Runtime call so that a call holds about the oracle's batch of rows."""
        return max(1, self.oracle.batch_size // (k + int(with_self)))

    def ask(self, x: np.ndarray, idx: np.ndarray, rng: np.random.Generator, with_self: bool = True):
        """(p_self (n, K) or None, p_copies (n, k, K)) for inputs x (checked, float32) and bank indices idx (n, k)."""
        n, k = idx.shape
        n_classes = self.oracle.n_classes
        p_self = np.empty((n, n_classes)) if with_self else None
        p_copies = np.empty((n, k, n_classes))
        step = self.rows_per_call(k, with_self)
        for s in range(0, n, step):
            xc, ic = x[s:s + step], np.ascontiguousarray(idx[s:s + step], dtype=np.int64)
            m = len(xc)
            asked = np.arange(m + m * k) if with_self else np.arange(m, m + m * k)
            order = asked[rng.permutation(len(asked))]
            answer = self.oracle.ask_wrapped(self.session, {PREFIX + "x": xc, PREFIX + "idx": ic,
                                                            PREFIX + "order": order}, len(order))
            rows = np.empty((m + m * k, n_classes))
            rows[order] = answer
            if with_self:
                p_self[s:s + m] = rows[:m]
            p_copies[s:s + m] = rows[m:].reshape(m, k, n_classes)
        return p_self, p_copies
