"""MLflow registry webhooks: checking a delivery, and the receiver that queues gates.

MLflow (3.3+) signs a delivery with the webhook's secret (`mlflow.webhooks.delivery`):

    X-MLflow-Signature: v1,<base64 HMAC-SHA256(secret, f"{delivery_id}.{timestamp}.{raw body}")>
    X-MLflow-Timestamp: <unix seconds>          X-MLflow-Delivery-Id: <uuid>

`verify_delivery` recomputes the signature over the raw body (constant-time compare) and refuses
a timestamp outside the window (default 5 minutes, either way); the receiver also refuses a
delivery id it has seen before, even across restarts. A refused delivery gets HTTP 401 and a log
line, and gates nothing. An accepted one is answered at once (MLflow's delivery is fire and
forget, with a 30 s timeout): the version is read back from the registry (the payload's `run_id`
can be null, and the payload is only a hint) and a gate is queued.

Events: `model_version.created` queues a gate; `model_version_tag.set` with the key
`trojan_gate.regate` (any value) asks for a gate again, e.g. after new held-out data. The
gate's own tag writes are other keys and are ignored. The watcher's filters apply here too
(`watcher.skip_reason`): guarded models, registered scan calibrations, versions a gate created
(patched) and, for `created`, versions that already carry a verdict are answered 200 and not queued.

Bounds, because anyone who can reach the port can send anything: the body must come with a
numeric `Content-Length` of at most `MAX_BODY` bytes (411 without one, 400 when it is not a
non-negative number or fewer bytes arrive, 413 above the cap) and is read to exactly that length
before the signature is checked; every connection has a socket timeout (`TIMEOUT_S`, per read) and
an absolute deadline (`CONNECTION_DEADLINE_S`: a reaper thread shuts down a connection still open
after it, so a client trickling one byte at a time cannot hold a slot; the standard library's
server and uvicorn alike only time out single reads), and at most `MAX_CONNECTIONS` are served at
once (a further connection is answered 503 and closed).
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from trojan_gate.gates.errors import TrojanGateError

log = logging.getLogger("trojan_gate.listen")

SIGNATURE_HEADER, TIMESTAMP_HEADER, DELIVERY_HEADER = "X-MLflow-Signature", "X-MLflow-Timestamp", "X-MLflow-Delivery-Id"
REGATE_TAG = "trojan_gate.regate"
MAX_BODY = 1 << 20
TIMEOUT_S = 10.0  # a connection idle or half-sent for this long is closed
MAX_CONNECTIONS = 32
CONNECTION_DEADLINE_S = 30.0  # a connection, however busy, is closed after this long


class DeliveryRefused(TrojanGateError):
    """A webhook delivery failed its signature, timestamp or replay check."""


def sign(secret: str, delivery_id: str, timestamp: str, body: bytes | str) -> str:
    """MLflow's v1 signature of a delivery (for tests and for checking)."""
    payload = body.decode("utf-8") if isinstance(body, bytes) else body
    mac = hmac.new(secret.encode("utf-8"), f"{delivery_id}.{timestamp}.{payload}".encode("utf-8"), hashlib.sha256)
    return "v1," + base64.b64encode(mac.digest()).decode("utf-8")


def verify_delivery(headers, body: bytes, secret: str, now: float | None = None, window_s: float = 300.0) -> str:
    """Check one delivery's signature and timestamp; returns its delivery id or raises DeliveryRefused."""
    delivery_id, timestamp, signature = (headers.get(h) for h in (DELIVERY_HEADER, TIMESTAMP_HEADER, SIGNATURE_HEADER))
    if not delivery_id or not timestamp or not signature:
        raise DeliveryRefused("missing delivery id, timestamp or signature header")
    try:
        sent = int(timestamp)
    except ValueError as e:
        raise DeliveryRefused(f"timestamp {timestamp!r} is not unix seconds") from e
    now = time.time() if now is None else now
    if abs(now - sent) > window_s:
        raise DeliveryRefused(f"timestamp {sent} is {now - sent:+.0f} s from now, outside the {window_s:.0f} s window")
    try:
        expected = sign(secret, delivery_id, timestamp, body)
    except UnicodeDecodeError as e:
        raise DeliveryRefused("body is not UTF-8") from e
    if not hmac.compare_digest(expected.encode(), signature.encode()):
        raise DeliveryRefused("signature does not match the secret")
    return delivery_id


