"""One model file is loaded once by a server however knowledge bases name it: by two paths (a copy) and as an
Ollama model whose blob holds the same bytes."""

from __future__ import annotations

import json
import re
import shutil

import httpx
from serverutil import Replica, write_docs

from cag import api, engines
from ollamautil import ollama_store


def test_a_gguf_named_three_ways_is_loaded_once(tmp_path, cag_home, monkeypatch, tiny_llama_gguf):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    ollama_store(tmp_path / "ollama", tiny_llama_gguf)
    copy = tmp_path / "elsewhere" / "same.gguf"
    copy.parent.mkdir()
    shutil.copy(tiny_llama_gguf, copy)
    names = {"by-path": str(tiny_llama_gguf), "by-copy": str(copy), "by-ollama": "ollama:tiny:q4"}
    want = {}
    for kb, model in names.items():
        lm = engines.load(model, threads=1, log=lambda _m: None)
        try:
            built = api.build([write_docs(tmp_path / kb)], name=kb, model=model, lm=lm, log=lambda _m: None)
            want[kb] = built.ask("Who founded it?", max_new_tokens=6).answer
        finally:
            lm.close()
    config = tmp_path / "server.json"
    config.write_text(json.dumps({"model": str(tiny_llama_gguf), "response_cache": False}))
    server = Replica(cag_home, config, {"CAG_THREADS": "1", "OLLAMA_MODELS": str(tmp_path / "ollama")}).start()
    try:
        for kb in names:
            r = httpx.post(server.url + "/v1/chat/completions", timeout=300, json={
                "model": kb, "max_tokens": 6, "messages": [{"role": "user", "content": "Who founded it?"}]})
            assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == want[kb], r.text
        metrics = httpx.get(server.url + "/metrics").text
    finally:
        server.stop()
    log = server.log.read_text()
    assert "loaded model" not in log, log  # the server's own model, loaded at start, answered all three
    weights = re.findall(r'^cag_model_bytes\{[^}]*part="weights"[^}]*\} (\S+)$', metrics, re.M)
    assert len(weights) == 1, metrics
