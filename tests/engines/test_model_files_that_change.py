"""Model files that change or vanish after a knowledge base was built on them.

A cache belongs to the exact model it was made with. When that model's file is replaced (another GGUF at
the same path, an Ollama tag pulled again, retrained weights in a Hugging Face folder) or removed, every
path must say so: `cag ask` refuses on one line naming the file and what to do (never an answer from
another model, never a silent rebuild with it), and `cag ls --verify` does not call such a cache "ok".
An Ollama blob is checked against the sha256 its name claims, with the memoized hash the load computes.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from conftest import make_tiny_model
from storeutil import make_docs

import cag
from cag import api, engines, paths
from cag.cache.stores.disk import CACHE_FILE
from cag.errors import ModelChangedError, ModelError
from cliutil import assert_one_line_error, run
from ollamautil import ollama_store

QUIET = {"log": lambda _m: None}


def _verified(name: str) -> dict:
    return next(row for row in api.list_kbs(verify=True) if row["name"] == name)


# -- a Hugging Face folder (the torch engine) -------------------------------------------------------------

@pytest.fixture
def own_model(tmp_path, cag_home) -> Path:
    """A tiny model folder of this test's own, and a knowledge base "kb" built on it."""
    folder = make_tiny_model(tmp_path / "model")
    cag.build([make_docs(tmp_path / "docs")], name="kb", model=str(folder), **QUIET)
    return folder


def test_ls_verify_reports_retrained_weights_and_a_removed_folder(own_model, cag_home):
    assert _verified("kb")["status"] == "ok"
    make_tiny_model(own_model, seed=1)  # same tokenizer and config, other weights
    row = _verified("kb")
    assert row["status"].startswith(f"model changed: {own_model}") and row["verified"] is False
    table = run(["ls", "--verify"], cag_home).stdout
    assert [line.split()[-2:] for line in table.splitlines() if line.startswith("kb ")] == [["model", "changed"]]
    shutil.rmtree(own_model)
    row = _verified("kb")
    assert row["status"].startswith("model missing: ") and str(own_model) in row["status"]
    assert row["verified"] is False


def test_ask_refuses_retrained_weights_naming_the_folder(own_model, cag_home):
    make_tiny_model(own_model, seed=1)
    proc = run(["ask", "kb", "Who founded it?", "--max-new-tokens", "4"], cag_home, check=False)
    assert_one_line_error(proc, "the model of knowledge base 'kb' changed since its cache was built",
                          str(own_model), "put the original back", "cag build")
    assert proc.stdout == ""  # no answer from the other model


def test_ask_after_the_model_folder_was_removed_says_what_to_do(own_model, cag_home):
    shutil.rmtree(own_model)
    proc = run(["ask", "kb", "Who founded it?", "--max-new-tokens", "4"], cag_home, check=False)
    assert_one_line_error(proc, f"no model at {own_model}", "The knowledge base 'kb' was built with that model",
                          "put it back", "--model NEWPATH")


def test_a_dropped_cache_is_not_rebuilt_silently_with_a_replaced_model(own_model, cag_home, tmp_path):
    api.invalidate("kb")  # no cache left to compare with: only kb.json knows which model it was
    make_tiny_model(own_model, seed=1)
    with pytest.raises(ModelChangedError, match="changed since its cache was built"):
        cag.load("kb", **QUIET)
    assert not (paths.kb_dir("kb") / CACHE_FILE).exists()  # nothing was rebuilt with the other model
    cag.build([tmp_path / "docs"], name="kb", model=str(own_model), **QUIET)  # the user's explicit choice
    assert cag.load("kb", **QUIET).tokens > 0
    assert _verified("kb")["status"] == "ok"


# -- GGUF files and Ollama blobs (the llama.cpp engine) ---------------------------------------------------

def _other_gguf(path: Path) -> None:
    """Another random-weight model of the same shape (and so the same size) written over `path`."""
    from cag.engines.llamacpp import synth
    from cag.engines.torch.models import default_gguf_path

    synth.write(path, synth.SHAPES["tiny-llama"], default_gguf_path(), "Q4_K_M", seed=2)


