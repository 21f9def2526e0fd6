"""Gate workers: take jobs from the queue and run each gate as its own `trojan-gate gate` process.

At most `workers` gates run at once, and never two for one version (the queue holds one live job
per version). Each gate is a child process that dies with its parent (it sets PR_SET_PDEATHSIG on Linux when
`TROJAN_GATE_DIE_WITH_PARENT` is set, see `die_with_parent`):
killing the receiver kills its gates mid-way, which the gate's registry protocol makes safe, and
the next receiver requeues them (`GateQueue.recover`, at most `queue.MAX_ATTEMPTS` starts per job).
A gate that runs past `job_timeout_s` (default `JOB_TIMEOUT_S`) is killed and its job ends in error
(exit code 124). A gate's exit code is recorded with its job: 0 passed or patched, 1 blocked, 2 error.
"""
from __future__ import annotations

import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field

log = logging.getLogger("trojan_gate.workers")


DIE_WITH_PARENT_ENV = "TROJAN_GATE_DIE_WITH_PARENT"
JOB_TIMEOUT_S = 6 * 3600.0  # a gate process alive this long is killed (the gate's own deadline is shorter)
TIMED_OUT = 124


def die_with_parent():
    """Called by a gate process at start when `TROJAN_GATE_DIE_WITH_PARENT` is set: the kernel
    SIGKILLs it when the process that started it dies; if that already happened, exit now."""
    if not os.environ.get(DIE_WITH_PARENT_ENV):
        return
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: the child outlives a killed parent; the protocol still holds
        return
    if os.getppid() == 1:
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass
class GateCommand:
    """The gate options every job runs with (the `trojan-gate gate` flags)."""

    heldout: str
    policy: str = "block"
    alias: str = "candidate"
    config: str | None = None
    tracking_uri: str | None = None
    extra_env: dict = field(default_factory=dict)
    dispatch: str = "local"  # local: a child process; kubernetes: an MLflow Project run, one Job per gate
    project_uri: str = "deploy/kubernetes"
    backend_config: str | None = None

    def argv(self, model_uri: str, reason: str = "") -> list[str]:
        """The command of one job; a regate request (`trojan_gate.regate`) scans again (`--force`)."""
        force = "regate" in reason
        if self.dispatch == "kubernetes":  # Kubernetes schedules; the queue only bounds how many at once
            params = {"model_uri": model_uri, "heldout": self.heldout, "policy": self.policy, "alias": self.alias,
                      **({"config": self.config} if self.config else {}), **({"force": "true"} if force else {})}
            return [sys.executable, "-m", "mlflow", "run", self.project_uri, "-e", "gate", "-b", "kubernetes",
                    "--backend-config", str(self.backend_config)] + [a for k, v in params.items() for a in ("-P", f"{k}={v}")]
        args = [sys.executable, "-m", "trojan_gate.pipelines", "gate", model_uri, "--adopt", "--heldout", self.heldout,
                "--policy", self.policy, "--alias", self.alias]
        if self.config:
            args += ["--config", self.config]
        if self.tracking_uri:
            args += ["--tracking-uri", self.tracking_uri]
        return args + (["--force"] if force else [])

    def env(self) -> dict:
        return {**os.environ, **self.extra_env, DIE_WITH_PARENT_ENV: "1"}


class GateWorkers:
    """`workers` threads, each running queued gates one after another until `stop()`."""

    def __init__(self, queue, command: GateCommand, workers: int = 1, poll_s: float = 1.0,
                 job_timeout_s: float = JOB_TIMEOUT_S):
        self.queue, self.command, self.poll_s, self.job_timeout_s = queue, command, poll_s, float(job_timeout_s)
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._loop, name=f"gate-worker-{i}", daemon=True)
                         for i in range(max(1, int(workers)))]

    def start(self) -> "GateWorkers":
        for t in self._threads:
            t.start()
        return self

    def stop(self, timeout: float | None = None):
        self._stop.set()
        for t in self._threads:
            t.join(timeout)

    def run_one(self) -> bool:
        """Run the next queued gate in this thread, renewing its lease while it runs; False when the
        queue is empty. A gate past `job_timeout_s`, or whose lease another process took over, is killed."""
        job = self.queue.claim_next()
        if job is None:
            return False
        log.info("gate %s (%s, attempt %d)", job.uri, job.reason, job.attempts)
        code, detail = 2, ""
        try:
            code, detail = self._run(job)
        except Exception as e:  # the job ends in error with its cause instead of staying running
            code, detail = 2, f"the worker could not run the gate: {type(e).__name__}: {e}"
        finally:
            if not self.queue.finish(job, code, detail):
                log.warning("gate %s: this worker no longer held its lease; its exit %d is not recorded", job.uri, code)
        log.info("gate %s exited %d", job.uri, code)
        return True

    def _run(self, job) -> tuple[int, str]:
        proc = subprocess.Popen(self.command.argv(job.uri, job.reason), env=self.command.env(), stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True)
        deadline = time.monotonic() + self.job_timeout_s
        beat = max(0.05, self.queue.lease_s / 4)
        while True:
            try:
                out, _ = proc.communicate(timeout=max(0.01, min(beat, deadline - time.monotonic())))
                return proc.returncode, (out or "")[-2000:]
            except subprocess.TimeoutExpired:
                pass
            if time.monotonic() >= deadline:
                why = f"killed after {self.job_timeout_s:.0f} s"
            elif not self.queue.heartbeat(job):
                why = "killed: its lease was taken over by another process"
            else:
                continue
            proc.kill()
            out, _ = proc.communicate()
            return TIMED_OUT, why + "\n" + (out or "")[-1800:]

    def _loop(self):
        while not self._stop.is_set():
            if not self.run_one():
                self._stop.wait(self.poll_s)

    def drain(self):
        """Run every queued gate in the calling thread (the watcher's `--once`)."""
        while self.run_one():
            pass
