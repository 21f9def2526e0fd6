"""SIGKILL a real `trojan-gate` process at many points of intake, scan, patch, STRIP calibration and the
registry writes; after every kill the registry holds no alias on a version without a passed or patched
verdict, the next run does not reuse a half-written record, and in the end a run completes.

Each flow is a sequence of kill points in the order a gate reaches them: run k is killed at point k,
so it has to get past every earlier point again (it re-gates instead of reusing what run k-1 left).
The flows run side by side, each on its own SQLite store.
"""
import json
import os
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytestmark = pytest.mark.slow

SETTINGS = """
[gate]
max_accuracy_drop = 0.05

[scan]
use_heldout = false
n_per_class = 10
generator_steps = 100

[patch]
soup = 1
epochs = 10
residual_margin = 0.25  # a 10-epoch patch keeps some of the trojan; this test is about kills, not acceptance
residual_steps = 25     # the residual search's cost, not its power, matters here
residual_restarts = 1
residual_area_ladder = [0.08, 0.02]

[check]
kind = "strip"  # the same signing and attaching path as the default check, without training its student
"""

# (version to gate, policy, kill points in the order the gate reaches them)
# The points between the claim and the release only compute (fetch, validate, scan, fit): one of them
# (inside the scan) stands for all; every point around a registry or artifact write is kept.
PASS_FLOW = ["registry.tag#2", "gate.claimed", "scan.measured", "check.release-signed", "check.attached",
             "verdict.tags", "verdict.decided", "registry.alias-set", "verdict.aliased", "verdict.done"]
PATCH_FLOW = ["registry.alias-dropped", "patch.rescanned", "intake.logged", "intake.registered",
              "patch.registered", "registry.alias-set", "verdict.done"]
INTAKE_FLOW = ["intake.logged", "intake.registered"]


def _env(store) -> dict:
    """This store for tracking and registry alike (whatever an earlier test exported)."""
    uri = f"sqlite:///{store}/mlflow.db"
    return {**os.environ, "MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri}


def _cli(store, args, fault=None, keys=None):
    env = {**_env(store),
           "TROJAN_GATE_SIGNING_KEY": str(keys[0]), "TROJAN_GATE_VERIFY_KEY": str(keys[1])}
    env.pop("TROJAN_GATE_FAULT", None)
    if fault:
        env["TROJAN_GATE_FAULT"] = fault
    proc = subprocess.run([sys.executable, "-m", "trojan_gate.pipelines", *args], cwd=store, env=env,
                          capture_output=True, text=True, timeout=600)
    return proc


def _registry(store):
    """{name: {version: (verdict, gate state, aliases)}} read straight from the store."""
    code = ("import json, mlflow; c = mlflow.MlflowClient(); out = {}\n"
            "for m in c.search_registered_models():\n"
            "    for v in c.search_model_versions(f\"name='{m.name}'\"):\n"
            "        v = c.get_model_version(m.name, v.version)  # search results carry no aliases\n"
            "        out.setdefault(m.name, {})[v.version] = [v.tags.get('trojan_gate.verdict'), "
            "v.tags.get('trojan_gate.gate.state'), sorted(v.aliases)]\n"
            "print(json.dumps(out))")
    env = _env(store)
    return json.loads(subprocess.run([sys.executable, "-c", code], cwd=store, env=env, capture_output=True,
                                     text=True, check=True).stdout.strip().splitlines()[-1])


def _no_alias_on_an_unverified_version(registry, where):
    for name, versions in registry.items():
        for version, (verdict, state, aliases) in versions.items():
            if aliases and not name.endswith("-guarded"):
                assert verdict in ("passed", "patched"), f"{where}: {name}/{version} holds {aliases} with {verdict}"


def _flow(store, keys, points, policy, alias_first=False):
    log = []
    if alias_first:  # an alias to take away: the claim must drop it before anything else
        code = "import mlflow; mlflow.MlflowClient().set_registered_model_alias('m', 'production', '1')"
        env = _env(store)
        subprocess.run([sys.executable, "-c", code], cwd=store, env=env, check=True)
    for point in points:
        proc = _cli(store, ["gate", "models:/m/1", "--heldout", "heldout.npz", "--config", "gate.toml",
                            "--policy", policy], fault=point, keys=keys)
        assert proc.returncode == -signal.SIGKILL, (point, proc.returncode, proc.stderr[-2000:])
        _no_alias_on_an_unverified_version(_registry(store), f"after a kill at {point}")
        log.append(point)
    final = _cli(store, ["gate", "models:/m/1", "--heldout", "heldout.npz", "--config", "gate.toml", "--policy",
                         policy], keys=keys)
    registry = _registry(store)
    _no_alias_on_an_unverified_version(registry, "after the last run")
    return log, json.loads(final.stdout), registry


@pytest.fixture(scope="module")
def stores(tmp_path_factory, digits, digits_trojan, digits_benign, release_keys):
    made = {}
    for flow, lab in (("pass", digits_benign), ("patch", digits_trojan), ("intake", digits_benign)):
        d = tmp_path_factory.mktemp(f"kill-{flow}")
        lab.save(d / "model.onnx")
        np.savez(d / "heldout.npz", x=digits[1].x, y=digits[1].y)
        (d / "gate.toml").write_text(SETTINGS)
        if flow != "intake":
            assert _cli(d, ["intake", "model.onnx", "--name", "m"], keys=release_keys).returncode == 0
        made[flow] = d
    return made


def test_a_kill_anywhere_leaves_no_alias_on_an_unverified_version_and_the_next_run_completes(stores, release_keys):
    keys = release_keys
    with ThreadPoolExecutor(2) as pool:
        passing = pool.submit(_flow, stores["pass"], keys, PASS_FLOW, "block")
        patching = pool.submit(_flow, stores["patch"], keys, PATCH_FLOW, "patch", True)
        passing, patching = passing.result(), patching.result()
    # intake: a kill before or after the version exists leaves nothing unverified, and intake again works
    d = stores["intake"]
    for point in INTAKE_FLOW:
        proc = _cli(d, ["intake", "model.onnx", "--name", "m"], fault=point, keys=keys)
        assert proc.returncode == -signal.SIGKILL, (point, proc.stderr[-2000:])
        _no_alias_on_an_unverified_version(_registry(d), f"intake killed at {point}")
    assert _cli(d, ["intake", "model.onnx", "--name", "m"], keys=keys).returncode == 0
    # a gate that fails (a budget far too small) and is killed right after writing `error`
    proc = _cli(d, ["gate", "models:/m/1", "--heldout", "heldout.npz", "--budget", "100"], fault="verdict.failed",
                keys=keys)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert _registry(d)["m"]["1"][:2] == ["error", "done"]

    points = passing[0] + patching[0] + INTAKE_FLOW + ["verdict.failed"]
    assert len(points) >= 20
    (log, final, registry) = passing
    assert final["verdict"] == "passed" and registry["m"]["1"] == ["passed", "done", ["candidate"]]
    assert final["reused"]  # the last kill came after the record was complete: reusing it is right
    assert final["run_id"] in final["report_uri"]  # and the record links the report of the run that decided it
    (log, final, registry) = patching
    assert final["verdict"] == "patched" and final["reused"]
    assert registry["m"]["1"][:2] == ["blocked", "done"] and registry["m"]["1"][2] == []
    holders = [v for v, (verdict, _, aliases) in registry["m"].items() if aliases]
    assert len(holders) == 1 and registry["m"][holders[0]] == ["patched", "done", ["candidate"]]
    assert final["final"] == f"models:/m/{holders[0]}"
