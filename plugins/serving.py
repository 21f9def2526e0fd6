"""Run `mlflow models serve` for a registered (guarded) model on loopback and talk REST to it."""
from __future__ import annotations

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np

from trojan_gate.gates.errors import TrojanGateError


class ServingRefused(TrojanGateError):
    """The guarded model may not be served; the message says why."""


def check_servable(guarded_uri: str) -> str:
    """The source version of a guarded model, if a finished gate decided it passed or patched;
    raises ServingRefused otherwise. Returns the source's URI."""
    from .registry import VersionRef, resolve, tag, version_tags
    from .signing import SERVABLE

    guarded = resolve(guarded_uri)
    gtags = version_tags(guarded)
    name, version = gtags.get(tag("source_model")), gtags.get(tag("source_version"))
    if not name or not version:
        raise ServingRefused(f"{guarded.uri} is not a trojan-gate guarded model (no source version tags)")
    if gtags.get(tag("revoked")):
        raise ServingRefused(f"{guarded.uri} is revoked: {gtags[tag('revoked')]}")
    source = VersionRef(name, version)
    stags = version_tags(source)
    verdict, state = stags.get(tag("verdict")), stags.get(tag("gate.state"))
    if verdict not in SERVABLE or state != "done":
        raise ServingRefused(f"its source {source.uri} has verdict {verdict or 'none'} (gate state {state or 'none'}); "
                             f"only {' or '.join(SERVABLE)} versions are served")
    if stags.get(tag("guarded_model")) != guarded.uri:
        raise ServingRefused(f"{source.uri}'s current guarded model is {stags.get(tag('guarded_model'))}, "
                             f"not {guarded.uri}")
    return source.uri


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command(model_uri: str, port: int, host: str = "127.0.0.1", workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "mlflow", "models", "serve", "-m", model_uri, "--env-manager", "local",
            "-h", host, "-p", str(port), "-w", str(workers)]


def serving_env(tracking_uri: str | None) -> dict:
    """This process's environment (the verification key included) with uvicorn on PATH and the store set."""
    env = dict(os.environ)
    bin_dir = str(Path(sys.executable).parent)  # uvicorn lives beside this interpreter
    env["PATH"] = bin_dir + os.pathsep + env.get("PATH", "")
    if tracking_uri:
        env["MLFLOW_TRACKING_URI"] = tracking_uri
        env.setdefault("MLFLOW_REGISTRY_URI", tracking_uri)
    return env


def wait_for_http(url: str, proc: subprocess.Popen | None, what: str, timeout: float, log=None):
    """Poll `url` until it answers 200; raise if `proc` exits first or `timeout` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with code {proc.returncode} before answering"
                               + (f"; see {log}" if log else ""))
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not answer {url} within {timeout:.0f} s")
        time.sleep(0.5)


def stop_process_group(proc: subprocess.Popen, grace: float = 20.0):
    """SIGTERM the process group started with start_new_session, then SIGKILL after `grace` seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, 15)
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, 9)
        proc.wait(timeout=10)


@contextlib.contextmanager
def served_model(model_uri: str, tracking_uri: str | None = None, port: int | None = None,
                 startup_timeout: float = 180.0, log_path: str | None = None):
    """Start `mlflow models serve` on 127.0.0.1, wait for /ping, yield the base URL, stop it."""
    port = port or free_port()
    log = open(log_path, "w") if log_path else subprocess.DEVNULL
    proc = subprocess.Popen(serve_command(model_uri, port), env=serving_env(tracking_uri),
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(url + "/ping", proc, "`mlflow models serve`", startup_timeout, log_path)
        yield url
    finally:
        stop_process_group(proc)
        if log_path:
            log.close()


def invoke(url: str, x: np.ndarray, params: dict | None = None, timeout: float = 120.0) -> list[dict]:
    """POST `{"inputs": x}` to /invocations; return the list of per-input prediction records."""
    body = {"inputs": np.asarray(x, dtype=np.float32).tolist()}
    if params:
        body["params"] = params
    req = urllib.request.Request(url + "/invocations", data=json.dumps(body).encode(),
                                 headers={"Content-Type": "application/json"}, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            payload = json.loads(r.read())
    except urllib.error.HTTPError as e:
        body = e.read().decode(errors="replace")
        try:  # MLflow's error JSON: keep the error, not the echo of the request data before it
            doc = json.loads(body)
            body = f"{doc.get('error_code')}: {str(doc.get('message', ''))[-500:]}" + (
                " (with a stack trace)" if doc.get("stack_trace") else "")
        except ValueError:
            body = body[-500:]
        raise RuntimeError(f"server answered {e.code}: {body}") from e
    return payload["predictions"]
