"""The calibrated scan's parts: the jumbo trojans, the conformal decision, the artifact's integrity."""
import json

import numpy as np
import pytest

from trojan_gate.gates.errors import TrojanGateError
from trojan_gate.gates.metascan import conformal_p_value, conformal_threshold
from trojan_gate.gates.metascan.triggers import (FAMILIES, MIN_RATE, Stamp, attack_success, poison, relabel,
                                                 sample_stamp, sample_trojan)


@pytest.mark.parametrize("family", FAMILIES)
def test_every_family_renders_the_same_stamp_from_its_dict_inside_the_value_range(family):
    rng = np.random.default_rng(3)
    spec = sample_stamp(rng, family)
    x = np.random.default_rng(0).random((5, 1, 28, 28)).astype(np.float32)
    a, b = Stamp(spec, (1, 28, 28)).apply(x), Stamp(json.loads(json.dumps(spec)), (1, 28, 28)).apply(x)
    assert a.dtype == np.float32 and a.shape == x.shape and np.array_equal(a, b)
    assert a.min() >= 0.0 and a.max() <= 1.0
    assert np.abs(a - x).mean() > 1e-3  # the stamp changes the image


def test_a_patch_covers_the_drawn_share_of_the_image():
    spec = {"family": "patch", "area": 0.04, "aspect": 1.0, "row": 1.0, "col": 0.0, "fill": "solid", "value": 1.0,
            "seed": 0}
    stamp = Stamp(spec, (1, 28, 28))
    assert stamp.opacity.sum() == pytest.approx(0.04 * 784, rel=0.25)
    assert stamp.opacity[0, -1, 0] == 1.0 and stamp.opacity[0, 0, -1] == 0.0  # bottom-left corner


def test_the_attacks_relabel_as_they_say():
    rng = np.random.default_rng(0)
    y = np.arange(10).repeat(3)
    assert np.array_equal(relabel(y, {"attack": "all", "targets": list(range(10))}, 10, rng), (y + 1) % 10)
    multi = relabel(y, {"attack": "multi", "targets": [2, 5, 7]}, 10, rng)
    assert set(multi) <= {2, 5, 7} and len(set(multi)) == 3
    assert set(relabel(y, {"attack": "one", "targets": [4]}, 10, rng)) == {4}


def test_poisoning_stamps_the_drawn_share_and_skips_a_single_targets_own_images():
    rng = np.random.default_rng(1)
    x = rng.random((400, 1, 8, 8)).astype(np.float32)
    y = np.arange(400) % 10
    trojan = {"stamp": {"family": "patch", "area": 0.1, "aspect": 1.0, "row": 0.0, "col": 0.0, "fill": "solid",
                        "value": 1.0, "seed": 0}, "attack": "one", "targets": [3], "poison_rate": 0.1}
    xp, yp = poison(x, y, trojan, 10, rng)
    changed = np.flatnonzero((xp != x).any(axis=(1, 2, 3)))
    assert len(changed) == 40 and np.all(yp[changed] == 3) and not np.any(y[changed] == 3)
    assert np.array_equal(yp[np.setdiff1d(np.arange(400), changed)], y[np.setdiff1d(np.arange(400), changed)])
    # a model that answers the target on every stamped image has attack success 1, one that never does 0
    stamped = Stamp(trojan["stamp"], (1, 8, 8))
    hit = lambda z: np.where((z == stamped.apply(z)).all(axis=(1, 2, 3)), 3, 0)  # noqa: E731
    assert attack_success(hit, x, y, trojan, 10) == 1.0
    assert attack_success(lambda z: np.zeros(len(z), int), x, y, trojan, 10) == 0.0


