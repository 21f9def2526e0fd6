"""REST serving of the guarded model against the plain ONNX model, both through `mlflow models serve`.

In a throwaway MLflow store (SQLite, a temporary folder) the model is registered by `intake_onnx`
and served as MLflow's ONNX flavour (plain); each calibrated check is attached with
`attach_check` and its guarded model served the same way. The release is signed with a throwaway
key and a verdict of "passed" written by this benchmark (it measures serving, not the scan: no
gate ran). Each server runs with one worker on loopback; one client sends requests back to back
over a kept-alive connection, each body encoded once beforehand, for `seconds` per row count
(at least 5 requests), and reports p50 / p99 latency and inputs/s.
"""
from __future__ import annotations

import contextlib
import http.client
import json
import os
import tempfile
import time
from pathlib import Path
from urllib.parse import urlparse

import numpy as np


def load(url: str, body: bytes, seconds: float, min_requests: int = 5, max_requests: int = 5000) -> list[float]:
    """Latencies (s) of back-to-back POSTs of `body` to /invocations for about `seconds`."""
    u = urlparse(url)
    conn = http.client.HTTPConnection(u.hostname, u.port, timeout=300)
    headers = {"Content-Type": "application/json"}
    latencies = []
    try:
        for _ in range(2):  # warm-up
            conn.request("POST", "/invocations", body, headers)
            r = conn.getresponse()
            payload = r.read()
            if r.status != 200:
                raise RuntimeError(f"{url} answered {r.status}: {payload[-300:]!r}")
        start = time.perf_counter()
        while len(latencies) < max_requests and (len(latencies) < min_requests
                                                 or time.perf_counter() - start < seconds):
            t0 = time.perf_counter()
            conn.request("POST", "/invocations", body, headers)
            r = conn.getresponse()
            r.read()
            latencies.append(time.perf_counter() - t0)
            if r.status != 200:
                raise RuntimeError(f"{url} answered {r.status}")
    finally:
        conn.close()
    return latencies


@contextlib.contextmanager
def _environment(values: dict):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def rest_benchmark(model: Path, artifacts: dict, x: np.ndarray, rows_list: list[int], seconds: float) -> list[dict]:
    """Rows {server, rows, requests, p50_ms, p99_ms, inputs_per_s} for the plain model and each guarded one."""
    import mlflow

    from trojan_gate.gates.guard import GuardedClassifier
    from trojan_gate.plugins.calibration import attach_check, serving_settings
    from trojan_gate.plugins.registry import intake_onnx
    from trojan_gate.plugins.serving import served_model
    from trojan_gate.plugins.signing import SIGNING_KEY_ENV, VERIFY_KEY_ENV, generate_keypair

    results = []
    with tempfile.TemporaryDirectory(prefix="trojan-gate-rest-") as tmp:
        tmp = Path(tmp)
        uri = f"sqlite:///{tmp / 'mlflow.db'}"
        private, public = generate_keypair(tmp / "keys")
        env = {"MLFLOW_TRACKING_URI": uri, "MLFLOW_REGISTRY_URI": uri, SIGNING_KEY_ENV: str(private),
               VERIFY_KEY_ENV: str(public)}
        with _environment(env):
            mlflow.set_tracking_uri(uri)
            mlflow.set_registry_uri(uri)
            from trojan_gate.plugins.registry import ensure_experiment

            ensure_experiment("trojan-gate-intake", artifact_location=str(tmp / "artifacts"))
            ensure_experiment("trojan-gate-calibrate", artifact_location=str(tmp / "artifacts"))
            ref = intake_onnx(model, "bench")
            servers = {"plain": ref.uri}
            for kind, directory in artifacts.items():
                guard = GuardedClassifier.from_artifacts(model, directory)
                verdict = {"verdict": "passed", "serving": serving_settings("flag", max_rows=max(rows_list))}
                outcome = attach_check(ref, guard.detector, model, verdict, guarded_name=f"bench-{kind}-guarded")
                servers[kind] = outcome.guarded.uri
            bodies = {rows: json.dumps({"inputs": x[:rows].tolist()}).encode() for rows in rows_list}
            for server, model_uri in servers.items():
                print(f"serving {server} ({model_uri}) ...", flush=True)
                with served_model(model_uri, tracking_uri=uri, log_path=str(tmp / f"{server}.log")) as url:
                    for rows, body in bodies.items():
                        lat = np.asarray(load(url, body, seconds))
                        results.append({"server": server, "rows": rows, "requests": len(lat),
                                        "p50_ms": 1000 * float(np.percentile(lat, 50)),
                                        "p99_ms": 1000 * float(np.percentile(lat, 99)),
                                        "inputs_per_s": rows * len(lat) / float(lat.sum())})
                        print(json.dumps(results[-1]), flush=True)
    return results


def rest_markdown(results: list[dict]) -> list[str]:
    """The REST table: per row count, each server's latency and throughput, and guarded / plain."""
    plain = {r["rows"]: r["inputs_per_s"] for r in results if r["server"] == "plain"}
    lines = ["REST (`mlflow models serve`, one worker, one client on loopback, JSON bodies encoded beforehand):", "",
             "| served model | rows per request | requests | p50 latency | p99 latency | inputs/s | / plain |",
             "|---|---|---|---|---|---|---|"]
    for r in results:
        ratio = r["inputs_per_s"] / plain[r["rows"]] if plain.get(r["rows"]) else float("nan")
        lines.append(f"| {r['server']} | {r['rows']} | {r['requests']} | {r['p50_ms']:.1f} ms | {r['p99_ms']:.1f} ms "
                     f"| {r['inputs_per_s']:.0f} | {ratio:.2f} |")
    return lines
