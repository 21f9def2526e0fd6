"""Automated intake: signed webhook deliveries, the persistent queue, the receiver on a real `mlflow server`,
the polling watcher, and a receiver killed with gates queued and running."""
import json
import os
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid

import onnx
import pytest

from trojan_gate.plugins.automation.queue import GateQueue
from trojan_gate.plugins.automation.webhook import DeliveryRefused, parse_event, sign, verify_delivery
from trojan_gate.plugins.serving import wait_for_http

SECRET = "s3cret-for-tests"
CHEAP = """
[scan]
use_heldout = false
n_per_class = 10
generator_steps = 100
"""


def _headers(body, secret=SECRET, ts=None, delivery=None):
    delivery = delivery or str(uuid.uuid4())
    ts = str(int(time.time() if ts is None else ts))
    return {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": ts,
            "X-MLflow-Signature": sign(secret, delivery, ts, body), "Content-Type": "application/json"}


def test_our_check_accepts_mlflows_own_signature_and_refuses_any_change():
    from mlflow.webhooks.delivery import _generate_hmac_signature  # MLflow's signing code, as its server runs it

    body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "m", "version": "1"}})
    delivery, ts = str(uuid.uuid4()), str(int(time.time()))
    headers = {"X-MLflow-Delivery-Id": delivery, "X-MLflow-Timestamp": ts,
               "X-MLflow-Signature": _generate_hmac_signature(SECRET, delivery, ts, body)}
    assert headers["X-MLflow-Signature"] == sign(SECRET, delivery, ts, body)
    assert verify_delivery(headers, body.encode(), SECRET) == delivery
    for bad, match in (({**headers, "X-MLflow-Signature": headers["X-MLflow-Signature"][:-4] + "AAA="}, "signature"),
                       ({k: v for k, v in headers.items() if k != "X-MLflow-Signature"}, "missing")):
        with pytest.raises(DeliveryRefused, match=match):
            verify_delivery(bad, body.encode(), SECRET)
    with pytest.raises(DeliveryRefused, match="signature"):
        verify_delivery(headers, body.replace('"1"', '"2"').encode(), SECRET)  # the body was changed
    with pytest.raises(DeliveryRefused, match="signature"):
        verify_delivery(headers, body.encode(), "another secret")
    old = _headers(body, ts=time.time() - 3600)
    with pytest.raises(DeliveryRefused, match="outside"):
        verify_delivery(old, body.encode(), SECRET)


def test_events_and_regate_requests():
    def ev(entity, action, **data):
        return parse_event(json.dumps({"entity": entity, "action": action, "data": data}).encode())

    assert (ev("model_version", "created", name="m", version="3").version) == "3"
    assert ev("model_version_tag", "set", name="m", version="3", key="trojan_gate.regate", value="1").name == "m"
    assert ev("model_version_tag", "set", name="m", version="3", key="trojan_gate.verdict", value="x").name is None
    with pytest.raises(DeliveryRefused):
        parse_event(b"not json")


def test_the_queue_survives_a_restart_and_keeps_one_live_job_per_version(tmp_path):
    q = GateQueue(tmp_path / "q.db")
    assert q.enqueue("m", "1", "created") == "queued" and q.enqueue("m", "1", "again") == "live"
    assert q.enqueue("m", "2", "created") == "queued"
    job = q.claim_next(lease_s=0.0)  # the receiver dies: its lease is not renewed
    assert (job.name, job.version, job.attempts) == ("m", "1", 1)
    assert q.enqueue("m", "1", "while running") == "live"
    again = GateQueue(tmp_path / "q.db")  # a new receiver opens the same file
    time.sleep(0.05)
    assert again.recover() == 1
    assert [(j["version"], j["state"]) for j in again.jobs()] == [("1", "queued"), ("2", "queued")]
    job = again.claim_next()
    again.finish(job, 0)
    assert again.enqueue("m", "1", "a regate request after it finished") == "queued"
    assert again.remember_delivery("d1") and not again.remember_delivery("d1")
    assert not GateQueue(tmp_path / "q.db").remember_delivery("d1")  # replays are refused across restarts


