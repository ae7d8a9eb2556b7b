"""`cag models`: the default model, the GGUFs in the local Ollama store, and the models knowledge bases use,
each with what --model takes, its size and its knowledge bases; a model gone from its place says so."""

from __future__ import annotations

import json
import os
import shutil
import subprocess

from storeutil import make_docs
from cliutil import CAG, run
from ollamautil import ollama_store


def _models(home, store) -> list[dict]:
    env = {**os.environ, "CAG_HOME": str(home), "OLLAMA_MODELS": str(store)}
    proc = subprocess.run(CAG + ["models", "--json"], capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    return [json.loads(line) for line in proc.stdout.splitlines()]


def test_models_lists_the_store_and_what_knowledge_bases_use(tmp_path, cag_home, tiny_llama_gguf):
    store = tmp_path / "ollama"
    ollama_store(store, tiny_llama_gguf)
    model = tmp_path / "mine.gguf"
    shutil.copy(tiny_llama_gguf, model)
    run(["build", make_docs(tmp_path / "docs"), "--name", "g", "--model", model], cag_home)
    rows = {r["model"]: r for r in _models(cag_home, store)}
    assert rows["smollm2-135m-instruct"]["source"] == "default"
    ollama = rows["ollama:tiny:q4"]
    assert ollama["engine"] == "llamacpp" and ollama["bytes"] == tiny_llama_gguf.stat().st_size and not ollama["problem"]
    mine = rows[str(model)]
    assert mine["knowledge_bases"] == ["g"] and mine["source"] == "file" and mine["bytes"] == model.stat().st_size
    model.unlink()
    gone = {r["model"]: r for r in _models(cag_home, store)}[str(model)]
    assert gone["problem"] == "not found on this machine" and gone["knowledge_bases"] == ["g"]
    table = subprocess.run(CAG + ["models"], capture_output=True, text=True, timeout=300,
                           env={**os.environ, "CAG_HOME": str(cag_home), "OLLAMA_MODELS": str(store)})
    assert "ollama" in table.stdout and "file (missing)" in table.stdout, table.stdout
