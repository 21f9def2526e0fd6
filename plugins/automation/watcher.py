"""The polling watcher: find model versions no gate has decided, and queue them.

For stores without webhooks (file stores, older or locked-down servers). Every `interval`
seconds it lists the registered models and their versions and queues each version that has no
`trojan_gate.verdict` yet: registered by `trojan-gate intake` (status pending) or straight through
MLflow (the gate adopts it first). Guarded models (`NAME-guarded`), registered scan calibrations
and patched versions a gate is still registering are skipped. MLflow's search filters cannot ask for a missing tag, so the
watcher reads the tags of each model's versions itself (one search per registered model), page
after page.
"""
from __future__ import annotations

import logging
import time

from mlflow import MlflowClient

from ..registry import tag

log = logging.getLogger("trojan_gate.watch")


def every_page(search, **kwargs):
    """Every result of an MLflow search, page after page (one call returns one page and a token:
    `search_registered_models` stops at 100 models unless asked for the next page)."""
    token = None
    while True:
        page = search(page_token=token, **kwargs)
        yield from page
        token = page.token
        if not token:
            return


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


def ungated_versions(client: MlflowClient | None = None, page_size: int | None = None) -> list[tuple[str, str]]:
    """(name, version) of every version without a verdict, oldest first (`page_size`: results per
    search call, MLflow's default when None)."""
    client = client or MlflowClient()
    size = {} if page_size is None else {"max_results": int(page_size)}
    found = []
    for model in every_page(client.search_registered_models, **size):
        if skip_reason(model.tags, {}):
            continue
        for v in every_page(client.search_model_versions, filter_string=f"name='{model.name}'", **size):
            if skip_reason(model.tags, v.tags):
                continue
            found.append((model.name, str(v.version)))
    return sorted(found, key=lambda nv: (nv[0], int(nv[1])))


def watch(queue, workers, interval_s: float = 60.0, once: bool = False, client: MlflowClient | None = None,
          stop=None) -> int:
    """Queue every ungated version, every `interval_s` seconds; with `once`, one pass and then run the
    queue dry in this thread. Returns how many versions were queued."""
    queued = 0
    while True:
        for name, version in ungated_versions(client):
            if queue.enqueue(name, version, "watcher: no verdict"):
                queued += 1
                log.info("queued models:/%s/%s", name, version)
        if once:
            workers.drain()
            return queued
        if stop is not None and stop.wait(interval_s):
            return queued
        if stop is None:
            time.sleep(interval_s)
