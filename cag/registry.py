"""The registry of knowledge bases: every name on disk or in Redis, where its cache lives, how big, how used.

A knowledge base is registered by its record (settings in kb.json: model, template instruction,
policies; and its owner); its cache may live in several tiers at once, or in none (dropped: the next
load rebuilds it). A deleted one leaves a tombstone in the shared tier, so no replica lists it again.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from . import paths
from .errors import CacheFileError, NotFoundError
from .policies import Policy
from .stores import TieredStore


def rows(store: TieredStore) -> list[dict]:
    """name, owner, model, tokens, documents, bytes, created, status, tiers, hits, age_s, policy."""
    out = []
    for name in store.names():
        record = store.record(name)
        if record is None:
            continue  # deleted elsewhere since its local copy was made
        meta, snapshot = record.meta, store.snapshot(name)
        row = {"name": name, "owner": record.owner, "model": meta.get("model"),
               "policy": Policy.from_meta(meta).to_json()}
        try:
            tiers = store.info(name)
            status = "ok" if tiers else "not cached (the next load rebuilds it)"
            if meta.get("shards"):
                status = f"sharded: {', '.join(meta['shards'])}"
        except CacheFileError as err:
            tiers, status = {}, f"broken: {err}"
        where = tiers.get("disk") or next(iter(tiers.values()), {})
        built = meta.get("built_at")
        row.update(tokens=where.get("tokens"), documents=len(snapshot) if snapshot is not None else None,
                   bytes=where.get("bytes"), created=where.get("created"), status=status, tiers=list(tiers),
                   hits=sum(i.get("hits", 0) for i in tiers.values()),
                   age_s=round(time.time() - built, 1) if built else _age(where.get("created")))
        out.append(row)
    return out


def delete(name: str, store: TieredStore) -> None:
    """Remove the knowledge base everywhere: caches in every tier, its settings, owner and saved text,
    on every replica (a tombstone in the shared tier; refused, changing nothing, while it is down)."""
    if store.record(name) is None:
        raise NotFoundError(f"no knowledge base named {name!r} in {paths.kbs_dir()}")
    store.delete(name)


def _age(created: str | None) -> float | None:
    if not created:
        return None
    when = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return round(time.time() - when.timestamp(), 1)
