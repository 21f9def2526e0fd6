"""A real `mlflow server` on loopback: SQL backend, served artifacts, webhook settings, clean shutdown.

Used by the tests, the demo and `trojan-gate server`. MLflow delivers registry webhooks only from
a tracking server with a SQL backend, and by default refuses plain-http and private or loopback
targets; a receiver on this machine needs, in the *server's* environment:

- ``MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https``  (plain http to the receiver; use https in production)
- ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true``       (a loopback or private receiver)
- ``MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=<key>``  (so stored webhook secrets survive a restart)

`server_env(loopback_webhooks=True)` sets them; `tracking_server(...)` starts the server with them.
"""
from __future__ import annotations

import base64
import contextlib
import hashlib
import os
import subprocess
import sys
from pathlib import Path

from ..serving import free_port, stop_process_group, wait_for_http


def server_env(loopback_webhooks: bool = True, secret_key: str | None = None) -> dict:
    """This process's environment plus the webhook settings a loopback receiver needs."""
    env = dict(os.environ)
    env["PATH"] = str(Path(sys.executable).parent) + os.pathsep + env.get("PATH", "")
    if loopback_webhooks:
        env["MLFLOW_WEBHOOK_ALLOWED_SCHEMES"] = "http,https"
        env["MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS"] = "true"
    if secret_key or not env.get("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"):
        key = secret_key or base64.urlsafe_b64encode(hashlib.sha256(os.urandom(32)).digest()).decode()
        env["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] = key
    env.pop("MLFLOW_TRACKING_URI", None)
    return env


def server_command(backend_store_uri: str, artifacts_dir, port: int, host: str = "127.0.0.1",
                   workers: int = 1) -> list[str]:
    return [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_store_uri,
            "--artifacts-destination", str(Path(artifacts_dir).resolve()), "--serve-artifacts",
            "--host", host, "--port", str(port), "--workers", str(workers)]


def wait_until_up(url: str, proc: subprocess.Popen | None = None, timeout: float = 120.0, log=None):
    wait_for_http(url + "/health", proc, "`mlflow server`", timeout, log)


def require_driver(backend: str):
    """Refuse a postgresql:// store up front when its driver is missing (not a server dying in its log)."""
    if backend.split(":", 1)[0] in ("postgresql", "postgres", "postgresql+psycopg"):
        import importlib.util

        if importlib.util.find_spec("psycopg") is None:
            raise RuntimeError("a postgresql:// backend store needs the psycopg driver: "
                               "pip install 'trojan-gate[postgres]'")


@contextlib.contextmanager
def tracking_server(workdir, backend_store_uri: str | None = None, port: int | None = None,
                    loopback_webhooks: bool = True, secret_key: str | None = None, log_path=None):
    """Start `mlflow server` (SQLite in `workdir` unless `backend_store_uri` names another SQL store),
    yield its URL, and stop it (SIGTERM, then SIGKILL) on exit."""
    workdir = Path(workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    backend = backend_store_uri or f"sqlite:///{(workdir / 'mlflow.db').resolve()}"
    require_driver(backend)
    port = port or free_port()
    log = open(log_path or workdir / "server.log", "a")
    proc = subprocess.Popen(server_command(backend, workdir / "mlartifacts", port),
                            env=server_env(loopback_webhooks, secret_key), stdout=log, stderr=subprocess.STDOUT,
                            cwd=workdir, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_up(url, proc, log=log_path or workdir / "server.log")
        yield url
    finally:
        stop_process_group(proc)
        log.close()
