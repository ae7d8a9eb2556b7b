"""Sharing caches through a real redis-server: restarts, a second machine, expiry, events and versions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis as redis_py
from storeutil import make_docs, redis_server, redis_url, tiny_entry  # noqa: F401,F811 - fixtures

from cag.cache import kvfile
from cag.errors import CacheMismatchError
from cag.cache.stores import DiskStore, MemoryStore, TieredStore
from cag.cache.stores.base import Entry
from cag.cache.stores.redis import RedisError, RedisStore

PROBE = Path(__file__).with_name("stores_probe.py")
ROOT = Path(__file__).resolve().parent.parent


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

    cag_cli(["invalidate", "kb", "--redis", redis_url], first)
    time.sleep(0.5)  # pub/sub delivery to the replica's listener thread
    after = replica.ask("Who?")
    assert after["cache_source"] == "built" and after["forwards"] > 0  # it did not serve the dropped cache

    cag_cli(["publish", "kb", "2", "--redis", redis_url], first)
    time.sleep(0.5)
    bumped = replica.ask("Who?")
    assert bumped["cache_source"] == "built" and bumped["forwards"] > 0  # version None/1 refused, rebuilt as 2
    again = replica.ask("Who?")
    assert again["forwards"] == 0 and again["token_ids"] == bumped["token_ids"]
    replica.close()


def test_redis_values_are_chunked_written_manifest_last_and_expire(redis_url, tiny_lm):
    from cag.engines.torch import engine

    ids = list(range(5, 45))
    layers = engine.prefill(tiny_lm.model, ids)
    entry = Entry("kb", layers, ids, {"model": {"fingerprint": "m"}}, {"policy": {"ttl_s": 1.5}}, [{"name": "a", "text": "t"}])
    store = RedisStore(redis_url, chunk_bytes=4096)
    store.put(entry)
    client = redis_py.Redis.from_url(redis_url)
    head = json.loads(client.get("cag:kb:manifest"))
    assert head["chunks"] == -(-head["bytes"] // 4096) > 1
    assert all(len(client.get(f"cag:kb:chunk:{head['gen']}:{i}")) <= 4096 for i in range(head["chunks"]))
    assert 0 < client.pttl("cag:kb:manifest") <= 1500
    got = store.get("kb", kvfile.Expect(model="m"), "cpu")
    assert got.prefix_ids == ids and all(k.equal(k2) and v.equal(v2) for (k, v), (k2, v2) in zip(layers, got.layers))
    with pytest.raises(CacheMismatchError, match="different model"):
        store.get("kb", kvfile.Expect(model="other"), "cpu")
    time.sleep(1.7)
    assert store.get("kb", kvfile.Expect(), "cpu") is None  # expired with its keys


def test_a_reader_never_sees_a_half_written_cache(redis_url, tiny_lm):
    from cag.engines.torch import engine

    ids = list(range(5, 25))
    entry = Entry("kb", engine.prefill(tiny_lm.model, ids), ids, {}, {}, [])
    store = RedisStore(redis_url, chunk_bytes=2048)
    client = redis_py.Redis.from_url(redis_url)
    real_set = client.set
    seen = []

    def spy(key, *args, **kwargs):  # the manifest must be written after every chunk exists
        if key == "cag:kb:manifest":
            seen.append(sorted(k.decode() for k in client.keys("cag:kb:chunk:*")))
        return real_set(key, *args, **kwargs)

    store.client = client
    client.set = spy
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
    real = redis.client.get
    redis.client.get = lambda *a, **k: calls.append(a) or real(*a, **k)
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
    two.listen()
    one.put(tiny_entry("kb", 4))
    two.get("kb", kvfile.Expect(), "cpu")
    redis_server.stop()
    two.put(tiny_entry("offline", 4, owner="beta"))  # Redis is down: only on two's disk for now
    time.sleep(1.5)  # the listener notices
    redis_server.start()  # same port, empty
    deadline = time.time() + 20
    while RedisStore(redis_server.url).record("offline") is None:
        assert time.time() < deadline, "what two built while Redis was down was never written through"
        time.sleep(0.2)
    assert one.record("offline").owner == "beta"
    assert two.get("kb", kvfile.Expect(), "cpu")[1] == "memory"
    one.invalidate("kb")  # reaches two's listener again: its local copies go
    deadline = time.time() + 5
    while two.tier("memory").has("kb") or two.tier("disk").has("kb"):
        assert time.time() < deadline, "the invalidation did not reach the listening store"
        time.sleep(0.1)
