"""The registry of knowledge bases: every name on disk or in Redis, where its cache lives, how big, how used.

A knowledge base is registered by its settings (kb.json: model, template instruction, policies);
its cache may live in several tiers at once, or in none (dropped: the next load rebuilds it).
"""

from __future__ import annotations

import shutil
import time
from datetime import datetime, timezone

from . import paths
from .errors import CacheFileError, NotFoundError
from .policies import Policy
from .stores import TieredStore


def names(store: TieredStore) -> list[str]:
    root = paths.kbs_dir()
    found = {f.name for f in root.iterdir() if (f / "kb.json").is_file()} if root.is_dir() else set()
    redis = store.tier("redis")
    if redis is not None:
        found.update(redis.names())
    return sorted(found)


def rows(store: TieredStore) -> list[dict]:
    """name, model, tokens, documents, bytes, created, status (as before) + tiers, hits, age_s, policy."""
    out = []
    for name in names(store):
        meta, snapshot = store.settings(name) or ({}, None)
        row = {"name": name, "model": meta.get("model"), "policy": Policy.from_meta(meta).to_json()}
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
    """Remove the knowledge base everywhere: caches in every tier, its settings and its saved text."""
    folder = paths.kb_dir(name)
    redis = store.tier("redis")
    in_redis = redis is not None and redis.meta(name) is not None
    if not (folder / "kb.json").is_file() and not in_redis:
        raise NotFoundError(f"no knowledge base named {name!r} in {paths.kbs_dir()}")
    store.drop(name)
    if in_redis:
        redis.forget(name)
    if folder.exists():
        shutil.rmtree(folder)


def _age(created: str | None) -> float | None:
    if not created:
        return None
    when = datetime.strptime(created, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=timezone.utc)
    return round(time.time() - when.timestamp(), 1)
