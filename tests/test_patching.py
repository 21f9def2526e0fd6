"""Model patching (DeepInspect Sec. 5) on tiny digits lab models."""
import io

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from trojan_gate.gates.errors import InputShapeError
from trojan_gate.gates.architectures import SmallCNN
from trojan_gate.gates.lab import LabConfig, train_lab_model
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.gates.patching import (Patcher, PatchResult, onnx_to_torch, torch_to_onnx, trojan_activation_rates,
                                        uniform_soup)
from trojan_gate.gates.patching.convert import OUTPUT_LOGITS, OUTPUT_PROBABILITIES
from trojan_gate.gates.patching.stamps import jitter_stamps, shift_image


# The residual-risk search judges every patch (tens of seconds at its defaults); tests about something
# else give it the smallest budget. Its defaults are exercised by `patched` and tests/test_patch_acceptance.py.
CHEAP_RESIDUAL = dict(residual_steps=5, residual_restarts=1, residual_area_ladder=(0.08,))


@pytest.fixture(scope="module")
def trojaned(digits):
    train, test = digits
    return train_lab_model(train, test, LabConfig(trigger="patch", targets=(0,), epochs=30, batch_size=64, seed=0),
                           progress=False, threads=1)


@pytest.fixture(scope="module")
def inverted(digits):
    """A stand-in for the scan's substitute set: 200 training images with their labels."""
    train, _ = digits
    idx = np.random.default_rng(3).choice(len(train), 200, replace=False)
    return train.x[idx], train.y[idx]


@pytest.fixture(scope="module")
def patched(trojaned, inverted, digits):
    _, test = digits
    stamp = lambda x, t, seed: trojaned.trigger.apply(x)  # noqa: E731  the lab's true trigger
    return Patcher(seed=0, progress=False).fit(trojaned.onnx_bytes, *inverted, stamp, [0], heldout=test).result_


def _export(module, in_shape, output_name="scores") -> bytes:
    buf = io.BytesIO()
    torch.onnx.export(module.eval(), (torch.zeros((1,) + in_shape),), buf, input_names=["pixels"],
                      output_names=[output_name], dynamic_axes={"pixels": {0: "n"}, output_name: {0: "n"}},
                      opset_version=17, dynamo=False)
    return buf.getvalue()


def _raw(onnx_bytes, x):
    sess = ort.InferenceSession(onnx_bytes, providers=["CPUExecutionProvider"])
    return sess.run(None, {sess.get_inputs()[0].name: x})[0]


