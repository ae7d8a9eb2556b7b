"""When a cache may still be served: per knowledge base TTL and version, checked on every lookup.

- TTL: a cache older than `ttl_s` seconds (since its prefill) is not served; it is rebuilt. In Redis
  the keys also expire on their own.
- Content hash: the knowledge files' sha256 is in the cache manifest; api.load rebuilds on a change.
- Version: `cag.publish(name, N)` records N as the only servable version (in Redis when configured,
  so every replica sees it, and in CAG_HOME: TieredStore.publish / published); a cache built as any
  other version is refused and rebuilt.
- Events: see cag.events (drop a knowledge base's cache in every process at once).
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass

from .stores import Entry


@dataclass(frozen=True)
class Policy:
    ttl_s: float | None = None  # serve a cache at most this long after its prefill
    version: int | None = None  # the version this build is; refused once another one is published

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}

    @classmethod
    def from_meta(cls, meta: dict) -> "Policy":
        p = meta.get("policy") or {}
        return cls(ttl_s=p.get("ttl_s"), version=p.get("version"))


def expired(meta: dict, now: float | None = None) -> bool:
    ttl = Policy.from_meta(meta).ttl_s
    return ttl is not None and (now or time.time()) - meta.get("built_at", 0.0) > ttl


def servable(entry: Entry, published: int | None) -> bool:
    if expired(entry.meta):
        return False
    return published is None or Policy.from_meta(entry.meta).version == published