def test_the_watcher_reads_every_page_of_the_registry(mlflow_store, tmp_path):
    """MLflow's searches return one page at a time: with one result per page the watcher still finds
    every ungated version, and skips decided versions and guarded models."""
    from mlflow import MlflowClient

    from trojan_gate.plugins.automation.watcher import ungated_versions

    client = MlflowClient()
    for name, versions in (("a", 2), ("b", 1), ("c", 1), ("a-guarded", 1)):
        client.create_registered_model(name, tags={"trojan_gate.kind": "guarded"} if name.endswith("guarded") else None)
        for _ in range(versions):
            client.create_model_version(name, source=str(tmp_path))
    client.set_model_version_tag("b", "1", "trojan_gate.verdict", "passed")
    fresh = "watcher: no verdict"
    want = [("a", "1", fresh), ("a", "2", fresh), ("c", "1", fresh)]
    assert ungated_versions(client, page_size=1) == want
    assert ungated_versions(client) == want
    # a name holding quotes breaks no filter string; versions left pending are reconciled
    client.create_registered_model("it's \"quoted\"")
    client.create_model_version("it's \"quoted\"", source=str(tmp_path))
    import mlflow

    with mlflow.start_run() as killed:  # a gate that died: its run ended
        pass
    with mlflow.start_run() as alive:
        client.set_model_version_tag("c", "1", "trojan_gate.verdict", "pending")
        client.set_model_version_tag("c", "1", "trojan_gate.gate.run_id", alive.info.run_id)
        client.set_model_version_tag("a", "2", "trojan_gate.verdict", "pending")
        client.set_model_version_tag("a", "2", "trojan_gate.gate.run_id", killed.info.run_id)
        found = ungated_versions(client, page_size=2)
        assert found == [("a", "1", fresh), ("a", "2", "watcher: pending, its gate no longer runs"),
                         ("it's \"quoted\"", "1", fresh)]  # c's gate still runs
        assert ("c", "1", "watcher: pending, its gate no longer runs") in ungated_versions(client, stale_after_s=-1)


def test_the_watcher_survives_a_failing_registry_and_backs_off(tmp_path):
    import threading

    from trojan_gate.plugins.automation.watcher import watch

    calls = []

    class Down:
        def search_registered_models(self, **kwargs):
            calls.append(time.monotonic())
            raise ConnectionError("registry unreachable")

    stop = threading.Event()
    t = threading.Thread(target=watch, args=(GateQueue(tmp_path / "q.db"), None),
                         kwargs={"interval_s": 0.05, "client": Down(), "stop": stop, "max_backoff_s": 0.4})
    t.start()
    time.sleep(1.5)
    stop.set()
    t.join(5)
    assert not t.is_alive() and 3 <= len(calls) <= 12  # alive through every failure, waiting longer each time
    gaps = [b - a for a, b in zip(calls, calls[1:])]
    assert gaps[1] > gaps[0] and max(gaps) < 0.9