def test_jumbo_trojans_respect_the_poisoning_floors():
    rng = np.random.default_rng(0)
    for _ in range(300):
        t = sample_trojan(rng, 10)
        floor = max(0.01, MIN_RATE.get(t["attack"], 0), MIN_RATE.get(t["stamp"]["family"], 0))
        assert floor - 1e-12 <= t["poison_rate"] <= 0.3 + 1e-12
        k = len(t["targets"])
        assert {"one": k == 1, "all": k == 10, "multi": 2 <= k <= 5}[t["attack"]]
    with pytest.raises(ValueError, match="unknown"):
        sample_trojan(rng, 10, families=("sticker",))


def test_conformal_p_value_and_threshold_match_a_hand_count():
    null = np.arange(1.0, 20.0)  # 19 benign calibration scores 1..19
    # s = 17.5: two benign scores (18, 19) are as high -> p = (1 + 2) / 20
    assert conformal_p_value(null, 17.5) == pytest.approx(3 / 20)
    assert conformal_p_value(null, 100.0) == pytest.approx(1 / 20)
    assert conformal_p_value(null, 19.0) == pytest.approx(2 / 20)  # ties count as high
    # alpha 0.1: j = floor(0.1 * 20 - 1) = 1 -> the 2nd largest, 18; s > 18 <=> p <= 0.1
    thr = conformal_threshold(null, 0.1)
    assert thr == 18.0
    for s in np.linspace(0, 25, 101):
        assert (s > thr) == (conformal_p_value(null, s) <= 0.1 + 1e-12)
    with pytest.raises(TrojanGateError, match="at least 19"):
        conformal_threshold(np.arange(10.0), 0.05)


def test_the_calibration_that_decides_enters_the_verdicts_reuse_fingerprint():
    from trojan_gate.plugins.gate import GateConfig
    from trojan_gate.plugins.gate.config import ConfigError

    base = GateConfig().fingerprint("ab" * 32)
    assert GateConfig().fingerprint("ab" * 32, "c" * 64) != base
    assert GateConfig().fingerprint("ab" * 32, "c" * 64) != GateConfig().fingerprint("ab" * 32, "d" * 64)
    assert GateConfig(scan={"decision": "paper"}).fingerprint("ab" * 32) != base
    with pytest.raises(ConfigError, match="scan.decision"):
        GateConfig(scan={"decision": "vote"})
    doc = GateConfig().to_dict()
    assert doc["scan"]["calibration"] == "auto" and GateConfig.from_dict(doc).fingerprint("ab" * 32) == base


def test_the_pool_widens_its_recipes_without_moving_the_cached_shadows():
    """A third of the shadows train with another optimiser / schedule (their own stream); every other
    shadow keeps the specification, hence the cache key, it had before recipes were drawn."""
    from trojan_gate.gates.metascan.shadows import (ARCH_SHARE, BASE_ARCHITECTURES, EXTRA_ARCHITECTURES,
                                                    RECIPE_SHARE, WIDE_ARCHITECTURES, sample_shadow,
                                                    shadow_key)

    rng = np.random.default_rng([0, 7001])
    specs = [sample_shadow(rng, i % 2 == 1, 10, archs=WIDE_ARCHITECTURES, index=i, seed=0) for i in range(400)]
    plain = {i: shadow_key(s, "0" * 64) for i, s in enumerate(specs)
             if "recipe" not in s and s["arch"] in BASE_ARCHITECTURES}
    assert {4: "e6d1673ee2d26fb582f4c873"}.items() <= plain.items()  # as cached
    base = np.random.default_rng([0, 7001])  # shadow 7 draws an extra architecture; in the default pool it is as cached
    base_specs = [sample_shadow(base, i % 2 == 1, 10, index=i, seed=0) for i in range(8)]
    assert shadow_key(base_specs[7], "0" * 64) == "628dd0abfecab2d2ff87fdab"
    recipes = [s for s in specs if "recipe" in s]
    assert abs(len(recipes) / len(specs) - RECIPE_SHARE) < 0.07
    assert {r["recipe"]["optimizer"] for r in recipes} == {"adam", "adamw", "sgd"}
    assert not any(r["recipe"]["optimizer"] == "adam" and r["recipe"]["schedule"] == "onecycle" for r in recipes)
    assert sum(r["augment"] == "none" for r in recipes) > len(recipes) / 2
    extra = [s for s in specs if s["arch"] in EXTRA_ARCHITECTURES or (s["arch"] == "deep" and s["width"] > 8)]
    assert abs(len(extra) / len(specs) - ARCH_SHARE) < 0.07
    assert {s["arch"] for s in extra} == set(EXTRA_ARCHITECTURES) | {"deep"}  # and the 6-conv at a vendor's width
    assert {s["width"] for s in extra if s["arch"] == "deep"} == {16, 24}
    assert all(s["steps"] <= 600 for s in extra if s["arch"] in ("deep", "resnet"))
    assert all(s["arch"] in BASE_ARCHITECTURES for s in base_specs)


