"""What every cache tier stores and answers to: one Entry per knowledge base, one Store protocol.

An Entry carries everything a process needs to answer from a knowledge base it has never seen: the
prefix KV, the prefix token ids, the cache manifest (what it was made for), the knowledge base's
settings (kb.json), its owner (the tenant that created it through the server; None for the CLI) and
the knowledge text itself. That is what lets a second machine with an empty CAG_HOME answer from a
cache another machine put into Redis, for the same tenant and nobody else.

A Record is the same minus the tensors (what listing, authorizing and rebuilding need); a Tombstone
is what a shared tier keeps of a deleted knowledge base, so that copies made before the delete (on a
replica that was down when it happened) are recognised as stale and never served again.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Protocol, runtime_checkable

import torch

from .. import kvfile
from ..events import Event
from ...engines.torch.kvcompat import KV
from ..kvfile import Expect


@dataclass(frozen=True)
class Record:
    """A knowledge base's settings and owner: everything but its KV and its knowledge text."""

    name: str
    meta: dict  # kb.json: sources, model, dtype, instruction, reserve, policy, built_at
    owner: str | None = None  # the tenant that owns it; None: built by the CLI

    @property
    def built_at(self) -> float:
        return float(self.meta.get("built_at") or 0.0)


@dataclass(frozen=True)
class Tombstone:
    """A knowledge base deleted at `deleted_at`: any copy built before then is stale, wherever it is."""

    name: str
    deleted_at: float

    def buries(self, record: Record) -> bool:
        return record.built_at <= self.deleted_at


@dataclass
class Entry:
    name: str
    layers: KV
    prefix_ids: list[int]
    manifest: dict  # the kvfile manifest: fingerprints, tokens, dtype, created, checksums
    meta: dict  # kb.json: sources, model, dtype, instruction, reserve, policy
    snapshot: list[dict]  # the knowledge as knowledge.to_json gives it
    owner: str | None = None  # see Record.owner
    stored_at: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return layers_nbytes(self.layers)

    @property
    def record(self) -> Record:
        return Record(self.name, self.meta, self.owner)


@runtime_checkable
class Store(Protocol):
    """One cache tier: the one interface every tier implements and every caller goes through.

    The methods' bodies here are the answers of a tier that does not keep that kind of thing (a
    memory tier keeps no versions, only a shared tier has other processes to talk to); tiers
    subclass Store and override what they keep. `get` returns None on a miss; a corrupt or
    mismatched copy raises CacheFileError; a shared tier that cannot be reached raises RedisError.
    """

    name: str  # "memory", "host", "disk" or "redis": what Answer.cache_source reports
    persistent: bool  # survives the process (disk, redis)
    shared: bool = False  # seen by other processes and machines (redis)

    # -- the KV cache ------------------------------------------------------------------------------
    def get(self, name: str, expect: Expect, device: torch.device | str) -> Entry | None: ...

    def put(self, entry: Entry) -> dict | None:
        """Keep `entry` (cache, record and knowledge text); the manifest as written, where a file is written."""

    def drop(self, name: str) -> bool:
        """Forget the cache of `name` but keep its record, so it can be rebuilt; False if there was none."""

    def has(self, name: str) -> bool: ...

    def info(self, name: str) -> dict | None:
        """bytes, tokens, hits (and created, expires_in_s where known) of the cache, or None."""

    # -- the record: settings, owner, knowledge text -------------------------------------------------
    def record(self, name: str) -> Record | Tombstone | None:
        """What this tier knows of `name`: its record, its tombstone (shared tiers), or nothing."""
        return None

    def snapshot(self, name: str) -> list[dict] | None:
        """The knowledge text saved at build time (a machine without the source files answers from it)."""
        return None

    def put_record(self, record: Record, snapshot: list[dict]) -> None:
        """Keep a record without a cache (a sharded knowledge base's parent)."""

    def names(self) -> list[str]:
        """Every knowledge base with a live record in this tier."""
        return []

    # -- the published version ---------------------------------------------------------------------
    def version(self, name: str) -> int | None:
        """The only version of `name` that may be served, if one was published here."""
        return None

    def set_version(self, name: str, version: int) -> None: ...

    # -- deletion ----------------------------------------------------------------------------------
    def remove(self, name: str, tombstone: Tombstone) -> bool:
        """Delete everything of `name` (cache, record, text, version, counters); a shared tier keeps
        `tombstone` in its place. True if there was anything to delete."""
        return self.drop(name)

    # -- events between processes (shared tiers only) ----------------------------------------------
    def announce(self, event: Event) -> None:
        """Tell every other process sharing this tier."""

    def listen(self, on_event: Callable[[Event], None], on_reconnect: Callable[[], None]) -> None:
        """Call `on_event` for every event announced by another process, until close() (`on_reconnect`
        after each reconnection, since events sent meanwhile were missed)."""

    def close(self) -> None:
        """Stop listening and let go of connections."""


def layers_nbytes(layers: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


def matches(manifest: dict, expect: Expect) -> bool:
    """The same checks kvfile.load makes, for tiers that hold tensors already verified once."""
    return kvfile.mismatch(manifest, expect) is None


def save_file(path, entry: Entry) -> dict:
    """Write `entry` in the kvfile format. Only what the cache was made for and the pieces its prefix was
    computed in are carried over from its manifest (plus its KV quantization); tokens, shapes, checksums
    and signature are made afresh."""
    identity = {k: entry.manifest[k] for k in kvfile.CARRIED if k in entry.manifest}
    return kvfile.save(path, entry.layers, entry.prefix_ids, identity, kv_quant=entry.manifest.get("kv_quant"))