@dataclass
class Event:
    """What a delivery asks for: gate name/version (None when the event is not ours)."""

    name: str | None
    version: str | None
    reason: str


def parse_event(body: bytes) -> Event:
    try:
        doc = json.loads(body)
        entity, action, data = doc["entity"], doc["action"], doc.get("data") or {}
    except (ValueError, KeyError, TypeError) as e:
        raise DeliveryRefused(f"not an MLflow webhook payload: {e}") from e
    if (entity, action) == ("model_version", "created"):
        return Event(str(data.get("name")), str(data.get("version")), "model_version.created")
    if (entity, action) == ("model_version_tag", "set") and data.get("key") == REGATE_TAG:
        return Event(str(data.get("name")), str(data.get("version")), "model_version_tag.set regate")
    return Event(None, None, f"{entity}.{action} ignored")


def body_length(headers) -> int:
    """The declared body length, checked: (HTTP code, reason) in DeliveryRefused.args when it is missing
    (411), chunked (411), not a non-negative decimal number (400) or over MAX_BODY (413)."""
    if headers.get("Transfer-Encoding"):
        raise DeliveryRefused(411, "a body must come with a Content-Length, not Transfer-Encoding")
    raw = headers.get("Content-Length")
    if raw is None:
        raise DeliveryRefused(411, "Content-Length required")
    if not raw.strip().isdigit():
        raise DeliveryRefused(400, f"Content-Length {raw[:32]!r} is not a non-negative number")
    length = int(raw)
    if length > MAX_BODY:
        raise DeliveryRefused(413, f"payload too large ({length} bytes, at most {MAX_BODY})")
    return length


