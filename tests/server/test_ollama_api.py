"""Ollama's API on a real `cag serve` (the real default model), through the official `ollama` Python client.

Chat and generate, streamed and whole, answer exactly what /v1/chat/completions answers for the same
question; the listing, show, ps and version routes speak Ollama's shapes; keys, unknown models and bad bodies
are refused in Ollama's error shape; keep_alive 0 unloads a model as its answer ends, and a short server
keep_alive unloads an idle one (shown by /api/ps, /v1/cag/loaded and /metrics).
"""

from __future__ import annotations

import json
import time
from contextlib import contextmanager
from datetime import datetime, timezone

import httpx
import ollama
import pytest

import cag
from conftest import SAMPLE_DOCS, SAMPLE_QUESTIONS
from serverutil import Replica

pytestmark = pytest.mark.real_model

KEY = "ollama-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
KB = "ollama-sample"
TOKENS = 12
QUESTION = json.loads(SAMPLE_QUESTIONS.read_text().splitlines()[0])["q"]


@pytest.fixture(scope="module")
def home(real_home, real_lm):
    """The real home with the sample knowledge base built on the default model."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAG_HOME", str(real_home))
        cag.build([SAMPLE_DOCS], name=KB, lm=real_lm, log=lambda _m: None)
    return real_home


@contextmanager
def replica(home, tmp_path_factory, own_model, **settings):
    """`cag serve` on the real home, behind KEY (CLI knowledge bases shared), the response cache off so that
    every answer is the model's own; stopped afterwards. Its own model (loaded at start) is the tiny one, so
    it starts in seconds; the knowledge base's default model loads on first use, as any other model does."""
    config = tmp_path_factory.mktemp("ollama-config") / "server.json"
    config.write_text(json.dumps({"api_keys": {KEY: "team"}, "share_cli_kbs": True, "response_cache": False,
                                  "model": str(own_model), **settings}))
    server = Replica(home, config, {}).start(timeout=300)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def server(home, tmp_path_factory, tiny_model_dir):
    with replica(home, tmp_path_factory, tiny_model_dir) as s:
        yield s


@pytest.fixture
def client(server):
    return ollama.Client(host=server.url, headers=AUTH, timeout=300)


def openai_answer(url: str, question: str = QUESTION) -> dict:
    r = httpx.post(url + "/v1/chat/completions", headers=AUTH, timeout=300, json={
        "model": KB, "max_tokens": TOKENS, "messages": [{"role": "user", "content": question}]})
    assert r.status_code == 200, r.text
    return r.json()


def ask(client: ollama.Client, **more):
    return client.chat(model=KB, messages=[{"role": "user", "content": QUESTION}], options={"num_predict": TOKENS},
                       **more)


def loaded_names(client: ollama.Client) -> list[str]:
    return [m.model for m in client.ps().models]


def test_chat_and_generate_answer_exactly_as_the_openai_route(server, client):
    want = openai_answer(server.url)
    text, usage = want["choices"][0]["message"]["content"], want["usage"]
    assert text

    whole = ask(client, stream=False)
    assert whole.message.content == text and whole.message.role == "assistant"
    assert whole.done and whole.done_reason == want["choices"][0]["finish_reason"]
    assert whole.eval_count == usage["completion_tokens"] and whole.prompt_eval_count == usage["prompt_tokens"]
    assert whole.total_duration >= whole.eval_duration > 0 and whole.model == KB
    assert datetime.fromisoformat(whole.created_at.replace("Z", "+00:00")).tzinfo is not None

    parts = list(client.chat(model=KB + ":latest", messages=[{"role": "user", "content": QUESTION}],
                             options={"num_predict": TOKENS, "temperature": 0}, stream=True))
    assert "".join(p.message.content for p in parts) == text
    assert [p.done for p in parts] == [False] * (len(parts) - 1) + [True] and len(parts) > 2
    assert parts[-1].eval_count == usage["completion_tokens"] and parts[-1].model == KB + ":latest"

    generated = client.generate(model=KB, prompt=QUESTION, options={"num_predict": TOKENS}, stream=False)
    assert generated.response == text and generated.done
    pieces = list(client.generate(model=KB, prompt=QUESTION, options={"num_predict": TOKENS}, stream=True))
    assert "".join(p.response for p in pieces) == text and pieces[-1].done

    # Ollama's own default is to stream: a body without `stream` gets NDJSON, one JSON object a line
    r = httpx.post(server.url + "/api/generate", headers=AUTH, timeout=300,
                   json={"model": KB, "prompt": QUESTION, "options": {"num_predict": TOKENS}})
    assert r.status_code == 200 and r.headers["content-type"].startswith("application/x-ndjson")
    lines = [json.loads(line) for line in r.text.splitlines()]
    assert "".join(x["response"] for x in lines) == text and lines[-1]["done"] and not lines[0]["done"]


