"""The hostile benchmark's attacks on the automation and release path (issue list of the second
hardening round): the webhook receiver's body and connection floods, lost and replayed deliveries,
two receivers on one queue, a gate that hangs, a model call that runs on or outgrows memory, the
watcher's inputs, regate abuse, promotion of the raw ONNX version and a revoked release.

Each case returns (outcome, cause): "refused" or "survived" with what held, or "crashed",
"promoted", "served unchecked", "hung" with what went wrong. `cases(env)` lists them; `env`
carries the benchmark's store, held-out data, cheap gate settings and a benign passed version.
"""
from __future__ import annotations

import json
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

SECRET = "hostile-benchmark-secret"


def _rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


class _Receiver:
    """The real receiver (handler, bounded server, GateQueue) on a loopback port, in this process."""

    def __init__(self, queue_path, resolve, timeout_s: float = 1.0, max_connections: int = 32,
                 deadline_s: float = 3.0):
        from trojan_gate.plugins.automation import webhook
        from trojan_gate.plugins.automation.queue import GateQueue
        from trojan_gate.plugins.automation.watcher import skip_reason

        self._webhook, self._old_timeout = webhook, webhook.TIMEOUT_S
        webhook.TIMEOUT_S = timeout_s
        self.queue = GateQueue(queue_path)
        handler = webhook.make_handler(SECRET, self.queue, resolve,
                                       skip_reason=lambda ref, why: skip_reason({}, {}, "regate" in why))
        self.server = webhook.receiver("127.0.0.1", 0, handler, max_connections=max_connections,
                                       deadline_s=deadline_s)
        self.port = self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()
        self.server.server_close()
        self._webhook.TIMEOUT_S = self._old_timeout

    def raw(self, data: bytes, body_chunks=(), wait: float = 10.0) -> bytes:
        return exchange(self.port, data, body_chunks, wait)

    def signed(self, body: str, delivery: str | None = None) -> bytes:
        from trojan_gate.plugins.automation.webhook import sign

        delivery = delivery or str(uuid.uuid4())
        ts = str(int(time.time()))
        head = {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": ts,
                "X-MLflow-Signature": sign(SECRET, delivery, ts, body), "Content-Type": "application/json"}
        lines = "".join(f"{k}: {v}\r\n" for k, v in head.items())
        return (f"POST / HTTP/1.1\r\nHost: x\r\n{lines}Content-Length: {len(body.encode())}\r\n"
                "Connection: close\r\n\r\n").encode() + body.encode()


def exchange(port: int, data: bytes, body_chunks=(), wait: float = 10.0, close_write: bool = False) -> bytes:
    """Send `data` (then `body_chunks`) to a loopback port as a raw client would; everything answered
    until the server closes the connection or `wait` passes."""
    s = socket.create_connection(("127.0.0.1", port), timeout=wait)
    try:
        s.sendall(data)
        for chunk in body_chunks:
            s.sendall(chunk)
        if close_write:
            s.shutdown(socket.SHUT_WR)
    except OSError:  # the receiver closed the connection while the attacker was still sending
        pass
    out = b""
    try:
        while chunk := s.recv(65536):
            out += chunk
    except OSError:
        pass
    s.close()
    return out


def _resolver(fail_once=()):
    from types import SimpleNamespace

    failures = {name: 1 for name in fail_once}

    def resolve(name, version):
        if failures.get(name):
            failures[name] -= 1
            raise ConnectionError("registry unreachable")
        return SimpleNamespace(name=name, version=str(version), uri=f"models:/{name}/{version}")

    return resolve


def body_flood(env):
    rx = _Receiver(env.work / "q-body.db", _resolver())
    try:
        before = _rss_mib()
        chunk = b"x" * (1 << 20)
        answer = rx.raw(b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: -1\r\n\r\n", [chunk] * 64)
        grown = _rss_mib() - before
        big = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "m", "version": "1",
                                                                                   "pad": "x" * (3 << 20)}})
        honest = rx.raw(rx.signed(big))
        if b" 400 " in answer and b" 413 " in honest and grown < 32:
            return "refused", f"Content-Length -1 with 64 MiB: 400 (+{grown:.0f} MiB); signed 3 MiB: 413"
        return "crashed", f"answers {answer[:12]!r} / {honest[:12]!r}, receiver memory +{grown:.0f} MiB"
    finally:
        rx.close()


