"""Cache tiers (memory, host, disk, redis) and the process-wide tiered store configured from the environment
(CAG_MEMORY_BYTES, CAG_HOST_BYTES, CAG_REDIS_URL, CAG_REDIS_TTL: see cag.settings)."""

from __future__ import annotations

import threading

from ... import paths, settings
from ...settings import parse_bytes
from .base import Entry, Record, Store, Tombstone, layers_nbytes, matches
from .disk import DiskStore
from .host import HostStore
from .memory import BudgetError, MemoryStore
from .tiered import TieredStore

__all__ = ["Entry", "Record", "Tombstone", "Store", "TieredStore", "MemoryStore", "HostStore", "DiskStore", "BudgetError",
           "layers_nbytes", "matches", "default", "configure", "parse_bytes"]

_stores: dict[tuple, TieredStore] = {}
_lock = threading.Lock()


def configure(memory_bytes: int | None = None, host_bytes: int | None = None, redis_url: str | None = None,
              redis_ttl_s: float | None = None) -> TieredStore:
    """The tiered store for this CAG_HOME and settings (one per process and setting, so memory tiers are shared)."""
    env = settings.current()
    memory = memory_bytes if memory_bytes is not None else env.memory_bytes
    host = host_bytes if host_bytes is not None else env.host_bytes
    url = redis_url if redis_url is not None else env.redis_url
    ttl = redis_ttl_s if redis_ttl_s is not None else env.redis_ttl_s
    key = (str(paths.home()), memory, host, url, ttl)
    with _lock:
        store = _stores.get(key)
        if store is None:
            tiers: list[Store] = []
            if memory > 0:
                tiers.append(MemoryStore(memory))
            if host > 0:
                tiers.append(HostStore(host))
            tiers.append(DiskStore())
            if url:
                from .redis import RedisStore

                tiers.append(RedisStore(url, ttl_s=ttl))
            store = _stores[key] = TieredStore(tiers)
            store.listen()  # other processes' invalidations, versions and deletes (with a shared tier)
        return store


def default() -> TieredStore:
    return configure()
