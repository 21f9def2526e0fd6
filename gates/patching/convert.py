"""ONNX <-> torch for patching: a trainable copy of an ONNX classifier and its export back.

The ONNX model is converted to torch with onnx2torch, fine-tuned, and exported back to a
single-file ONNX with the same input/output names, a dynamic batch axis and the same kind of
output (probabilities or logits). A trailing Softmax node is split off so that training runs
on log_softmax of the logits.
"""
from __future__ import annotations

import copy
import io
import warnings

import numpy as np
import onnx
import torch
from torch import nn

from ..errors import ModelLoadError
from ..oracle import ModelOracle, inspect_model

OUTPUT_PROBABILITIES = "probabilities"
OUTPUT_LOGITS = "logits"


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
    x = np.random.default_rng(seed).random((16,) + tuple(input_shape), dtype=np.float32)
    raw = ModelOracle(onnx_bytes).raw_scores(x).astype(np.float64)
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
        """Log-probabilities (n, K) for images (n, C, H, W)."""
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