def connection_flood(env):
    rx = _Receiver(env.work / "q-conn.db", _resolver(), timeout_s=1.0, max_connections=32)
    try:
        threads = threading.active_count()
        idle = [socket.create_connection(("127.0.0.1", rx.port), timeout=10) for _ in range(200)]
        time.sleep(0.5)
        peak = threading.active_count() - threads
        time.sleep(2.0)  # the socket timeout ends every idle connection
        health = rx.raw(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for s in idle:
            s.close()
        if peak <= 34 and b" 200 " in health:
            return "survived", f"200 idle connections: at most {peak} threads, closed after 1 s, then /health 200"
        return "crashed", f"{peak} threads for 200 idle connections; /health {health[:12]!r}"
    finally:
        rx.close()


def trickle(env):
    """Slowloris: 32 connections each sending a byte every 0.5 s (never 1 s idle)."""
    rx = _Receiver(env.work / "q-trickle.db", _resolver(), timeout_s=1.0, max_connections=32, deadline_s=3.0)
    try:
        conns = [socket.create_connection(("127.0.0.1", rx.port), timeout=10) for _ in range(32)]
        t0, open_ = time.monotonic(), list(conns)
        while open_ and time.monotonic() - t0 < 15:
            for s in list(open_):
                try:
                    s.sendall(b"a")
                except OSError:
                    open_.remove(s)
            time.sleep(0.5)
        took = time.monotonic() - t0
        health = rx.raw(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        for s in conns:
            s.close()
        if not open_ and b" 200 " in health:
            return "survived", f"32 trickling connections shut at the 3 s deadline (all gone after {took:.1f} s)"
        return "hung", f"{len(open_)} trickling connections still open after {took:.0f} s"
    finally:
        rx.close()


def lost_delivery(env):
    rx = _Receiver(env.work / "q-lost.db", _resolver(fail_once=("m",)))
    try:
        body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "m", "version": "4"}})
        delivery = str(uuid.uuid4())
        first, retry, replay = (rx.raw(rx.signed(body, delivery)) for _ in range(3))
        if b" 503 " in first and b" 202 " in retry and b" 401 " in replay and rx.queue.live() == 1:
            return "survived", "registry down: 503 and id not kept; MLflow's retry queued; a third copy 401"
        return "crashed", f"answers {first[:12]!r} {retry[:12]!r} {replay[:12]!r}"
    finally:
        rx.close()


def two_receivers(env):
    from trojan_gate.plugins.automation.queue import GateQueue

    first, second = GateQueue(env.work / "q-two.db"), GateQueue(env.work / "q-two.db")
    first.enqueue("m", "1", "created")
    job = first.claim_next()
    stolen = second.recover() + (second.claim_next() is not None)
    if stolen == 0 and not second.finish(job, 0) and first.finish(job, 0):
        return "survived", "a second receiver on the same file took nothing from a live lease"
    return "crashed", f"the second receiver took {stolen} job(s)"


def queue_abuse(env):
    """A tag-happy client asks for gate after gate of one model; the queue file is one for listen and watch."""
    from trojan_gate.plugins.automation.queue import MAX_JOBS_PER_MODEL_PER_HOUR, GateQueue

    queue = GateQueue(env.work / "q-rate.db")
    answers = [queue.enqueue("m", str(v), "model_version_tag.set regate") for v in range(100)]
    queued = answers.count("queued")
    from trojan_gate.pipelines import gateopts

    shared = gateopts.gate_setup.__defaults__ == ("gate-queue",)  # listen and watch open the same file
    if queued == MAX_JOBS_PER_MODEL_PER_HOUR and shared:
        return "refused", f"100 requests for one model: {queued} queued, {answers.count('rate-limited')} answered 429"
    return "crashed", f"{queued} of 100 queued; one queue file for listen and watch: {shared}"


def webhook_filters(env):
    """Deliveries for a guarded model, a scan calibration and a patched version, read back from the registry."""
    from mlflow import MlflowClient

    from trojan_gate.plugins.automation.watcher import registry_skip_reason
    from trojan_gate.plugins.registry import VersionRef

    client = MlflowClient()
    cases = {"filter-guarded": ({"trojan_gate.kind": "guarded"}, {}),
             "filter-calibration": ({"trojan_gate.kind": "scan-calibration"}, {}),
             "filter-patched": ({}, {"trojan_gate.patched_from": "1"})}
    why = {}
    for name, (model_tags, version_tags) in cases.items():
        client.create_registered_model(name, tags=model_tags)
        v = client.create_model_version(name, source=str(env.work), tags=version_tags)
        why[name] = registry_skip_reason(client)(VersionRef(name, str(v.version)), "model_version.created")
    if all(why.values()):
        return "refused", "; ".join(f"{k[7:]}: {v}" for k, v in why.items())
    return "crashed", f"queued: {[k for k, v in why.items() if not v]}"


