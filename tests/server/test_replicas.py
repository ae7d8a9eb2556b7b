"""Horizontal scaling: `cag serve` replicas with separate CAG_HOMEs sharing one real Redis.

A knowledge base built on one machine is answered on another with an empty CAG_HOME from the cache in
Redis (no prefill). Tenant knowledge bases keep their owner on every replica and through every tier;
a delete on one replica is seen by the others (and survives their restart); while Redis is down each
replica keeps serving what it holds locally, and recovers when Redis is back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import httpx
import pytest

from serverutil import Replica
from storeutil import make_docs, redis_server, redis_url  # noqa: F401 - fixtures

KEYS = {"alpha": "key-a", "beta": "key-b"}
VAULT = [{"name": "vault", "text": "Zephyrine the otter guards vault 7731."}]


def _env(url: str, keys: str = "") -> dict:
    return {"CAG_REDIS_URL": url, "CAG_API_KEYS": keys}


def _config(tmp_path, model_dir, **extra):
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"model": str(model_dir), "response_cache": False, **extra}))
    return config


def _pair(tmp_path, config, env):
    replicas = [Replica(tmp_path / name, config, env) for name in ("machine-a", "machine-b")]
    try:
        for replica in replicas:
            replica.start()
    except BaseException:
        for replica in replicas:
            replica.stop()
        raise
    return replicas


@pytest.fixture
def replicas(tmp_path, redis_url, sharp_model_dir):  # noqa: F811
    home_a = tmp_path / "machine-a"
    docs = make_docs(tmp_path / "docs")
    build = subprocess.run([sys.executable, "-m", "cag", "build", str(docs), "--name", "kb", "--model", str(sharp_model_dir)],
                           env={**os.environ, "CAG_HOME": str(home_a), **_env(redis_url)},
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    pair = _pair(tmp_path, _config(tmp_path, sharp_model_dir), _env(redis_url))
    yield pair
    for replica in pair:
        replica.stop()


def _chat(url: str, model: str, q: str = "Who guards the vault?", tenant: str | None = None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {KEYS[tenant]}"} if tenant else {}
    return httpx.post(url + "/v1/chat/completions", timeout=120, headers=headers,
                      json={"model": model, "max_tokens": 10, "messages": [{"role": "user", "content": q}]})


def _ask(url: str, q: str) -> dict:
    r = _chat(url, "kb", q)
    assert r.status_code == 200, r.text
    return r.json()


def test_replica_with_an_empty_home_answers_from_the_shared_redis_cache(replicas):
    from cag.cache import kvfile

    a, b = replicas
    sources = []
    for q in ("Who founded it?", "How much is the Heron?"):
        from_a, from_b = _ask(a.url, q), _ask(b.url, q)
        assert from_b["choices"][0]["message"]["content"] == from_a["choices"][0]["message"]["content"]
        assert from_b["usage"]["prompt_tokens_details"]["cached_tokens"] == \
            from_a["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        sources.append(from_b["cag"]["cache_source"])
    assert sources[0] == "redis"  # B's first answer came from the cache A built, through Redis
    metrics = httpx.get(b.url + "/metrics").text
    assert 'cag_kb_loads_total{tier="redis"} 1.0' in metrics and 'cag_kb_loads_total{tier="resident"} 1.0' in metrics
    # B may keep a promoted copy on its own disk: the same KV and identity as A's cache (its own write time)
    copy = b.home / "kbs" / "kb" / "cache.safetensors"
    if copy.exists():
        import torch

        mine, original = kvfile.load(copy), kvfile.load(a.home / "kbs" / "kb" / "cache.safetensors")
        assert mine.prefix_ids == original.prefix_ids
        assert all(torch.equal(k, k2) and torch.equal(v, v2) for (k, v), (k2, v2) in zip(mine.layers, original.layers))
        assert all(mine.manifest[key] == original.manifest[key] for key in kvfile.IDENTITY)


# -- tenants across replicas -------------------------------------------------------------------------

@pytest.fixture(params=[False, True], ids=["private-cli-kbs", "share-cli-kbs"])
def tenant_replicas(request, tmp_path, redis_server, sharp_model_dir):  # noqa: F811
    config = _config(tmp_path, sharp_model_dir, share_cli_kbs=request.param)
    pair = _pair(tmp_path, config, _env(redis_server.url, "key-a=alpha,key-b=beta"))
    yield pair
    for replica in pair:
        replica.stop()


def _create(url: str, tenant: str, name: str, docs: list[dict] = VAULT) -> httpx.Response:
    return httpx.post(url + "/v1/kbs", headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=120,
                      json={"name": name, "documents": docs})


def _models(url: str, tenant: str) -> list[str]:
    r = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {KEYS[tenant]}"}, timeout=30)
    assert r.status_code == 200, r.text
    return [m["id"] for m in r.json()["data"]]


def _until(check, seconds: float, what: str):
    """Poll `check()` until it returns something truthy; fail naming `what` after `seconds`."""
    deadline = time.time() + seconds
    while True:
        got = check()
        if got:
            return got
        if time.time() > deadline:
            pytest.fail(f"not within {seconds} s: {what}")
        time.sleep(0.2)


def test_a_tenants_kb_keeps_its_owner_on_every_replica(tenant_replicas):
    a, b = tenant_replicas
    assert _create(a.url, "alpha", "notes").status_code == 201
    answers = []
    for _ in range(3):  # the first from Redis, then from B's own copy: every time still alpha's
        r = _chat(b.url, "notes", tenant="alpha")
        assert r.status_code == 200, r.text
        answers.append(r.json()["choices"][0]["message"]["content"])
    assert answers[0] == answers[1] == answers[2] == _chat(a.url, "notes", tenant="alpha").json()["choices"][0]["message"]["content"]
    owner = json.loads((b.home / "kbs" / "alpha__notes" / "tenant.json").read_text())
    assert owner["tenant"] == "alpha"  # B's disk copy carries the owner
    assert "notes" in _models(b.url, "alpha")
    for replica in (a, b):  # beta: not listed, not readable, not answerable, under either name
        assert _models(replica.url, "beta") == []
        for name in ("notes", "alpha__notes"):
            assert _chat(replica.url, name, tenant="beta").status_code == 404
            assert httpx.get(f"{replica.url}/v1/kbs/{name}", headers={"Authorization": "Bearer key-b"}).status_code == 404
            assert httpx.delete(f"{replica.url}/v1/kbs/{name}", headers={"Authorization": "Bearer key-b"}).status_code == 404
    assert _chat(b.url, "notes", tenant="alpha").status_code == 200  # beta's attempts changed nothing


@pytest.mark.parametrize("tenant_replicas", [False], indirect=True, ids=["private-cli-kbs"])
def test_a_delete_reaches_every_replica_and_survives_their_restart(tenant_replicas):
    a, b = tenant_replicas
    assert _create(a.url, "alpha", "notes").status_code == 201
    assert _chat(b.url, "notes", tenant="alpha").status_code == 200  # B now holds a copy of its own
    assert httpx.delete(a.url + "/v1/kbs/notes", headers={"Authorization": "Bearer key-a"}).status_code == 200
    _until(lambda: not (b.home / "kbs" / "alpha__notes").exists(), 60, "the delete event removes B's copy")
    _until(lambda: _chat(b.url, "notes", tenant="alpha").status_code == 404, 60, "replica B refuses the deleted KB")
    assert "notes" not in _models(b.url, "alpha")
    b.restart()
    assert _chat(b.url, "notes", tenant="alpha").status_code == 404 and "notes" not in _models(b.url, "alpha")

    # created again under the same name: both replicas answer from the new one
    other = [{"name": "hours", "text": "The lantern shop opens at nine."}]
    assert _create(a.url, "alpha", "notes", other).status_code == 201
    for replica in (a, b):
        r = httpx.get(replica.url + "/v1/kbs/notes", headers={"Authorization": "Bearer key-a"}, timeout=120)
        assert r.status_code == 200 and r.json()["documents"] == ["hours.txt"], r.text
        assert _chat(replica.url, "notes", tenant="alpha").status_code == 200

    # a replica that was down during the delete does not bring its own disk copy back
    b.stop()
    assert httpx.delete(a.url + "/v1/kbs/notes", headers={"Authorization": "Bearer key-a"}).status_code == 200
    assert (b.home / "kbs" / "alpha__notes" / "kb.json").is_file()
    b.start()
    assert _chat(b.url, "notes", tenant="alpha").status_code == 404 and "notes" not in _models(b.url, "alpha")
    assert _create(b.url, "alpha", "notes").status_code == 201  # and the name is free again, from either side
    assert _chat(a.url, "notes", tenant="alpha").status_code == 200


@pytest.mark.parametrize("tenant_replicas", [False], indirect=True, ids=["private-cli-kbs"])
def test_replicas_serve_local_copies_while_redis_is_down_and_recover(tenant_replicas, redis_server):  # noqa: F811
    a, b = tenant_replicas
    assert _create(a.url, "alpha", "notes").status_code == 201
    assert _chat(b.url, "notes", tenant="alpha").status_code == 200

    redis_server.stop()
    for replica in (a, b):
        r = _chat(replica.url, "notes", tenant="alpha")
        assert r.status_code == 200, r.text
        assert _models(replica.url, "alpha") == ["notes"]
    r = _create(a.url, "alpha", "offline", [{"name": "hours", "text": "The lantern shop opens at nine."}])
    assert r.status_code == 201, r.text  # built and kept locally
    assert _chat(a.url, "offline", tenant="alpha").status_code == 200
    assert _models(a.url, "beta") == []
    deleted = httpx.delete(a.url + "/v1/kbs/notes", headers={"Authorization": "Bearer key-a"})
    assert deleted.status_code == 503, deleted.text  # a delete that could not reach every replica is refused
    assert _chat(a.url, "notes", tenant="alpha").status_code == 200  # ... and lost nothing

    redis_server.start()  # same port, empty
    # what A built while Redis was down is written through once it is back
    _until(lambda: _chat(b.url, "offline", tenant="alpha").status_code == 200, 60, "B answers the KB A built offline")
    # events flow again: an invalidation on A makes B rebuild instead of answering from its resident copy
    before = _chat(b.url, "notes", tenant="alpha").json()["cag"]["cache_source"]
    assert before != "built"
    cli = subprocess.run([sys.executable, "-m", "cag", "invalidate", "alpha__notes"], capture_output=True, text=True,
                         env={**os.environ, "CAG_HOME": str(a.home), "CAG_REDIS_URL": redis_server.url}, timeout=120)
    assert cli.returncode == 0, cli.stderr
    _until(lambda: _chat(b.url, "notes", tenant="alpha").json()["cag"]["cache_source"] == "built", 60,
           "B hears the invalidation after Redis came back")
    assert httpx.delete(a.url + "/v1/kbs/notes", headers={"Authorization": "Bearer key-a"}).status_code == 200
    _until(lambda: _chat(b.url, "notes", tenant="alpha").status_code == 404, 60, "B refuses the deleted KB")


# -- a shared Redis that holds junk, or lost everything -----------------------------------------------

@pytest.mark.parametrize("tenant_replicas", [False], indirect=True, ids=["private-cli-kbs"])
def test_junk_in_the_shared_redis_answers_no_500_on_any_replica(tenant_replicas, redis_server):  # noqa: F811
    import redis

    a, b = tenant_replicas
    assert _create(a.url, "alpha", "notes").status_code == 201
    hours = [{"name": "hours", "text": "The lantern shop opens at nine."}]
    assert _create(a.url, "alpha", "hours", hours).status_code == 201
    client = redis.Redis.from_url(redis_server.url)
    client.set("cag:junk:record", "not json")  # nobody's record, unreadable
    client.set("cag:alpha__notes:record", json.dumps({"meta": 5}))  # one tenant's record, damaged
    for replica in (a, b):
        assert _models(replica.url, "beta") == []
        assert "hours" in _models(replica.url, "alpha")
        assert _chat(replica.url, "hours", tenant="alpha").status_code == 200
    assert "notes" not in _models(b.url, "alpha")
    error = _chat(b.url, "notes", tenant="alpha")  # B has no copy of its own: it is not found, not a 500
    assert error.status_code == 404 and error.json()["error"]["code"] == "model_not_found", error.text
    assert _chat(a.url, "notes", tenant="alpha").status_code == 200  # A still holds a good copy and serves it
    assert _create(b.url, "alpha", "notes").status_code == 201  # built again: whole again
    assert _chat(b.url, "notes", tenant="alpha").status_code == 200 and "notes" in _models(b.url, "alpha")


@pytest.mark.parametrize("tenant_replicas", [False], indirect=True, ids=["private-cli-kbs"])
def test_a_kb_built_before_redis_lost_everything_reaches_every_replica_again(tenant_replicas,
                                                                             redis_server):  # noqa: F811
    a, b = tenant_replicas
    assert _create(a.url, "alpha", "notes").status_code == 201  # B never touches it before the restart
    redis_server.stop()  # kill -9 ...
    redis_server.start()  # ... and back without RDB or AOF: empty
    first = _until(lambda: (r := _chat(b.url, "notes", tenant="alpha")).status_code == 200 and r, 60,
                   "replica A publishes what it holds once Redis is back, and B answers from it")
    assert first.json()["cag"]["cache_source"] == "redis"  # A's cache, not a rebuild from its record alone
    assert "notes" in _models(b.url, "alpha")
