"""The one contract of a cache tier, run over every tier: memory, host, disk and a real Redis.

What each method answers for an entry this process put, for records another process wrote, and for
junk anyone may have left where a tier keeps its parts (a key of Redis, a file under CAG_HOME). Where a
tier keeps no such thing (the memory tiers keep no versions and no records without a cache; only Redis
keeps tombstones), the contract says what it answers instead; what other writers leave is checked on the
tiers they can reach (disk and Redis). A damaged part is never an exception for the reader: it reads as
missing, with one logged warning, and everything else the tier holds stays readable.
"""

from __future__ import annotations

import json
import logging
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import pytest
import redis as redis_py
import torch
from storeutil import RedisServer, settings, tiny_entry

from cag.cache.kvfile import Expect
from cag.cache.stores import DiskStore, HostStore, MemoryStore, Record, Store, Tombstone
from cag.cache.stores.redis import RedisStore
from cag.errors import CacheFileError, CacheMismatchError

ANY = Expect()


@dataclass
class Tier:
    """A tier under test, and how another process (or a person) reaches where it keeps things."""

    kind: str
    store: Store
    other: Callable[[], Store] | None = None  # the same tier as another process opens it; None: nobody else can
    write: Callable[[str, str, bytes], None] | None = None  # raw bytes into one part ("record", "snapshot", ...)
    write_record: Callable[[str, object, object], None] | None = None  # settings + owner, as another writer would


def _memory_tier(kind: str) -> Tier:
    return Tier(kind, MemoryStore(1 << 20) if kind == "memory" else HostStore(1 << 20))


