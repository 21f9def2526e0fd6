"""A persistent gate queue in one SQLite file: survives the receiver's restart, one job per version.

Jobs move queued -> running -> done | error. A version has at most one live (queued or running)
job: enqueueing it again while one is live adds nothing, and one model gets at most
`MAX_JOBS_PER_MODEL_PER_HOUR` jobs an hour (a tag-happy client cannot keep the workers busy).
`claim_next` moves the oldest queued job to running in one transaction under a *lease*: the job
records its owner (host, process id, a random token) and `lease_until`, which the worker renews
(`heartbeat`) while the gate runs. Any process sharing the file (a receiver and a watcher, two
receivers) puts a running job back in the queue only when its lease has run out, or when its
owner is a process of this host that no longer exists (`recover`, also run before every claim), so
two processes never run one job at once; `finish` and `heartbeat` only act for the owner, so a
worker whose lease was taken over learns it and stops. A job started `MAX_ATTEMPTS` times without
finishing ends in state error. Finished jobs are pruned after `KEEP_FINISHED_S`.

The same file remembers webhook delivery ids (`remember_delivery`), so a replayed delivery is
refused even across a restart; the receiver records an id only once the delivery was handled (its
job queued, or the event answered for good), so a failure before that leaves MLflow's retry welcome.
"""
from __future__ import annotations

import os
import secrets
import socket
import sqlite3
import threading
import time
from dataclasses import dataclass
from pathlib import Path

SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    name TEXT NOT NULL, version TEXT NOT NULL, reason TEXT NOT NULL,
    state TEXT NOT NULL DEFAULT 'queued', attempts INTEGER NOT NULL DEFAULT 0,
    enqueued_at REAL NOT NULL, started_at REAL, finished_at REAL, exit_code INTEGER, detail TEXT,
    owner TEXT, lease_until REAL);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_job ON jobs(name, version) WHERE state IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS deliveries (delivery_id TEXT PRIMARY KEY, received_at REAL NOT NULL);
"""


MAX_ATTEMPTS = 3  # starts of one job before recover() gives up on it
LEASE_S = 60.0  # a running job's lease; its worker renews it every LEASE_S / 4
MAX_JOBS_PER_MODEL_PER_HOUR = 30
KEEP_FINISHED_S = 30 * 86400.0
COLUMNS_ADDED = (("owner", "TEXT"), ("lease_until", "REAL"))  # queue files made before leases


def process_owner() -> str:
    """This process's owner name in the queue: host, process id and a random token."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"


def owner_is_gone(owner: str | None) -> bool:
    """True when `owner` names a process of this host that no longer exists (a crash, a kill)."""
    host, _, rest = (owner or "").partition(":")
    pid = rest.partition(":")[0]
    if host != socket.gethostname() or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, someone else's
        return False
    return False


@dataclass
class Job:
    id: int
    name: str
    version: str
    reason: str
    attempts: int

    @property
    def uri(self) -> str:
        return f"models:/{self.name}/{self.version}"


