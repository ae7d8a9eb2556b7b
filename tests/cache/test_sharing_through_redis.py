"""Sharing caches through a real redis-server: restarts, a second machine, expiry, events and versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch_direct as eu
import redis as redis_py
from storeutil import make_docs, redis_server, redis_url, settings, tiny_entry  # noqa: F401,F811 - fixtures

from cag.cache import kvfile
from cag.errors import CacheMismatchError, NotFoundError
from cag.cache.stores import DiskStore, MemoryStore, Record, TieredStore, Tombstone
from cag.cache.stores.base import Entry
from cag.cache.stores.redis import RedisError, RedisStore

PROBE = Path(__file__).resolve().parents[1] / "stores_probe.py"
ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def docs(tmp_path):
    return make_docs(tmp_path / "docs")


def env_for(home: Path, url: str | None) -> dict:
    env = {**os.environ, "CAG_HOME": str(home), "PYTHONPATH": str(ROOT)}
    env.pop("CAG_SIGNING_KEY", None)
    env.pop("CAG_REDIS_URL", None)
    if url:
        env["CAG_REDIS_URL"] = url
    return env


class Probe:
    """tests/stores_probe.py in its own process: another 'machine' answering from the shared caches."""

    def __init__(self, name: str, home: Path, url: str | None):
        self.proc = subprocess.Popen([sys.executable, str(PROBE), name], env=env_for(home, url), text=True,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self.ready = self._line()

    def _line(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise AssertionError(f"probe died: {self.proc.stderr.read()}")
        return json.loads(line)

    def ask(self, question: str) -> dict:
        self.proc.stdin.write(question + "\n")
        self.proc.stdin.flush()
        return self._line()

    def generation(self) -> int:
        """The knowledge base's event generation in the probe (cag.cache.events)."""
        return self.ask("!generation")["generation"]

    def heard(self, since: int) -> None:
        """Wait until an event after generation `since` reached the probe's listener (and was acted on)."""
        now = self.ask(f"!await {since}")["generation"]
        assert now > since, "no event reached the other process's listener within 60 s"

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def cag_cli(args, home, url=None):
    proc = subprocess.run([sys.executable, "-m", "cag", *map(str, args)], env=env_for(home, url),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return proc


def test_restart_answers_from_disk_without_prefill(tmp_path, tiny_model_dir, docs):
    home = tmp_path / "home"
    cag_cli(["build", docs, "--name", "kb", "--model", tiny_model_dir], home)
    ask = cag_cli(["ask", "kb", "Who founded it?", "--json", "--max-new-tokens", "4"], home)
    assert json.loads(ask.stdout.splitlines()[-1])["cache_source"] == "disk"
    probe = Probe("kb", home, None)
    assert probe.ready["cache_source"] == "disk" and probe.ready["forwards"] == 0
    probe.close()


def test_second_machine_answers_from_the_first_ones_redis_cache(tmp_path, tiny_model_dir, docs, redis_url):
    first, second = tmp_path / "first", tmp_path / "second"
    cag_cli(["build", docs, "--name", "kb", "--model", tiny_model_dir, "--redis", redis_url], first)
    ask = cag_cli(["ask", "kb", "Who founded it?", "--json", "--max-new-tokens", "4", "--redis", redis_url], second)
    row = json.loads(ask.stdout.splitlines()[-1])
    assert row["cache_source"] == "redis" and row["cached_tokens"] > 0
    other = tmp_path / "third"
    probe = Probe("kb", other, redis_url)  # empty CAG_HOME: settings, text and KV all come from Redis
    assert probe.ready == {"ready": True, "cache_source": "redis", "forwards": 0}
    a = probe.ask("Who founded it?")
    assert a["cache_source"] == "redis" and a["forwards"] == 0
    probe.close()
    local = Probe("kb", first, None)  # the builder's own disk copy gives the same answer
    assert local.ask("Who founded it?")["token_ids"] == a["token_ids"]
    local.close()


def test_events_and_versions_stop_every_process_serving_the_old_cache(tmp_path, tiny_model_dir, docs, redis_url):
    first, second = tmp_path / "first", tmp_path / "second"
    cag_cli(["build", docs, "--name", "kb", "--model", tiny_model_dir, "--redis", redis_url], first)
    replica = Probe("kb", second, redis_url)
    assert replica.ask("Who?")["cache_source"] == "redis"
    assert replica.ask("Who?")["forwards"] == 0  # no reload between questions

    seen = replica.generation()
    cag_cli(["invalidate", "kb", "--redis", redis_url], first)
    replica.heard(seen)  # pub/sub delivery to the replica's listener thread
    after = replica.ask("Who?")
    assert after["cache_source"] == "built" and after["forwards"] > 0  # it did not serve the dropped cache

    seen = replica.generation()
    cag_cli(["publish", "kb", "2", "--redis", redis_url], first)
    replica.heard(seen)
    bumped = replica.ask("Who?")
    assert bumped["cache_source"] == "built" and bumped["forwards"] > 0  # version None/1 refused, rebuilt as 2
    again = replica.ask("Who?")
    assert again["forwards"] == 0 and again["token_ids"] == bumped["token_ids"]
    replica.close()


def test_redis_values_are_chunked_written_manifest_last_and_expire(redis_url, tiny_lm):
    ids = list(range(5, 45))
    layers = eu.prefill(tiny_lm, ids)
    # an hour's TTL: every key carries it, and none runs out while the test looks, however slow the machine
    entry = Entry("kb", layers, ids, {"model": {"fingerprint": "m"}}, settings(policy={"ttl_s": 3600}),
                  [{"name": "a", "text": "t"}])
    store = RedisStore(redis_url, chunk_bytes=4096)
    store.put(entry)
    client = redis_py.Redis.from_url(redis_url)
    head = json.loads(client.get("cag:kb:manifest"))
    assert head["chunks"] == -(-head["bytes"] // 4096) > 1
    chunks = [f"cag:kb:chunk:{head['gen']}:{i}" for i in range(head["chunks"])]
    assert all(len(client.get(key)) <= 4096 for key in chunks)
    assert all(0 < client.pttl(key) <= 3_600_000 for key in ["cag:kb:manifest", *chunks])
    got = store.get("kb", kvfile.Expect(model="m"), "cpu")
    assert got.prefix_ids == ids and all(k.equal(k2) and v.equal(v2) for (k, v), (k2, v2) in zip(layers, got.layers))
    with pytest.raises(CacheMismatchError, match="different model"):
        store.get("kb", kvfile.Expect(model="other"), "cpu")
    # a TTL that runs out: once Redis has let the manifest go, the entry reads as absent, chunks gone too
    store.put(Entry("brief", layers, ids, {"model": {"fingerprint": "m"}}, settings(policy={"ttl_s": 0.2}),
                    [{"name": "a", "text": "t"}]))
    deadline = time.monotonic() + 60
    while client.exists("cag:brief:manifest"):
        assert time.monotonic() < deadline, "Redis kept the manifest past its TTL"
        time.sleep(0.05)
    assert store.get("brief", kvfile.Expect(), "cpu") is None  # expired with its keys
    assert client.keys("cag:brief:chunk:*") == []


def test_a_reader_never_sees_a_half_written_cache(redis_url, tiny_lm):
    ids = list(range(5, 25))
    entry = Entry("kb", eu.prefill(tiny_lm, ids), ids, {}, {}, [])
    store = RedisStore(redis_url, chunk_bytes=2048)
    client = redis_py.Redis.from_url(redis_url)
    real_pipeline = client.pipeline
    seen = []

    def spy(*args, **kwargs):  # the manifest must be written after every chunk exists
        pipe = real_pipeline(*args, **kwargs)
        real_execute = pipe.execute

        def execute(*a, **kw):
            if any(command[:2] == ("SET", "cag:kb:manifest") for command, _ in pipe.command_stack):
                seen.append(sorted(k.decode() for k in client.keys("cag:kb:chunk:*")))
            return real_execute(*a, **kw)

        pipe.execute = execute
        return pipe

    store.client = client
    client.pipeline = spy
    store.put(entry)
    head = json.loads(client.get("cag:kb:manifest"))
    assert seen and len(seen[0]) == head["chunks"]


# -- one store interface across machines: owner, tombstones, Redis outages --------------------------

@pytest.fixture
def machine():
    """machine(root, url): the tiers of one machine (its own memory and disk under root, the shared
    Redis), closed after the test (their listeners stop)."""
    made = []

    def make(root: Path, url: str) -> TieredStore:
        made.append(TieredStore([MemoryStore(1 << 20), DiskStore(root), RedisStore(url)]))
        return made[-1]

    yield make
    for store in made:
        store.close()


def test_the_owner_travels_with_an_entry_through_every_tier(tmp_path, redis_url, machine):
    one, two = machine(tmp_path / "one", redis_url), machine(tmp_path / "two", redis_url)
    one.put(tiny_entry("alpha__notes", 4, owner="alpha"))
    entry, source = two.get("alpha__notes", kvfile.Expect(), "cpu")
    assert source == "redis" and entry.owner == "alpha" and two.record("alpha__notes").owner == "alpha"
    assert json.loads((tmp_path / "two" / "alpha__notes" / "tenant.json").read_text())["tenant"] == "alpha"
    offline = TieredStore([MemoryStore(1 << 20), DiskStore(tmp_path / "two")])  # the promoted copy alone
    assert offline.record("alpha__notes").owner == "alpha"
    assert offline.get("alpha__notes", kvfile.Expect(), "cpu")[0].owner == "alpha"
    assert two.get("alpha__notes", kvfile.Expect(), "cpu")[1] == "memory"


def test_a_tombstone_buries_older_copies_but_not_a_newer_build(tmp_path, redis_url, machine):
    one, two = machine(tmp_path / "one", redis_url), machine(tmp_path / "two", redis_url)
    one.put(tiny_entry("kb", 4, owner="alpha"))
    assert two.get("kb", kvfile.Expect(), "cpu")[1] == "redis"  # two now holds copies in memory and on disk
    assert one.delete("kb")
    assert one.record("kb") is None and one.names() == [] and not (tmp_path / "one" / "kb").exists()
    assert (tmp_path / "two" / "kb" / "kb.json").is_file()  # two never heard of it (not listening) ...
    assert two.record("kb") is None  # ... but the tombstone is newer than its copy: gone, here too
    assert not (tmp_path / "two" / "kb").exists() and two.get("kb", kvfile.Expect(), "cpu") is None
    assert "kb" not in two.names()
    one.put(tiny_entry("kb", 6, owner="alpha"))  # the same name again, built after the delete
    assert two.record("kb").owner == "alpha" and two.get("kb", kvfile.Expect(), "cpu")[0].prefix_ids == list(range(6))
    late = tiny_entry("kb", 5, built_at=time.time() - 3600)  # a write-through of a copy older than a delete
    one.delete("kb")
    RedisStore(redis_url).put(late)
    assert two.record("kb") is None and RedisStore(redis_url).names() == []


def test_while_redis_is_down_local_tiers_serve_and_it_is_not_asked_again_at_once(tmp_path, redis_server, machine):
    store = machine(tmp_path / "one", redis_server.url)
    store.put(tiny_entry("kb", 4, owner="alpha"))
    store.publish("kb", 3)
    redis_server.stop()
    redis = store.tier("redis")
    calls = []
    real = redis.client.mget
    redis.client.mget = lambda *a, **k: calls.append(a) or real(*a, **k)
    assert store.record("kb").owner == "alpha" and store.names() == ["kb"]  # the first call finds it down
    assert len(calls) == 1 and redis.health.until > 0
    assert store.get("kb", kvfile.Expect(), "cpu")[1] == "disk" and store.published("kb") == 3
    store.put(tiny_entry("new", 4))  # kept locally, written through later
    assert store.record("new") is not None and len(calls) == 1  # no further attempt within the interval
    with pytest.raises(RedisError, match="unreachable"):
        store.delete("kb")  # every replica must see a delete: refused, and nothing changed here
    with pytest.raises(RedisError):
        store.invalidate("kb")
    assert store.record("kb") is not None and store.get("kb", kvfile.Expect(), "cpu") is not None


def test_the_listener_survives_redis_restarts_and_writes_through_what_waited(tmp_path, redis_server, machine):
    one, two = machine(tmp_path / "one", redis_server.url), machine(tmp_path / "two", redis_server.url)
    listener, failed = two.tier("redis"), threading.Event()
    subscribe = listener._subscribe

    def noted():  # the listener's attempts to subscribe again: one that fails shows it noticed the outage
        try:
            return subscribe()
        except Exception:
            failed.set()
            raise

    listener._subscribe = noted
    two.listen()
    one.put(tiny_entry("kb", 4))
    two.get("kb", kvfile.Expect(), "cpu")
    redis_server.stop()
    two.put(tiny_entry("offline", 4, owner="beta"))  # Redis is down: only on two's disk for now
    assert failed.wait(60), "the listener never noticed that Redis went down"
    redis_server.start()  # same port, empty
    deadline = time.time() + 60  # the listener retries on a backoff of up to 10 s
    while RedisStore(redis_server.url).record("offline") is None:
        assert time.time() < deadline, "what two built while Redis was down was never written through"
        time.sleep(0.2)
    assert one.record("offline").owner == "beta"
    assert two.get("kb", kvfile.Expect(), "cpu")[1] == "memory"
    one.invalidate("kb")  # reaches two's listener again: its local copies go
    deadline = time.time() + 60
    while two.tier("memory").has("kb") or two.tier("disk").has("kb"):
        assert time.time() < deadline, "the invalidation did not reach the listening store"
        time.sleep(0.1)


# -- junk in the shared Redis --------------------------------------------------------------------------

def test_junk_in_the_shared_redis_never_breaks_listing_or_the_other_kbs(tmp_path, redis_url, machine, docs, caplog):
    one, two = machine(tmp_path / "one", redis_url), machine(tmp_path / "two", redis_url)
    one.put(tiny_entry("kb", 4))
    one.put(tiny_entry("alpha__notes", 4, owner="alpha"))
    client = redis_py.Redis.from_url(redis_url)
    client.set("cag:junk:record", "not json")  # a record nobody can read
    client.set("cag:alpha__notes:record", json.dumps({"meta": 5}))  # one knowledge base's record, damaged
    client.rpush("cag:listed:record", "a list")  # a key of another type where a record should be
    client.set("cag:odd name:record", json.dumps({"meta": settings()}))  # a name no knowledge base can have
    from cag import api, registry

    assert [row["name"] for row in registry.rows(two)] == ["kb"]  # the others are left out, with a warning
    assert "'junk'" in caplog.text and "'alpha__notes'" in caplog.text and "damaged" in caplog.text
    assert api.record("alpha__notes", two) is None and two.get("alpha__notes", kvfile.Expect(), "cpu") is None
    assert two.get("kb", kvfile.Expect(), "cpu")[1] == "redis"
    assert one.record("alpha__notes").owner == "alpha"  # the replica holding a good copy keeps serving it
    assert two.tier("redis").health.interval == 0  # junk is not an outage
    cag_cli(["ls", "--redis", redis_url], tmp_path / "cli")  # the CLI lists too (it asserts exit code 0)
    registry.delete("junk", two)  # a damaged record can be removed like any other
    assert isinstance(RedisStore(redis_url).record("junk"), Tombstone) and "junk" not in two.names()
    with pytest.raises(NotFoundError):
        registry.delete("never-was", two)


def test_junk_on_the_events_channel_does_not_stop_the_listener(tmp_path, redis_url, machine):
    one, two = machine(tmp_path / "one", redis_url), machine(tmp_path / "two", redis_url)
    two.listen()
    one.put(tiny_entry("kb", 4))
    two.get("kb", kvfile.Expect(), "cpu")
    client = redis_py.Redis.from_url(redis_url)
    for junk in ("[" * 100_000, "not json", "[1]", '{"name": []}'):
        client.publish("cag:events", junk)
    one.invalidate("kb")  # still heard after the junk: two drops its own copies
    deadline = time.time() + 60
    while two.tier("memory").has("kb") or two.tier("disk").has("kb"):
        assert time.time() < deadline, "the listener stopped at junk on the events channel"
        time.sleep(0.1)


# -- publishing again what a Redis restart lost --------------------------------------------------------

def test_a_redis_restarted_without_persistence_gets_every_kb_back_from_the_replica_holding_it(
        tmp_path, redis_server, machine):
    one = machine(tmp_path / "one", redis_server.url)
    one.listen()
    one.put(tiny_entry("kb", 4, owner="alpha"))
    one.put_record(Record("parent", settings(shards=["kb"]), "alpha"), [{"name": "a.txt", "text": "t"}])
    redis_server.stop()  # kill -9, and back empty: no RDB, no AOF
    redis_server.start()
    fresh = machine(tmp_path / "fresh", redis_server.url)  # a replica that never saw either
    deadline = time.time() + 60  # replica one's listener retries on a backoff of up to 10 s
    while fresh.record("kb") is None or fresh.record("parent") is None:
        assert time.time() < deadline, "what replica one holds never reached the restarted Redis"
        time.sleep(0.2)
    entry, source = fresh.get("kb", kvfile.Expect(), "cpu")
    assert source == "redis" and entry.owner == "alpha" and entry.prefix_ids == list(range(4))
    assert fresh.record("parent").meta["shards"] == ["kb"] and not fresh.tier("redis").has("parent")


def test_publishing_again_never_brings_back_a_deleted_kb_nor_replaces_a_newer_build(tmp_path, redis_url, machine):
    one, two = machine(tmp_path / "one", redis_url), machine(tmp_path / "two", redis_url)
    old = time.time() - 60
    one.put(tiny_entry("gone", 4, built_at=old))
    one.put(tiny_entry("kb", 4, built_at=old))
    two.get("gone", kvfile.Expect(), "cpu")
    one.delete("gone")  # two (not listening) still holds its copy of it
    two.put(tiny_entry("kb", 6))  # and a newer build of kb
    one.tier("disk").put(tiny_entry("kb", 4, built_at=old))  # one still holds the older one
    assert one.republish() == [] and two.republish() == []  # nothing the shared tier lacks
    shared = RedisStore(redis_url)
    assert isinstance(shared.record("gone"), Tombstone) and not (tmp_path / "two" / "gone").exists()
    assert shared.get("kb", kvfile.Expect(), "cpu").prefix_ids == list(range(6))
    redis_py.Redis.from_url(redis_url).flushall()  # Redis forgot everything: the newest copy comes back
    assert one.republish() == ["kb"] and two.republish() == ["kb"]
    assert shared.get("kb", kvfile.Expect(), "cpu").prefix_ids == list(range(6))
    assert one.republish() == [] and shared.record("gone") is None  # (its tombstone is gone too: see README)


def test_a_delete_landing_while_a_copy_is_uploaded_is_never_undone(tmp_path, redis_url):
    store, other = RedisStore(redis_url), redis_py.Redis.from_url(redis_url)
    built = time.time()
    real_pipeline = store.client.pipeline

    def pipeline(*args, **kwargs):  # right after the chunks are uploaded, another replica deletes the KB
        pipe = real_pipeline(*args, **kwargs)
        if not kwargs.get("transaction", True):
            real_execute = pipe.execute

            def execute(*a, **kw):
                uploads = any(command[1].startswith("cag:kb:chunk:") for command, _ in pipe.command_stack)
                done = real_execute(*a, **kw)
                if uploads:
                    other.set("cag:kb:record", json.dumps({"deleted_at": built + 1}))
                return done

            pipe.execute = execute
        return pipe

    store.client.pipeline = pipeline
    store.put(tiny_entry("kb", 4, built_at=built))  # checked before the upload: not deleted then
    assert store.record("kb") == Tombstone("kb", built + 1) and other.get("cag:kb:manifest") is None
    assert all(0 < other.pttl(key) for key in other.keys("cag:kb:chunk:*"))  # the upload expires
