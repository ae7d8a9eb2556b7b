"""Redis tier: caches shared between processes and machines, with expiry, tombstones and events.

Layout per knowledge base NAME (all under the `cag:` prefix):
  cag:NAME:chunk:GEN:I   raw bytes of the cache file (kvfile format), in pieces far below Redis's 512 MB cap
  cag:NAME:manifest      JSON: generation, chunk count, byte count, kvfile manifest
  cag:NAME:record        JSON: kb.json settings + owner; after a delete, the tombstone {"deleted_at"} (no expiry)
  cag:NAME:snapshot      JSON: the knowledge text (so an empty CAG_HOME can answer)
  cag:NAME:version       the published version
  cag:NAME:hits          hit counter
  channel cag:events     invalidate / version / delete events (cag.events.Event as JSON)
A reader starts from the manifest, so it never sees a half-written cache: the chunks of a new
generation are all in place before one transaction points the manifest at them (with the record and
text), and the previous generation's chunks are only set to expire, not deleted, so a reader in the
middle of fetching them still finishes. That transaction checks the record under WATCH: a tombstone
of a later delete, or a newer build, refuses the write, so no late write brings a deleted knowledge
base back. The bytes are the same verified file format as on disk (checksums, signature, fingerprints).

Redis is shared with other processes and people, so everything read back is checked before use: a key
of the wrong type, bytes that are not JSON, a record, manifest, text, version or counter of the wrong
shape is logged once as damaged and read as missing (that knowledge base is unavailable, or rebuilt),
never an error for a listing or for other knowledge bases. Reads use MGET, which answers nil for a
key of another type where GET would fail the call.

Redis is a shared tier, not a single point of failure: after a failed call every call fails at once
(RedisError, which the tiered store turns into "serve from the local tiers") for a short interval
that doubles with each further failure (0.5 s up to 10 s), so a dead Redis costs one connection
attempt per interval, not one per request. The events listener resubscribes on the same schedule, and
each reconnection lets the tiered store publish again what Redis lacks (TieredStore.republish), which
also covers a Redis restarted without persistence. Such a Redis has forgotten its tombstones too: a
replica that missed a delete and still holds its copy publishes it again then. Run Redis with AOF or
RDB where deletes must survive its restart.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Callable, Iterator

import torch

from ...errors import CagError
from .. import kvfile
from ..events import Event
from ..kvfile import KV, Expect
from .base import (
    Entry,
    Record,
    Store,
    Tombstone,
    checked_number,
    checked_record,
    checked_snapshot,
    damaged,
    loads,
    save_file,
    valid_name,
)

DEFAULT_CHUNK_BYTES = 64 << 20
MAX_CHUNKS = 1 << 16  # far more than any cache has (4 TiB at the default size): a manifest claiming more is junk
OLD_GENERATION_GRACE_MS = 60_000
WRITE_TRIES = 10  # transactions started over because another process changed the record meanwhile
EVENTS_CHANNEL = "cag:events"
FIRST_RETRY_S, MAX_RETRY_S = 0.5, 10.0

log = logging.getLogger("cag.stores")
_GEN = re.compile(r"[0-9a-f]{1,32}")


class RedisError(CagError):
    """Redis could not be reached or answered with an error."""


class Health:
    """Whether Redis answered last time; after a failure, calls fail at once for a short, growing interval."""

    def __init__(self, url: str):
        self.url, self.interval, self.until, self.last = url, 0.0, 0.0, ""
        self._lock = threading.Lock()

    def check(self) -> None:
        wait = self.until - time.monotonic()
        if wait > 0:
            raise RedisError(f"Redis at {self.url} is unreachable ({self.last}); next try in {wait:.1f} s; "
                             "check CAG_REDIS_URL / --redis and that the server runs")

    def failed(self, err: BaseException) -> None:
        with self._lock:
            now = time.monotonic()
            if now < self.until:
                return  # a call that started before the failure was noticed: the interval is already set
            self.interval = min(MAX_RETRY_S, self.interval * 2) if self.interval else FIRST_RETRY_S
            self.until, self.last = now + self.interval, str(err)
        log.warning("Redis at %s failed (%s); serving from the local tiers, next try in %.1f s",
                    self.url, err, self.interval)

    def ok(self) -> None:
        if self.interval:
            with self._lock:
                self.interval, self.until = 0.0, 0.0
            log.warning("Redis at %s answers again", self.url)

    def wait(self) -> float:
        """Seconds until the next try."""
        return max(0.0, self.until - time.monotonic())


class RedisStore(Store):
    name = "redis"
    persistent = True
    shared = True

    def __init__(self, url: str, ttl_s: float | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        import redis as redis_py  # the redis-py package, not this module

        self.url, self.ttl_s, self.chunk_bytes = re.sub(r"//[^@/]*@", "//***@", url), ttl_s, int(chunk_bytes)
        self._errors = (redis_py.RedisError, OSError)
        self._watch_error, self._response_error = redis_py.WatchError, redis_py.ResponseError
        self.client = redis_py.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=30,
                                              health_check_interval=15)
        self.health = Health(self.url)
        self._closed = threading.Event()

    # -- the KV cache ------------------------------------------------------------------------------
    def get(self, name: str, expect: Expect, device: torch.device | str) -> Entry | None:
        with self._talk():
            for _ in range(2):  # a writer may replace the generation between reading manifest and chunks
                head = self._head(name)
                if head is None:
                    return None
                chunks = self._read(*(self._key(name, "chunk", head["gen"], i) for i in range(head["chunks"])))
                if all(c is not None for c in chunks):
                    break
            else:
                return None
            record_raw, snapshot_raw = self._read(self._key(name, "record"), self._key(name, "snapshot"))
            self._count_hit(name)
        record, snapshot = self._record(name, record_raw), self._snapshot(name, snapshot_raw)
        if not isinstance(record, Record) or snapshot is None:
            return None
        data = b"".join(chunks)
        if len(data) != head["bytes"]:
            damaged(name, f"cache in Redis at {self.url}", f"{len(data)} bytes where its manifest says {head['bytes']}")
            return None
        loaded = kvfile.load_bytes(data, expect, device=device, where=f"redis cache {name!r} at {self.url}")
        return Entry.loaded(name, loaded, record, snapshot, stored_at=head.get("stored_at") or time.time())

    def put(self, entry: Entry) -> dict:
        """Upload the chunks of a new generation, then switch record, text and manifest to it at once,
        unless the record here outranks this copy (see _commit)."""
        with _scratch() as path:
            full = save_file(path, entry)
            data = path.read_bytes()
        gen = uuid.uuid4().hex[:12]
        pieces = [data[i:i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)]
        px = self._ttl_ms(entry.meta)
        head = {"gen": gen, "chunks": len(pieces), "bytes": len(data), "stored_at": time.time(),
                "tokens": full.get("tokens"), "created": full.get("created")}
        with self._talk():
            if self._outranked(entry.record, *self._read(self._key(entry.name, "record"))):
                return full  # known before uploading anything
            pipe = self.client.pipeline(transaction=False)
            for i, piece in enumerate(pieces):
                pipe.set(self._key(entry.name, "chunk", gen, i), piece, px=px)
            pipe.execute()
            written, old = self._commit(entry.record, entry.snapshot, px, head)
            if not written or old is not None:
                self._expire_generation(entry.name, old if written else head)
        return full

    def drop(self, name: str) -> bool:
        """Remove the cache (readers stop seeing it at once); the record and text stay for a rebuild."""
        with self._talk():
            (old,) = self._read(self._key(name, "manifest"))
            existed = bool(self.client.delete(self._key(name, "manifest")))
            head = _head_or_none(old)
            if head is not None:
                self._expire_generation(name, head)
        return existed

    def has(self, name: str) -> bool:
        with self._talk():
            return self._head(name) is not None

    def info(self, name: str) -> dict | None:
        with self._talk():
            raw, hits = self._read(self._key(name, "manifest"), self._key(name, "hits"))
            ttl_ms = self.client.pttl(self._key(name, "manifest"))
        head = self._parse_head(name, raw)
        if head is None:
            return None
        return {"bytes": head["bytes"], "tokens": head.get("tokens"), "created": head.get("created"),
                "hits": self._hits(name, hits), "expires_in_s": ttl_ms / 1000 if ttl_ms and ttl_ms > 0 else None}

    def share(self, name: str, layers: KV) -> None:
        """Nothing: Redis holds the cache file's bytes, for other processes."""

    # -- the record --------------------------------------------------------------------------------
    def record(self, name: str) -> Record | Tombstone | None:
        with self._talk():
            (raw,) = self._read(self._key(name, "record"))
        return self._record(name, raw)

    def snapshot(self, name: str) -> list[dict] | None:
        with self._talk():
            (raw,) = self._read(self._key(name, "snapshot"))
        return self._snapshot(name, raw)

    def put_record(self, record: Record, snapshot: list[dict]) -> None:
        with self._talk():
            self._commit(record, snapshot, self._ttl_ms(record.meta))

    def names(self) -> list[str]:
        with self._talk():
            keys = [k.decode(errors="replace") for k in self.client.scan_iter(match="cag:*:record", count=1000)]
            keys = [k for k in keys if valid_name(k[len("cag:"):-len(":record")])]  # junk keys name no knowledge base
            values = self._read(*keys) if keys else []
        names = (k[len("cag:"):-len(":record")] for k in keys)
        return sorted(n for n, raw in zip(names, values) if raw is not None and not _tombstone_like(raw))

    # -- version and deletion ----------------------------------------------------------------------
    def version(self, name: str) -> int | None:
        with self._talk():
            (raw,) = self._read(self._key(name, "version"))
        if raw is None:
            return None
        try:
            return checked_number(loads(raw), whole=True)
        except ValueError as err:
            damaged(name, f"published version in Redis at {self.url}", str(err))
            return None

    def set_version(self, name: str, version: int) -> None:
        with self._talk():
            self.client.set(self._key(name, "version"), int(version))

    def remove(self, name: str, tombstone: Tombstone) -> bool:
        """Delete every key of `name` and leave its tombstone (no expiry: a replica that was down for the
        delete may come back any time later with its own copy, and must find out it is stale). A damaged
        record counts as one: this is how it is cleaned up."""
        with self._talk():
            found, old = self._read(self._key(name, "record"), self._key(name, "manifest"))
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(*(self._key(name, k) for k in ("manifest", "snapshot", "hits", "version")))
            pipe.set(self._key(name, "record"), json.dumps({"deleted_at": tombstone.deleted_at}))
            pipe.execute()
            head = _head_or_none(old)
            if head is not None:
                self._expire_generation(name, head)
        return (found is not None and not _tombstone_like(found)) or old is not None

    # -- events ------------------------------------------------------------------------------------
    def announce(self, event: Event) -> None:
        with self._talk():
            self.client.publish(EVENTS_CHANNEL, event.encode())

    def listen(self, on_event: Callable[[Event], None], on_reconnect: Callable[[], None]) -> None:
        """Subscribe now (so no event sent after this returns is missed while Redis is up), then deliver
        from a daemon thread that resubscribes after every failure, on the same backoff as other calls."""
        try:
            pubsub = self._subscribe()
        except RedisError:
            pubsub = None  # Redis is down: the thread keeps trying
        threading.Thread(target=self._listen_loop, args=(pubsub, on_event, on_reconnect), daemon=True,
                         name="cag-events").start()

    def close(self) -> None:
        self._closed.set()  # the listener stops within a second
        self.client.close()

    def _listen_loop(self, pubsub, on_event: Callable[[Event], None], on_reconnect: Callable[[], None]) -> None:
        while not self._closed.is_set():
            if pubsub is None:
                if self._closed.wait(self.health.wait()):
                    return
                try:
                    pubsub = self._subscribe()
                except RedisError:
                    continue
                _quietly(on_reconnect)
            try:
                message = pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
            except Exception as err:  # noqa: BLE001 - whatever broke the connection, subscribe again
                self.health.failed(err)
                _quietly(pubsub.close)
                pubsub = None
                continue
            event = Event.decode(message["data"]) if message and message.get("type") == "message" else None
            if event is not None:
                _quietly(lambda: on_event(event))
        if pubsub is not None:
            _quietly(pubsub.close)

    def _subscribe(self):
        with self._talk():
            pubsub = self.client.pubsub(ignore_subscribe_messages=True)
            pubsub.subscribe(EVENTS_CHANNEL)
            return pubsub

    # -- plumbing ---------------------------------------------------------------------------------
    def _key(self, name: str, *parts: object) -> str:
        return ":".join(["cag", name, *map(str, parts)])

    def _read(self, *keys: str) -> list[bytes | None]:
        """The values of `keys`, by MGET even for one: a key holding another type (junk, to cag) reads as
        missing, where GET would fail the call as if Redis were down."""
        return self.client.mget(keys)

    def _ttl_ms(self, meta: dict) -> int | None:
        ttl = (meta.get("policy") or {}).get("ttl_s") or self.ttl_s
        return max(1, int(ttl * 1000)) if ttl else None

    def _write_record(self, pipe, record: Record, snapshot: list[dict], px: int | None) -> None:
        pipe.set(self._key(record.name, "record"), json.dumps({"meta": record.meta, "owner": record.owner}), px=px)
        pipe.set(self._key(record.name, "snapshot"), json.dumps(snapshot, ensure_ascii=False), px=px)

    def _commit(self, record: Record, snapshot: list[dict], px: int | None,
                head: dict | None = None) -> tuple[bool, dict | None]:
        """Write the record and text of `record` (and point the manifest at `head`) in one transaction,
        unless the record here outranks it. The check runs under WATCH of the record and the manifest, so
        a delete or another build landing in between makes it start over: a deleted knowledge base is
        never brought back by a late write (a replica re-publishing its old copy after a restart, say),
        whatever the timing. (written, the manifest it replaced)."""
        key, manifest = self._key(record.name, "record"), self._key(record.name, "manifest")
        for _ in range(WRITE_TRIES):
            with self.client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(key, manifest)
                    found, old = pipe.mget([key, manifest])
                    if self._outranked(record, found):
                        return False, None
                    pipe.multi()
                    self._write_record(pipe, record, snapshot, px)
                    if head is not None:
                        pipe.set(manifest, json.dumps(head), px=px)  # with the record: now readers see it
                    pipe.execute()
                    return True, _head_or_none(old) if head is not None else None
                except self._watch_error:
                    continue
        raise RedisError(f"the record of {record.name!r} in Redis at {self.url} kept changing while this process "
                         "wrote it; try again")

    def _outranked(self, record: Record, raw: bytes | None) -> bool:
        """Whether the record here wins over `record`: the tombstone of a delete after it was built, or a
        newer build (the newest build is the one every replica serves)."""
        found = self._record(record.name, raw)
        if isinstance(found, Tombstone) and found.buries(record):
            log.warning("not writing %r to Redis: it was deleted after this copy was built", record.name)
            return True
        if isinstance(found, Record) and found.built_at > record.built_at:
            log.warning("not writing %r to Redis: it holds a newer build of it", record.name)
            return True
        return False

    def _head(self, name: str) -> dict | None:
        (raw,) = self._read(self._key(name, "manifest"))
        return self._parse_head(name, raw)

    def _parse_head(self, name: str, raw: bytes | None) -> dict | None:
        try:
            return _checked_head(raw) if raw is not None else None
        except ValueError as err:
            damaged(name, f"cache manifest in Redis at {self.url}", str(err))
            return None

    def _record(self, name: str, raw: bytes | None) -> Record | Tombstone | None:
        if raw is None:
            return None
        try:
            data = loads(raw)
            if isinstance(data, dict) and "deleted_at" in data:
                return Tombstone(name, checked_number(data["deleted_at"]))
            if not isinstance(data, dict) or "meta" not in data:
                raise ValueError("it is not a record written by cag")
            return checked_record(name, data["meta"], data.get("owner"))
        except ValueError as err:
            damaged(name, f"record in Redis at {self.url}", str(err))
            return None

    def _snapshot(self, name: str, raw: bytes | None) -> list[dict] | None:
        try:
            return checked_snapshot(loads(raw)) if raw is not None else None
        except ValueError as err:
            damaged(name, f"knowledge text in Redis at {self.url}", str(err))
            return None

    def _hits(self, name: str, raw: bytes | None) -> int:
        try:
            return checked_number(loads(raw), whole=True) if raw is not None else 0
        except ValueError as err:
            damaged(name, f"hit counter in Redis at {self.url}", str(err))
            return 0

    def _count_hit(self, name: str) -> None:
        try:
            self.client.incr(self._key(name, "hits"))
        except self._response_error as err:  # not a number there: the counter is lost, the answer is not
            damaged(name, f"hit counter in Redis at {self.url}", str(err))

    def _expire_generation(self, name: str, head: dict) -> None:
        pipe = self.client.pipeline(transaction=False)
        for i in range(head["chunks"]):
            pipe.pexpire(self._key(name, "chunk", head["gen"], i), OLD_GENERATION_GRACE_MS)
        pipe.execute()

    @contextmanager
    def _talk(self) -> Iterator[None]:
        self.health.check()
        try:
            yield
        except self._errors as err:
            self.health.failed(err)
            raise RedisError(f"Redis at {self.url} failed: {err}; check CAG_REDIS_URL / --redis and that the server runs") from None
        self.health.ok()


