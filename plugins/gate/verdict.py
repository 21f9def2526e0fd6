"""The gate's registry protocol: claim, re-check, verdict, alias, written in an order a kill cannot break.

States of a version (tags `trojan_gate.gate.state` and `trojan_gate.verdict`):

    (never gated) --claim--> running / pending --finish--> done / passed | patched | blocked
                                    |                       \\--fail--> done / error
                                    \\-- killed: stays running / pending (no alias), re-gated next run

1. **Claim**: the version's aliases are removed first, then `verdict=pending`,
   `gate.state=running`, `gate.run_id=<this run>` and an empty fingerprint are written. From
   here on the version holds no alias until a verdict that allows one is written.
2. **Re-check**: nothing is registered for the version (STRIP tags, guarded model, patched
   version) and no verdict is written unless `gate.run_id` still names this run; a gate that
   lost its claim stops with `GateSuperseded` and writes nothing more.
3. **Finish** (`finish`): descriptive tags first; a block drops aliases again before writing
   `blocked`; the verdict and the fingerprint come next; the alias moves to a passed or patched
   version only after its verdict is written; `gate.state=done` is last.
4. **Fail** (`fail`): while the claim holds, `verdict=error` with its cause and `gate.state=done`.
5. **Reuse** (`recorded_outcome`): a recorded verdict is returned without re-running only when
   `gate.state=done`, the verdict is decided, the fingerprint equals this configuration's, and the
   aliases agree with the verdict (passed: the version holds the alias; patched: the patched
   version does; blocked: no alias).

A kill at any point therefore leaves no alias on a version without a passed or patched verdict,
and the next run either reuses a complete record or gates again. MLflow has no compare-and-set
on tags: across machines the claim is last-writer-wins, re-checked before every write (a
narrow window between a re-check and the write it guards remains); on one machine a file lock
serialises gates and promotions of the same version.
"""
from __future__ import annotations

import contextlib
import fcntl
import hashlib
from pathlib import Path

import mlflow

from trojan_gate.gates import __version__
from trojan_gate.gates.data import default_cache_dir
from trojan_gate.gates.errors import TrojanGateError
from trojan_gate.gates.faults import checkpoint

from ..registry import VersionRef, set_tags, tag, version_tags

PASSED, PATCHED, BLOCKED, ERROR, PENDING = "passed", "patched", "blocked", "error", "pending"
DECIDED = (PASSED, PATCHED, BLOCKED)
EXIT_CODES = {PASSED: 0, PATCHED: 0, BLOCKED: 1, ERROR: 2}
RUNNING, DONE = "running", "done"


class GateSuperseded(TrojanGateError):
    """Another gate claimed this version after this one started; it decides the verdict."""


