"""Superimposed copies built where the model runs: a wrapper graph around the admitted model.

The run-time detectors ask the served model about an input x and its keyed copies (`copies`).
Built in numpy, the copies of a batch are gathered from the bank, blended, checked and sent to
ONNX Runtime: N + 1 images of memory traffic per input before the model sees a row. Here one
ONNX Runtime call takes the inputs and, for every row it asks, the row's input `src` and bank
image `bidx` (rows already in a fresh random order), and computes

    rows   = blend(bank'[bidx], x[src])          two Gathers and the rule (`copies.BLEND_RULES`):
             max -> Max(b, x);  sum -> Min(Max(b + x, 0), 1)
    answer = model(rows)                         the admitted model's own graph, unchanged

where bank' is the bank followed by one neutral image (`low` for max, 0 for sum): a row that asks
about an input itself points at it, since max(x, low) = x and clip(x + 0, 0, 1) = x on inputs the
oracle admitted. Row i of an input's copies meets bank[idx_i], the draws of `KeyedCopies`
(unchanged), so the model sees bit-identical rows and the scores are the same. The order is a
fresh permutation of the rows asked (every row, or only the copies when the inputs' own answers
are known), as `copies.ask_shuffled` sends them. A call holds about `ROWS_PER_CALL` rows: the
model is fastest on small batches whose activations stay in cache (measured in
docs/guarded-path.md).

The wrapper is built only when it can be trusted to mean the same thing: rule max or sum (the
rule "average" has no neutral image), a graph that takes a dynamic batch, imports the standard
operator set at version 8 or later (broadcasting Max/Min) and uses no name under the wrapper's
prefix. It is checked once against the numpy copies on a batch of bank images before use; any
refusal falls back to the numpy copies.
"""
from __future__ import annotations

import logging

import numpy as np

PREFIX = "trojan_gate.copies/"
MIN_OPSET = 8
NEUTRAL = ("max", "sum")  # rules with an image b that leaves every input as it is: max(x, low) = x, clip(x + 0) = x
ROWS_PER_CALL = 128  # rows of one wrapper call: small batches keep the model's activations in cache
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


def wrapper_graph(model_bytes: bytes, info, bank: np.ndarray, blend: str, low: float = 0.0) -> bytes | None:
    """The wrapper model of the module doc around `model_bytes` (ModelInfo `info`), or None where it
    cannot be built faithfully (rule "average", fixed batch, opset before 8, IR before 4, a name under
    the prefix). `low` is the inputs' lower bound, the value of the neutral image for rule max."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    if info.fixed_batch == 1 or info.opset < MIN_OPSET or blend not in NEUTRAL:
        return None
    proto = onnx.load_model_from_string(model_bytes)
    if proto.ir_version < 4 or any(name.startswith(PREFIX) for name in _names(proto.graph)):
        return None
    graph = proto.graph
    p = PREFIX
    neutral = np.full((1,) + tuple(bank.shape[1:]), low if blend == "max" else 0.0, np.float32)
    consts = {"bank": np.ascontiguousarray(np.concatenate([bank, neutral]), np.float32),
              "zero": np.array(0.0, np.float32), "one": np.array(1.0, np.float32)}
    blend_nodes = {
        "max": [helper.make_node("Max", [p + "drawn", p + "xs"], [info.input_name])],
        "sum": [helper.make_node("Add", [p + "drawn", p + "xs"], [p + "sum"]),
                helper.make_node("Max", [p + "sum", p + "zero"], [p + "floor"]),
                helper.make_node("Min", [p + "floor", p + "one"], [info.input_name])],
    }[blend]
    nodes = [helper.make_node("Gather", [p + "x", p + "src"], [p + "xs"], axis=0),
             helper.make_node("Gather", [p + "bank", p + "bidx"], [p + "drawn"], axis=0), *blend_nodes]
    c, h, w = info.input_shape
    inputs = [helper.make_tensor_value_info(p + "x", TensorProto.FLOAT, ["n", c, h, w]),
              helper.make_tensor_value_info(p + "src", TensorProto.INT64, ["rows"]),
              helper.make_tensor_value_info(p + "bidx", TensorProto.INT64, ["rows"])]
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
            self.neutral_index = len(copies.bank)  # the neutral image follows the bank
            graph = wrapper_graph(oracle.model_bytes, oracle.info, copies.bank, copies.blend, oracle.value_range[0])
            if graph is not None:
                self.session = oracle.wrapper_session(graph)
                self._verify(copies)
        except Exception as e:  # an exotic graph ONNX Runtime will not wrap: the numpy copies serve it
            log.warning("copies are built in numpy for this model: the wrapper graph was refused (%s: %s)",
                        type(e).__name__, e)
            self.session = None

    def _feeds(self, x: np.ndarray, idx: np.ndarray, order: np.ndarray) -> dict:
        """Wrapper inputs for rows `order` of [x; copies of x on bank[idx]] (row i < m: input i itself,
        row m + i k + j: its copy j): each row's input and its bank image (the neutral one for an input itself)."""
        m, k = idx.shape
        src = np.concatenate([np.arange(m), np.repeat(np.arange(m), k)])
        bidx = np.concatenate([np.full(m, self.neutral_index), idx.reshape(-1)])
        return {PREFIX + "x": x, PREFIX + "src": src[order], PREFIX + "bidx": bidx[order].astype(np.int64)}

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
        got[order] = oracle.ask_wrapped(self.session, self._feeds(x, idx, order), 3 * m, counted=False)
        want = oracle.uncounted_proba(np.concatenate([x, copies.copies_at(x, idx)]))
        if not np.allclose(got, want, rtol=0, atol=1e-6):
            self.session = None
            raise ValueError(f"the wrapper's answers differ from the numpy copies' by up to "
                             f"{float(np.abs(got - want).max()):.3g}")

    def rows_per_call(self, k: int, with_self: bool) -> int:
        """Inputs per ONNX Runtime call so that a call holds about `ROWS_PER_CALL` rows (at most the oracle's batch)."""
        return max(1, min(ROWS_PER_CALL, self.oracle.batch_size) // (k + int(with_self)))

    def ask(self, x: np.ndarray, idx: np.ndarray, rng: np.random.Generator, with_self: bool = True):
        """(p_self (n, K) or None, p_copies (n, k, K)) for inputs x (checked, float32) and bank indices idx (n, k)."""
        n, k = idx.shape
        n_classes = self.oracle.n_classes
        p_self = np.empty((n, n_classes)) if with_self else None
        p_copies = np.empty((n, k, n_classes))
        step = self.rows_per_call(k, with_self)
        for s in range(0, n, step):
            xc, ic = x[s:s + step], idx[s:s + step]
            m = len(xc)
            asked = np.arange(m + m * k) if with_self else np.arange(m, m + m * k)
            order = asked[rng.permutation(len(asked))]
            answer = self.oracle.ask_wrapped(self.session, self._feeds(xc, ic, order), len(order))
            rows = np.empty((m + m * k, n_classes))
            rows[order] = answer
            if with_self:
                p_self[s:s + m] = rows[:m]
            p_copies[s:s + m] = rows[m:].reshape(m, k, n_classes)
        return p_self, p_copies