# ----------------------------------------------------------------------------- conversion
def test_softmax_model_converts_to_logits_body(trojaned, digits):
    _, test = digits
    clf = onnx_to_torch(trojaned.onnx_bytes)
    assert clf.output_kind == OUTPUT_PROBABILITIES and clf.body_output == OUTPUT_LOGITS
    x = test.x[:16]
    with torch.no_grad():
        logp = clf(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(np.exp(logp), _raw(trojaned.onnx_bytes, x), atol=1e-5)
    # the round trip keeps probabilities, names and a dynamic batch axis
    back = torch_to_onnx(clf)
    out = _raw(back, test.x[:7])
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(out, _raw(trojaned.onnx_bytes, test.x[:7]), atol=1e-5)
    proto = onnx.load_model_from_string(back)
    assert proto.graph.node[-1].op_type == "Softmax"
    assert proto.graph.input[0].name == "input" and proto.graph.output[0].name == "probabilities"


def test_logits_model_stays_logits(digits):
    _, test = digits
    torch.manual_seed(0)
    data = _export(SmallCNN((1, 8, 8), 10), (1, 8, 8))
    clf = onnx_to_torch(data)
    assert clf.output_kind == OUTPUT_LOGITS and clf.body_output == OUTPUT_LOGITS
    back = torch_to_onnx(clf)
    out = _raw(back, test.x[:5])
    assert not np.allclose(out.sum(axis=1), 1.0, atol=1e-3)
    np.testing.assert_allclose(out, _raw(data, test.x[:5]), atol=1e-5)
    assert onnx.load_model_from_string(back).graph.output[0].name == "scores"


def test_inseparable_softmax_trains_on_log_probabilities(digits):
    """A softmax that is not the last node: detected from the outputs, log(p) used for training."""
    _, test = digits

    class ScaledSoftmax(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = SmallCNN((1, 8, 8), 10)

        def forward(self, x):
            return torch.softmax(self.net(x), dim=1) * 1.0 + 0.0 * x.mean()

    torch.manual_seed(0)
    data = _export(ScaledSoftmax(), (1, 8, 8))
    assert onnx.load_model_from_string(data).graph.node[-1].op_type != "Softmax"
    clf = onnx_to_torch(data)
    assert clf.output_kind == OUTPUT_PROBABILITIES and clf.body_output == OUTPUT_PROBABILITIES
    with torch.no_grad():
        logp = clf(torch.from_numpy(test.x[:4])).numpy()
    np.testing.assert_allclose(np.exp(logp).sum(axis=1), 1.0, atol=1e-4)
    np.testing.assert_allclose(_raw(torch_to_onnx(clf), test.x[:4]).sum(axis=1), 1.0, atol=1e-4)


# ----------------------------------------------------------------------------- patching
def test_patch_removes_true_trigger_and_keeps_accuracy(patched, trojaned, digits):
    _, test = digits
    r = patched
    assert isinstance(r, PatchResult)
    assert r.eval_source == "heldout" and r.n_eval > 200
    assert r.before["trojan_activation_rate"] > 0.8
    assert r.after["trojan_activation_rate"] < 0.25
    assert r.after["trojan_activation_rate"] < r.before["trojan_activation_rate"] / 4
    assert r.accuracy_drop <= 0.03
    assert r.meets(max_activation_rate=0.25, max_accuracy_drop=0.03)
    assert not r.meets(max_activation_rate=r.after["trojan_activation_rate"] - 0.01)
    assert r.epochs_run == 4 * 40  # the default soup: four runs of 40 epochs
    assert len(r.history) == 4 * 41 and r.history[0]["epoch"] == 0
    assert [h["member"] for h in r.history if h["epoch"] == 0] == [0, 1, 2, 3]
    # re-measure independently on the whole digits test split with ONNX Runtime
    before, after = ModelOracle(trojaned.onnx_bytes), ModelOracle(r.onnx_bytes)
    keep = test.y != 0
    stamped = trojaned.trigger.apply(test.x[keep])
    assert (after.predict(stamped) == 0).mean() < 0.25 < (before.predict(stamped) == 0).mean()
    assert (after.predict(test.x) == test.y).mean() >= (before.predict(test.x) == test.y).mean() - 0.03


def test_the_patch_result_carries_its_residual_risk_evidence(patched):
    r = patched.residual
    assert r is not None and set(r.strongest) == {"mask", "additive"} and r.budgets == {"mask": 0.05, "additive": 0.12}
    assert patched.residual_accepted == r.accepted and patched.to_dict()["residual"]["summary"]["mask"]["median"] >= 0


def test_patched_model_interface_and_output_kind(patched, trojaned, digits):
    _, test = digits
    oracle = ModelOracle(patched.onnx_bytes, output="probabilities")  # raises if rows are not probabilities
    src = ModelOracle(trojaned.onnx_bytes)
    assert oracle.input_shape == src.input_shape == (1, 8, 8) and oracle.n_classes == src.n_classes == 10
    assert oracle.info.input_name == src.info.input_name and oracle.info.output_name == src.info.output_name
    for n in (1, 7):
        assert oracle.predict_proba(test.x[:n]).shape == (n, 10)
    proto = onnx.load_model_from_string(patched.onnx_bytes)
    onnx.checker.check_model(proto)
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["trojan_gate.patched_from"] == patched.source_sha256 == src.sha256
    assert patched.sha256 == oracle.sha256 != src.sha256
    assert patched.output_kind == OUTPUT_PROBABILITIES
    d = patched.to_dict()
    assert d["before"]["trojan_activation_rates"]["0"] == patched.before["trojan_activation_rate"]
    assert d["config"]["patch_fraction"] == 0.40 and d["config"]["val_fraction"] == 0.10
    assert d["config"]["epochs"] == 40


def test_patching_is_deterministic(trojaned, inverted, digits):
    """Two fits of one setting (a soup, so its members' own draws count) give the same bytes and figures."""
    _, test = digits
    stamp = lambda x, t, seed: trojaned.trigger.apply(x)  # noqa: E731
    first, again = (Patcher(epochs=3, soup=2, seed=0, progress=False, **CHEAP_RESIDUAL).fit(
        trojaned.onnx_bytes, *inverted, stamp, [0], heldout=test).result_ for _ in range(2))
    assert again.sha256 == first.sha256
    assert again.after == first.after and again.residual.to_dict() == first.residual.to_dict()


def test_without_heldout_measures_on_validation_split(trojaned, inverted, tmp_path):
    stamp = lambda x, t, seed: trojaned.trigger.apply(x)  # noqa: E731
    r = Patcher(epochs=2, soup=1, seed=1, progress=False, **CHEAP_RESIDUAL).fit(trojaned.onnx_bytes, *inverted, stamp, [0]).result_
    assert r.eval_source == "validation" and r.n_eval == r.n_val == 20
    assert r.before["clean_accuracy"] is None and r.accuracy_drop is None
    assert r.epochs_run == 2 and len(r.history) == 3
    path = r.save(tmp_path / "patched.onnx")
    assert ModelOracle(path).sha256 == r.sha256
    assert (tmp_path / "patched.onnx.json").is_file()


def test_generator_like_stamp_with_several_targets(trojaned, inverted):
    """A stamp that depends on (t, seed) is called per target with images of other classes."""
    calls = []

    def stamp(x, t, seed):
        calls.append((int(t), int(seed), len(x)))
        noise = np.random.default_rng(seed).uniform(0, 0.2, size=x.shape[1:]).astype(np.float32)
        return np.clip(x + noise * (1 + t % 2), 0, 1)

    r = Patcher(epochs=1, background_fraction=0.0, seed=0, progress=False, **CHEAP_RESIDUAL).fit(
        trojaned.onnx_bytes, *inverted, stamp, [2, 5]).result_
    assert {t for t, _, _ in calls} == {2, 5}
    assert set(r.before["trojan_activation_rates"]) == {2, 5}
    assert 0.0 <= r.after["trojan_activation_rate"] <= 1.0


class RecordingPatcher(Patcher):
    """A patcher that keeps the state each fine-tuning run ends with."""

    def _finetune(self, *args, **kw):
        out = super()._finetune(*args, **kw)
        self.kept = getattr(self, "kept", []) + [{k: v.clone() for k, v in out[0].items()}]
        return out


def test_uniform_soup_averages_weights_and_keeps_integer_buffers():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(5)}
    soup = uniform_soup([a, b])
    assert torch.equal(soup["w"], torch.tensor([2.0, 4.0])) and int(soup["n"]) == 3
    with pytest.raises(ValueError, match="same state keys"):
        uniform_soup([a, {"v": torch.tensor([1.0, 2.0]), "n": torch.tensor(3)}])
    with pytest.raises(ValueError, match="at least one"):
        uniform_soup([])


def test_a_soup_patch_is_the_average_of_its_runs_and_its_first_run_is_the_single_patch(trojaned, inverted, digits):
    _, test = digits
    stamp = lambda x, t, seed: trojaned.trigger.apply(x)  # noqa: E731
    single = RecordingPatcher(epochs=2, soup=1, seed=0, progress=False, **CHEAP_RESIDUAL)
    one = single.fit(trojaned.onnx_bytes, *inverted, stamp, [0], heldout=test).result_
    soup = RecordingPatcher(epochs=2, soup=3, seed=0, progress=False, **CHEAP_RESIDUAL)
    three = soup.fit(trojaned.onnx_bytes, *inverted, stamp, [0], heldout=test).result_
    assert len(soup.kept) == 3 and three.epochs_run == 6 and three.config["soup"] == 3
    assert sorted({h["member"] for h in three.history}) == [0, 1, 2] and len(three.history) == 9
    # member 0 trains exactly what a single patch trains; the others draw their own batches and stamps
    assert all(torch.equal(single.kept[0][k], soup.kept[0][k]) for k in single.kept[0])
    weight = _first_weight(soup.kept[0])
    assert not torch.equal(soup.kept[0][weight], soup.kept[1][weight])
    # the exported model is the uniform average of the three runs' weights
    clf = onnx_to_torch(trojaned.onnx_bytes)
    clf.load_state_dict(uniform_soup(soup.kept))
    clf.eval()
    with torch.no_grad():
        expected = clf.original_output(torch.from_numpy(test.x[:50])).numpy()
    np.testing.assert_allclose(_raw(three.onnx_bytes, test.x[:50]), expected, atol=1e-5)
    assert three.sha256 != one.sha256
    with pytest.raises(ValueError, match="soup"):
        Patcher(soup=0).fit(trojaned.onnx_bytes, *inverted, stamp, [0])


def _first_weight(state) -> str:
    """The state key of the converted model's first weight tensor."""
    return next(k for k in state if k.startswith("body.") and k.endswith("weight"))


def test_background_stamps_cover_unflagged_classes_never_an_image_own_class(trojaned, inverted):
    """background_fraction stamps a share of images with triggers of the unflagged classes too."""
    x_inv, y_inv = inverted
    label_of = {row.tobytes(): int(label) for row, label in zip(x_inv, y_inv)}
    calls = []

    def stamp(x, t, seed):
        calls.append((int(t), [label_of.get(row.tobytes()) for row in x]))
        return x

    Patcher(epochs=2, background_fraction=0.3, trigger_jitter=0, seed=0, progress=False, **CHEAP_RESIDUAL).fit(
        trojaned.onnx_bytes, x_inv, y_inv, stamp, [0])
    targets = {t for t, _ in calls}
    assert 0 in targets and len(targets - {0}) >= 5
    background = [(t, labels) for t, labels in calls if t != 0]
    assert all(label != t for t, labels in background for label in labels if label is not None)

    only_flagged = []
    Patcher(epochs=1, background_fraction=0.0, seed=0, progress=False, **CHEAP_RESIDUAL).fit(
        trojaned.onnx_bytes, x_inv, y_inv, lambda x, t, s: only_flagged.append(int(t)) or x, [0])
    assert set(only_flagged) == {0}


def test_trojan_activation_rates_excludes_target_class():
    y = np.array([0, 0, 1, 2, 2])
    x = np.zeros((5, 1, 2, 2), np.float32)
    rates = trojan_activation_rates(lambda xs: np.zeros(len(xs), int), x, y, lambda x, t, s: x, [0, 1])
    assert rates == {0: 1.0, 1: 0.0}


def test_bad_inputs_are_rejected(trojaned, inverted):
    stamp = lambda x, t, seed: x  # noqa: E731
    p = Patcher(epochs=1, progress=False)
    with pytest.raises(ValueError, match="no flagged"):
        p.fit(trojaned.onnx_bytes, *inverted, stamp, [])
    with pytest.raises(ValueError, match="outside"):
        p.fit(trojaned.onnx_bytes, *inverted, stamp, [10])
    with pytest.raises(InputShapeError):
        p.fit(trojaned.onnx_bytes, inverted[0][:, :, :4], inverted[1], stamp, [0])
    with pytest.raises(InputShapeError):
        p.fit(trojaned.onnx_bytes, inverted[0], inverted[1][:-1], stamp, [0])
    with pytest.raises(InputShapeError, match="stamp returned"):
        p.fit(trojaned.onnx_bytes, *inverted, lambda x, t, s: x[:, :, :4], [0])
    with pytest.raises(ValueError, match="val_fraction"):
        Patcher(val_fraction=0.0).fit(trojaned.onnx_bytes, *inverted, stamp, [0])
    with pytest.raises(ValueError, match="background_fraction"):
        Patcher(background_fraction=1.5).fit(trojaned.onnx_bytes, *inverted, stamp, [0])


def test_shift_image_moves_without_wrapping():
    a = np.zeros((1, 5, 5), np.float32)
    a[0, 3:5, 3:5] = 1.0  # a 2x2 patch in the bottom-right corner
    down_right = shift_image(a, 1, 1)
    assert down_right.sum() == 1.0 and down_right[0, 4, 4] == 1.0  # three pixels fell off the edge
    up_left = shift_image(a, -2, -3)
    assert np.argwhere(up_left[0]).tolist() == [[1, 0], [1, 1], [2, 0], [2, 1]]
    assert np.array_equal(shift_image(a, 0, 0), a)


def test_jitter_moves_the_effective_trigger_and_keeps_the_image():
    rng = np.random.default_rng(0)
    x = np.full((50, 1, 8, 8), 0.2, np.float32)
    stamped = x.copy()
    stamped[:, :, 5:7, 5:7] = 1.0
    out = jitter_stamps(x, stamped, 1, rng)
    assert out.shape == x.shape and out.min() >= 0.0 and out.max() <= 1.0
    for img in out:  # the 2x2 trigger, moved by at most one pixel, on the unchanged background
        bright = np.argwhere(img[0] > 0.5)
        assert len(bright) == 4 and bright.min() >= 4 and bright.max() <= 7
        assert np.allclose(img[0][img[0] <= 0.5], 0.2)
    moved = [not np.array_equal(o, s) for o, s in zip(out, stamped)]
    assert 30 < sum(moved) < 50  # 8 of 9 offsets move it
    assert jitter_stamps(x, stamped, 0, rng) is stamped
    with pytest.raises(ValueError, match="trigger_jitter"):
        Patcher(trigger_jitter=-1)._check()


def test_one_comparison_decides_the_accuracy_bound(patched):
    """0.901 - 0.891 is 0.010000000000000009 in floating point; it must count as one point for
    `meets` and for the gate (which calls `within_accuracy_drop`) alike."""
    from dataclasses import replace

    edge = replace(patched, before={**patched.before, "clean_accuracy": 0.901},
                   after={**patched.after, "clean_accuracy": 0.891, "trojan_activation_rate": 0.0})
    assert edge.accuracy_drop > 0.01  # the floating-point edge this test is about
    assert edge.within_accuracy_drop(0.01) and edge.meets(max_accuracy_drop=0.01)
    over = replace(edge, after={**edge.after, "clean_accuracy": 0.890})
    assert not over.within_accuracy_drop(0.01) and not over.meets(max_accuracy_drop=0.01)
    unmeasured = replace(edge, before={**edge.before, "clean_accuracy": None})
    assert unmeasured.within_accuracy_drop(0.0)


def test_paired_standard_error_of_the_accuracy_drop_by_hand():
    from trojan_gate.gates.patching import paired_drop_standard_error

    before = np.array([1, 1, 1, 1, 0, 0, 1, 1, 1, 0], bool)
    after = np.array([1, 0, 0, 1, 0, 1, 1, 1, 1, 0], bool)
    # b = 2 right only before, c = 1 right only after, n = 10: Var(d) = 3/10 - (1/10)^2 = 0.29
    assert paired_drop_standard_error(before, after) == pytest.approx(np.sqrt(0.29 / 10))
    assert paired_drop_standard_error(before, before) == 0.0  # the same answers: no noise in the drop
    assert paired_drop_standard_error(None, after) is None
    assert paired_drop_standard_error(before, after[:5]) is None


def test_patch_result_reports_the_paired_error_of_its_measured_drop(patched):
    from trojan_gate.gates.patching import paired_drop_standard_error

    assert patched.correct_before.shape == patched.correct_after.shape == (patched.n_eval,)
    assert patched.correct_before.mean() == pytest.approx(patched.before["clean_accuracy"])
    assert patched.correct_after.mean() == pytest.approx(patched.after["clean_accuracy"])
    se = patched.accuracy_drop_se
    assert se == paired_drop_standard_error(patched.correct_before, patched.correct_after)
    assert patched.to_dict()["accuracy_drop_se"] == se


def test_the_unlearning_stages_run_inside_the_patcher_and_record_what_they_chose(trojaned, inverted, digits):
    _, test = digits
    wrong = lambda x, t, seed: np.clip(x + 0.3, 0, 1).astype(np.float32)  # noqa: E731  a wrong recovered trigger
    p = Patcher(epochs=1, soup=1, universal_rounds=1, reverse_rounds=2, residual_area_ladder=(0.3, 0.15, 0.08),
                residual_steps=20, seed=0, progress=False).fit(trojaned.onnx_bytes, *inverted, wrong, [0], heldout=test)
    assert set(p.reverse_["areas"]) == set(range(10)) and p.reverse_["classes"]
    assert p.result_.config["reverse_rounds"] == 2 and set(p.result_.residual.areas) == set(range(10))
    assert Patcher(seed=0).get_params()["reverse_rounds"] == 0 and not hasattr(Patcher(), "reverse_")
