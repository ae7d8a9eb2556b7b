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
from storeutil import make_docs, redis_url  # noqa: F401,F811 - redis_url is a fixture

from cag import kvfile
from cag.errors import CacheMismatchError
from cag.stores.base import Entry
from cag.stores.redis import RedisStore

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
    from cag import engine

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
    from cag import engine

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
