"""Hostile models, inputs and data sets are refused by name and leave the registry as it was."""
import os

import numpy as np
import pytest
from mlflow import MlflowClient

from trojan_gate.gates.admission import AdmissionError, AdmissionLimits
from trojan_gate.gates.errors import DataValidationError, InputRangeError, InputShapeError
from trojan_gate.gates.oracle import ModelOracle
from trojan_gate.pipelines.benchmarks import hostile_models as hm
from trojan_gate.pipelines.cli import main
from trojan_gate.plugins.registry import intake_onnx


def _versions():
    client = MlflowClient()
    return sorted((m.name, v.version) for m in client.search_registered_models()
                  for v in client.search_model_versions(f"name='{m.name}'"))


@pytest.mark.parametrize("case", [c for c in hm.MODEL_CASES if c.expected != "served-refused"], ids=lambda c: c.name)
def test_every_hostile_model_is_refused_at_intake_by_name(case, mlflow_store, tmp_path, capsys):
    path = tmp_path / f"{case.name}.onnx"
    path.write_bytes(case.build().SerializeToString())
    before = _versions()
    with pytest.raises(AdmissionError) as refused:
        intake_onnx(path, "vendor")
    assert refused.value.cause == case.expected, str(refused.value)
    assert _versions() == before
    assert main(["intake", str(path), "--name", "vendor"]) == 2
    assert f"({case.expected})" in capsys.readouterr().err


def test_an_out_of_range_trigger_cannot_be_delivered(tmp_path, capsys):
    """The model is admitted (it is an ordinary classifier on [0, 1]) but its trigger lives at -1:
    every entry point refuses such an input instead of clipping it or passing it on."""
    oracle = ModelOracle(hm.out_of_range_trigger().SerializeToString()).probe()
    x = np.random.default_rng(0).random((4,) + hm.SHAPE, dtype=np.float32)
    poisoned = x.copy()
    poisoned[:, 0, 0, 0] = -1.0
    assert (ModelOracle(hm.out_of_range_trigger().SerializeToString(), value_range=(-2, 2))
            .predict(poisoned) == 0).all()  # what the attacker wanted
    for bad in (poisoned, x * 1e6, np.where(x > 0.5, np.nan, x)):
        with pytest.raises(InputShapeError):
            oracle.predict_proba(bad)
    with pytest.raises(InputRangeError, match=r"\[0, 1\]"):
        oracle.predict_proba(poisoned)
    from trojan_gate.gates.strip import Strip

    Strip(oracle, progress=False).fit(np.random.default_rng(2).random((50,) + hm.SHAPE, dtype=np.float32)) \
        .infer_threshold(0.05).save(tmp_path / "boundary")
    np.savez(tmp_path / "in.npz", x=poisoned)
    model = tmp_path / "m.onnx"
    model.write_bytes(hm.out_of_range_trigger().SerializeToString())
    assert main(["check", str(model), "--boundary", str(tmp_path / "boundary"), "--inputs", str(tmp_path / "in.npz"),
                 "--out", str(tmp_path / "r.npz")]) == 2
    assert "inputs must lie in [0, 1]" in capsys.readouterr().err


def test_a_batch_of_one_graph_is_asked_one_row_per_call():
    m = hm.fixed_batch(1).SerializeToString()
    oracle = ModelOracle(m).probe()
    x = np.random.default_rng(1).random((7,) + hm.SHAPE, dtype=np.float32)
    assert oracle.batch_size == 1 and oracle.info.fixed_batch == 1
    np.testing.assert_allclose(oracle.predict_proba(x), ModelOracle(hm.benign().SerializeToString()).predict_proba(x),
                               atol=1e-6)
    assert oracle.ledger.to_dict()["default"]["calls"] == 1  # counted as one query batch


def test_file_size_is_capped_before_anything_is_parsed(tmp_path):
    path = tmp_path / "big.onnx"
    path.write_bytes(hm.benign().SerializeToString())
    with pytest.raises(AdmissionError) as refused:
        ModelOracle(path, limits=AdmissionLimits(max_file_bytes=1000))
    assert refused.value.cause == "file-too-large"


def test_hostile_heldout_files_are_refused(tmp_path):
    from trojan_gate.gates.data import load_heldout

    bomb = hm.write_zip_bomb(tmp_path / "bomb.npz", expanded_bytes=2**24)
    with pytest.raises(DataValidationError, match="zip bomb"):
        load_heldout(bomb, max_bytes=2**20)
    pickled = tmp_path / "pickled.npz"
    np.savez(pickled, x=np.array([object()], dtype=object), y=np.zeros(1))
    with pytest.raises(DataValidationError, match="will not load safely"):
        load_heldout(pickled)
    not_zip = tmp_path / "text.npz"
    not_zip.write_text("x,y\n1,2\n")
    with pytest.raises(DataValidationError, match="not an .npz"):
        load_heldout(not_zip)
    folder = tmp_path / "images" / "cls0"
    folder.mkdir(parents=True)
    os.symlink(tmp_path / "images", folder / "loop")  # a link back up: an endless walk if followed
    with pytest.raises(DataValidationError, match="symbolic link"):
        load_heldout(tmp_path / "images", (1, 8, 8))
    os.symlink(pickled, tmp_path / "link.npz")
    with pytest.raises(DataValidationError, match="symbolic link"):
        load_heldout(tmp_path / "link.npz")


