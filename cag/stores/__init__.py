"""Cache tiers (memory, host, disk, redis) and the process-wide tiered store configured from the environment.

    CAG_MEMORY_BYTES   budget of the in-process, on-device tier (default 2G; 0 turns it off)
    CAG_HOST_BYTES     budget of the CPU-RAM tier, pinned under CUDA (default 0: off)
    CAG_REDIS_URL      redis://host:port/db — share caches between processes and machines
    CAG_REDIS_TTL      seconds a cache lives in Redis unless a knowledge base sets its own TTL
"""

from __future__ import annotations

import os
import re
import threading

from .. import paths
from ..errors import CagError
from .base import Entry, Record, Store, Tombstone, layers_nbytes, matches
from .disk import DiskStore
from .host import HostStore
from .memory import BudgetError, MemoryStore
from .tiered import TieredStore

__all__ = ["Entry", "Record", "Tombstone", "Store", "TieredStore", "MemoryStore", "HostStore", "DiskStore", "BudgetError",
           "layers_nbytes", "matches", "default", "configure", "parse_bytes"]

DEFAULT_MEMORY_BYTES = 2 << 30
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_stores: dict[tuple, TieredStore] = {}
_lock = threading.Lock()


def parse_bytes(value: str | int, what: str) -> int:
    """'2G', '512M', '1048576' -> bytes; anything else is a one-line error naming the setting."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", str(value).lower())
    if not m:
        raise CagError(f"{what} must be a byte count like 1073741824, 512M or 2G (got {value!r})")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def configure(memory_bytes: int | None = None, host_bytes: int | None = None, redis_url: str | None = None,
              redis_ttl_s: float | None = None) -> TieredStore:
    """The tiered store for this CAG_HOME and settings (one per process and setting, so memory tiers are shared)."""
    env = os.environ
    memory = memory_bytes if memory_bytes is not None else parse_bytes(env.get("CAG_MEMORY_BYTES", DEFAULT_MEMORY_BYTES), "CAG_MEMORY_BYTES")
    host = host_bytes if host_bytes is not None else parse_bytes(env.get("CAG_HOST_BYTES", 0), "CAG_HOST_BYTES")
    url = redis_url if redis_url is not None else env.get("CAG_REDIS_URL") or None
    ttl = redis_ttl_s if redis_ttl_s is not None else float(env["CAG_REDIS_TTL"]) if env.get("CAG_REDIS_TTL") else None
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
