"""Reading an untrusted ONNX classifier file: admission rules, then what it expects and returns.

`inspect_model` is the one door through which a model file enters trojan-gate (intake, every
oracle, patching): it applies the static admission rules of `admission` before ONNX Runtime
ever sees the bytes, and returns them with a `ModelInfo`.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import onnx
import onnxruntime as ort

from .admission import AdmissionLimits, check_declared_input, check_graph, check_size
from .errors import ModelLoadError
from .hashing import sha256_bytes


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
    fixed_batch: int | None = None  # 1 when the graph takes one image per call


def _static_dims(value_info) -> list:
    dims = []
    for d in value_info.type.tensor_type.shape.dim:
        dims.append(d.dim_value if d.HasField("dim_value") else None)
    return dims


def inspect_model(model: str | Path | bytes,
                  limits: AdmissionLimits = AdmissionLimits()) -> tuple[bytes, ModelInfo]:
    """Load and check an ONNX classifier; return its bytes and what it expects.

    Raises ModelLoadError naming the problem: a file over the size cap, unreadable protobuf,
    failing onnx.checker, a broken admission rule (`AdmissionError`: external data, custom
    domains, random operators, oversized or fixed-batch input), not exactly one float input of
    rank 4 with static (C, H, W), or no rank-2 output with a static class count.
    """
    if isinstance(model, (str, Path)):
        path = Path(model)
        if not path.is_file():
            raise ModelLoadError(f"model file not found: {path}")
        check_size(path.stat().st_size, limits)
        data = path.read_bytes()
    else:
        data = bytes(model)
        check_size(len(data), limits)
    try:
        proto = onnx.load_model_from_string(data)
    except Exception as e:  # protobuf DecodeError and friends
        raise ModelLoadError(f"not a readable ONNX model: {e}") from e
    check_graph(proto, limits)  # named refusals before anything else reads the graph
    try:
        onnx.checker.check_model(proto)
    except Exception as e:
        raise ModelLoadError(f"ONNX checker rejected the model: {e}") from e
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
    fixed_batch = check_declared_input(dims, limits)
    if len(proto.graph.output) < 1:
        raise ModelLoadError("model has no output")
    out = proto.graph.output[0]
    odims = _static_dims(out)
    if len(odims) != 2 or odims[1] is None or odims[1] < 2:
        raise ModelLoadError(f"output '{out.name}' must be (batch, n_classes) with static n_classes >= 2; got {odims}")
    if odims[1] > limits.max_classes:
        raise ModelLoadError(f"output '{out.name}' declares {odims[1]} classes, over the cap of {limits.max_classes}")
    opset = max((o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")), default=0)
    info = ModelInfo(input_name=inp.name, output_name=out.name, input_shape=tuple(int(d) for d in dims[1:]),
                     n_classes=int(odims[1]), sha256=sha256_bytes(data), opset=int(opset), fixed_batch=fixed_batch)
    return data, info