def test_an_intake_whose_read_back_fails_leaves_no_version(mlflow_store, trojan_onnx, monkeypatch):
    from trojan_gate.gates.errors import ArtifactIntegrityError
    from trojan_gate.plugins import registry

    intake_onnx(trojan_onnx, "clf")
    before = _versions()

    def tampered(*args, **kwargs):
        raise ArtifactIntegrityError("registered artifact does not hash to the intake file")

    monkeypatch.setattr(registry, "fetch_onnx", tampered)
    with pytest.raises(ArtifactIntegrityError):
        intake_onnx(trojan_onnx, "clf")
    assert _versions() == before


def test_the_hash_covers_the_onnx_mlmodel_loads_and_mlmodel_itself(mlflow_store, trojan_onnx, tmp_path):
    import yaml

    from trojan_gate.gates.errors import ArtifactIntegrityError
    from trojan_gate.plugins.registry import fetch_onnx, version_tags

    ref = intake_onnx(trojan_onnx, "clf")
    tags = version_tags(ref)
    assert tags["trojan_gate.mlmodel_sha256"]
    mlmodel = next(p for p in (tmp_path / "mlruns").rglob("MLmodel") if "onnx" in p.read_text())
    extra = mlmodel.parent / "other.onnx"  # a second, attacker-chosen ONNX for MLmodel to load
    extra.write_bytes(hm.benign().SerializeToString())
    doc = yaml.safe_load(mlmodel.read_text())
    doc["flavors"]["onnx"]["data"] = "other.onnx"
    mlmodel.write_text(yaml.safe_dump(doc))
    with pytest.raises(ArtifactIntegrityError, match="MLmodel"):
        fetch_onnx(ref)


@pytest.mark.parametrize("kind", ["strip", "runtime"])
def test_a_tampered_and_rehashed_release_does_not_load(tmp_path, digits, digits_trojan, kind):
    from trojan_gate.gates.errors import ArtifactIntegrityError
    from trojan_gate.gates.runtime import RuntimeCheck
    from trojan_gate.gates.strip import Strip
    from trojan_gate.pipelines.benchmarks.hostile import move_threshold
    from trojan_gate.plugins.guarded_pyfunc import load_release
    from trojan_gate.plugins.signing import sign_release, write_release

    _, test = digits
    model = digits_trojan.save(tmp_path / "m.onnx")
    if kind == "strip":
        strip = Strip(ModelOracle(model), progress=False).fit(test.x[:200]).infer_threshold(0.05)
    else:
        strip = RuntimeCheck(ModelOracle(model), reference_epochs=5, progress=False).fit(test.x[:300], test.y[:300])
        strip.infer_threshold(0.05)
    strip.save(tmp_path / "boundary")
    release = write_release(tmp_path / "release", model, tmp_path / "boundary",
                            {"verdict": "passed", "model_sha256": strip.model_sha256_, "serving": {"policy": "reject"},
                             "check_artifact_sha256": None})
    sign_release(release, tmp_path / "release.sig")
    guard, verdict = load_release(release, tmp_path / "release.sig")
    assert verdict["verdict"] == "passed" and guard.policy == "reject"
    move_threshold(release / "boundary", 1e9)  # flags nothing, re-hashed: the artifact's own checks pass
    with pytest.raises(ArtifactIntegrityError, match="signature does not verify"):
        load_release(release, tmp_path / "release.sig")


@pytest.mark.slow
def test_the_hostile_benchmark_reports_no_crash_no_promotion_nothing_served_unchecked(tmp_path, release_keys, monkeypatch):
    from trojan_gate.plugins.signing import SIGNING_KEY_ENV, VERIFY_KEY_ENV

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    for env in (SIGNING_KEY_ENV, VERIFY_KEY_ENV):  # the benchmark makes its own keys; ours come back after
        monkeypatch.setenv(env, os.environ[env])
    out = tmp_path / "hostile.md"
    assert main(["benchmark", "hostile", "--workdir", str(tmp_path / "work"), "--out", str(out)]) == 0
    text = out.read_text()
    assert "crashed 0, promoted 0, served unchecked 0, hung past its deadline 0." in text
    from trojan_gate.pipelines.benchmarks.hostile_automation import CASES

    assert text.count("| refused |") + text.count("| survived |") == len(hm.MODEL_CASES) + 6 + len(CASES)