# ----------------------------------------------------------------------------- end to end on a real server
def _post(url, body, headers):
    req = urllib.request.Request(url, data=body.encode(), headers=headers, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, json.loads(e.read())


def _wait(predicate, timeout=300, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(1)
    raise AssertionError(f"timed out waiting for {what}")


def _register(lab, name):
    """A vendor registers a model straight through MLflow: no trojan-gate intake."""
    import mlflow

    with mlflow.start_run():
        mlflow.onnx.log_model(onnx.load_model_from_string(lab.onnx_bytes), name="model", registered_model_name=name,
                              save_as_external_data=False)


def _tags(name, version):
    from mlflow import MlflowClient

    return MlflowClient().get_model_version(name, version).tags


def _aliases(name):
    from mlflow import MlflowClient

    return {k: str(v) for k, v in MlflowClient().get_registered_model(name).aliases.items()}


@pytest.fixture
def server(tmp_path, monkeypatch):
    import mlflow

    from trojan_gate.plugins.automation.server import tracking_server

    backend = _fresh_postgres_database()  # PostgreSQL when .ci/run started one, else SQLite
    with tracking_server(tmp_path / "server", backend_store_uri=backend) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        mlflow.set_tracking_uri(url)
        mlflow.set_registry_uri(url)
        yield url


def _fresh_postgres_database():
    """With TROJAN_GATE_TEST_POSTGRES=postgresql://USER:PASS@HOST:PORT/DB (a role that may create
    databases), a new empty database for this test; None otherwise (the server then uses SQLite)."""
    admin = os.environ.get("TROJAN_GATE_TEST_POSTGRES")
    if not admin:
        return None
    import psycopg  # the driver SQLAlchemy 2.1 (and so `mlflow server`) uses for postgresql://

    name = f"trojan_gate_{uuid.uuid4().hex[:12]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f"CREATE DATABASE {name}")
    return admin.rsplit("/", 1)[0] + "/" + name


def test_the_server_tests_run_on_postgresql_when_ci_provides_it():
    if not os.environ.get("TROJAN_GATE_TEST_POSTGRES"):
        pytest.skip("no PostgreSQL here: TROJAN_GATE_TEST_POSTGRES is not set (.ci/run starts Debian's postgresql)")
    assert _fresh_postgres_database().startswith("postgresql://")


def _listener(tmp_path, url, port, heldout, queue):
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_REGISTRY_URI": url, "HOOK_SECRET": SECRET}
    (tmp_path / "cheap.toml").write_text(CHEAP)
    return subprocess.Popen([sys.executable, "-m", "trojan_gate.pipelines", "listen", "--port", str(port),
                             "--secret-env", "HOOK_SECRET", "--heldout", str(heldout), "--config",
                             str(tmp_path / "cheap.toml"), "--queue", str(queue), "--workers", "2"],
                            env=env, stdout=open(tmp_path / "listen.log", "a"), stderr=subprocess.STDOUT,
                            start_new_session=True)


@pytest.mark.slow
def test_a_registered_version_is_gated_by_webhook_and_bad_deliveries_gate_nothing(
        server, tmp_path, digits, digits_benign, heldout_npz):
    from trojan_gate.pipelines.webhook import install
    from trojan_gate.plugins.serving import free_port

    port = free_port()
    listener = _listener(tmp_path, server, port, heldout_npz, tmp_path / "queue.db")
    try:
        receiver = f"http://127.0.0.1:{port}/"
        wait_for_http(receiver + "health", listener, "the receiver", 60)
        out = install(receiver, SECRET)
        assert out["test"]["success"], out
        _register(digits_benign, "vendor")
        tags = _wait(lambda: (t := _tags("vendor", "1")).get("trojan_gate.gate.state") == "done" and t, 400,
                     "the webhook-triggered gate")
        assert tags["trojan_gate.verdict"] == "passed" and tags["trojan_gate.adopted"] == "true"
        assert _aliases("vendor") == {"candidate": "1"}
        # forged and stale deliveries are refused with 401 and queue nothing
        body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "vendor", "version": "1"}})
        assert _post(receiver, body, _headers(body, secret="wrong"))[0] == 401
        assert _post(receiver, body, _headers(body, ts=time.time() - 3600))[0] == 401
        replay = _headers(body)
        code, answer = _post(receiver, body, replay)  # a genuine delivery for a version already decided
        assert code == 200 and "already decided" in str(answer)  # the watcher's filters: not gated twice
        assert _post(receiver, body, replay)[0] == 401  # the same delivery again: a replay
        jobs = GateQueue(tmp_path / "queue.db").jobs()
        assert [j["reason"] for j in jobs].count("model_version.created") == 1
        assert "refused a webhook delivery" in (tmp_path / "listen.log").read_text()
    finally:
        os.killpg(listener.pid, signal.SIGTERM)
        listener.wait(20)


