"""Redis tier: caches shared between processes and machines, with expiry, tombstones and events.

Layout per knowledge base NAME (all under the `cag:` prefix):
  cag:NAME:chunk:GEN:I   raw bytes of the cache file (kvfile format), in pieces far below Redis's 512 MB cap
  cag:NAME:manifest      JSON: generation, chunk count, byte count, kvfile manifest — written LAST
  cag:NAME:record        JSON: kb.json settings + owner; after a delete, the tombstone {"deleted_at"} (no expiry)
  cag:NAME:snapshot      JSON: the knowledge text (so an empty CAG_HOME can answer)
  cag:NAME:version       the published version
  cag:NAME:hits          hit counter
  channel cag:events     invalidate / version / delete events (cag.events.Event as JSON)
A reader starts from the manifest, so it never sees a half-written cache: the chunks of a new
generation are all in place before the manifest points at them, and the previous generation's chunks
are only set to expire, not deleted, so a reader in the middle of fetching them still finishes.
The bytes are the same verified file format as on disk (checksums, signature, fingerprints).

Redis is a shared tier, not a single point of failure: after a failed call every call fails at once
(RedisError, which the tiered store turns into "serve from the local tiers") for a short interval
that doubles with each further failure (0.5 s up to 10 s), so a dead Redis costs one connection
attempt per interval, not one per request. The events listener resubscribes on the same schedule.
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

from .. import kvfile
from ...errors import CagError
from ..events import Event
from ..kvfile import Expect
from .base import Entry, Record, Store, Tombstone, save_file

DEFAULT_CHUNK_BYTES = 64 << 20
OLD_GENERATION_GRACE_MS = 60_000
EVENTS_CHANNEL = "cag:events"
FIRST_RETRY_S, MAX_RETRY_S = 0.5, 10.0

log = logging.getLogger("cag.stores")


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
        self.client = redis_py.Redis.from_url(url, socket_connect_timeout=2, socket_timeout=30,
                                              health_check_interval=15)
        self.health = Health(self.url)
        self._closed = threading.Event()

    # -- the KV cache ------------------------------------------------------------------------------
    def get(self, name: str, expect: Expect, device: torch.device | str) -> Entry | None:
        with self._talk():
            for _ in range(2):  # a writer may replace the generation between reading manifest and chunks
                head = self.client.get(self._key(name, "manifest"))
                if head is None:
                    return None
                head = json.loads(head)
                chunks = self.client.mget([self._key(name, "chunk", head["gen"], i) for i in range(head["chunks"])])
                if all(c is not None for c in chunks):
                    break
            else:
                return None
            record_raw, snapshot_raw = self.client.mget([self._key(name, "record"), self._key(name, "snapshot")])
            self.client.incr(self._key(name, "hits"))
        data = b"".join(chunks)
        record = _record(name, record_raw)
        if len(data) != head["bytes"] or not isinstance(record, Record) or snapshot_raw is None:
            return None
        loaded = kvfile.load_bytes(data, expect, device=device, where=f"redis cache {name!r} at {self.url}")
        return Entry(name, loaded.layers, loaded.prefix_ids, loaded.manifest, record.meta, json.loads(snapshot_raw),
                     owner=record.owner, stored_at=head.get("stored_at", time.time()))

    def put(self, entry: Entry) -> dict:
        with _scratch() as path:
            full = save_file(path, entry)
            data = path.read_bytes()
        gen = uuid.uuid4().hex[:12]
        pieces = [data[i:i + self.chunk_bytes] for i in range(0, len(data), self.chunk_bytes)]
        px = self._ttl_ms(entry.meta)
        head = {"gen": gen, "chunks": len(pieces), "bytes": len(data), "stored_at": time.time(),
                "tokens": full.get("tokens"), "created": full.get("created")}
        with self._talk():
            if self._buried(entry.record):
                return full
            old = self.client.get(self._key(entry.name, "manifest"))
            pipe = self.client.pipeline(transaction=False)
            for i, piece in enumerate(pieces):
                pipe.set(self._key(entry.name, "chunk", gen, i), piece, px=px)
            self._write_record(pipe, entry.record, entry.snapshot, px)
            pipe.execute()
            self.client.set(self._key(entry.name, "manifest"), json.dumps(head), px=px)  # last: now readers see it
            if old is not None:
                self._expire_generation(entry.name, json.loads(old))
        return full

    def drop(self, name: str) -> bool:
        """Remove the cache (readers stop seeing it at once); the record and text stay for a rebuild."""
        with self._talk():
            old = self.client.get(self._key(name, "manifest"))
            self.client.delete(self._key(name, "manifest"))
            if old is not None:
                self._expire_generation(name, json.loads(old))
        return old is not None

    def has(self, name: str) -> bool:
        with self._talk():
            return bool(self.client.exists(self._key(name, "manifest")))

    def info(self, name: str) -> dict | None:
        with self._talk():
            head = self.client.get(self._key(name, "manifest"))
            hits = self.client.get(self._key(name, "hits"))
            ttl_ms = self.client.pttl(self._key(name, "manifest"))
        if head is None:
            return None
        head = json.loads(head)
        return {"bytes": head["bytes"], "tokens": head.get("tokens"), "created": head.get("created"),
                "hits": int(hits or 0), "expires_in_s": ttl_ms / 1000 if ttl_ms and ttl_ms > 0 else None}

    # -- the record --------------------------------------------------------------------------------
    def record(self, name: str) -> Record | Tombstone | None:
        with self._talk():
            return _record(name, self.client.get(self._key(name, "record")))

    def snapshot(self, name: str) -> list[dict] | None:
        with self._talk():
            raw = self.client.get(self._key(name, "snapshot"))
        return json.loads(raw) if raw is not None else None

    def put_record(self, record: Record, snapshot: list[dict]) -> None:
        with self._talk():
            if self._buried(record):
                return
            pipe = self.client.pipeline(transaction=False)
            self._write_record(pipe, record, snapshot, self._ttl_ms(record.meta))
            pipe.execute()

    def names(self) -> list[str]:
        with self._talk():
            keys = [k.decode() for k in self.client.scan_iter(match="cag:*:record", count=1000)]
            values = self.client.mget(keys) if keys else []
        names = (k[len("cag:"):-len(":record")] for k in keys)
        return sorted(n for n, raw in zip(names, values) if isinstance(_record(n, raw), Record))

    # -- version and deletion ----------------------------------------------------------------------
    def version(self, name: str) -> int | None:
        with self._talk():
            raw = self.client.get(self._key(name, "version"))
        return int(raw) if raw is not None else None

    def set_version(self, name: str, version: int) -> None:
        with self._talk():
            self.client.set(self._key(name, "version"), int(version))

    def remove(self, name: str, tombstone: Tombstone) -> bool:
        """Delete every key of `name` and leave its tombstone (no expiry: a replica that was down for the
        delete may come back any time later with its own copy, and must find out it is stale)."""
        with self._talk():
            old = self.client.get(self._key(name, "manifest"))
            existed = isinstance(_record(name, self.client.get(self._key(name, "record"))), Record)
            pipe = self.client.pipeline(transaction=False)
            pipe.delete(*(self._key(name, k) for k in ("manifest", "snapshot", "hits", "version")))
            pipe.set(self._key(name, "record"), json.dumps({"deleted_at": tombstone.deleted_at}))
            pipe.execute()
            if old is not None:
                self._expire_generation(name, json.loads(old))
        return existed or old is not None

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

    def _ttl_ms(self, meta: dict) -> int | None:
        ttl = (meta.get("policy") or {}).get("ttl_s") or self.ttl_s
        return max(1, int(ttl * 1000)) if ttl else None

    def _write_record(self, pipe, record: Record, snapshot: list[dict], px: int | None) -> None:
        pipe.set(self._key(record.name, "record"), json.dumps({"meta": record.meta, "owner": record.owner}), px=px)
        pipe.set(self._key(record.name, "snapshot"), json.dumps(snapshot, ensure_ascii=False), px=px)

    def _buried(self, record: Record) -> bool:
        """A copy built before the knowledge base was deleted must not come back (a late write-through)."""
        found = _record(record.name, self.client.get(self._key(record.name, "record")))
        if isinstance(found, Tombstone) and found.buries(record):
            log.warning("not writing %r to Redis: it was deleted after this copy was built", record.name)
            return True
        return False

    def _expire_generation(self, name: str, head: dict) -> None:
        pipe = self.client.pipeline(transaction=False)
        for i in range(head.get("chunks", 0)):
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


def _record(name: str, raw: bytes | None) -> Record | Tombstone | None:
    if raw is None:
        return None
    data = json.loads(raw)
    if "deleted_at" in data:
        return Tombstone(name, float(data["deleted_at"]))
    return Record(name, data["meta"], data.get("owner"))


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
