"""What every cache tier stores and answers to: one Entry per knowledge base, one Store interface.

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

import abc
import json
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ... import paths
from ...engines.base import Payload
from ...errors import CagError
from .. import kvfile
from ..events import Event
from ..kvfile import KV, Expect, Loaded

log = logging.getLogger("cag.stores")


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
    state: torch.Tensor | None = None  # an engine's opaque prefix state (llama.cpp) instead of `layers`

    @classmethod
    def of(cls, name: str, payload: Payload, prefix_ids: list[int], manifest: dict, meta: dict,
           snapshot: list[dict], owner: str | None = None, **fields) -> "Entry":
        """What the stores keep of a prefix its engine exported: the one place a Payload becomes an Entry."""
        return cls(name, payload.layers, prefix_ids, manifest, meta, snapshot, owner=owner, state=payload.state,
                   **fields)

    @classmethod
    def loaded(cls, name: str, loaded: Loaded, record: Record, snapshot: list[dict], **fields) -> "Entry":
        """What the stores keep of a cache a tier read back (kvfile.load) with its record and knowledge."""
        return cls.of(name, Payload(loaded.layers, loaded.state), loaded.prefix_ids, loaded.manifest, record.meta,
                      snapshot, owner=record.owner, **fields)

    @property
    def payload(self) -> Payload:
        """The prefix as its engine restores it (Engine.restore)."""
        return Payload(self.layers, self.state)

    @property
    def nbytes(self) -> int:
        return layers_nbytes(self.layers) + (self.state.numel() if self.state is not None else 0)

    @property
    def record(self) -> Record:
        return Record(self.name, self.meta, self.owner)


class Store(abc.ABC):
    """One cache tier: the one interface every tier implements and every caller goes through.

    Every tier answers every method. Where a tier keeps no such thing, its method says what it answers
    instead (a memory tier keeps no versions: `version` is None; only a shared tier has other processes
    to talk to, so announce/listen/close do nothing by default). `get` returns None on a miss; a copy
    whose bytes are corrupt or made for something else raises CacheFileError; a shared tier that cannot
    be reached raises RedisError. Anything a tier reads back that another process, an older version or a
    person wrote and that does not make sense (junk bytes, a record of the wrong shape) is reported once
    with a logged warning and answered as missing: one damaged record never breaks anything else.
    """

    name: str  # "memory", "host", "disk" or "redis": what Answer.cache_source reports
    persistent: bool  # survives the process (disk, redis)
    shared: bool = False  # seen by other processes and machines (redis)

    # -- the KV cache ------------------------------------------------------------------------------
    @abc.abstractmethod
    def get(self, name: str, expect: Expect, device: torch.device | str) -> Entry | None:
        """The whole entry of `name`, its tensors on `device`; None when any part of it is missing or unreadable."""

    @abc.abstractmethod
    def put(self, entry: Entry) -> dict | None:
        """Keep `entry` (cache, record and knowledge text); the manifest as written, where a file is written."""

    @abc.abstractmethod
    def drop(self, name: str) -> bool:
        """Forget the cache of `name` (persistent tiers keep its record, for a rebuild); False if there was none."""

    @abc.abstractmethod
    def has(self, name: str) -> bool:
        """Whether a readable cache of `name` is here (what eviction asks before handing an entry down)."""

    @abc.abstractmethod
    def info(self, name: str) -> dict | None:
        """bytes, tokens, hits (and created, expires_in_s where known) of the cache, or None."""

    @abc.abstractmethod
    def share(self, name: str, layers: KV) -> None:
        """Hold `layers` (a loaded knowledge base's own prefix tensors: the same values as the cache of `name`
        here) instead of a copy of them, so a loaded knowledge base costs its KV once. Only a tier that keeps
        tensors on the model's device can; the others keep a copy elsewhere on purpose and do nothing."""

    # -- the record: settings, owner, knowledge text -------------------------------------------------
    @abc.abstractmethod
    def record(self, name: str) -> Record | Tombstone | None:
        """What this tier knows of `name`: its record, its tombstone (shared tiers), or nothing."""

    @abc.abstractmethod
    def snapshot(self, name: str) -> list[dict] | None:
        """The knowledge text saved at build time (a machine without the source files answers from it)."""

    @abc.abstractmethod
    def put_record(self, record: Record, snapshot: list[dict]) -> None:
        """Keep a record without a cache (a sharded knowledge base's parent)."""

    @abc.abstractmethod
    def names(self) -> list[str]:
        """Every knowledge base with a record here that is not a tombstone, readable or not: `record` answers
        None for a damaged one, and `remove` removes it."""

    # -- the published version ---------------------------------------------------------------------
    @abc.abstractmethod
    def version(self, name: str) -> int | None:
        """The only version of `name` that may be served, if one was published here."""

    @abc.abstractmethod
    def set_version(self, name: str, version: int) -> None:
        """Publish `version` as the only one of `name` that may be served."""

    # -- deletion ----------------------------------------------------------------------------------
    @abc.abstractmethod
    def remove(self, name: str, tombstone: Tombstone) -> bool:
        """Delete everything of `name` (cache, record, text, version, counters); a shared tier keeps
        `tombstone` in its place. True if there was anything to delete."""

    # -- events between processes (shared tiers only) ----------------------------------------------
    def announce(self, event: Event) -> None:
        """Tell every other process sharing this tier (a tier no other process sees has nobody to tell)."""

    def listen(self, on_event: Callable[[Event], None], on_reconnect: Callable[[], None]) -> None:
        """Call `on_event` for every event announced by another process, until close() (`on_reconnect`
        after each reconnection, since events sent meanwhile were missed). Nothing to hear in a local tier."""

    def close(self) -> None:
        """Stop listening and let go of connections (a local tier holds none)."""