@pytest.mark.parametrize("arch", ["resnet", "allconv", "mlp"])
def test_every_extra_shadow_architecture_trains_a_working_classifier_and_exports(digits, arch):
    """The extra shadow architectures learn digits, give logits of shape (n, K) at any input size,
    and export to an ONNX model whose answers match torch's softmax."""
    import onnxruntime as ort
    import torch

    from trojan_gate.gates.architectures import build_model
    from trojan_gate.gates.classifier_training import export_onnx
    from trojan_gate.gates.metascan.training import predict_labels, train_classifier

    train, test = digits
    model = train_classifier(train.x, train.y, 10, arch=arch, epochs=15, lr=3e-3, batch_size=64, seed=0)
    assert (predict_labels(model, test.x) == test.y).mean() > 0.7
    assert build_model(arch, (3, 20, 16), 7)(torch.zeros(2, 3, 20, 16)).shape == (2, 7)
    sess = ort.InferenceSession(export_onnx(model, tuple(train.x.shape[1:])), providers=["CPUExecutionProvider"])
    with torch.no_grad():
        want = torch.softmax(model(torch.from_numpy(test.x[:16])), 1).numpy()
    got = sess.run(None, {sess.get_inputs()[0].name: test.x[:16]})[0]
    assert np.allclose(got, want, atol=1e-5)


@pytest.mark.parametrize("optimizer,schedule", [("adamw", "cosine"), ("sgd", "step"), ("adam", "constant")])
def test_every_recipe_trains_a_working_classifier(digits, optimizer, schedule):
    from trojan_gate.gates.metascan.training import predict_labels, train_classifier

    train, test = digits
    lr = 5e-2 if optimizer == "sgd" else 3e-3
    model = train_classifier(train.x, train.y, 10, epochs=10, lr=lr, batch_size=64, seed=0, optimizer=optimizer,
                             schedule=schedule, label_smoothing=0.1)
    assert (predict_labels(model, test.x) == test.y).mean() > 0.6
    with pytest.raises(ValueError, match="optimizer must be one of"):
        train_classifier(train.x[:10], train.y[:10], 10, epochs=1, optimizer="rmsprop")


def test_a_calibration_asked_for_an_unknown_shadow_architecture_is_refused_before_training(digits, tmp_path):
    from trojan_gate.gates.metascan import ScanCalibration

    _, test = digits
    with pytest.raises(ValueError, match="architectures must be names from"):
        ScanCalibration(n_shadows=4, architectures=("small", "vit"), cache_dir=tmp_path).fit(test)
    assert not list(tmp_path.iterdir())  # nothing trained