def server_key(env):
    from trojan_gate.plugins.automation.server import persistent_key

    first, again = persistent_key(env.work / "server"), persistent_key(env.work / "server")
    if first == again:
        return "survived", "the webhook-secret key is kept in the server's workdir across restarts (0600)"
    return "crashed", "a restart drew a new key: stored secrets no longer decrypt"


def hanging_gate(env):
    from trojan_gate.plugins.automation.queue import GateQueue
    from trojan_gate.plugins.automation.workers import TIMED_OUT, GateCommand, GateWorkers

    queue = GateQueue(env.work / "q-hang.db")
    queue.enqueue("m", "1", "created")
    command = GateCommand(heldout="h.npz")
    command.argv = lambda uri, reason="": [sys.executable, "-c", "import time; time.sleep(600)"]
    t0 = time.monotonic()
    GateWorkers(queue, command, job_timeout_s=2.0).run_one()
    job = queue.jobs()[0]
    took = time.monotonic() - t0
    if job["exit_code"] == TIMED_OUT and took < 30:
        return "refused", f"a gate hanging 600 s killed after {took:.1f} s (job limit 2 s), job error {TIMED_OUT}"
    return "hung", f"still waiting after {took:.0f} s"


def slow_call(env):
    from trojan_gate.gates.errors import OracleTimeout
    from trojan_gate.plugins.registry import intake_onnx

    from . import hostile_models as hm

    path = env.work / "slow.onnx"
    path.write_bytes(hm.slow_model(rounds=200).SerializeToString())
    t0 = time.monotonic()
    try:
        intake_onnx(path, "slow-call", call_timeout_s=1.0)  # a deployment's per-call limit for 8x8 models
    except OracleTimeout as e:
        return "refused", f"OracleTimeout after {time.monotonic() - t0:.1f} s: {str(e)[:60]}"
    return "hung", f"intake returned after {time.monotonic() - t0:.0f} s"


def image_aware_batch(env):
    """Behaves on every noise probe, hijacks row 0 of a batch holding a digit: intake (noise probes)
    admits it, the gate's probes mixing the held-out images in refuse it."""
    from mlflow import MlflowClient

    from trojan_gate.plugins.gate import run_gate
    from trojan_gate.plugins.registry import intake_onnx, version_tags

    from . import hostile_models as hm

    path = env.work / "image-aware.onnx"
    path.write_bytes(hm.image_aware_batch().SerializeToString())
    ref = intake_onnx(path, "image-aware")
    out = run_gate(ref.uri, env.heldout, env.cheap)
    aliases = MlflowClient().get_registered_model(ref.name).aliases
    error = version_tags(ref).get("trojan_gate.verdict.error", "")
    if out.verdict == "error" and not aliases and "batch-dependent" in error:
        return "refused", "intake admitted it; the gate's keyed probes with held-out images: batch-dependent"
    return ("promoted" if aliases else "crashed"), f"gate {out.verdict}: {error[:80]}"


