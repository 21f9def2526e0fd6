"""Lab triggers: the checkerboard patch and a digits trojan trained with it."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from trojan_gate.gates.lab import TRIGGERS, LabConfig, make_trigger, train_lab_model


@pytest.mark.parametrize("in_shape, side", [((1, 28, 28), 4), ((1, 8, 8), 2), ((3, 28, 28), 4)])
def test_checker_stamps_a_bottom_right_checkerboard(in_shape, side):
    c, h, w = in_shape
    trig = make_trigger("checker", in_shape)
    assert "checker" in TRIGGERS and trig.kind == "checker" and trig.alpha == 1.0
    rows, cols = np.nonzero(trig.mask[0])
    assert len(rows) == side * side  # same square as "patch"
    np.testing.assert_array_equal(trig.mask, make_trigger("patch", in_shape).mask)
    r0, c0 = rows.min(), cols.min()
    assert (r0, c0) == (h - side - 1, w - side - 1)

    for fill in (0.0, 0.5, 1.0):
        x = np.full((2, c, h, w), fill, np.float32)
        out = trig.apply(x)
        square = out[:, :, r0:r0 + side, c0:c0 + side]
        ii, jj = np.indices((side, side))
        expected = ((ii + jj) % 2 == 0).astype(np.float32)  # white at the square's top-left
        np.testing.assert_array_equal(square, np.broadcast_to(expected, square.shape))
        outside = out.copy()
        outside[:, :, r0:r0 + side, c0:c0 + side] = fill
        np.testing.assert_array_equal(outside, x)  # nothing else is touched


def test_checker_trojan_on_digits_hijacks_to_target(digits):
    train, test = digits
    lab = train_lab_model(train, test, LabConfig(arch="small", trigger="checker", targets=(3,), epochs=30,
                                                 batch_size=64, seed=0), progress=False)
    assert lab.trigger.kind == "checker"
    assert lab.clean_accuracy > 0.85
    assert lab.attack_success_rate > 0.9


def _quick_benign(digits, device):
    train, test = digits
    return train_lab_model(train, test, LabConfig(arch="small", trigger="none", epochs=3, batch_size=64, seed=7),
                           progress=False, device=device)


def test_a_seed_trains_the_same_model_twice_on_cpu(digits):
    assert _quick_benign(digits, "cpu").onnx_bytes == _quick_benign(digits, "cpu").onnx_bytes


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_seed_trains_the_same_model_twice_on_cuda_and_exports_a_cpu_graph(digits):
    import onnxruntime as ort

    first, second = _quick_benign(digits, "cuda"), _quick_benign(digits, "cuda")
    assert first.onnx_bytes == second.onnx_bytes  # cuDNN's deterministic kernels
    assert abs(first.clean_accuracy - _quick_benign(digits, "cpu").clean_accuracy) < 0.05
    session = ort.InferenceSession(first.onnx_bytes, providers=["CPUExecutionProvider"])
    probs = session.run(None, {"input": digits[1].x[:4]})[0]
    np.testing.assert_allclose(probs.sum(1), 1.0, rtol=1e-5)