# -- reading back what any process wrote -------------------------------------------------------------

REQUIRED = ("model", "sources", "instruction", "reserve")  # every build writes them; loading reads them


def _text(value: object) -> bool:
    return isinstance(value, str)


def _texts(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(v, str) for v in value)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _policy(value: object) -> bool:
    return isinstance(value, dict) and all(value.get(k) is None or ok(value[k]) for k, ok in (("ttl_s", _number),
                                                                                              ("version", _whole)))


# each setting a reader interprets, and what it must be; the nullable ones may also be null
_SETTINGS = {"model": _text, "sources": _texts, "instruction": _text, "reserve": _whole, "documents": _texts,
             "dtype": _text, "kv_quant": _text, "built_at": _number, "policy": _policy, "shards": _texts,
             "parent": _text}
_NULLABLE = {"dtype", "kv_quant", "built_at", "policy", "shards", "parent"}


def checked_record(name: str, meta: object, owner: object) -> Record:
    """The Record of `name` from settings and owner a tier read back, checked: the settings are an object
    holding what a knowledge base is loaded with, every setting a reader interprets is of its type, the
    owner is a string or null. Raises ValueError saying what is wrong (the tier then answers as if there
    were no record), so junk fails here, once, instead of wherever a field is first used."""
    if not isinstance(meta, dict):
        raise ValueError(f"its settings are {type(meta).__name__}, not an object")
    if owner is not None and not isinstance(owner, str):
        raise ValueError(f"its owner is {type(owner).__name__}, not a string")
    missing = [key for key in REQUIRED if key not in meta]
    if missing:
        raise ValueError(f"its settings lack {', '.join(missing)}")
    for key, valid in _SETTINGS.items():
        if key in meta and not (valid(meta[key]) or (meta[key] is None and key in _NULLABLE)):
            raise ValueError(f"its setting {key!r} is {_short(meta[key])}")
    return Record(name, meta, owner)


def checked_snapshot(items: object) -> list[dict]:
    """The knowledge text a tier read back, checked to be what knowledge.from_json reads; ValueError otherwise."""
    if not isinstance(items, list) or not all(isinstance(i, dict) and isinstance(i.get("name"), str)
                                              and isinstance(i.get("text"), str) for i in items):
        raise ValueError("the knowledge text is not a list of documents with a name and a text")
    return items


def checked_number(value: object, whole: bool = False) -> float:
    """A finite number (an int when `whole`) read back from a tier; ValueError otherwise."""
    if not (_whole(value) if whole else _number(value)):
        raise ValueError(f"{_short(value)} is not a {'whole ' if whole else ''}number")
    return value


def loads(raw: bytes | str) -> object:
    """json.loads for bytes anyone may have written: whatever cannot be read is a ValueError."""
    try:
        return json.loads(raw)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def valid_name(name: str) -> bool:
    """Whether `name` may name a knowledge base (paths.kb_dir's rule). A folder or Redis key of another
    name was not made by cag and is skipped, not an error for whoever lists."""
    try:
        paths.kb_dir(name)
    except CagError:
        return False
    return True


_reported: set[str] = set()


def damaged(name: str, what: str, why: str) -> None:
    """Warn that the `what` of `name` (naming the tier and where) is unreadable and is treated as missing:
    once per distinct damage, since a listing reads every record on every request."""
    message = (f"knowledge base {name!r}: the {what} is damaged ({why}) and is treated as missing; build it "
               f"again with `cag build` or remove it with `cag rm {name}`")
    if message in _reported:
        return
    if len(_reported) > 1000:
        _reported.clear()
    _reported.add(message)
    log.warning("%s", message)


def _short(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:36] + "…"


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
    if entry.state is not None:
        identity["dtype"] = entry.manifest["dtype"]  # an engine state's KV type: not readable from the bytes
    return kvfile.save(path, entry.layers, entry.prefix_ids, identity, kv_quant=entry.manifest.get("kv_quant"),
                       state=entry.state)