def memory_outgrown(env):
    script = ("import numpy as np\n"
              "from trojan_gate.gates.admission import AdmissionLimits\n"
              "from trojan_gate.gates.oracle import ModelOracle\n"
              "from trojan_gate.pipelines.benchmarks import hostile_models as hm\n"
              "o = ModelOracle(hm.slow_model(side=4000, rounds=2).SerializeToString(),\n"
              "                limits=AdmissionLimits(max_memory_bytes=100 * 2**20))\n"
              "o.predict_proba(np.full((1,) + o.input_shape, 0.5, np.float32))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    if "ModelMemoryError" in out.stderr:
        return "refused", "ModelMemoryError: intermediates of 128 MiB under a 100 MiB execution cap"
    return "crashed", f"exit {out.returncode}: {out.stderr[-120:]}"


def watcher_inputs(env):
    from mlflow import MlflowClient

    from trojan_gate.plugins.automation.queue import GateQueue
    from trojan_gate.plugins.automation.watcher import ungated_versions, watch

    client = MlflowClient()
    name = "it's \"quoted\""
    client.create_registered_model(name)
    client.create_model_version(name, source=str(env.work))
    found = [n for n, _, _ in ungated_versions(client)]

    class Down:
        def search_registered_models(self, **kwargs):
            raise ConnectionError("registry unreachable")

    stop = threading.Event()
    t = threading.Thread(target=watch, args=(GateQueue(env.work / "q-watch.db"), None),
                         kwargs={"interval_s": 0.05, "client": Down(), "stop": stop, "max_backoff_s": 0.2})
    t.start()
    time.sleep(0.6)
    alive = t.is_alive()
    stop.set()
    t.join(5)
    client.delete_registered_model(name)
    if name in found and alive:
        return "survived", "a quoted model name listed; a failing registry retried with backoff"
    return "crashed", f"quoted name listed: {name in found}; watcher alive: {alive}"


def regate_and_revocation(env):
    """A regate request (anyone who can set a tag) on a passed, promoted version: it re-scans; only a
    pass gives the removed aliases back; a block revokes the release everywhere."""
    from dataclasses import replace

    from mlflow import MlflowClient

    from trojan_gate.gates.errors import ArtifactIntegrityError
    from trojan_gate.plugins.gate import run_gate
    from trojan_gate.plugins.gate.steps import default_scan
    from trojan_gate.plugins.guarded_pyfunc import load_served_release
    from trojan_gate.plugins.promotion import promote
    from trojan_gate.plugins.registry import intake_onnx, resolve, version_tags
    from trojan_gate.plugins.serving import ServingRefused, check_servable

    client = MlflowClient()
    ref = intake_onnx(env.benign_path, "regated")
    run_gate(ref.uri, env.heldout, env.cheap)
    promote(ref.name, ref.version)
    if "production" in (client.get_registered_model(ref.name).aliases or {}):
        return "promoted", "the raw ONNX version holds the release alias"
    client.set_registered_model_alias(ref.name, "champion", ref.version)
    passed = run_gate(ref.uri, env.heldout, env.cheap, force=True)
    kept = dict(client.get_registered_model(ref.name).aliases)
    if passed.verdict != "passed" or "champion" not in kept:
        return "crashed", f"a passing regate left aliases {kept}"

    def flags(oracle, data, config):
        return replace(default_scan(oracle, data, config), is_trojaned=True, flagged_classes=[0])

    guarded = version_tags(ref)["trojan_gate.guarded_model"]
    blocked = run_gate(ref.uri, env.heldout, env.cheap, force=True, scan_fn=flags)
    left = dict(client.get_registered_model(ref.name).aliases) or dict(client.get_registered_model(
        resolve(guarded).name).aliases)
    if blocked.verdict != "blocked" or left:
        return "promoted", f"after a blocking regate aliases {left} remain"
    try:
        check_servable(guarded)
        return "served unchecked", "serve accepted a revoked release"
    except ServingRefused:
        pass
    import mlflow

    local = Path(mlflow.artifacts.download_artifacts(artifact_uri=guarded, dst_path=str(env.work / "revoked")))
    try:
        load_served_release(next(local.rglob("verdict.json")).parent, next(local.rglob("release.sig")))
    except ArtifactIntegrityError as e:
        return "refused", f"raw version never aliased; pass restored champion; block revoked: {str(e)[:50]}"
    return "served unchecked", "the revoked release loaded"


CASES = (
    ("receiver-body", "Content-Length -1 with 64 MiB; a signed 3 MiB body", body_flood),
    ("receiver-connections", "200 idle connections", connection_flood),
    ("receiver-trickle", "32 connections sending a byte every 0.5 s", trickle),
    ("lost-delivery", "the registry fails while a delivery is handled; MLflow retries", lost_delivery),
    ("two-receivers", "a second receiver on the same queue file", two_receivers),
    ("queue-abuse", "100 regate requests for one model in an hour", queue_abuse),
    ("webhook-filters", "deliveries for a guarded model, a calibration, a patched version", webhook_filters),
    ("server-key", "restart a webhook server", server_key),
    ("hanging-gate", "a gate process that never ends", hanging_gate),
    ("slow-call", "every model call computes for seconds (limit 1 s)", slow_call),
    ("image-aware-batch", "batch dependence only on digit-like rows, none on noise", image_aware_batch),
    ("memory-outgrown", "intermediates past the execution memory cap", memory_outgrown),
    ("watcher-inputs", "a quoted model name; a registry that fails", watcher_inputs),
    ("regate-revoke", "regate a promoted version; block it later", regate_and_revocation),
)
