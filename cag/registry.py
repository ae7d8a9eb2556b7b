"""The registry of knowledge bases: every name on disk or in Redis, where its cache lives, how big, how used.

A knowledge base is registered by its record (settings in kb.json: model, template instruction,
policies; and its owner); its cache may live in several tiers at once, or in none (dropped: the next
load rebuilds it). A deleted one leaves a tombstone in the shared tier, so no replica lists it again.
One whose record is damaged is left out of the listing (the store logs why: a listing is everyone's,
and no single knowledge base may break it) and can still be removed.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

from . import paths
from .errors import CacheFileError, CagError, NotFoundError
from .cache.policies import Policy
from .cache.stores import TieredStore


def rows(store: TieredStore) -> list[dict]:
    """name, owner, model, tokens, documents, bytes, created, status, tiers, hits, age_s, policy, parent.

    A sharded knowledge base's row adds up its shards (tokens, bytes, hits; the latest creation time); each
    shard has a row of its own too, naming its `parent`."""
    out = [_row(name, store) for name in store.names()]
    out = [row for row in out if row is not None]
    by_name = {row["name"]: row for row in out}
    for row in out:
        shards = [by_name[s] for s in row.pop("shards", None) or () if s in by_name]
        if shards:
            row.update(tokens=sum(r["tokens"] or 0 for r in shards), bytes=sum(r["bytes"] or 0 for r in shards),
                       created=max((r["created"] for r in shards if r["created"]), default=None),
                       tiers=sorted({t for r in shards for t in r["tiers"]}), hits=sum(r["hits"] for r in shards),
                       status=f"sharded: {len(shards)} shards" + ("" if all(r["status"] == "ok" for r in shards)
                                                                   else " (some not cached)"))
    return out


def _row(name: str, store: TieredStore) -> dict | None:
    record = store.record(name)
    if record is None:
        return None  # deleted elsewhere since its local copy was made, or its record is damaged
    meta, snapshot = record.meta, store.snapshot(name)
    row = {"name": name, "owner": record.owner, "model": meta.get("model"), "engine": meta.get("engine") or "torch",
           "policy": Policy.from_meta(meta).to_json(), "parent": meta.get("parent"),
           "shards": meta.get("shards")}
    try:
        tiers = store.info(name)
        status = "ok" if tiers else "not cached (the next load rebuilds it)"
    except CacheFileError as err:
        tiers, status = {}, f"broken: {err}"
    where = tiers.get("disk") or next(iter(tiers.values()), {})
    built = meta.get("built_at")
    row.update(tokens=where.get("tokens"), documents=len(snapshot) if snapshot is not None else None,
               bytes=where.get("bytes"), created=where.get("created"), status=status, tiers=list(tiers),
               hits=sum(i.get("hits", 0) for i in tiers.values()),
               age_s=round(time.time() - built, 1) if built else _age(where.get("created")))
    return row


def delete(name: str, store: TieredStore) -> None:
    """Remove the knowledge base everywhere: caches in every tier, its settings, owner and saved text,
    on every replica (a tombstone in the shared tier; refused, changing nothing, while it is down)."""
    record = store.record(name)
    if record is None:
        if name not in store.names():
            raise NotFoundError(f"no knowledge base named {name!r} in {paths.kbs_dir()}")
        store.delete(name)  # its record is damaged (the store said why): whatever is left of it goes
        return
    parent = record.meta.get("parent")
    if parent:
        raise CagError(f"{name!r} is one shard of the knowledge base {parent!r}; a shard alone cannot be removed "
                       f"(its questions would have nowhere to go): remove the whole one with `cag rm {parent}`")
    for shard in record.meta.get("shards") or ():
        if store.record(shard) is not None:
            store.delete(shard)
    store.delete(name)


def _age(created: str | None) -> float | None:
    try:
        when = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    except (TypeError, ValueError):
        return None  # none recorded, or not in the manifest's format
    return round(time.time() - when.timestamp(), 1)
