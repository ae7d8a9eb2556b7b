"""A knowledge base created over HTTP is built with the model it names, if the server's config allows it, and
with no other: an unlisted model is a 400 that names the allowed ones, and nothing is created."""

from __future__ import annotations

import json

import httpx
import pytest
from serverutil import Replica

DOCS = [{"name": "a.md", "text": "# Lanterns\nThe Heron lantern costs 148 crowns and is blue."}]


@pytest.fixture
def server(cag_home, tmp_path, tiny_qwen2_gguf, tiny_llama_gguf):
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"model": str(tiny_qwen2_gguf), "allowed_models": [str(tiny_llama_gguf)],
                                  "response_cache": False}))
    replica = Replica(cag_home, config, {"CAG_THREADS": "1"}).start()
    yield replica
    replica.stop()


def _roots(url: str) -> dict:
    return {m["id"]: m["root"] for m in httpx.get(url + "/v1/models").json()["data"]}


def test_the_named_model_is_honoured_or_refused(server, tiny_qwen2_gguf, tiny_llama_gguf, smollm2_gguf):
    url = server.url
    own = httpx.post(url + "/v1/kbs", json={"name": "own", "documents": DOCS}, timeout=300)
    assert own.status_code == 201 and own.json()["model"] == tiny_qwen2_gguf.name, own.text
    other = httpx.post(url + "/v1/kbs", json={"name": "other", "documents": DOCS, "model": str(tiny_llama_gguf)},
                       timeout=300)
    assert other.status_code == 201 and other.json()["model"] == tiny_llama_gguf.name, other.text
    assert _roots(url) == {"own": tiny_qwen2_gguf.name, "other": tiny_llama_gguf.name}

    refused = httpx.post(url + "/v1/kbs", json={"name": "nope", "documents": DOCS, "model": str(smollm2_gguf)},
                         timeout=300)
    error = refused.json()["error"]
    assert refused.status_code == 400 and error["code"] == "model_not_allowed" and error["param"] == "model"
    assert tiny_qwen2_gguf.name in error["message"] and tiny_llama_gguf.name in error["message"]  # (paths kept)
    upload = httpx.post(url + "/v1/kbs/upload", data={"name": "nope", "model": "ollama:smollm2:135m"},
                        files={"files": ("a.md", b"# A\nText.")}, timeout=300)
    assert upload.status_code == 400 and upload.json()["error"]["code"] == "model_not_allowed"
    assert httpx.get(url + "/v1/kbs/nope").status_code == 404 and "nope" not in _roots(url)

    replaced = httpx.put(url + "/v1/kbs/other", json={"documents": DOCS + [{"name": "b.txt", "text": "More."}]},
                         timeout=300)
    assert replaced.status_code == 200 and replaced.json()["model"] == tiny_llama_gguf.name  # a rebuild keeps it
    answer = httpx.post(url + "/v1/chat/completions", timeout=300, json={
        "model": "other", "max_tokens": 4, "messages": [{"role": "user", "content": "How much is the Heron?"}]})
    assert answer.status_code == 200 and answer.json()["model"] == "other"


def test_an_allowed_models_entry_that_is_no_list_is_refused_at_start(tmp_path):
    from cag.server.config import ConfigError, ServerConfig

    with pytest.raises(ConfigError, match="allowed_models must be a list"):
        ServerConfig(allowed_models="a.gguf")
