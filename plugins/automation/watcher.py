"""The polling watcher: find model versions no gate has decided, and queue them.

For stores without webhooks (file stores, older or locked-down servers). Every `interval`
seconds it lists the registered models and their versions and queues each version that has no
`trojan_gate.verdict` yet: registered by `trojan-gate intake` (status pending) or straight through
MLflow (the gate adopts it first). Guarded models (`NAME-guarded`), registered scan calibrations
and patched versions a gate is still registering are skipped. MLflow's search filters cannot ask for a missing tag, so the
watcher reads the tags of every version itself, page after page, with no filter string (a model
name holding a quote cannot break one). A version left `pending` by a gate that was killed (its
gate run ended, or is older than `STALE_GATE_S`) is queued again: the reconciliation pass. A pass
that fails (the registry unreachable, a transient error) is logged and retried with a doubling
wait (at most `MAX_BACKOFF_S`); one bad version never stops the others.
"""
from __future__ import annotations

import logging
import time

from mlflow import MlflowClient

from ..registry import every_page, tag

log = logging.getLogger("trojan_gate.watch")

STALE_GATE_S = 6 * 3600.0  # a gate run still "running" after this long was killed (the worker's job timeout)
MAX_BACKOFF_S = 600.0


def skip_reason(model_tags: dict, version_tags: dict, gated_again: bool = False) -> str | None:
    """Why a version is not for a gate (None: gate it): a guarded model or a registered scan
    calibration, a version a gate created (patched), or one already decided unless a gate is
    asked for again."""
    kind = (model_tags or {}).get(tag("kind"))
    if kind in ("guarded", "scan-calibration"):
        return f"a {kind} model"
    if (version_tags or {}).get(tag("patched_from")):
        return "a version a gate created (patched)"
    if (version_tags or {}).get(tag("verdict")) and not gated_again:
        return f"already decided ({version_tags[tag('verdict')]})"
    return None


def registry_skip_reason(client: MlflowClient | None = None):
    """`skip_reason` for one version read back from the registry (what the webhook receiver calls)."""

    def reason(ref, event_reason: str = "") -> str | None:
        c = client or MlflowClient()
        return skip_reason(c.get_registered_model(ref.name).tags, c.get_model_version(ref.name, ref.version).tags,
                           gated_again="regate" in event_reason)

    return reason


def record_given_up(client: MlflowClient | None = None):
    """`GateQueue.on_give_up` for a registry: a version whose gate never finished in the queue's
    attempts gets `verdict=error` with the cause and no alias (unless a gate decided it meanwhile),
    so it is neither left `pending` nor queued again by the reconciliation pass."""
    from ..gate.verdict import drop_aliases
    from ..registry import VersionRef, set_tags

    def give_up(name: str, version: str, cause: str):
        c = client or MlflowClient()
        ref = VersionRef(name, str(version))
        try:
            if c.get_model_version(name, str(version)).tags.get(tag("verdict")) not in (None, "", "pending"):
                return
            drop_aliases(c, ref)
            set_tags(ref, {"verdict": "error", "verdict.error": cause, "gate.state": "done"}, c)
        except Exception as e:  # the registry is down: the next recover() does not see the job again
            log.warning("could not record that models:/%s/%s was given up: %s", name, version, e)

    return give_up


def stale_claim(client, version_tags: dict, now: float | None = None, stale_after_s: float = STALE_GATE_S) -> bool:
    """True when a version's `pending` verdict was left by a gate that no longer runs: its gate run
    ended (finished, failed, killed) or cannot be found, or started more than `stale_after_s` ago."""
    if version_tags.get(tag("verdict")) != "pending":
        return False
    run_id = version_tags.get(tag("gate.run_id"))
    if not run_id:
        return True
    try:
        info = client.get_run(run_id).info
    except Exception as e:
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return True
        raise
    if info.status != "RUNNING":
        return True
    now = time.time() if now is None else now
    return now - info.start_time / 1000.0 > stale_after_s


def ungated_versions(client: MlflowClient | None = None, page_size: int | None = None,
                     stale_after_s: float = STALE_GATE_S) -> list[tuple[str, str, str]]:
    """(name, version, reason) of every version without a verdict, and of every version left
    `pending` by a killed gate, oldest first (`page_size`: results per search call, MLflow's
    default when None). A version whose tags cannot be read is logged and left for the next pass."""
    client = client or MlflowClient()
    size = {} if page_size is None else {"max_results": int(page_size)}
    models = {m.name: m.tags for m in every_page(client.search_registered_models, **size)}
    found = []
    for v in every_page(client.search_model_versions, **size):
        try:
            if v.name not in models:  # registered after the model listing
                models[v.name] = client.get_registered_model(v.name).tags
            tags = dict(v.tags or {})
            if stale_claim(client, tags, stale_after_s=stale_after_s):
                if not skip_reason(models[v.name], {}):
                    found.append((v.name, str(v.version), "watcher: pending, its gate no longer runs"))
            elif not skip_reason(models[v.name], tags):
                found.append((v.name, str(v.version), "watcher: no verdict"))
        except Exception as e:  # one unreadable version never stops the pass
            log.warning("models:/%s/%s skipped this pass: %s: %s", v.name, v.version, type(e).__name__, e)
    return sorted(found, key=lambda f: (f[0], int(f[1])))


def watch(queue, workers, interval_s: float = 60.0, once: bool = False, client: MlflowClient | None = None,
          stop=None, max_backoff_s: float = MAX_BACKOFF_S) -> int:
    """Queue every ungated version, every `interval_s` seconds; with `once`, one pass and then run the
    queue dry in this thread. A failed pass waits twice as long as the last (at most `max_backoff_s`)
    before the next. Returns how many versions were queued."""
    queued, failures = 0, 0
    while True:
        try:
            for name, version, reason in ungated_versions(client):
                if queue.enqueue(name, version, reason) == "queued":
                    queued += 1
                    log.info("queued models:/%s/%s (%s)", name, version, reason)
            failures = 0
        except Exception as e:
            failures += 1
            log.warning("watch pass failed (%d in a row): %s: %s", failures, type(e).__name__, e)
            if once:
                raise
        if once:
            workers.drain()
            return queued
        wait = interval_s if not failures else min(max_backoff_s, interval_s * 2 ** failures)
        if stop is not None and stop.wait(wait):
            return queued
        if stop is None:
            time.sleep(wait)
