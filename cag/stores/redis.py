"""Redis tier: caches shared between processes and machines, with expiry.

Layout per knowledge base NAME (all under the `cag:` prefix):
  cag:NAME:chunk:GEN:I   raw bytes of the cache file (kvfile format), in pieces far below Redis's 512 MB cap
  cag:NAME:manifest      JSON: generation, chunk count, byte count, kvfile manifest — written LAST
  cag:NAME:meta          JSON: kb.json settings + the knowledge text (so an empty CAG_HOME can answer)
  cag:NAME:hits          hit counter
A reader starts from the manifest, so it never sees a half-written cache: the chunks of a new
generation are all in place before the manifest points at them, and the previous generation's chunks
are only set to expire, not deleted, so a reader in the middle of fetching them still finishes.
The bytes are the same verified file format as on disk (checksums, signature, fingerprints).
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

import torch

from .. import kvfile
from ..errors import CagError
from ..kvfile import Expect
from .base import Entry, save_file

DEFAULT_CHUNK_BYTES = 64 << 20
OLD_GENERATION_GRACE_MS = 60_000
EVENTS_CHANNEL = "cag:events"


class RedisError(CagError):
    """Redis could not be reached or answered with an error."""


class RedisStore:
    name = "redis"
    persistent = True

    def __init__(self, url: str, ttl_s: float | None = None, chunk_bytes: int = DEFAULT_CHUNK_BYTES):
        import redis as redis_py  # the redis-py package, not this module

        self.url, self.ttl_s, self.chunk_bytes = url, ttl_s, int(chunk_bytes)
        self._errors = (redis_py.RedisError, OSError)
        self.client = redis_py.Redis.from_url(url, socket_connect_timeout=5)

    # -- the Store protocol -----------------------------------------------------------------------
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
            meta_raw = self.client.get(self._key(name, "meta"))
            self.client.incr(self._key(name, "hits"))
        data = b"".join(chunks)
        if len(data) != head["bytes"] or meta_raw is None:
            return None
        loaded = kvfile.load_bytes(data, expect, device=device, where=f"redis cache {name!r} at {self.url}")
        extra = json.loads(meta_raw)
        return Entry(name, loaded.layers, loaded.prefix_ids, loaded.manifest, extra["meta"], extra["snapshot"],
                     stored_at=head.get("stored_at", time.time()))

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
            old = self.client.get(self._key(entry.name, "manifest"))
            pipe = self.client.pipeline(transaction=False)
            for i, piece in enumerate(pieces):
                pipe.set(self._key(entry.name, "chunk", gen, i), piece, px=px)
            pipe.set(self._key(entry.name, "meta"), json.dumps({"meta": entry.meta, "snapshot": entry.snapshot}), px=px)
            pipe.execute()
            self.client.set(self._key(entry.name, "manifest"), json.dumps(head), px=px)  # last: now readers see it
            if old is not None:
                self._expire_generation(entry.name, json.loads(old))
        return full

    def drop(self, name: str) -> bool:
        """Remove the cache (readers stop seeing it at once); the settings and text stay for a rebuild."""
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

    # -- settings and knowledge text, for processes with an empty CAG_HOME -------------------------
    def meta(self, name: str) -> tuple[dict, list[dict]] | None:
        with self._talk():
            raw = self.client.get(self._key(name, "meta"))
        if raw is None:
            return None
        extra = json.loads(raw)
        return extra["meta"], extra["snapshot"]

    def forget(self, name: str) -> None:
        """Remove every key of `name` (settings, text, counters, version), after drop() removed the cache."""
        with self._talk():
            self.client.delete(*(self._key(name, k) for k in ("meta", "hits", "version")))

    def names(self) -> list[str]:
        with self._talk():
            keys = [k.decode() for k in self.client.scan_iter(match="cag:*:meta", count=1000)]
        return sorted(k[len("cag:"):-len(":meta")] for k in keys)

    # -- plumbing ---------------------------------------------------------------------------------
    def _key(self, name: str, *parts: object) -> str:
        return ":".join(["cag", name, *map(str, parts)])

    def _ttl_ms(self, meta: dict) -> int | None:
        ttl = (meta.get("policy") or {}).get("ttl_s") or self.ttl_s
        return max(1, int(ttl * 1000)) if ttl else None

    def _expire_generation(self, name: str, head: dict) -> None:
        pipe = self.client.pipeline(transaction=False)
        for i in range(head.get("chunks", 0)):
            pipe.pexpire(self._key(name, "chunk", head["gen"], i), OLD_GENERATION_GRACE_MS)
        pipe.execute()

    @contextmanager
    def _talk(self) -> Iterator[None]:
        try:
            yield
        except self._errors as err:
            raise RedisError(f"Redis at {self.url} failed: {err}; check CAG_REDIS_URL / --redis and that the server runs") from None


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