def test_tags_show_version_ps_and_loaded(server, client):
    ask(client, stream=False)  # loaded now
    tags = {m.model: m for m in client.list().models}
    assert KB in tags and tags[KB].size > 0 and len(tags[KB].digest) == 64
    assert tags[KB].details.family == "smollm2-135m-instruct"

    shown = client.show(KB + ":latest")
    assert shown.modelinfo["cag.tokens"] > 1000 and shown.capabilities == ["completion"]

    version = httpx.get(server.url + "/api/version", timeout=30).json()
    assert version["version"] and version["cag"] == cag.__version__

    running = client.ps().models
    assert [m.model for m in running] == [KB]
    assert running[0].size > 0 and running[0].expires_at > datetime.now(timezone.utc)
    loaded = httpx.get(server.url + "/v1/cag/loaded", headers=AUTH, timeout=30).json()["data"]
    row = next(r for r in loaded if r["knowledge_bases"])
    assert row["knowledge_bases"][0]["name"] == KB and row["bytes"] > row["weights"] > 0
    assert row["idle_s"] >= 0 and row["keep_alive_s"] is None  # the server's default: for ever (the budget decides)
    assert running[0].expires_at.year == 9999
    metrics = httpx.get(server.url + "/metrics", timeout=30).text
    assert 'cag_model_idle_seconds{engine="torch",model="smollm2-135m-instruct"}' in metrics


def test_keys_unknown_models_and_bad_bodies_are_refused_in_ollamas_shape(server):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        with pytest.raises(ollama.ResponseError) as refused:
            ollama.Client(host=server.url, headers=headers).list()
        assert refused.value.status_code == 401 and "API key" in refused.value.error
    with pytest.raises(ollama.ResponseError) as refused:
        ollama.Client(host=server.url).chat(model=KB, messages=[{"role": "user", "content": QUESTION}])
    assert refused.value.status_code == 401

    keyed = ollama.Client(host=server.url, headers=AUTH)
    for model in ("no-such-kb", KB + ":7b"):
        with pytest.raises(ollama.ResponseError) as missing:
            keyed.chat(model=model, messages=[{"role": "user", "content": QUESTION}], stream=False)
        assert missing.value.status_code == 404 and model.split(":")[0] in missing.value.error
    with pytest.raises(ollama.ResponseError) as missing:
        keyed.show("no-such-kb")
    assert missing.value.status_code == 404

    for body, says in (({"model": KB, "keep_alive": "soon", "messages": []}, "keep_alive"),
                       ({"model": KB, "options": {"num_predict": "8"}, "messages": [{"role": "user", "content": "q"}]},
                        "options.num_predict"),
                       ({"model": KB, "format": "json", "messages": [{"role": "user", "content": "q"}]}, "format"),
                       ({"model": KB, "messages": [{"role": "robot", "content": "q"}]}, "role")):
        r = httpx.post(server.url + "/api/chat", headers=AUTH, json=body, timeout=60)
        assert r.status_code == 400 and set(r.json()) == {"error"} and says in r.json()["error"], r.text
    r = httpx.post(server.url + "/api/chat", headers={**AUTH, "Content-Type": "application/json"},
                   content=b"{not json", timeout=60)
    assert r.status_code == 400 and isinstance(r.json()["error"], str)
    # the OpenAI routes' limits: max_tokens_limit (1024) and max_body_bytes (2 MB)
    r = httpx.post(server.url + "/api/generate", headers=AUTH, timeout=60,
                   json={"model": KB, "prompt": QUESTION, "options": {"num_predict": 5000}, "stream": False})
    assert r.status_code == 400 and "1024" in r.json()["error"], r.text
    r = httpx.post(server.url + "/api/generate", headers=AUTH, timeout=60,
                   json={"model": KB, "prompt": "x" * 2_100_000})
    assert r.status_code == 413 and set(r.json()) == {"error"}, r.text
    assert httpx.get(server.url + "/healthz", timeout=30).status_code == 200  # and it still serves


def test_keep_alive_zero_unloads_the_model_once_it_answered(server, client):
    first = ask(client, stream=False)
    assert loaded_names(client) == [KB]
    again = ask(client, stream=False, keep_alive=0)
    assert again.message.content == first.message.content
    assert loaded_names(client) == []  # at once: unloaded before the answer was sent
    loaded = httpx.get(server.url + "/v1/cag/loaded", headers=AUTH, timeout=30).json()["data"]
    assert not any(r["knowledge_bases"] for r in loaded)
    assert ask(client, stream=False).message.content == first.message.content  # loaded again on demand
    assert loaded_names(client) == [KB]
    # Ollama's unload request: no messages, keep_alive 0
    r = httpx.post(server.url + "/api/chat", headers=AUTH, timeout=60, json={"model": KB, "keep_alive": 0})
    assert r.status_code == 200 and r.json()["done_reason"] == "unload"
    assert loaded_names(client) == []


def test_a_short_server_keep_alive_unloads_an_idle_model(home, tmp_path_factory, tiny_model_dir):
    with replica(home, tmp_path_factory, tiny_model_dir, keep_alive="2s") as short:
        client = ollama.Client(host=short.url, headers=AUTH, timeout=300)
        kept = ask(client, stream=False, keep_alive=-1)  # for ever: outlives the server's default
        time.sleep(3)
        running = client.ps().models
        assert [m.model for m in running] == [KB] and running[0].expires_at.year == 9999
        assert ask(client, stream=False).message.content == kept.message.content  # the server's 2s from now on
        assert loaded_names(client) == [KB]
        deadline = time.time() + 30
        while loaded_names(client) and time.time() < deadline:
            time.sleep(0.25)
        assert loaded_names(client) == [], "an idle model outlived the server's keep_alive"
        metrics = httpx.get(short.url + "/metrics", timeout=30).text
        assert "cag_model_idle_seconds{" not in metrics  # nothing loaded (the server's own model went too)