def _checked_head(raw: bytes) -> dict:
    """A cache manifest, checked before any of it is used to name keys or count chunks; ValueError otherwise."""
    head = loads(raw)
    if not isinstance(head, dict):
        raise ValueError("it is not an object")
    gen, chunks, size = head.get("gen"), head.get("chunks"), head.get("bytes")
    if not (isinstance(gen, str) and _GEN.fullmatch(gen)):
        raise ValueError("it names no generation")
    if not (checked_number(chunks, whole=True) >= 1 and chunks <= min(checked_number(size, whole=True), MAX_CHUNKS)):
        raise ValueError(f"{chunks} pieces of {size} bytes")
    if head.get("stored_at") is not None:
        checked_number(head["stored_at"])
    if not (isinstance(head.get("tokens"), (int, type(None))) and isinstance(head.get("created"), (str, type(None)))):
        raise ValueError("its tokens or creation time are of the wrong type")
    return head


def _head_or_none(raw: bytes | None) -> dict | None:
    """The manifest being replaced or removed, if it can be read (a damaged one has no chunks to expire)."""
    try:
        return _checked_head(raw) if raw is not None else None
    except ValueError:
        return None


def _tombstone_like(raw: bytes) -> bool:
    try:
        data = loads(raw)
    except ValueError:
        return False
    return isinstance(data, dict) and "deleted_at" in data


def _quietly(call: Callable[[], object]) -> None:
    """Run a listener callback; a failure is logged, never the end of the listener."""
    try:
        call()
    except Exception:  # noqa: BLE001 - a background thread has nobody to raise to
        log.exception("cag events listener: a callback failed")


@contextmanager
def _scratch() -> Iterator[Path]:
    """A private temp file (in RAM where /dev/shm exists) for kvfile to write the bytes Redis will hold."""
    folder = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    fd, tmp = tempfile.mkstemp(prefix="cag-redis-", suffix=".safetensors", dir=folder)
    os.close(fd)
    try:
        yield Path(tmp)
    finally:
        Path(tmp).unlink(missing_ok=True)