def make_handler(secret: str, queue, resolve_version, window_s: float = 300.0, skip_reason=None):
    """A request handler class: bound, verify, parse, read the version back, filter, queue, answer
    (200/202/400/401/411/413). `skip_reason(ref)` names why a version is not gated (None: gate it)."""

    class Handler(BaseHTTPRequestHandler):
        server_version = "trojan-gate-listen"
        timeout = TIMEOUT_S  # socket timeout for every read and write of this connection

        def log_message(self, fmt, *args):  # one line per request, through logging
            log.info("%s %s", self.address_string(), fmt % args)

        def _answer(self, code: int, message: str):
            body = json.dumps({"status": code, "message": message}).encode()
            self.send_response(code)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def do_GET(self):
            if self.path == "/health":
                return self._answer(200, f"ok, {queue.live()} gate(s) queued or running")
            self._answer(404, "not found")

        def do_POST(self):
            try:
                length = body_length(self.headers)
            except DeliveryRefused as e:
                self.close_connection = True
                return self._answer(*e.args)
            try:
                body = self.rfile.read(length)
            except TimeoutError:
                self.close_connection = True
                return self._answer(400, f"the body did not arrive within {TIMEOUT_S:.0f} s")
            if len(body) != length:
                self.close_connection = True
                return self._answer(400, f"the body ended after {len(body)} of {length} bytes")
            try:
                delivery = verify_delivery(self.headers, body, secret, window_s=window_s)
                if queue.seen_delivery(delivery):
                    raise DeliveryRefused(f"delivery {delivery} was seen before (a replay)")
            except DeliveryRefused as e:
                log.warning("refused a webhook delivery from %s: %s", self.address_string(), e)
                return self._answer(401, str(e))
            code, message = self._handle(delivery, body)
            if code < 500 and code != 429 and not queue.remember_delivery(delivery):  # handled: replays refused
                code, message = 401, f"delivery {delivery} was seen before (a replay)"
            self._answer(code, message)

        def _handle(self, delivery: str, body: bytes) -> tuple[int, str]:
            """(status, message) for one authenticated delivery. 5xx and 429 leave the delivery id
            unrecorded, so MLflow's retry (on 429 and 5xx) is welcome."""
            try:
                event = parse_event(body)
            except DeliveryRefused as e:
                return 400, str(e)
            if event.name is None:
                return 200, event.reason
            try:
                ref = resolve_version(event.name, event.version)  # the registry, not the payload, decides
            except Exception as e:
                if any(getattr(x, "error_code", "") == "RESOURCE_DOES_NOT_EXIST" for x in (e, e.__cause__)):
                    log.warning("delivery %s names %s/%s, which the registry does not have", delivery, event.name,
                                event.version)
                    return 400, f"no such model version {event.name}/{event.version}"
                log.warning("delivery %s: the registry could not be read: %s", delivery, e)
                return 503, f"the registry could not be read ({type(e).__name__}); retry later"
            try:
                why = None if skip_reason is None else skip_reason(ref, event.reason)
                status = None if why else queue.enqueue(ref.name, ref.version, event.reason)
            except Exception as e:  # a registry read or the queue file failed: MLflow retries
                log.warning("delivery %s: %s could not be queued: %s", delivery, ref.uri, e)
                return 503, f"{ref.uri} could not be queued ({type(e).__name__}); retry later"
            if why:
                log.info("delivery %s: %s not gated: %s", delivery, ref.uri, why)
                return 200, f"{ref.uri} not gated: {why}"
            log.info("delivery %s: %s %s", delivery, ref.uri, status)
            if status == "rate-limited":
                return 429, f"{ref.uri} not queued: model {ref.name} reached its gates per hour"
            return 202, f"{ref.uri} {'queued' if status == 'queued' else 'already queued or running'}"

    return Handler


class BoundedHTTPServer(ThreadingHTTPServer):
    """A threading server that serves at most `MAX_CONNECTIONS` connections at once; one more is
    answered 503 and closed at once instead of getting a thread."""

    daemon_threads = True

    def __init__(self, address, handler, max_connections: int = MAX_CONNECTIONS,
                 deadline_s: float | None = None):
        super().__init__(address, handler)
        self.slots = threading.BoundedSemaphore(max_connections)
        self.deadline_s = CONNECTION_DEADLINE_S if deadline_s is None else float(deadline_s)
        self._open: dict = {}  # socket -> time.monotonic() past which it is shut down
        self._open_lock = threading.Lock()
        self.reaped = 0
        threading.Thread(target=self._reap, name="receiver-reaper", daemon=True).start()

    def _reap(self):
        """Shut down connections past their deadline (the handler's blocked read then returns)."""
        import socket

        while True:
            time.sleep(min(1.0, self.deadline_s / 4))
            now = time.monotonic()
            with self._open_lock:
                late = [s for s, due in self._open.items() if due < now]
                for s in late:
                    del self._open[s]
            for s in late:
                try:
                    s.shutdown(socket.SHUT_RDWR)
                    self.reaped += 1
                except OSError:
                    pass

    def process_request(self, request, client_address):
        if not self.slots.acquire(blocking=False):
            try:
                request.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self.slots.release()
            raise

    def process_request_thread(self, request, client_address):
        with self._open_lock:
            self._open[request] = time.monotonic() + self.deadline_s
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._open_lock:
                self._open.pop(request, None)
            self.slots.release()


def receiver(host: str, port: int, handler, max_connections: int = MAX_CONNECTIONS,
             deadline_s: float | None = None) -> ThreadingHTTPServer:
    """The receiver's HTTP server (bounded connections, per-read timeout, connection deadline; see the module doc)."""
    return BoundedHTTPServer((host, port), handler, max_connections, deadline_s)
