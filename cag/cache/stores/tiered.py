"""Tiers in front of each other: look up fastest first, promote on a hit, write builds through, and keep
the local tiers consistent with the shared one.

Order is memory -> host -> disk -> redis (whichever are configured). A hit in a slow tier is copied
into every faster one, so the next lookup is served from the fastest. A build is written to every
persistent tier (disk, redis) and nowhere else; memory tiers fill on lookups. An entry evicted from
a memory tier is first handed down to the next tier when no slower tier holds it, so eviction never
loses the only copy.

The shared tier (Redis) has the last word on what exists: a local record older than the shared
tier's record or tombstone is stale and is removed here before anything is served from it (that is
how a replica that missed a delete, or was down for it, never brings the knowledge base back). A
damaged shared record is no word at all: the local copy, if any, is served.
Changes that every process must see (invalidate, publish, delete) go to the shared tier first and
fail, changing nothing, while it cannot be reached; everything else degrades to the local tiers
while Redis is down (logged by the tier). Each time the events listener reconnects, this process
publishes every knowledge base it holds that the shared tier lacks or holds an older build of
(`republish`): what was built during the outage, and what a Redis restarted without persistence
lost, so every replica reaches every knowledge base again within one reconnection (at most 10 s
after Redis is back, plus the uploads). Two replicas publishing the same one is harmless (the newer
build wins, by built_at); a tombstone in Redis wins over any copy built before it.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Callable, Sequence

import torch

from ...errors import CagError
from .. import events, kvfile
from ..events import Event
from ..kvfile import Expect
from .base import Entry, Record, Store, Tombstone
from .disk import DiskStore
from .memory import BudgetError, MemoryStore
from .redis import RedisError

Valid = Callable[[Entry, str], bool]
log = logging.getLogger("cag.stores")


class TieredStore:
    def __init__(self, tiers: Sequence[Store]):
        self.tiers = list(tiers)
        self.local = [t for t in self.tiers if not t.shared]
        self.shared = [t for t in self.tiers if t.shared]
        self._lock = threading.Lock()
        self._listening = False
        self.origin = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"  # names this store's events
        for i, tier in enumerate(self.tiers):
            if isinstance(tier, MemoryStore):
                tier.on_evict = lambda entry, below=self.tiers[i + 1:]: self._demote(entry, below)

    def tier(self, name: str) -> Store | None:
        """One tier, for inspection (tests, benchmarks); reads and writes go through the methods below."""
        return next((t for t in self.tiers if t.name == name), None)

    # -- the KV cache ------------------------------------------------------------------------------
    def get(self, name: str, expect: Expect, device: torch.device | str,
            valid: Valid = lambda entry, tier: True) -> tuple[Entry, str] | None:
        """The entry from the fastest tier holding a valid copy, and that tier's name.

        A copy the policies reject (`valid` is False: expired, old version) is dropped from its tier
        so no later lookup serves it either. An unreachable shared tier is a miss.
        """
        for i, tier in enumerate(self.tiers):
            try:
                entry = tier.get(name, expect, device)
            except RedisError:
                continue
            if entry is None:
                continue
            if not valid(entry, tier.name):
                _reachable(lambda: tier.drop(name), False)
                continue
            for faster in self.tiers[:i]:
                self._offer(faster, entry)
            return entry, tier.name
        return None

    def put(self, entry: Entry) -> dict:
        """Write through to the persistent tiers (the fastest one only if none is persistent). A shared
        tier that is down is written once it is back; the local copy serves meanwhile."""
        targets = [t for t in self.tiers if t.persistent] or self.tiers[:1]
        manifest = entry.manifest
        for tier in targets:
            try:
                stored = tier.put(entry)
            except RedisError:
                _kept_locally(entry.name)
                continue
            if stored and manifest is entry.manifest:
                manifest = stored
        return manifest

    def drop(self, name: str, where: Callable[[Store], bool] = lambda tier: True) -> list[str]:
        """Forget the cache of `name` in the tiers `where` picks (all by default); the tiers that held it."""
        return [t.name for t in self.tiers if where(t) and t.drop(name)]

    def share(self, name: str, layers) -> None:
        """Point the on-device tier at a loaded knowledge base's own prefix tensors (views, same values)
        instead of a second copy, so a loaded knowledge base costs its KV once, not twice."""
        for tier in self.tiers:
            tier.share(name, layers)  # only a tier holding tensors on the device takes them

    def local_file(self, name: str) -> Path | None:
        """Where this machine's disk tier keeps the cache file of `name` (it may not exist; None without a
        disk tier): what `cag inspect` verifies, and what a build's size and a server's check for a changed
        cache are taken from."""
        disk = self.tier("disk")
        return disk.file(name) if isinstance(disk, DiskStore) else None

    def local_manifest(self, name: str) -> dict:
        """The manifest of `name`'s local cache file ({} when there is none); CacheFileError when the file
        is damaged."""
        path = self.local_file(name)
        return kvfile.read_manifest(path) if path is not None and path.is_file() else {}

    def info(self, name: str) -> dict[str, dict]:
        return {t.name: i for t in self.tiers if (i := _reachable(lambda t=t: t.info(name), None)) is not None}

    # -- records -----------------------------------------------------------------------------------
    def record(self, name: str) -> Record | None:
        """Settings and owner of `name`: the newest of the local copy and the shared tier's, or None when
        it does not exist or was deleted after the local copy was made (which is then removed here)."""
        local = self._local_record(name)
        for tier in self.shared:
            try:
                found = tier.record(name)
                if isinstance(found, Tombstone):
                    if local is not None and found.buries(local):
                        log.warning("%r was deleted elsewhere after this copy was made: removing the local copy", name)
                        self._remove_local(name)
                        local = None
                elif found is not None and (local is None or found.built_at > local.built_at):
                    if local is not None:
                        self._refresh_local(found, tier)
                    return found
            except RedisError:
                continue  # unreachable: the local copy is all there is to go on
            return local
        return local

    def snapshot(self, name: str) -> list[dict] | None:
        """The knowledge text saved at build time, from the fastest tier that has it."""
        for tier in self.tiers:
            found = _reachable(lambda: tier.snapshot(name), None)
            if found is not None:
                return found
        return None

    def put_record(self, record: Record, snapshot: list[dict]) -> None:
        """Keep a record without a cache (a sharded knowledge base's parent) in every persistent tier."""
        for tier in self.tiers:
            if not tier.persistent:
                continue
            try:
                tier.put_record(record, snapshot)
            except RedisError:
                _kept_locally(record.name)

    def names(self) -> list[str]:
        """Every knowledge base with a record here or in the shared tier (some may turn out deleted or damaged:
        `record` answers None for those)."""
        found: set[str] = set()
        for tier in self.tiers:
            found.update(_reachable(tier.names, []))
        return sorted(found)

    # -- versions ----------------------------------------------------------------------------------
    def published(self, name: str) -> int | None:
        """The version every replica must serve: the shared tier's word, else (not set there, or down) the local one."""
        for tier in self.shared + self.local:
            version = _reachable(lambda: tier.version(name), None)
            if version is not None:
                return version
        return None

    # -- changes every process must see -----------------------------------------------------------
    def publish(self, name: str, version: int) -> None:
        """Make `version` the only one served, here and (through the shared tier) everywhere."""
        for tier in self.shared + self.local:  # shared first: unreachable means nothing changed
            tier.set_version(name, version)
        self._changed(Event(name, "version", origin=self.origin))

    def invalidate(self, name: str) -> list[str]:
        """Drop the cache of `name` in every tier and every process; the tiers here that held it."""
        dropped = [t.name for t in self.shared if t.drop(name)]  # raises while unreachable: nothing changed
        dropped += self.drop(name, where=lambda tier: not tier.shared)
        self._changed(Event(name, "invalidate", origin=self.origin))
        return dropped

    def delete(self, name: str) -> bool:
        """Remove `name` everywhere, leaving a tombstone in the shared tier; False if nothing held it."""
        tombstone = Tombstone(name, time.time())
        removed = [t.remove(name, tombstone) for t in self.shared]  # raises while unreachable: nothing changed
        removed.append(self._remove_local(name))
        self._changed(Event(name, "delete", at=tombstone.deleted_at, origin=self.origin))
        return any(removed)

    # -- listening to the other processes ----------------------------------------------------------
    def listen(self) -> None:
        """Act on other processes' events from now on (once per store; nothing to do without a shared tier)."""
        with self._lock:
            if self._listening:
                return
            self._listening = True
        for tier in self.shared:
            tier.listen(self._on_event, self._on_reconnect)

    def close(self) -> None:
        for tier in self.tiers:
            tier.close()

    def _on_event(self, event: Event) -> None:
        if event.origin == self.origin or event.kind not in events.KINDS:
            return  # this process acted already when it sent it
        if event.kind == "delete":
            local = self._local_record(event.name)
            if local is None or local.built_at <= event.at:  # not a copy made again after the delete
                self._remove_local(event.name)
        else:
            self.drop(event.name, where=lambda tier: not tier.shared)  # the sender dropped the shared copy
        events.bump(event.name)

    def _on_reconnect(self) -> None:
        """Back in touch with the shared tier: publish what it lacks, and have every loaded knowledge base
        re-check its cache (events sent meanwhile were missed)."""
        try:
            self.republish()
        finally:
            events.bump_all()

    def republish(self) -> list[str]:
        """Write through every knowledge base held here that the shared tier lacks (not there, an older
        build there, or this build without the cache held here): record, knowledge text and cache. That
        is what was built while it was down, and what a Redis restarted without persistence lost. One a
        shared tombstone buries is removed here instead. Racing replicas are safe: the shared tier
        refuses a copy older than what it holds, or than a tombstone, atomically (RedisStore._commit).
        The names written."""
        written = []
        for name in sorted({n for tier in self.local for n in tier.names()}):
            try:
                if self._republish(name):
                    written.append(name)
            except RedisError:
                break  # down again: the next reconnection carries on
            except (CagError, OSError) as err:  # this one's local copy went away or is unreadable: the others go on
                log.warning("could not publish %r to the shared tier: %s", name, err)
        if written:
            log.warning("published again to the shared tier, which lacked them: %s", ", ".join(written))
        return written

    def _republish(self, name: str) -> bool:
        local = self._local_record(name)
        if local is None or self.record(name) is None:  # record(): a tombstone burying this copy removes it
            return False
        cached = any(t.has(name) for t in self.local if t.persistent)
        stale = [t for t in self.shared if _lacks(t, local, cached)]
        if not stale:
            return False
        entry = next((e for t in self.local if t.persistent and (e := t.get(name, Expect(), "cpu")) is not None), None)
        snapshot = entry.snapshot if entry is not None else self.snapshot(name) or []
        for shared in stale:
            if entry is not None:
                shared.put(entry)
            else:
                shared.put_record(local, snapshot)
        return True

    # -- plumbing ----------------------------------------------------------------------------------
    def _local_record(self, name: str) -> Record | None:
        return next((r for t in self.local if (r := t.record(name)) is not None), None)

    def _refresh_local(self, record: Record, shared: Store) -> None:
        """Another process rebuilt `record` since the local copy was made: the local caches are stale
        (the next load takes the shared one), the local record is replaced; what else lives with it
        (a server-created knowledge base's documents) stays."""
        name = record.name
        dropped = self.drop(name, where=lambda tier: not tier.shared)
        snapshot = shared.snapshot(name) or []
        for tier in self.local:
            if tier.persistent:
                tier.put_record(record, snapshot)
        events.bump(name)
        log.info("%r was rebuilt elsewhere: dropped the older local copy (%s)", name, ", ".join(dropped) or "no cache")

    def _remove_local(self, name: str) -> bool:
        removed = [t.remove(name, Tombstone(name, time.time())) for t in self.local]
        events.bump(name)
        return any(removed)

    def _changed(self, event: Event) -> None:
        events.bump(event.name)
        for tier in self.shared:
            try:
                tier.announce(event)
            except RedisError:
                pass  # the change is in the shared tier: the others see it on their next read or reconnect

    def _offer(self, tier: Store, entry: Entry) -> None:
        try:
            tier.put(entry)
        except BudgetError:
            pass  # too big for this tier: it is served from the slower one instead

    def _demote(self, entry: Entry, below: Sequence[Store]) -> None:
        if below and not any(_reachable(lambda t=t: t.has(entry.name), False) for t in below):
            self._offer(below[0], entry)


def _lacks(shared: Store, local: Record, cached: bool) -> bool:
    """Whether `shared` lacks what this process holds of `local`: a build as new (a newer one, or the
    tombstone of a later delete, wins), and its cache when this process has one (a replica may have
    published the same build's record without it)."""
    found = shared.record(local.name)
    if isinstance(found, Tombstone):
        return not found.buries(local)
    if found is None or found.built_at < local.built_at:
        return True
    return found.built_at == local.built_at and cached and not shared.has(local.name)


def _kept_locally(name: str) -> None:
    log.warning("%r is kept in the local tiers only for now; this process publishes it to the shared tier when "
                "it can reach it again", name)


def _reachable(call: Callable[[], object], otherwise):
    """`call()`, or `otherwise` while the shared tier cannot be reached (the tier has logged why)."""
    try:
        return call()
    except RedisError:
        return otherwise
