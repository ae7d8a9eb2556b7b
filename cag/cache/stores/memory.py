"""In-process tier: prefixes kept on the model's device, least recently used evicted past a byte budget.

Eviction calls `on_evict` first, so the tiered store can demote an entry that no slower tier holds:
dropping it from memory never loses the only copy. It keeps whole entries and nothing else: a record
lives here exactly as long as its cache, and versions and records without a cache are kept by the
persistent tiers only. Nothing here was written by another process, so nothing here can be damaged.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import Callable

import torch

from ...errors import CagError
from ..kvfile import KV, Expect
from .base import Entry, Record, Store, Tombstone, matches


class BudgetError(CagError):
    """A cache does not fit a tier's byte budget."""


class MemoryStore(Store):
    name = "memory"
    persistent = False
    shared = False

    def __init__(self, budget_bytes: int, on_evict: Callable[[Entry], None] | None = None, env: str = "CAG_MEMORY_BYTES"):
        self.budget = int(budget_bytes)
        self.on_evict = on_evict
        self.env = env
        self.entries: OrderedDict[str, Entry] = OrderedDict()
        self.hits: dict[str, int] = {}
        self.lock = threading.RLock()

    @property
    def used(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def get(self, name: str, expect: Expect, device: torch.device | str) -> Entry | None:
        with self.lock:
            entry = self.entries.get(name)
            if entry is None or not matches(entry.manifest, expect):
                return None
            out = self._deliver(entry, device)
            if out is not None:
                self.entries.move_to_end(name)
                self.hits[name] = self.hits.get(name, 0) + 1
            return out

    def put(self, entry: Entry) -> None:
        """Keep `entry`, evicting the least recently used ones until it fits; refuse one larger than the budget."""
        if entry.nbytes > self.budget:
            raise BudgetError(
                f"the cache of {entry.name!r} needs {entry.nbytes} bytes but the {self.name} tier's budget is "
                f"{self.budget} bytes; raise {self.env} or use a smaller knowledge base"
            )
        with self.lock:
            self.entries.pop(entry.name, None)
            while self.entries and self.used + entry.nbytes > self.budget:
                _, old = self.entries.popitem(last=False)
                if self.on_evict:
                    self.on_evict(old)
            self.entries[entry.name] = self._keep(entry)

    def drop(self, name: str) -> bool:
        with self.lock:
            return self.entries.pop(name, None) is not None

    def share(self, name: str, layers: KV) -> None:
        with self.lock:
            entry = self.entries.get(name)
            if entry is not None and [k.shape for k, _ in entry.layers] == [k.shape for k, _ in layers]:
                entry.layers = layers

    def has(self, name: str) -> bool:
        return name in self.entries

    def info(self, name: str) -> dict | None:
        entry = self.entries.get(name)
        if entry is None:
            return None
        return {"bytes": entry.nbytes, "tokens": len(entry.prefix_ids), "hits": self.hits.get(name, 0),
                "stored_at": entry.stored_at}

    def record(self, name: str) -> Record | None:
        entry = self.entries.get(name)
        return entry.record if entry is not None else None

    def snapshot(self, name: str) -> list[dict] | None:
        entry = self.entries.get(name)
        return entry.snapshot if entry is not None else None

    def put_record(self, record: Record, snapshot: list[dict]) -> None:
        """Nothing: a record without a cache has no tensors to keep close (the persistent tiers keep it)."""

    def names(self) -> list[str]:
        return sorted(self.entries)

    def version(self, name: str) -> int | None:
        """None: versions are published to the persistent tiers, which every process reads."""
        return None

    def set_version(self, name: str, version: int) -> None:
        """Nothing (see version)."""

    def remove(self, name: str, tombstone: Tombstone | None = None) -> bool:
        """The entry is everything this tier holds of `name`; no tombstone (no other process looks here)."""
        return self.drop(name)

    def _keep(self, entry: Entry) -> Entry:
        return entry  # the caller's tensors, on its device: no copy

    def _deliver(self, entry: Entry, device: torch.device | str) -> Entry | None:
        held = entry.layers[0][0] if entry.layers else entry.state  # an engine's state bytes live on the CPU
        return entry if held is not None and held.device.type == torch.device(device).type else None