@pytest.mark.slow
def test_a_killed_receiver_restarts_and_every_version_is_gated_exactly_once(
        server, tmp_path, digits, digits_benign, digits_trojan, heldout_npz):
    from mlflow import MlflowClient

    from trojan_gate.pipelines.webhook import install
    from trojan_gate.plugins.serving import free_port

    port = free_port()
    receiver = f"http://127.0.0.1:{port}/"
    queue = tmp_path / "queue.db"
    listener = _listener(tmp_path, server, port, heldout_npz, queue)
    wait_for_http(receiver + "health", listener, "the receiver", 60)
    install(receiver, SECRET)
    for i, lab in enumerate((digits_benign, digits_trojan, digits_benign)):
        _register(lab, f"vendor-{i}")
    _wait(lambda: any(j["state"] == "running" for j in GateQueue(queue).jobs()), 120, "a running gate")
    os.killpg(listener.pid, signal.SIGKILL)  # the receiver and its gates die mid-way
    listener.wait(20)
    for i in range(3):
        for alias, version in _aliases(f"vendor-{i}").items():
            assert _tags(f"vendor-{i}", version).get("trojan_gate.verdict") in ("passed", "patched")
    listener = _listener(tmp_path, server, port, heldout_npz, queue)
    try:
        _wait(lambda: GateQueue(queue).live() == 0 and len(GateQueue(queue).jobs()) >= 3, 600, "the queue to drain")
    finally:
        os.killpg(listener.pid, signal.SIGTERM)
        listener.wait(20)
    client = MlflowClient()
    for i, want in enumerate(("passed", "blocked", "passed")):
        versions = client.search_model_versions(f"name='vendor-{i}'")
        assert len(versions) == 1
        tags = versions[0].tags
        assert tags["trojan_gate.verdict"] == want and tags["trojan_gate.gate.state"] == "done"
        assert _aliases(f"vendor-{i}") == ({"candidate": "1"} if want == "passed" else {})
    done = [j for j in GateQueue(queue).jobs() if j["state"] == "done"]
    assert sorted(j["name"] for j in done) == ["vendor-0", "vendor-1", "vendor-2"]  # once each


