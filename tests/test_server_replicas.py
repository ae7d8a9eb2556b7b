"""Horizontal scaling: two `cag serve` replicas with separate CAG_HOMEs sharing one real Redis.

The knowledge base is built once by the CLI on "machine A"; the replica on "machine B" has an empty
CAG_HOME and must answer from the cache in Redis (no prefill, no rebuild), with the same answer as A.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import httpx
import pytest

from serverutil import wait_until_serving
from storeutil import free_port, make_docs, redis_url  # noqa: F401 - redis_url is a fixture


def _env(home, url):
    env = {**os.environ, "CAG_HOME": str(home), "CAG_REDIS_URL": url}
    env.pop("CAG_API_KEYS", None)
    return env


@pytest.fixture
def replicas(tmp_path, redis_url, sharp_model_dir):  # noqa: F811
    home_a, home_b = tmp_path / "machine-a", tmp_path / "machine-b"
    docs = make_docs(tmp_path / "docs")
    build = subprocess.run([sys.executable, "-m", "cag", "build", str(docs), "--name", "kb", "--model", str(sharp_model_dir)],
                           env=_env(home_a, redis_url), capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"model": str(sharp_model_dir), "response_cache": False}))
    procs, urls = [], []
    for home in (home_a, home_b):
        port = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "cag", "serve", "--port", str(port), "--config", str(config)],
                                      env=_env(home, redis_url), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
        urls.append(f"http://127.0.0.1:{port}")
    try:
        for url, proc in zip(urls, procs):
            wait_until_serving(url, proc, 120)
        yield urls, home_a, home_b
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait(timeout=30)


def _ask(url: str, q: str) -> dict:
    r = httpx.post(url + "/v1/chat/completions", timeout=120,
                   json={"model": "kb", "max_tokens": 10, "messages": [{"role": "user", "content": q}]})
    assert r.status_code == 200, r.text
    return r.json()


def test_replica_with_an_empty_home_answers_from_the_shared_redis_cache(replicas):
    from cag import kvfile

    (url_a, url_b), home_a, home_b = replicas
    sources = []
    for q in ("Who founded it?", "How much is the Heron?"):
        a, b = _ask(url_a, q), _ask(url_b, q)
        assert b["choices"][0]["message"]["content"] == a["choices"][0]["message"]["content"]
        assert b["usage"]["prompt_tokens_details"]["cached_tokens"] == a["usage"]["prompt_tokens_details"]["cached_tokens"] > 0
        sources.append(b["cag"]["cache_source"])
    assert sources[0] == "redis"  # B's first answer came from the cache A built, through Redis
    metrics = httpx.get(url_b + "/metrics").text
    assert 'cag_kb_loads_total{tier="redis"} 1.0' in metrics and 'cag_kb_loads_total{tier="resident"} 1.0' in metrics
    # B may keep a promoted copy on its own disk: the same bytes as A's cache
    copy = home_b / "kbs" / "kb" / "cache.safetensors"
    if copy.exists():
        original = kvfile.read_manifest(home_a / "kbs" / "kb" / "cache.safetensors")
        assert kvfile.read_manifest(copy)["tensors_sha256"] == original["tensors_sha256"]