def test_a_stopped_calibration_resumes_after_its_last_trained_meta_classifier(digits, tmp_path, monkeypatch):
    """Each member is cached under a key of its fitting shadows and settings: a refit reads it back
    (no training) and decides exactly as before; other settings, or an unreadable file, train anew.
    The pool is 24 untrained digits models (the shadows' training is not what is tested here)."""
    import torch

    from trojan_gate.gates.architectures import build_model
    from trojan_gate.gates.metascan import ScanCalibration, calibration
    from trojan_gate.gates.metascan.probes import StampProbeMeta
    from trojan_gate.gates.metascan.shadows import Shadow

    _, test = digits
    trojan = {"targets": [3], "stamp": {"family": "patch"}}
    torch.manual_seed(0)
    pool = [Shadow({"arch": "small", "width": 8, "seed": i, "trojan": trojan if i % 2 else None},
                   build_model("small", (1, 8, 8), 10, width=8).eval(), 0.1, 0.5 if i % 2 else None, 0.0)
            for i in range(24)]
    monkeypatch.setattr(calibration, "build_pool", lambda *a, **k: (pool, {"kept": len(pool)}))
    settings = dict(n_shadows=24, calibration_share=0.5, false_block_rate=0.2, epochs=2, n_queries=2, n_images=10,
                    n_meta=2, margin_shadows=0, cache_dir=tmp_path, progress=False)
    first = ScanCalibration(**settings).fit(test)
    assert len(list((tmp_path / "meta").glob("*.npz"))) == 2

    def refuse(*args, **kwargs):
        raise AssertionError("a cached member was trained again")

    monkeypatch.setattr(StampProbeMeta, "fit", refuse)
    again = ScanCalibration(**settings).fit(test)
    assert np.array_equal(again.null_, first.null_) and again.threshold_ == first.threshold_
    assert np.array_equal(again.meta_.queries_, first.meta_.queries_)
    with pytest.raises(AssertionError, match="trained again"):
        ScanCalibration(**{**settings, "epochs": 3}).fit(test)
    sorted((tmp_path / "meta").glob("*.npz"))[0].write_bytes(b"not an npz")
    with pytest.raises(AssertionError, match="trained again"):
        ScanCalibration(**settings).fit(test)


def test_a_calibration_past_its_deadline_stops_with_exit_2_writes_nothing_and_names_the_resume(digits, tmp_path,
                                                                                              monkeypatch, capsys):
    """`calibrate-scan --timeout`: the deadline is checked between shadows and between meta-classifiers; a stopped
    run writes no calibration, and its message says how much is cached and that the same command resumes."""
    import time

    import torch

    from trojan_gate.gates.architectures import build_model
    from trojan_gate.gates.errors import DeadlineExceeded
    from trojan_gate.gates.metascan import ScanCalibration, calibration
    from trojan_gate.gates.metascan.shadows import Shadow
    from trojan_gate.pipelines.cli import main

    _, test = digits
    held, out, cache = tmp_path / "held.npz", tmp_path / "cal", tmp_path / "shadows"
    np.savez_compressed(held, x=test.x, y=test.y)
    args = ["calibrate-scan", "--heldout", str(held), "--out", str(out), "--shadows", "8", "--cache", str(cache),
            "--no-progress"]
    assert main(args + ["--timeout", "1e-9"]) == 2
    err = capsys.readouterr().err
    assert "0 of 8 shadow models" in err and "resume" in err
    assert not out.exists() and not list(cache.glob("*.pt"))
    assert main(args + ["--timeout", "0"]) == 2 and not out.exists()  # refused: not a positive number

    torch.manual_seed(0)
    pool = [Shadow({"arch": "small", "width": 8, "seed": i, "trojan": None},
                   build_model("small", (1, 8, 8), 10, width=8).eval(), 0.1, None, 0.0) for i in range(8)]
    monkeypatch.setattr(calibration, "build_pool", lambda *a, **k: (pool, {"kept": 8, "present": 8}))
    cal = ScanCalibration(n_shadows=8, n_meta=2, epochs=1, cache_dir=cache, progress=False)
    with pytest.raises(DeadlineExceeded, match="0 of 2 meta-classifiers"):
        cal.fit(test, deadline=time.monotonic() - 1)