@pytest.mark.slow
def test_the_watcher_gates_a_store_without_webhooks(tmp_path, digits_benign, heldout_npz, monkeypatch):
    import mlflow

    store = f"sqlite:///{tmp_path / 'plain.db'}"
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store)
    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    _register(digits_benign, "direct")
    (tmp_path / "cheap.toml").write_text(CHEAP)
    proc = subprocess.run([sys.executable, "-m", "trojan_gate.pipelines", "watch", "--once", "--heldout",
                           str(heldout_npz), "--config", str(tmp_path / "cheap.toml"), "--queue",
                           str(tmp_path / "watch.db")], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    tags = _tags("direct", "1")
    assert tags["trojan_gate.verdict"] == "passed" and tags["trojan_gate.adopted"] == "true"
    assert _aliases("direct") == {"candidate": "1"}
    again = subprocess.run([sys.executable, "-m", "trojan_gate.pipelines", "watch", "--once", "--heldout",
                            str(heldout_npz), "--queue", str(tmp_path / "watch.db")], capture_output=True, text=True)
    assert "queued 0 version(s)" in again.stdout  # nothing left without a verdict


@pytest.mark.slow
def test_the_gate_report_renders_in_the_mlflow_ui(server, tmp_path, digits_trojan, heldout_npz, request):
    """Release approval: the reviewer opens the gate run in the MLflow UI and reads the report there."""
    pytest.importorskip("selenium")
    import shutil

    from selenium.webdriver.common.by import By
    from selenium.webdriver.support import expected_conditions as ec
    from selenium.webdriver.support.ui import WebDriverWait

    chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
    if not chromium or not driver_path:
        pytest.skip("Debian's chromium and chromium-driver are not installed")
    from selenium import webdriver

    from trojan_gate.plugins.gate import GateConfig, run_gate
    from trojan_gate.plugins.registry import intake_onnx

    ref = intake_onnx(digits_trojan.save(tmp_path / "trojan.onnx"), "ui-vendor")
    out = run_gate(ref.uri, str(heldout_npz), GateConfig(scan={"use_heldout": False}))
    assert out.verdict == "blocked"
    url = _tags("ui-vendor", ref.version)["trojan_gate.report.url"]
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 f"--user-data-dir={tmp_path / 'chrome'}", "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=webdriver.ChromeService(executable_path=driver_path), options=options)
    shots = tmp_path / "screenshots"
    shots.mkdir()
    try:
        driver.get(url)
        wait = WebDriverWait(driver, 90)
        wait.until(ec.element_to_be_clickable((By.XPATH, "//*[normalize-space(text())='report']"))).click()
        wait.until(ec.element_to_be_clickable((By.XPATH, "//*[normalize-space(text())='trojan_report.html']"))).click()
        frame = wait.until(ec.presence_of_element_located((By.TAG_NAME, "iframe")))
        driver.switch_to.frame(frame)
        wait.until(ec.presence_of_element_located((By.CSS_SELECTOR, ".badge")))
        text = driver.find_element(By.TAG_NAME, "body").text
        images = driver.find_elements(By.CSS_SELECTOR, "img[alt='recovered triggers per class']")
        visible = [img for img in images if img.is_displayed() and img.size["width"] > 100]
        driver.switch_to.default_content()
        driver.save_screenshot(str(shots / "gate-report-in-mlflow-ui.png"))
    finally:
        driver.quit()
    assert "BLOCKED" in text and "Trojan suspected: class 3" in text and "flagged classes" in text
    assert visible, "the recovered-trigger grid is not visible"
    assert (shots / "gate-report-in-mlflow-ui.png").stat().st_size > 10_000


def test_the_kubernetes_project_and_job_template_are_well_formed():
    """`mlflow run deploy/kubernetes -e gate -b kubernetes -c deploy/kubernetes/kubernetes_config.json`:
    the files MLflow reads are what its Kubernetes backend expects, and the queue dispatches to it."""
    from pathlib import Path

    import yaml
    from mlflow.projects import _project_spec

    from trojan_gate.plugins.automation.workers import GateCommand

    root = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"
    project = _project_spec.load_project(str(root))
    assert project.docker_env["image"] == "trojan-gate:latest" and "gate" in project._entry_points
    config = json.loads((root / "kubernetes_config.json").read_text())
    assert {"kube-context", "kube-job-template-path", "repository-uri"} <= set(config)
    job = yaml.safe_load((root / "kubernetes_job_template.yaml").read_text())
    assert job["kind"] == "Job" and job["spec"]["backoffLimit"] == 0
    container = job["spec"]["template"]["spec"]["containers"][0]
    assert "{replaced with" in container["image"] and "{replaced with" in container["command"][0]
    argv = GateCommand(heldout="/data/h.npz", dispatch="kubernetes", backend_config=str(root / "kubernetes_config.json"),
                       project_uri=str(root)).argv("models:/m/3")
    assert argv[1:4] == ["-m", "mlflow", "run"] and "kubernetes" in argv and "model_uri=models:/m/3" in argv
    assert "force=true" not in argv and "force=true" in GateCommand(
        heldout="/data/h.npz", dispatch="kubernetes", backend_config="c.json", project_uri=str(root)).argv(
        "models:/m/3", "model_version_tag.set regate")
    project = yaml.safe_load((root / "MLproject").read_text())["entry_points"]["gate"]
    assert "force" in project["parameters"] and "--force-gate {force}" in project["command"]
    local = GateCommand(heldout="/data/h.npz")
    assert "--force" not in local.argv("models:/m/3", "model_version.created")
    assert local.argv("models:/m/3", "model_version_tag.set regate")[-1] == "--force"  # a regate scans again


DEMO_SETTINGS = """
[scan]
n_per_class = 10
generator_steps = 100

[patch]
soup = 1
epochs = 10
residual_steps = 25
residual_restarts = 1
residual_area_ladder = [0.08, 0.02]

[check]
kind = "strip"
"""


@pytest.mark.slow
def test_the_demo_runs_through_a_real_tracking_server(tmp_path):
    """`trojan-gate demo --server`: intake, gate and guarded serving against `mlflow server` on loopback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "TROJAN_GATE_"))}
    settings = tmp_path / "gate.toml"  # small settings: this test is about the server path, not the scan's power
    settings.write_text(DEMO_SETTINGS)
    proc = subprocess.run([sys.executable, "-m", "trojan_gate.pipelines", "demo", "--server", "--dataset", "digits",
                           "--workdir", str(tmp_path / "demo"), "--no-use-heldout", "--requests", "40",
                           "--config", str(settings)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "demo" / "demo_summary.json").read_text())
    assert summary["tracking_uri"].startswith("http://127.0.0.1:")
    assert set(summary["verdicts"]) == {"benign", "trojaned"}
    assert set(summary["verdicts"].values()) <= {"passed", "blocked", "patched"}  # decided, no error
    assert proc.stdout.count("report in the MLflow UI: http://127.0.0.1:") == 2
    if "served" in summary:  # a version holds the alias: its guarded model answered over REST
        assert summary["frr_measured"] <= 0.2


class _Queue:
    def __init__(self):
        self.jobs, self.seen = [], set()

    def live(self):
        return len(self.jobs)

    def seen_delivery(self, delivery):
        return delivery in self.seen

    def remember_delivery(self, delivery):
        new = delivery not in self.seen
        self.seen.add(delivery)
        return new

    def enqueue(self, name, version, reason):
        self.jobs.append((name, version, reason))
        return "queued"


@pytest.fixture()
def bounded_receiver(monkeypatch):
    """A receiver on loopback with a 1 s socket timeout and room for 2 connections."""
    import threading
    from types import SimpleNamespace

    from trojan_gate.plugins.automation import webhook

    monkeypatch.setattr(webhook, "TIMEOUT_S", 1.0)
    queue = _Queue()

    def skip(ref, reason):
        return "a guarded model" if ref.name.endswith("-guarded") else None

    failures = {"flaky": 1}  # the registry fails once for model "flaky"

    def resolve(name, version):
        if failures.get(name):
            failures[name] -= 1
            raise ConnectionError("registry unreachable")
        return SimpleNamespace(name=name, version=version, uri=f"models:/{name}/{version}")

    handler = webhook.make_handler(SECRET, queue, resolve, skip_reason=skip)
    server = webhook.receiver("127.0.0.1", 0, handler, max_connections=2, deadline_s=3.0)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], queue
    server.shutdown()
    server.server_close()


def _raw(port, head: bytes, body: bytes = b"", close_write=False, wait=10.0) -> bytes:
    from trojan_gate.pipelines.benchmarks.hostile_automation import exchange

    return exchange(port, head + body, wait=wait, close_write=close_write)


def test_the_receiver_bounds_bodies_before_reading_them(bounded_receiver):
    port, queue = bounded_receiver
    post = b"POST /hook HTTP/1.1\r\nHost: x\r\n"
    assert b" 400 " in _raw(port, post + b"Content-Length: -1\r\n\r\n", b"x" * 100, close_write=True)
    assert b" 400 " in _raw(port, post + b"Content-Length: abc\r\n\r\n")
    assert b" 411 " in _raw(port, post + b"\r\n")
    assert b" 411 " in _raw(port, post + b"Transfer-Encoding: chunked\r\n\r\n", b"5\r\nhello\r\n0\r\n\r\n")
    assert b" 413 " in _raw(port, post + b"Content-Length: %d\r\n\r\n" % (2 << 20))  # refused before any body
    assert b" 400 " in _raw(port, post + b"Content-Length: 100\r\n\r\n", b"short", close_write=True)
    t0 = time.monotonic()
    assert b" 400 " in _raw(port, post + b"Content-Length: 100\r\n\r\n", b"short")  # half-sent: the timeout ends it
    assert time.monotonic() - t0 < 2.9
    assert queue.jobs == []


def test_the_receiver_limits_connections_and_times_out_idle_ones(bounded_receiver):
    import socket

    port, _ = bounded_receiver
    idle = [socket.create_connection(("127.0.0.1", port), timeout=5) for _ in range(2)]
    time.sleep(0.2)
    assert b" 503 " in _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")  # both slots held
    for s in idle:  # the socket timeout closes an idle connection and frees its slot
        assert s.recv(10) == b""
        s.close()
    time.sleep(0.2)
    assert b" 200 " in _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")


def test_a_client_trickling_bytes_loses_its_connection_at_the_deadline(bounded_receiver):
    """Slowloris: one byte every 0.5 s never trips the 1 s per-read timeout; the 3 s connection deadline
    shuts the connection down and frees its slot."""
    import socket

    port, queue = bounded_receiver
    s = socket.create_connection(("127.0.0.1", port), timeout=10)
    t0, closed = time.monotonic(), False
    request = b"POST / HTTP/1.1\r\nHost: x\r\nX-Padding: " + b"a" * 100
    for byte in request:
        try:
            s.sendall(bytes([byte]))
        except OSError:
            closed = True
            break
        s.settimeout(0.5)
        try:
            if s.recv(1024) == b"":
                closed = True
                break
        except TimeoutError:
            pass
    s.close()
    assert closed and 2.5 < time.monotonic() - t0 < 6.0
    time.sleep(0.2)
    assert b" 200 " in _raw(port, b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")


def test_the_receiver_applies_the_watchers_filters(bounded_receiver):
    from trojan_gate.plugins.automation.watcher import skip_reason

    port, queue = bounded_receiver
    for name in ("clf", "clf-guarded"):
        body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": name, "version": "1"}})
        head = "".join(f"{k}: {v}\r\n" for k, v in _headers(body).items())
        out = _raw(port, (f"POST /hook HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n"
                          "Connection: close\r\n\r\n").encode(), body.encode())
        assert (b" 202 " if name == "clf" else b"not gated: a guarded model") in out
    assert [j[0] for j in queue.jobs] == ["clf"]
    tag = "trojan_gate."
    assert skip_reason({tag + "kind": "guarded"}, {}) and skip_reason({tag + "kind": "scan-calibration"}, {})
    assert skip_reason({}, {tag + "patched_from": "3"}) and skip_reason({}, {tag + "verdict": "passed"})
    assert skip_reason({}, {tag + "verdict": "passed"}, gated_again=True) is None and skip_reason({}, {}) is None


def test_a_delivery_is_recorded_only_once_handled_so_mlflows_retry_is_welcome(bounded_receiver):
    port, queue = bounded_receiver
    body = json.dumps({"entity": "model_version", "action": "created", "data": {"name": "flaky", "version": "2"}})
    head = "".join(f"{k}: {v}\r\n" for k, v in _headers(body).items())
    request = (f"POST /hook HTTP/1.1\r\nHost: x\r\n{head}Content-Length: {len(body)}\r\n"
               "Connection: close\r\n\r\n").encode()
    assert b" 503 " in _raw(port, request, body.encode())  # the registry failed: nothing queued, id not kept
    assert queue.jobs == [] and not queue.seen
    assert b" 202 " in _raw(port, request, body.encode())  # MLflow's retry of the same delivery is gated
    assert [j[:2] for j in queue.jobs] == [("flaky", "2")]
    assert b" 401 " in _raw(port, request, body.encode())  # and only then is it a replay


def test_the_servers_webhook_secret_key_is_kept_in_its_workdir(tmp_path, monkeypatch):
    import stat

    from trojan_gate.plugins.automation.server import KEY_FILE, persistent_key, server_env

    key = persistent_key(tmp_path)
    assert persistent_key(tmp_path) == key  # a restart decrypts what the last run stored
    assert stat.S_IMODE((tmp_path / KEY_FILE).stat().st_mode) == 0o600
    monkeypatch.delenv("MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY", raising=False)
    assert server_env(secret_key=key)["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"] == key
    (tmp_path / KEY_FILE).write_text("not a key")
    with pytest.raises(RuntimeError, match="does not hold a webhook-secret encryption key"):
        persistent_key(tmp_path)


def test_two_processes_on_one_queue_file_never_run_one_job_twice(tmp_path):
    from trojan_gate.plugins.automation import queue as queue_module

    first, second = GateQueue(tmp_path / "q.db"), GateQueue(tmp_path / "q.db")
    assert first.enqueue("m", "1", "created") == "queued"
    job = first.claim_next()
    assert second.recover() == 0 and second.claim_next() is None  # a live owner's lease holds
    assert not second.finish(job, 0) and not second.heartbeat(job)  # only the owner records its end
    assert first.heartbeat(job, lease_s=0.0)
    time.sleep(0.05)
    assert second.recover() == 1  # the lease ran out: another process takes the job over
    taken = second.claim_next()
    assert taken.id == job.id and taken.attempts == 2
    assert not first.heartbeat(job) and not first.finish(job, 0)  # the first worker learns it lost the job
    assert second.finish(taken, 1) and [j["state"] for j in second.jobs()] == ["done"]
    # an owner that is a dead process of this host is recovered at once, lease or not
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert first.enqueue("m", "2", "created") == "queued"
    first.claim_next()
    host = queue_module.socket.gethostname()
    with first._connect() as db:
        db.execute("UPDATE jobs SET owner = ? WHERE version = '2'", (f"{host}:{dead.stdout.strip()}:x",))
    assert second.recover() == 1


def test_the_queue_limits_gates_per_model_and_opens_files_made_before_leases(tmp_path):
    import sqlite3

    q = GateQueue(tmp_path / "q.db", max_per_model_per_hour=2)
    assert [q.enqueue("m", v, "created") for v in ("1", "2", "3")] == ["queued", "queued", "rate-limited"]
    assert q.enqueue("m", "1", "again") == "rate-limited" and q.enqueue("other", "1", "created") == "queued"
    old = tmp_path / "old.db"
    with sqlite3.connect(old) as db:  # the jobs table as it was before leases, with a job left running
        db.executescript("CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, name TEXT NOT NULL, version TEXT "
                         "NOT NULL, reason TEXT NOT NULL, state TEXT NOT NULL DEFAULT 'queued', attempts INTEGER NOT "
                         "NULL DEFAULT 0, enqueued_at REAL NOT NULL, started_at REAL, finished_at REAL, exit_code "
                         "INTEGER, detail TEXT);"
                         "INSERT INTO jobs(name, version, reason, state, attempts, enqueued_at) "
                         "VALUES ('m', '1', 'x', 'running', 1, 0);")
    again = GateQueue(old)
    assert again.recover() == 1 and again.claim_next().version == "1"


def test_a_hanging_gate_is_killed_and_a_job_that_never_finishes_is_given_up(tmp_path, monkeypatch):
    from trojan_gate.plugins.automation.queue import MAX_ATTEMPTS
    from trojan_gate.plugins.automation.workers import TIMED_OUT, GateCommand, GateWorkers

    q = GateQueue(tmp_path / "q.sqlite")
    q.enqueue("m", "1", "test")
    command = GateCommand(heldout="h.npz")
    monkeypatch.setattr(command, "argv", lambda uri, reason="": [sys.executable, "-c", "import time; time.sleep(60)"])
    t0 = time.monotonic()
    assert GateWorkers(q, command, job_timeout_s=1.0).run_one()
    assert time.monotonic() - t0 < 20
    job = q.jobs()[0]
    assert job["state"] == "error" and job["exit_code"] == TIMED_OUT and "killed after 1 s" in job["detail"]
    q.enqueue("m", "2", "test")  # a job whose process dies with its receiver every time
    for attempt in range(1, MAX_ATTEMPTS + 1):
        assert q.claim_next(lease_s=0.0).attempts == attempt
        time.sleep(0.02)
        assert GateQueue(q.path).recover() == (1 if attempt < MAX_ATTEMPTS else 0)  # the next receiver
    last = q.jobs()[-1]
    assert last["state"] == "error" and "gave up after" in last["detail"] and q.live() == 0


def test_two_gates_creating_the_experiment_at_once_both_run(mlflow_store, monkeypatch):
    """Two gates started together both found the experiment missing; the loser of the create used to exit 2
    (RESOURCE_ALREADY_EXISTS) and its job ended in error."""
    import mlflow

    from trojan_gate.plugins.registry import ensure_experiment

    real = mlflow.create_experiment

    def lost_the_race(name, artifact_location=None):
        real(name, artifact_location=artifact_location)  # the other gate's create wins
        raise mlflow.exceptions.MlflowException(f"Experiment(name={name}) already exists",
                                                error_code="RESOURCE_ALREADY_EXISTS")

    monkeypatch.setattr(mlflow, "create_experiment", lost_the_race)
    exp_id = ensure_experiment("trojan-gate-gate")
    assert mlflow.get_experiment_by_name("trojan-gate-gate").experiment_id == exp_id


def test_a_job_given_up_leaves_its_version_in_error_not_pending(mlflow_store, tmp_path):
    """A gate that dies with its receiver every time: after the last attempt the version gets verdict=error
    with the cause and loses its aliases, so the watcher's reconciliation does not queue it forever."""
    from mlflow import MlflowClient

    from trojan_gate.plugins.automation.queue import MAX_ATTEMPTS
    from trojan_gate.plugins.automation.watcher import record_given_up, ungated_versions

    client = MlflowClient()
    client.create_registered_model("m")
    client.create_model_version("m", source=str(tmp_path), tags={"trojan_gate.verdict": "pending"})
    client.set_registered_model_alias("m", "candidate", "1")
    path = tmp_path / "q.db"
    GateQueue(path).enqueue("m", "1", "model_version.created")
    for _ in range(MAX_ATTEMPTS):
        GateQueue(path).claim_next(lease_s=0.0)  # the receiver dies with the gate
        time.sleep(0.02)
        GateQueue(path, on_give_up=record_given_up()).recover()  # the next receiver starts
    tags = client.get_model_version("m", "1").tags
    assert tags["trojan_gate.verdict"] == "error" and "gave up after 3 attempts" in tags["trojan_gate.verdict.error"]
    assert not client.get_registered_model("m").aliases
    assert ungated_versions(client) == []
