"""A persistent gate queue in one SQLite file: survives the receiver's restart, one job per version.

Jobs move queued -> running -> done | error. A version has at most one live (queued or running)
job: enqueueing it again while one is live adds nothing. `claim_next` moves the oldest queued job
to running in one transaction, so several workers never take the same job. A process that died
with jobs running leaves them behind; `recover()` (called when a receiver or watcher starts) puts
them back in the queue: the gate's own registry protocol makes running a gate again safe.

The same file remembers webhook delivery ids (`remember_delivery`), so a replayed delivery is
refused even across a restart.
"""
from __future__ import annotations

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
    enqueued_at REAL NOT NULL, started_at REAL, finished_at REAL, exit_code INTEGER, detail TEXT);
CREATE UNIQUE INDEX IF NOT EXISTS one_live_job ON jobs(name, version) WHERE state IN ('queued', 'running');
CREATE TABLE IF NOT EXISTS deliveries (delivery_id TEXT PRIMARY KEY, received_at REAL NOT NULL);
"""


MAX_ATTEMPTS = 3  # starts of one job before recover() gives up on it


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

    def __init__(self, path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.Lock()
        with self._connect() as db:
            db.executescript(SCHEMA)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        return db

    def enqueue(self, name: str, version: str, reason: str) -> bool:
        """Queue a gate of name/version; False when a live job for it exists already."""
        with self._lock, self._connect() as db:
            try:
                db.execute("INSERT INTO jobs(name, version, reason, enqueued_at) VALUES (?, ?, ?, ?)",
                           (name, str(version), reason, time.time()))
                return True
            except sqlite3.IntegrityError:
                return False

    def claim_next(self) -> Job | None:
        with self._lock, self._connect() as db:
            db.execute("BEGIN IMMEDIATE")
            row = db.execute("SELECT id, name, version, reason, attempts FROM jobs WHERE state = 'queued' "
                             "ORDER BY id LIMIT 1").fetchone()
            if row is None:
                db.execute("COMMIT")
                return None
            db.execute("UPDATE jobs SET state = 'running', started_at = ?, attempts = attempts + 1 WHERE id = ?",
                       (time.time(), row[0]))
            db.execute("COMMIT")
            return Job(row[0], row[1], row[2], row[3], row[4] + 1)

    def finish(self, job: Job, exit_code: int, detail: str = ""):
        state = "done" if exit_code in (0, 1) else "error"
        with self._lock, self._connect() as db:
            db.execute("UPDATE jobs SET state = ?, finished_at = ?, exit_code = ?, detail = ? WHERE id = ?",
                       (state, time.time(), exit_code, detail[-2000:], job.id))

    def recover(self, max_attempts: int = MAX_ATTEMPTS) -> int:
        """Jobs left running by a process that died go back to the queue, unless they have been started
        `max_attempts` times already (a gate that hangs or kills its receiver every time): those end in
        state error. Returns how many were requeued."""
        with self._lock, self._connect() as db:
            db.execute("UPDATE jobs SET state = 'error', finished_at = ?, detail = ? WHERE state = 'running' AND "
                       "attempts >= ?", (time.time(), f"gave up after {max_attempts} attempts that never finished",
                                         int(max_attempts)))
            return db.execute("UPDATE jobs SET state = 'queued' WHERE state = 'running'").rowcount

    def jobs(self) -> list[dict]:
        with self._connect() as db:
            cols = ("id", "name", "version", "reason", "state", "attempts", "exit_code", "detail")
            return [dict(zip(cols, r)) for r in db.execute(f"SELECT {', '.join(cols)} FROM jobs ORDER BY id")]

    def live(self) -> int:
        with self._connect() as db:
            return db.execute("SELECT COUNT(*) FROM jobs WHERE state IN ('queued', 'running')").fetchone()[0]

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
