"""Shared fixtures: tiny lab models on scikit-learn digits and a throw-away MLflow store."""
from __future__ import annotations

import os

import numpy as np
import pytest

os.environ.setdefault("GX_ANALYTICS_ENABLED", "False")
os.environ.setdefault("TQDM_DISABLE", "1")


@pytest.fixture(scope="session", autouse=True)
def release_keys(tmp_path_factory):
    """One signing key pair for the session, exported where the gate and the guarded model read it."""
    from trojan_gate.plugins.signing import SIGNING_KEY_ENV, VERIFY_KEY_ENV, generate_keypair

    private, public = generate_keypair(tmp_path_factory.mktemp("keys"))
    before = {k: os.environ.get(k) for k in (SIGNING_KEY_ENV, VERIFY_KEY_ENV)}
    os.environ[SIGNING_KEY_ENV], os.environ[VERIFY_KEY_ENV] = str(private), str(public)
    yield private, public
    for k, v in before.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(scope="session")
def digits():
    from trojan_gate.gates.data import load_digits_dataset

    return load_digits_dataset(seed=0)


@pytest.fixture(scope="session")
def digits_trojan(digits):
    """A BadNets patch trojan on 8x8 digits, target 3 (seeded; ~1 s to train)."""
    from trojan_gate.gates.lab import LabConfig, train_lab_model

    train, test = digits
    return train_lab_model(train, test, LabConfig(arch="small", trigger="patch", targets=(3,), epochs=30,
                                                  batch_size=64, seed=0), progress=False)


@pytest.fixture(scope="session")
def digits_benign(digits):
    from trojan_gate.gates.lab import LabConfig, train_lab_model

    train, test = digits
    return train_lab_model(train, test, LabConfig(arch="small", trigger="none", epochs=30, batch_size=64, seed=1),
                           progress=False)


@pytest.fixture
def trojan_onnx(tmp_path, digits_trojan):
    return digits_trojan.save(tmp_path / "trojan.onnx")


MLFLOW_ENV = ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_ID")


@pytest.fixture(autouse=True)
def _mlflow_environment_is_restored():
    """mlflow.set_tracking_uri / set_registry_uri export MLFLOW_*_URI for subprocesses; a test that
    points them at its own store must not leave later tests' subprocesses talking to it."""
    saved = {k: os.environ.get(k) for k in MLFLOW_ENV}
    yield
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def mlflow_store(tmp_path, monkeypatch):
    """A fresh SQLite MLflow store in tmp_path; cwd moves there so ./mlruns lands there too."""
    import mlflow

    from trojan_gate.plugins.registry import configure_tracking

    monkeypatch.chdir(tmp_path)
    for var in MLFLOW_ENV:
        monkeypatch.delenv(var, raising=False)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    configure_tracking(uri)
    mlflow.set_experiment(experiment_id="0")  # forget the experiment id cached from an earlier store
    yield uri
    if mlflow.active_run():
        mlflow.end_run()


@pytest.fixture
def heldout_npz(tmp_path, digits):
    _, test = digits
    path = tmp_path / "heldout.npz"
    np.savez_compressed(path, x=test.x, y=test.y)
    return path


_SCAN_CACHE = {}


@pytest.fixture(scope="session")
def cached_scan():
    """The gate's real DeepInspect scan, memoised per (model sha256, resolved scan settings, seed).

    Gate, promote and evaluator tests gate the same few digits models several times; the scan
    is deterministic for a fixed seed, so one real scan per model and config serves them all.
    """
    import json

    from trojan_gate.plugins.gate.steps import default_scan

    def run(oracle, heldout, config):
        key = (oracle.sha256, config.seed, json.dumps(config.scan.resolved(), sort_keys=True, default=str))
        if key not in _SCAN_CACHE:
            _SCAN_CACHE[key] = default_scan(oracle, heldout, config)
        return _SCAN_CACHE[key]

    return run