def _as_long_as(raw: bytes, size: int) -> bytes:
    return (raw * (size // len(raw) + 1))[:size]


def _disk_tier(root: Path) -> Tier:
    parts = {"record": "kb.json", "owner": "tenant.json", "snapshot": "knowledge.json", "version": "version.json",
             "hits": "stats.json", "cache": "cache.safetensors"}

    def write(name: str, part: str, raw: bytes) -> None:
        path = root / name / parts[part]
        path.parent.mkdir(parents=True, exist_ok=True)
        if part == "cache":  # junk of the same length, so it is the bytes that are wrong, not their count
            raw = _as_long_as(raw, path.stat().st_size)
        path.write_bytes(raw)

    def write_record(name: str, meta: object, owner: object) -> None:
        write(name, "record", json.dumps(meta).encode())
        if owner is not None:
            write(name, "owner", json.dumps({"tenant": owner}).encode())

    return Tier("disk", DiskStore(root), lambda: DiskStore(root), write, write_record)


def _redis_tier(url: str) -> Tier:
    client = redis_py.Redis.from_url(url)

    def write(name: str, part: str, raw: bytes) -> None:
        if part == "cache":  # the first chunk of the current generation, same length
            head = json.loads(client.get(f"cag:{name}:manifest"))
            key = f"cag:{name}:chunk:{head['gen']}:0"
            client.set(key, _as_long_as(raw, len(client.get(key))))
        else:
            client.set(f"cag:{name}:{part}", raw)

    def write_record(name: str, meta: object, owner: object) -> None:
        client.set(f"cag:{name}:record", json.dumps({"meta": meta, "owner": owner}))

    return Tier("redis", RedisStore(url), lambda: RedisStore(url), write, write_record)


@contextmanager
def _tier(kind: str, tmp_path: Path) -> Iterator[Tier]:
    if kind in ("memory", "host"):
        yield _memory_tier(kind)
    elif kind == "disk":
        yield _disk_tier(tmp_path / "kbs")
    else:
        server = RedisServer(tmp_path)
        server.start()
        made = _redis_tier(server.url)
        try:
            yield made
        finally:
            made.store.close()
            server.stop()


@pytest.fixture(params=["memory", "host", "disk", "redis"])
def tier(request, tmp_path):
    with _tier(request.param, tmp_path) as made:
        yield made


@pytest.fixture(params=["disk", "redis"])
def written(request, tmp_path):
    """A tier that other processes (and people) write to as well. The memory tiers hold only what this
    process put there, verified: nothing foreign or damaged can be found in them."""
    with _tier(request.param, tmp_path) as made:
        yield made


def _same(a, b) -> bool:
    return all(torch.equal(k, k2) and torch.equal(v, v2) for (k, v), (k2, v2) in zip(a, b))


# -- the interface ----------------------------------------------------------------------------------

def test_the_interface_is_an_abstract_class_every_tier_implements_whole():
    required = {"get", "put", "drop", "has", "info", "share", "record", "snapshot", "put_record", "names",
                "version", "set_version", "remove"}
    assert Store.__abstractmethods__ == required
    for tier in (MemoryStore, HostStore, DiskStore, RedisStore):
        assert issubclass(tier, Store) and not tier.__abstractmethods__

    forgot_share = type("Partial", (Store,), {m: lambda self, *a: None for m in required - {"share"}})
    with pytest.raises(TypeError, match="share"):  # a tier cannot be made without the whole interface
        forgot_share()


# -- the cache and what travels with it ----------------------------------------------------------------

def test_put_then_every_reader_sees_the_whole_entry_with_its_owner(tier):
    store = tier.store
    entry = tiny_entry("kb", 4, owner="alpha")
    store.put(entry)
    assert store.has("kb") is True and store.info("kb")["hits"] == 0
    got = store.get("kb", ANY, "cpu")
    assert got.prefix_ids == entry.prefix_ids and _same(got.layers, entry.layers)
    assert (got.owner, got.meta, got.snapshot) == ("alpha", entry.meta, entry.snapshot)
    assert store.record("kb") == Record("kb", entry.meta, "alpha") and store.snapshot("kb") == entry.snapshot
    assert store.names() == ["kb"]
    info = store.info("kb")
    assert info["bytes"] > 0 and info["tokens"] == 4 and info["hits"] == 1
    cli_built = tiny_entry("cli", 2)  # built by the CLI: no owner, and none made up on the way
    store.put(cli_built)
    assert store.get("cli", ANY, "cpu").owner is None and store.record("cli").owner is None
    for missing in (store.get("nope", ANY, "cpu"), store.info("nope"), store.record("nope"), store.snapshot("nope")):
        assert missing is None
    assert store.has("nope") is False


def test_a_copy_made_for_something_else_is_never_returned(tier):
    tier.store.put(tiny_entry("kb", 4))
    other = Expect(knowledge="another knowledge hash")
    if tier.kind in ("memory", "host"):  # copies verified once: a mismatch is a miss, the slower tier says why
        assert tier.store.get("kb", other, "cpu") is None
    else:  # the verified file format: refused, naming what differs
        with pytest.raises(CacheMismatchError, match="different knowledge"):
            tier.store.get("kb", other, "cpu")


def test_drop_forgets_the_cache_answers_whether_there_was_one_and_keeps_the_record(tier):
    store = tier.store
    entry = tiny_entry("kb", 4, owner="alpha")
    store.put(entry)
    assert store.drop("kb") is True
    assert store.drop("kb") is False and store.drop("never") is False
    assert store.has("kb") is False and store.get("kb", ANY, "cpu") is None and store.info("kb") is None
    if store.persistent:  # kept for a rebuild
        assert store.record("kb") == entry.record and store.snapshot("kb") == entry.snapshot
    else:  # a memory tier's record lives exactly as long as its cache
        assert store.record("kb") is None and store.names() == []


def test_put_record_keeps_settings_and_text_without_a_cache_where_persistent(tier):
    store = tier.store
    record = Record("parent", settings(shards=["parent.0"]), "alpha")
    store.put_record(record, [{"name": "a.txt", "text": "t"}])
    assert store.has("parent") is False and store.get("parent", ANY, "cpu") is None
    if store.persistent:
        assert store.record("parent") == record and store.snapshot("parent") == [{"name": "a.txt", "text": "t"}]
        assert store.names() == ["parent"]
    else:  # nothing to keep close without tensors: the persistent tiers keep it
        assert store.record("parent") is None and store.names() == []


def test_versions_are_kept_by_the_persistent_tiers_only(tier):
    store = tier.store
    store.put(tiny_entry("kb", 4))
    assert store.version("kb") is None
    store.set_version("kb", 4)
    assert store.version("kb") == (4 if store.persistent else None)  # a memory tier keeps no versions
    assert store.version("nope") is None


def test_remove_deletes_everything_and_a_shared_tier_keeps_the_tombstone(tier):
    store = tier.store
    built = time.time()
    store.put(tiny_entry("kb", 4, owner="alpha", built_at=built))
    store.set_version("kb", 2)
    tombstone = Tombstone("kb", built + 1)
    assert store.remove("kb", tombstone) is True
    assert store.remove("kb", tombstone) is False and store.remove("never", Tombstone("never", built)) is False
    assert store.record("kb") == (tombstone if store.shared else None)
    assert store.names() == [] and store.snapshot("kb") is None and store.version("kb") is None
    assert store.has("kb") is False and store.get("kb", ANY, "cpu") is None and store.info("kb") is None
    store.put(tiny_entry("kb", 4, built_at=built))  # a copy built before the delete, written late
    if store.shared:  # refused: the delete stands for every process
        assert store.record("kb") == tombstone and store.get("kb", ANY, "cpu") is None
    else:  # a local tier remembers no deletes; the tiered store asks the shared tier before serving it
        assert store.record("kb").built_at == built
    store.put(tiny_entry("kb", 6, built_at=built + 2))  # the name built again after the delete
    assert store.record("kb").built_at == built + 2 and store.get("kb", ANY, "cpu").prefix_ids == list(range(6))


def test_share_hands_a_device_tier_the_loaded_tensors_and_changes_nothing_elsewhere(tier):
    store = tier.store
    entry = tiny_entry("kb", 4)
    store.put(entry)
    loaded = [(k.clone(), v.clone()) for k, v in entry.layers]  # a loaded knowledge base's own prefix
    store.share("kb", loaded)
    got = store.get("kb", ANY, "cpu")
    assert _same(got.layers, loaded)
    held_once = got.layers[0][0].data_ptr() == loaded[0][0].data_ptr()
    assert held_once is (tier.kind == "memory")  # host, disk and Redis keep their own copy on purpose
    store.share("nope", loaded)  # nothing there: nothing happens
    assert store.has("nope") is False


# -- what another process wrote --------------------------------------------------------------------------

def test_an_entry_another_process_wrote_is_read_whole_with_its_owner(written):
    entry = tiny_entry("beta__notes", 4, owner="beta")
    written.other().put(entry)
    got = written.store.get("beta__notes", ANY, "cpu")
    assert got.owner == "beta" and got.prefix_ids == entry.prefix_ids and got.snapshot == entry.snapshot
    assert written.store.record("beta__notes") == entry.record and written.store.names() == ["beta__notes"]
    meta = settings()
    written.write_record("hand", meta, None)  # a record written by hand, the CLI's way: no owner
    assert written.store.record("hand") == Record("hand", meta, None)


DAMAGED_RECORDS = {  # what may be found where a record should be; each must read as no record
    "not-json": b"not json",
    "not-utf8": b"\xff\xfe\x00\x01",
    "nested-too-deep": b"[" * 100_000,
    "a-number": b"5",
    "null": b"null",
}
DAMAGED_SETTINGS = {  # (settings, owner) of the right syntax but the wrong shape
    "settings-not-an-object": (5, None),
    "owner-not-a-string": (settings(), 7),
    "built-at-not-a-number": (settings(built_at="yesterday"), None),
    "built-at-infinite": (settings(built_at=float("inf")), None),
    "policy-not-an-object": (settings(policy=5), None),
    "version-not-whole": (settings(policy={"version": "2"}), None),
    "sources-not-a-list": (settings(sources="docs"), None),
    "settings-missing": ({"built_at": 1.0}, None),
}


@pytest.mark.parametrize("case", [*DAMAGED_RECORDS, *DAMAGED_SETTINGS])
def test_a_damaged_record_reads_as_missing_with_a_warning_and_harms_nothing_else(written, case, caplog):
    store = written.store
    store.put(tiny_entry("good", 4, owner="alpha"))
    store.put(tiny_entry("bad", 4, owner="alpha"))
    if case in DAMAGED_RECORDS:
        written.write("bad", "record", DAMAGED_RECORDS[case])
    else:
        written.write_record("bad", *DAMAGED_SETTINGS[case])
    with caplog.at_level(logging.WARNING, logger="cag.stores"):
        assert store.record("bad") is None and store.get("bad", ANY, "cpu") is None
    assert any("'bad'" in r.getMessage() and "damaged" in r.getMessage() for r in caplog.records), caplog.text
    assert store.names() == ["bad", "good"]  # listed as there, so it can be found and removed
    assert store.record("good").owner == "alpha" and store.get("good", ANY, "cpu").prefix_ids == list(range(4))
    assert store.remove("bad", Tombstone("bad", time.time())) is True
    assert store.names() == ["good"]
    store.put(tiny_entry("bad", 5, owner="alpha"))  # built again: whole again
    assert store.record("bad").owner == "alpha" and store.get("bad", ANY, "cpu").prefix_ids == list(range(5))


@pytest.mark.parametrize("raw", [b'{"deleted_at": "soon"}', b'{"deleted_at": null}', b'{"deleted_at": Infinity}'],
                         ids=["text", "null", "infinite"])
def test_a_damaged_tombstone_reads_as_no_record(tmp_path, raw, caplog):
    with _tier("redis", tmp_path) as redis:  # the only tier that keeps tombstones
        redis.write("kb", "record", raw)
        with caplog.at_level(logging.WARNING, logger="cag.stores"):
            assert redis.store.record("kb") is None and redis.store.names() == []
        assert "damaged" in caplog.text
        redis.store.put(tiny_entry("kb", 4))  # an infinite one must not bury every later build
        assert redis.store.get("kb", ANY, "cpu").prefix_ids == list(range(4))


def _junk_snapshot(store: Store) -> None:
    assert store.snapshot("kb") is None and store.get("kb", ANY, "cpu") is None  # without its text: no entry
    assert store.record("kb").owner == "alpha"


def _junk_version(store: Store) -> None:
    assert store.version("kb") is None and store.get("kb", ANY, "cpu") is not None


def _junk_hits(store: Store) -> None:
    assert store.info("kb")["hits"] == 0
    assert store.get("kb", ANY, "cpu") is not None  # counting a hit on junk costs the count, not the answer


JUNK_PARTS = {"snapshot": _junk_snapshot, "version": _junk_version, "hits": _junk_hits}
JUNK = {"not-json": b"not json", "not-utf8": b"\xff\xfe", "a-list": b"[1, 2]",
        "absurd": b'{"gen": "../x", "chunks": 1000000000, "bytes": 1, "name": 5, "tenant": []}'}


@pytest.mark.parametrize("junk", JUNK)
@pytest.mark.parametrize("part", JUNK_PARTS)
def test_junk_in_any_other_part_reads_as_missing_never_as_an_error(written, part, junk, caplog):
    store = written.store
    store.put(tiny_entry("kb", 4, owner="alpha"))
    store.set_version("kb", 1)
    written.write("kb", part, JUNK[junk])
    with caplog.at_level(logging.WARNING, logger="cag.stores"):
        JUNK_PARTS[part](store)
    assert "damaged" in caplog.text


@pytest.mark.parametrize("junk", JUNK)
def test_a_damaged_redis_manifest_reads_as_no_cache(tmp_path, junk, caplog):
    with _tier("redis", tmp_path) as redis:  # on disk the manifest is inside the cache file: see below
        store = redis.store
        store.put(tiny_entry("kb", 4, owner="alpha"))
        redis.write("kb", "manifest", JUNK[junk])
        with caplog.at_level(logging.WARNING, logger="cag.stores"):
            assert store.has("kb") is False and store.info("kb") is None and store.get("kb", ANY, "cpu") is None
        assert "damaged" in caplog.text
        assert store.record("kb").owner == "alpha" and store.drop("kb") is True and store.drop("kb") is False


def test_corrupt_cache_bytes_are_refused_naming_what_is_wrong(written):
    written.store.put(tiny_entry("kb", 4))
    written.write("kb", "cache", b"junk")
    with pytest.raises(CacheFileError):
        written.store.get("kb", ANY, "cpu")
    assert written.store.record("kb") is not None  # the record is fine: a rebuild replaces the cache


def test_names_that_no_knowledge_base_can_have_are_not_listed(written):
    written.store.put(tiny_entry("kb", 4))
    for name in ("has space", "a:b", ".hidden"):
        if written.kind == "disk":
            (written.store.root / name).mkdir()
            (written.store.root / name / "kb.json").write_text(json.dumps(settings()))
        else:
            written.write_record(name, settings(), None)
    assert written.store.names() == ["kb"]
