"""Tiers in front of each other: look up fastest first, promote on a hit, write builds through.

Order is memory -> host -> disk -> redis (whichever are configured). A hit in a slow tier is copied
into every faster one, so the next lookup is served from the fastest. A build is written to every
persistent tier (disk, redis) and nowhere else; memory tiers fill on lookups. An entry evicted from
a memory tier is first handed down to the next tier when no slower tier holds it, so eviction never
loses the only copy.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

from ..kvfile import Expect
from .base import Entry, Store
from .memory import BudgetError, MemoryStore

Valid = Callable[[Entry, str], bool]


class TieredStore:
    def __init__(self, tiers: Sequence[Store]):
        self.tiers = list(tiers)
        for i, tier in enumerate(self.tiers):
            if isinstance(tier, MemoryStore):
                tier.on_evict = lambda entry, below=self.tiers[i + 1:]: self._demote(entry, below)

    def tier(self, name: str) -> Store | None:
        return next((t for t in self.tiers if t.name == name), None)

    def get(self, name: str, expect: Expect, device: torch.device | str,
            valid: Valid = lambda entry, tier: True) -> tuple[Entry, str] | None:
        """The entry from the fastest tier holding a valid copy, and that tier's name.

        A copy the policies reject (`valid` is False: expired, old version) is dropped from its tier
        so no later lookup serves it either.
        """
        for i, tier in enumerate(self.tiers):
            entry = tier.get(name, expect, device)
            if entry is None:
                continue
            if not valid(entry, tier.name):
                tier.drop(name)
                continue
            for faster in self.tiers[:i]:
                self._offer(faster, entry)
            return entry, tier.name
        return None

    def put(self, entry: Entry) -> dict:
        """Write through to the persistent tiers (the fastest one only if none is persistent)."""
        targets = [t for t in self.tiers if t.persistent] or self.tiers[:1]
        manifest = entry.manifest
        for tier in targets:
            stored = tier.put(entry)
            if stored and manifest is entry.manifest:
                manifest = stored
        return manifest

    def drop(self, name: str, where: Callable[[Store], bool] = lambda tier: True) -> list[str]:
        """Forget `name` in every tier (or those `where` picks); returns the tiers that held it."""
        return [t.name for t in self.tiers if where(t) and t.drop(name)]

    def share(self, name: str, layers) -> None:
        """Point the on-device tier at a loaded knowledge base's own prefix tensors (views, same values)
        instead of a second copy, so a loaded knowledge base costs its KV once, not twice."""
        for tier in self.tiers:
            if type(tier) is MemoryStore:
                tier.share(name, layers)

    def settings(self, name: str) -> tuple[dict, list[dict] | None] | None:
        """kb.json and the saved knowledge text: from CAG_HOME, else from Redis (a machine that never built it)."""
        disk, redis = self.tier("disk"), self.tier("redis")
        meta = disk.meta(name) if disk else None
        if meta is not None:
            return meta, disk.snapshot(name)
        return redis.meta(name) if redis else None

    def info(self, name: str) -> dict[str, dict]:
        return {t.name: i for t in self.tiers if (i := t.info(name)) is not None}

    def _offer(self, tier: Store, entry: Entry) -> None:
        try:
            tier.put(entry)
        except BudgetError:
            pass  # too big for this tier: it is served from the slower one instead

    def _demote(self, entry: Entry, below: Sequence[Store]) -> None:
        if below and not any(t.has(entry.name) for t in below):
            self._offer(below[0], entry)
