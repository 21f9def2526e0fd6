"""A real `mlflow server` on loopback: SQL backend, served artifacts, webhook settings, clean shutdown.

Used by the tests, the demo and `trojan-gate server`. MLflow delivers registry webhooks only from
a tracking server with a SQL backend, and by default refuses plain-http and private or loopback
targets; a receiver on this machine needs, in the *server's* environment:

- ``MLFLOW_WEBHOOK_ALLOWED_SCHEMES=http,https``  (plain http to the receiver; use https in production)
- ``MLFLOW_WEBHOOK_ALLOW_PRIVATE_IPS=true``       (a loopback or private receiver)
- ``MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY=<key>``  (required: without one, stored webhook secrets
  cannot be decrypted after a restart or by another worker, and every real delivery fails in the
  server while `webhook install`'s test delivery still succeeds)

`server_env(loopback_webhooks=True)` sets them; `tracking_server(...)` starts the server with them,
its encryption key kept in the workdir (`KEY_FILE`, mode 0600) unless the environment or the caller
gives one, so a restarted server still decrypts the secrets it stored.
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

KEY_FILE = "webhook-secret-encryption.key"


def persistent_key(workdir) -> str:
    """The webhook-secret encryption key kept in `workdir` (created once, mode 0600); a file that
    does not hold a Fernet key (32 bytes, url-safe base64) is refused by name."""
    path = Path(workdir) / KEY_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        key = path.read_text().strip()
        try:
            ok = len(base64.urlsafe_b64decode(key.encode())) == 32
        except ValueError:
            ok = False
        if not ok:
            raise RuntimeError(f"{path} does not hold a webhook-secret encryption key (32 bytes, url-safe "
                               "base64); restore it, or remove it and install the webhooks again") from None
        return key
    key = base64.urlsafe_b64encode(os.urandom(32)).decode()
    with os.fdopen(fd, "w") as f:
        f.write(key + "\n")
    return key


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
    if secret_key is None and not os.environ.get("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"):
        secret_key = persistent_key(workdir)
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