class GateQueue:
    """The queue file `path` (created on first use)."""

    def __init__(self, path, lease_s: float = LEASE_S, max_per_model_per_hour: int = MAX_JOBS_PER_MODEL_PER_HOUR,
                 on_give_up=None):
        self.on_give_up = on_give_up  # on_give_up(name, version, cause) when recover() gives a job up
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.lease_s, self.max_per_model_per_hour = float(lease_s), int(max_per_model_per_hour)
        self.owner = process_owner()
        self._lock = threading.Lock()
        with self._connect() as db:
            db.executescript(SCHEMA)
            have = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, kind in COLUMNS_ADDED:
                if column not in have:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {kind}")

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def enqueue(self, name: str, version: str, reason: str) -> str:
        """Queue a gate of name/version. Returns "queued", "live" (a queued or running job for it
        exists already: nothing added) or "rate-limited" (the model had `max_per_model_per_hour`
        jobs in the last hour)."""
        now = time.time()
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            try:
                recent = db.execute("SELECT COUNT(*) FROM jobs WHERE name = ? AND enqueued_at > ?",
                                    (name, now - 3600.0)).fetchone()[0]
                if recent >= self.max_per_model_per_hour:
                    return "rate-limited"
                db.execute("INSERT INTO jobs(name, version, reason, enqueued_at) VALUES (?, ?, ?, ?)",
                           (name, str(version), reason, now))
                return "queued"
            except sqlite3.IntegrityError:
                return "live"
            finally:
                db.execute("COMMIT")

    def claim_next(self, lease_s: float | None = None) -> Job | None:
        """The oldest queued job, now running under this queue's owner and a lease of `lease_s`
        (default the queue's); expired leases are recovered first. None when nothing is queued."""
        self.recover()
        lease = self.lease_s if lease_s is None else float(lease_s)
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT id, name, version, reason, attempts FROM jobs WHERE state = 'queued' "
                             "ORDER BY id LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            now = time.time()
            db.execute("UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1, owner = ?, "
                       "lease_until = ? WHERE id = ?", (now, self.owner, now + lease, row[0]))
            db.execute("COMMIT")
            return Job(row[0], row[1], row[2], row[3], row[4] + 1)

    def heartbeat(self, job: Job, lease_s: float | None = None) -> bool:
        """Renew `job`'s lease; False when this process no longer holds it (recovered by another)."""
        lease = self.lease_s if lease_s is None else float(lease_s)
        with self._lock, self._connect() as db:
            return db.execute("UPDATE jobs SET lease_until = ? WHERE id = ? AND owner = ? AND state = 'running'",
                              (time.time() + lease, job.id, self.owner)).rowcount == 1

    def finish(self, job: Job, exit_code: int, detail: str = "") -> bool:
        """Record `job`'s end (done for exit 0 or 1, error otherwise); False, recording nothing,
        when this process no longer holds its lease."""
        state = "done" if exit_code in (0, 1) else "error"
        with self._lock, self._connect() as db:
            return db.execute("UPDATE jobs SET state = ?, finished_at = ?, exit_code = ?, detail = ?, lease_until = "
                              "NULL WHERE id = ? AND owner = ? AND state = 'running'",
                              (state, time.time(), exit_code, detail[-2000:], job.id, self.owner)).rowcount == 1

    def recover(self, max_attempts: int = MAX_ATTEMPTS) -> int:
        """Running jobs whose lease ran out, or whose owner is a dead process of this host, go back to
        the queue, unless they have been started `max_attempts` times already (a gate that hangs or
        kills its receiver every time): those end in state error, and `on_give_up` is told (the
        receiver writes `verdict=error` with the cause, so the version is not left `pending`).
        Finished jobs older than `KEEP_FINISHED_S` are pruned. Returns how many were requeued."""
        now = time.time()
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            rows = db.execute("SELECT id, attempts, owner, lease_until, name, version FROM jobs "
                              "WHERE state = 'running'").fetchall()
            stale = [(i, a, n, v) for i, a, owner, until, n, v in rows
                     if owner != self.owner and (until is None or until < now or owner_is_gone(owner))]
            requeued, given_up = 0, []
            cause = f"gave up after {max_attempts} attempts that never finished"
            for job_id, attempts, name, version in stale:
                if attempts >= max_attempts:
                    db.execute("UPDATE jobs SET state = 'error', finished_at = ?, detail = ?, owner = NULL WHERE "
                               "id = ?", (now, cause, job_id))
                    given_up.append((name, version))
                else:
                    db.execute("UPDATE jobs SET state = 'queued', owner = NULL, lease_until = NULL WHERE id = ?",
                               (job_id,))
                    requeued += 1
            db.execute("DELETE FROM jobs WHERE state IN ('done', 'error') AND finished_at < ?",
                       (now - KEEP_FINISHED_S,))
            db.execute("COMMIT")
        for name, version in given_up:
            if self.on_give_up is not None:
                self.on_give_up(name, version, f"the gate queue {cause} (each was killed or hung)")
        return requeued

    def jobs(self) -> list[dict]:
        with self._connect() as db:
            cols = ("id", "name", "version", "reason", "state", "attempts", "exit_code", "detail")
            return [dict(zip(cols, r)) for r in db.execute(f"SELECT {', '.join(cols)} FROM jobs ORDER BY id")]

    def live(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]

    def seen_delivery(self, delivery_id: str) -> bool:
        """True when a webhook delivery id was recorded before (a replay)."""
        with self._connect() as db:
            return db.execute("SELECT 1 FROM deliveries WHERE delivery_id = ?", (delivery_id,)).fetchone() is not None

    def remember_delivery(self, delivery_id: str, keep_s: float = 7 * 86400) -> bool:
        """Record a webhook delivery id; False if it was seen before (a replay)."""
        now = time.time()
        with self._lock, self._connect() as db:
            db.execute("DELETE FROM deliveries WHERE received_at < ?", (now - keep_s,))
            try:
                db.execute("INSERT INTO deliveries(delivery_id, received_at) VALUES (?, ?)", (delivery_id, now))
                return True
            except sqlite3.IntegrityError:
                return False