@contextlib.contextmanager
def version_lock(ref: VersionRef):
    """Serialise gates and promotions of one version on this machine (fcntl lock keyed by store + version)."""
    key = hashlib.sha256(f"{mlflow.get_tracking_uri()}|{ref.name}|{ref.version}".encode()).hexdigest()[:24]
    lock_dir = default_cache_dir() / "locks"
    lock_dir.mkdir(parents=True, exist_ok=True)
    with open(Path(lock_dir) / f"{key}.lock", "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def aliases_of(client, ref: VersionRef) -> list:
    return list(client.get_model_version(ref.name, ref.version).aliases or [])


def drop_aliases(client, ref: VersionRef):
    for a in aliases_of(client, ref):
        client.delete_registered_model_alias(ref.name, a)
        checkpoint("registry.alias-dropped")


def claim(client, ref: VersionRef, run_id: str):
    """Step 1: no alias, then `pending` / `running` under this run's id. The aliases dropped are
    remembered first (`gate.removed_aliases`, joined with any an interrupted gate left there), so a
    gate that passes the version gives them back (`finish`); no other verdict does."""
    held = aliases_of(client, ref)
    if held:
        earlier = version_tags(ref, client).get(tag("gate.removed_aliases"), "")
        set_tags(ref, {"gate.removed_aliases": ",".join(sorted(set(filter(None, earlier.split(","))) | set(held)))},
                 client)
    drop_aliases(client, ref)
    set_tags(ref, {"verdict": PENDING, "gate.state": RUNNING, "gate.run_id": run_id, "gate.fingerprint": "",
                   "verdict.error": "", "gate.version": __version__}, client)
    require_claim(client, ref, run_id)


def require_claim(client, ref: VersionRef, run_id: str):
    """Step 2: raise GateSuperseded unless this run still holds the version."""
    holder = version_tags(ref, client).get(tag("gate.run_id"))
    if holder != run_id:
        raise GateSuperseded(f"another gate ({holder}) claimed {ref.uri} while this one ({run_id}) ran; "
                             "it decides the verdict")


def recorded_outcome(client, ref: VersionRef, fingerprint: str, alias: str) -> dict | None:
    """Step 5: the recorded decision when it may be reused, else None (see the module doc)."""
    tags = version_tags(ref, client)
    verdict = tags.get(tag("verdict"))
    if (tags.get(tag("gate.state")) != DONE or verdict not in DECIDED
            or tags.get(tag("gate.fingerprint")) != fingerprint):
        return None
    superseded_by = tags.get(tag("superseded_by"))
    own = aliases_of(client, ref)
    if verdict == PASSED and alias in own:
        return {"verdict": PASSED, "final": ref.uri, "tags": tags}
    if verdict == BLOCKED and superseded_by and not own:
        from ..registry import resolve

        new = resolve(superseded_by, client=client)
        new_tags = version_tags(new, client)
        if new_tags.get(tag("verdict")) == PATCHED and alias in aliases_of(client, new):
            return {"verdict": PATCHED, "final": new.uri, "tags": tags}
        return None
    if verdict == BLOCKED and not superseded_by and not own:
        return {"verdict": BLOCKED, "final": None, "tags": tags}
    return None


def finish(client, ref: VersionRef, run_id: str, verdict: str, fingerprint: str, alias: str,
           source_tags: dict, new_ref: VersionRef | None = None, new_tags: dict | None = None,
           new_fingerprint: str = ""):
    """Step 3 for a decided gate. `source_tags` / `new_tags` are the descriptive tags (scan,
    STRIP, status); the verdict, fingerprint, alias and state are written here, in order."""
    if verdict not in DECIDED:
        raise ValueError(f"finish writes a decided verdict, not {verdict!r}")
    require_claim(client, ref, run_id)
    common = {"gate.version": __version__, "gate.run_id": run_id, "verdict.error": ""}
    removed = [a for a in version_tags(ref, client).get(tag("gate.removed_aliases"), "").split(",") if a]
    if verdict == PASSED:
        set_tags(ref, {**common, **source_tags, "status": PASSED}, client)
        checkpoint("verdict.tags")
        set_tags(ref, {"verdict": PASSED, "gate.fingerprint": fingerprint}, client)
        checkpoint("verdict.decided")
        set_alias(client, ref, alias)
        for other in removed:  # the aliases the claim took away, back on a version that passed
            if other != alias:
                set_alias(client, ref, other)
        carry_release_aliases(client, ref)
    elif verdict == BLOCKED:
        drop_aliases(client, ref)
        revoke_release(client, ref, run_id)
        set_tags(ref, {**common, **source_tags, "status": BLOCKED}, client)
        checkpoint("verdict.tags")
        set_tags(ref, {"verdict": BLOCKED, "gate.fingerprint": fingerprint}, client)
        checkpoint("verdict.decided")
    else:  # patched: the source is blocked and superseded by the new version, which gets the alias
        drop_aliases(client, ref)
        revoke_release(client, ref, run_id)
        set_tags(ref, {**common, **source_tags, "status": "superseded", "superseded_by": new_ref.uri}, client)
        set_tags(ref, {"verdict": BLOCKED, "gate.fingerprint": fingerprint}, client)
        set_tags(new_ref, {**common, **(new_tags or {}), "status": PATCHED, "patched_from": ref.version,
                           "gate.state": DONE}, client)
        checkpoint("verdict.tags")
        set_tags(new_ref, {"verdict": PATCHED, "gate.fingerprint": new_fingerprint}, client)
        checkpoint("verdict.decided")
        set_alias(client, new_ref, alias)
    checkpoint("verdict.aliased")
    restored = verdict == PASSED and removed  # kept otherwise: a later gate that passes gives them back
    set_tags(ref, {"gate.state": DONE, **({"gate.removed_aliases": ""} if restored else {})}, client)
    checkpoint("verdict.done")


def guarded_versions(client, ref: VersionRef) -> list[VersionRef]:
    """Every guarded model version (every release) made for `ref`, current and earlier: the versions
    of its guarded model whose source tags name `ref`."""
    from ..registry import resolve, versions_of

    uri = version_tags(ref, client).get(tag("guarded_model"))
    if not uri:
        return []
    try:
        name = resolve(uri, client=client).name
    except TrojanGateError:
        return []
    return [VersionRef(v.name, str(v.version)) for v in versions_of(name, client)
            if (v.tags or {}).get(tag("source_model")) == ref.name
            and (v.tags or {}).get(tag("source_version")) == str(ref.version)]


def carry_release_aliases(client, ref: VersionRef):
    """After a pass that made a new release: aliases on the version's earlier releases (a `production`
    that `promote` set) move to the current one, which this gate signed for the same version."""
    current = version_tags(ref, client).get(tag("guarded_model"))
    for old in guarded_versions(client, ref):
        if old.uri == current:
            continue
        for a in aliases_of(client, old):
            client.set_registered_model_alias(old.name, a, current.rsplit("/", 1)[1])
            checkpoint("registry.alias-set")


def revoke_release(client, ref: VersionRef, run_id: str):
    """A version blocked by a later gate loses every release an earlier gate gave it: the guarded
    versions' aliases are dropped and each is tagged `trojan_gate.revoked`, which `serve`, `promote`
    and the guarded model's load (when the registry is reachable) refuse."""
    for guarded in guarded_versions(client, ref):
        drop_aliases(client, guarded)
        set_tags(guarded, {"revoked": f"{ref.uri} blocked by gate run {run_id}"}, client)
    checkpoint("verdict.revoked")


def set_alias(client, ref: VersionRef, alias: str):
    client.set_registered_model_alias(ref.name, alias, ref.version)
    checkpoint("registry.alias-set")


def fail(client, ref: VersionRef, run_id: str, error: str, new_ref: VersionRef | None = None):
    """Step 4: `verdict=error` with its cause while the claim holds (aliases were dropped at the claim)."""
    with contextlib.suppress(Exception):
        if version_tags(ref, client).get(tag("gate.run_id")) != run_id:
            return  # a newer gate owns the version
        for r in filter(None, (new_ref, ref)):
            drop_aliases(client, r)
            set_tags(r, {"verdict": ERROR, "verdict.error": error[:4000], "gate.run_id": run_id,
                         "gate.version": __version__, "gate.fingerprint": "", "gate.state": DONE}, client)
        checkpoint("verdict.failed")