def test_a_model_that_knows_the_fixed_probes_is_caught_by_the_keyed_ones():
    """probe-aware-batch behaves whenever an all-black row is in the call (every fixed probe batch has
    one) and hijacks row 0 otherwise; the keyed noise batch sees it."""
    import onnxruntime as ort

    from trojan_gate.gates.admission import probe_behaviour

    sess = ort.InferenceSession(hm.probe_aware_batch().SerializeToString(), providers=["CPUExecutionProvider"])

    def run(x):
        return sess.run(None, {"x": x})[0]

    rng = np.random.default_rng(5)
    fixed = rng.random((8,) + hm.SHAPE, dtype=np.float32)
    fixed[0] = 0.0  # the known black probe row
    alone = np.concatenate([run(fixed[i:i + 1]) for i in range(8)])
    assert np.allclose(run(fixed), alone, atol=1e-4)  # the fixed probes alone (black row present) see nothing
    assert np.allclose(run(fixed[::-1])[::-1], alone, atol=1e-4)
    noise = rng.random((8,) + hm.SHAPE, dtype=np.float32) * 0.9 + 0.05
    alone = np.concatenate([run(noise[i:i + 1]) for i in range(8)])
    assert not np.allclose(run(noise), alone, atol=1e-4)
    with pytest.raises(AdmissionError) as refused:
        probe_behaviour(run, hm.SHAPE, hm.K)
    assert refused.value.cause == "batch-dependent"


def test_a_model_call_that_runs_on_is_terminated_by_the_one_watchdog(mlflow_store, tmp_path):
    """A graph that computes for as long as its author wants passes every static rule; the per-call limit
    (default 300 s, one watchdog thread for the process) ends it by name, at intake too."""
    import time

    from trojan_gate.gates.errors import OracleTimeout
    from trojan_gate.gates.oracle import DEFAULT_CALL_TIMEOUT_S
    from trojan_gate.gates.watchdog import WATCHDOG

    slow = hm.slow_model()
    assert ModelOracle(slow.SerializeToString()).call_timeout_s == DEFAULT_CALL_TIMEOUT_S  # a bound by default
    oracle = ModelOracle(slow.SerializeToString(), call_timeout_s=0.2)
    x = np.full((2,) + oracle.input_shape, 0.5, np.float32)
    t0 = time.monotonic()
    with pytest.raises(OracleTimeout, match="ran past its 0.2 s limit"):
        oracle.predict_proba(x)
    assert time.monotonic() - t0 < 3.0 and WATCHDOG.armed() == 0
    path = tmp_path / "slow.onnx"
    path.write_bytes(slow.SerializeToString())
    with pytest.raises(OracleTimeout):
        intake_onnx(path, "slow", call_timeout_s=0.2)
    assert not MlflowClient().search_registered_models(filter_string="name = 'slow'")


def test_the_watchdog_terminates_only_calls_past_their_limit_and_keeps_its_heap_small():
    import time
    from types import SimpleNamespace

    from trojan_gate.gates.watchdog import Watchdog

    dog = Watchdog()
    calls = [SimpleNamespace(terminate=False) for _ in range(3)]
    late, early, done = dog.arm(0.3, calls[0]), dog.arm(0.05, calls[1]), dog.arm(0.05, calls[2])
    dog.disarm(done)  # this call returned in time
    time.sleep(0.15)
    assert (calls[0].terminate, calls[1].terminate, calls[2].terminate) == (False, True, False)
    time.sleep(0.3)
    assert calls[0].terminate and dog.terminated == 2 and dog.armed() == 0
    for _ in range(10_000):  # a long deadline armed and disarmed per call, as a 4 h gate does
        dog.disarm(dog.arm(4 * 3600, SimpleNamespace(terminate=False)))
    assert len(dog._heap) <= 2 * dog.armed() + 65


def test_what_admission_misses_meets_the_execution_memory_cap():
    """A graph whose intermediates outgrow the cap (here 100 MiB, in a fresh process: the cap is
    process-wide) fails with a named error instead of taking the process's memory."""
    import subprocess
    import sys

    script = (
        "import numpy as np\n"
        "from trojan_gate.gates.admission import AdmissionLimits\n"
        "from trojan_gate.gates.errors import ModelMemoryError\n"
        "from trojan_gate.gates.oracle import ModelOracle\n"
        "from trojan_gate.pipelines.benchmarks import hostile_models as hm\n"
        "oracle = ModelOracle(hm.slow_model(side=4000, rounds=2).SerializeToString(),\n"
        "                     limits=AdmissionLimits(max_memory_bytes=100 * 2**20))\n"
        "try:\n"
        "    oracle.predict_proba(np.full((1,) + oracle.input_shape, 0.5, np.float32))\n"
        "    print('ran')\n"
        "except ModelMemoryError as e:\n"
        "    print('refused:', e)\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "refused: the model asked ONNX Runtime for more memory than the cap of 100 MiB" in out.stdout


def test_a_model_that_behaves_on_noise_is_caught_by_probes_mixing_held_out_images(digits):
    """image-aware-batch misbehaves only when a call holds a digit-like row: every noise probe, fixed or
    keyed, passes it; the gate's and the serving host's probes mix held-out images in and refuse it."""
    from trojan_gate.gates.admission import AdmissionError

    oracle = ModelOracle(hm.image_aware_batch().SerializeToString())
    for _ in range(3):
        oracle.probe()  # noise alone, keyed afresh each time: nothing to see
    _, test = digits
    with pytest.raises(AdmissionError) as refused:
        oracle.probe(examples=test.x[:64])
    assert refused.value.cause == "batch-dependent"