def _gguf_kb(tmp_path: Path, model: str) -> None:
    """Knowledge base "g", built on the GGUF model `model` (a path or ollama:NAME:TAG)."""
    lm = engines.load(model, threads=2, **QUIET)
    try:
        cag.build([make_docs(tmp_path / "docs")], name="g", model=model, lm=lm, **QUIET)
    finally:
        lm.close()


def test_a_replaced_or_removed_gguf_file(tmp_path, cag_home, tiny_llama_gguf):
    model = tmp_path / "model.gguf"
    shutil.copy(tiny_llama_gguf, model)
    _gguf_kb(tmp_path, str(model))
    assert _verified("g")["status"] == "ok"
    _other_gguf(model)
    assert model.stat().st_size == tiny_llama_gguf.stat().st_size  # only the content tells them apart
    row = _verified("g")
    assert row["status"].startswith(f"model changed: {model}") and row["verified"] is False
    proc = run(["ask", "g", "Who founded it?", "--max-new-tokens", "4"], cag_home, check=False)
    assert_one_line_error(proc, "the model of knowledge base 'g' changed since its cache was built", str(model))
    assert proc.stdout == ""
    model.unlink()
    row = _verified("g")
    assert row["status"].startswith(f"model missing: no model at {model}")
    proc = run(["ask", "g", "Who founded it?", "--max-new-tokens", "4"], cag_home, check=False)
    assert_one_line_error(proc, f"no model at {model}", "put it back", "--model NEWPATH", "reuses the whole cache")


def test_an_ollama_blob_must_match_its_sha256_name(tmp_path, cag_home, monkeypatch, tiny_llama_gguf,
                                                    tiny_qwen2_gguf):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    blob = ollama_store(tmp_path / "ollama", tiny_llama_gguf)
    _gguf_kb(tmp_path, "ollama:tiny:q4")  # a good blob loads
    memo_path = paths.models_dir() / "fingerprints.json"
    memo = json.loads(memo_path.read_text())
    st = blob.stat()
    key = f"{blob.resolve()}|{st.st_size}|{st.st_mtime_ns}"
    assert memo[key] == blob.name.removeprefix("sha256-")  # hashed once, kept for the next load
    memo_path.write_text(json.dumps({**memo, key: "0" * 64}))
    with pytest.raises(ModelError, match="does not match its sha256 name"):  # the check used the memo: no rehash
        engines.load("ollama:tiny:q4", threads=2, **QUIET)
    memo_path.write_text(json.dumps(memo))
    shutil.copy(tiny_qwen2_gguf, blob)  # altered content under the old name
    with pytest.raises(ModelError) as info:
        engines.load("ollama:tiny:q4", threads=2, **QUIET)
    assert str(info.value) == (f"the Ollama blob of model tiny:q4 ({blob}) does not match its sha256 name: it is "
                               "damaged or was altered; run `ollama pull tiny:q4`")
    proc = run(["ask", "g", "Who founded it?", "--max-new-tokens", "4"], cag_home, check=False)
    assert_one_line_error(proc, "does not match its sha256 name", "ollama pull tiny:q4")
    assert _verified("g")["status"].startswith("model unusable: the Ollama blob of model tiny:q4")


def test_an_ollama_tag_pulled_again_is_another_model(tmp_path, cag_home, monkeypatch, tiny_llama_gguf,
                                                      tiny_qwen2_gguf):
    monkeypatch.setenv("OLLAMA_MODELS", str(tmp_path / "ollama"))
    ollama_store(tmp_path / "ollama", tiny_llama_gguf)
    _gguf_kb(tmp_path, "ollama:tiny:q4")
    assert _verified("g")["status"] == "ok"
    new_blob = ollama_store(tmp_path / "ollama", tiny_qwen2_gguf)  # the manifest now names another blob
    row = _verified("g")
    assert row["status"].startswith(f"model changed: {new_blob}")
    proc = run(["ask", "g", "Who founded it?", "--max-new-tokens", "4"], cag_home, check=False)
    assert_one_line_error(proc, "the model of knowledge base 'g' changed", f"ollama:tiny:q4 ({new_blob})")
    shutil.rmtree(tmp_path / "ollama" / "manifests")
    assert _verified("g")["status"].startswith("model missing: Ollama model 'tiny:q4' is not in")
