"""The Python API end to end on the tiny model: build, reload from disk, stale knowledge, bad files."""

import json

import pytest

import cag
from cag import paths
from cag.cache.stores.disk import CACHE_FILE, KB_FILE
from cag.errors import CacheFileError, CacheMismatchError, KnowledgeTooLargeError, NotFoundError, StaleKnowledgeError
from cag.kb.prompt import Turn

QUESTIONS = ["Who founded the company?", "How much is the Heron?", "What colour is it?", "When was it founded?"]


@pytest.fixture
def kb_docs(tmp_path):
    d = tmp_path / "docs"
    d.mkdir()
    (d / "a.md").write_text("# Lanterns\nThe Heron lantern costs 148 crowns and is blue.")
    (d / "b.txt").write_text("Quillfeather was founded in 1987 by Odalys Renn.")
    return d


def test_build_then_load_answers_identically_from_disk(cag_home, tiny_model_dir, kb_docs):
    logs = []
    kb = cag.build([kb_docs], name="lanterns", model=str(tiny_model_dir), log=logs.append)
    assert kb.cache_source == "built" and kb.build_stats.tokens == kb.tokens > 0
    assert (paths.kb_dir("lanterns") / CACHE_FILE).is_file()
    again = cag.load("lanterns", log=logs.append)
    assert again.cache_source == "disk" and again.prefix_ids == kb.prefix_ids
    for q in QUESTIONS:
        a = again.ask(q, max_new_tokens=16)
        assert a.token_ids == kb.ask(q, max_new_tokens=16).token_ids
        ref = again.ask(q, max_new_tokens=16, use_cache=False)
        assert a.token_ids == ref.token_ids
        assert a.cached_tokens == kb.tokens and ref.cached_tokens == 0
        assert a.prompt_tokens == ref.prompt_tokens == a.cached_tokens + a.question_tokens


def test_streamed_text_adds_up_to_the_answer(cag_home, tiny_model_dir, kb_docs):
    kb = cag.build([kb_docs], name="s", model=str(tiny_model_dir))
    pieces = []
    a = kb.ask("Who founded it?", max_new_tokens=20, on_text=pieces.append)
    assert "".join(pieces).strip() == a.answer


def test_history_turns_are_answered_from_the_cached_prefix(cag_home, tiny_model_dir, kb_docs):
    kb = cag.build([kb_docs], name="h", model=str(tiny_model_dir))
    history = [Turn("How much is the Heron?", "148 crowns.")]
    a = kb.ask("And who founded the company?", history=history, max_new_tokens=12)
    b = kb.ask("And who founded the company?", history=history, max_new_tokens=12, use_cache=False)
    assert a.boundary_ok and a.cached_tokens == kb.tokens and a.token_ids == b.token_ids


def test_changed_knowledge_is_rebuilt_and_said(cag_home, tiny_model_dir, kb_docs):
    kb = cag.build([kb_docs], name="k", model=str(tiny_model_dir))
    (kb_docs / "b.txt").write_text("Quillfeather was founded in 1990 by someone else entirely.")
    with pytest.raises(StaleKnowledgeError, match="changed"):
        cag.load("k", rebuild=False)
    logs = []
    fresh = cag.load("k", log=logs.append)
    assert fresh.cache_source == "built" and fresh.prefix_ids != kb.prefix_ids
    assert any("changed" in m and "rebuilding" in m for m in logs)
    assert cag.load("k").cache_source == "disk"  # the rebuilt cache was stored


def test_missing_sources_fall_back_to_the_build_time_copy(cag_home, tiny_model_dir, kb_docs):
    kb = cag.build([kb_docs], name="gone", model=str(tiny_model_dir))
    for f in kb_docs.iterdir():
        f.unlink()
    kb_docs.rmdir()
    logs = []
    again = cag.load("gone", log=logs.append)
    assert again.prefix_ids == kb.prefix_ids and any("not found" in m for m in logs)


def test_oversize_knowledge_says_how_many_tokens_and_how_many_fit(cag_home, tiny_model_dir):
    from conftest import SAMPLE_DOCS

    with pytest.raises(KnowledgeTooLargeError) as info:
        cag.build([SAMPLE_DOCS], name="big", model=str(tiny_model_dir))
    e = info.value
    assert e.tokens > e.fits == 1024 - 512
    assert f"{e.tokens} tokens" in str(e) and "at most 512 fit" in str(e)
    assert not paths.kb_dir("big").exists()


def test_cache_for_another_model_is_refused(cag_home, tiny_model_dir, kb_docs, tmp_path):
    from conftest import make_tiny_model

    cag.build([kb_docs], name="m", model=str(tiny_model_dir))
    other = make_tiny_model(tmp_path / "other-model", seed=1)
    meta_path = paths.kb_dir("m") / KB_FILE
    meta = json.loads(meta_path.read_text())
    meta["model"] = str(other)
    meta_path.write_text(json.dumps(meta))
    with pytest.raises(CacheMismatchError, match="different model"):
        cag.load("m")


def test_tampered_cache_is_refused(cag_home, tiny_model_dir, kb_docs):
    cag.build([kb_docs], name="t", model=str(tiny_model_dir))
    f = paths.kb_dir("t") / CACHE_FILE
    data = bytearray(f.read_bytes())
    data[-100] ^= 0xFF
    f.write_bytes(bytes(data))
    with pytest.raises(CacheFileError, match="checksum"):
        cag.load("t")


def test_list_and_delete(cag_home, tiny_model_dir, kb_docs):
    assert cag.list_kbs() == []
    kb = cag.build([kb_docs], name="one", model=str(tiny_model_dir))
    rows = cag.list_kbs(verify=True)
    assert [r["name"] for r in rows] == ["one"] and rows[0]["tokens"] == kb.tokens and rows[0]["status"] == "ok"
    cag.delete("one")
    assert cag.list_kbs() == []
    with pytest.raises(NotFoundError):
        cag.delete("one")
    with pytest.raises(NotFoundError, match="cag build"):
        cag.load("one")


def test_names_cannot_escape_the_home(cag_home):
    with pytest.raises(cag.CagError, match="invalid knowledge base name"):
        paths.kb_dir("../etc")


def test_int8_kv_build_is_smaller_and_answers_the_same_from_disk(cag_home, sharp_lm, kb_docs):
    exact = cag.build([kb_docs], name="exact", lm=sharp_lm, log=lambda _m: None)
    small = cag.build([kb_docs], name="small", lm=sharp_lm, log=lambda _m: None, kv_quant="int8")
    assert small.manifest["kv_quant"] == "int8" and "kv_quant" not in exact.manifest
    assert small.build_stats.file_bytes < 0.6 * exact.build_stats.file_bytes
    again = cag.load("small", lm=sharp_lm, log=lambda _m: None)
    assert again.cache_source in ("disk", "memory")
    for q in QUESTIONS:
        cached = again.ask(q, max_new_tokens=10)
        assert cached.token_ids == small.ask(q, max_new_tokens=10).token_ids
        # the reference recomputes the prefix and stores it as the cache does (int8), so it agrees too
        assert again.ask(q, max_new_tokens=10, use_cache=False).token_ids == cached.token_ids


def test_settings_are_read_in_one_place_and_bad_values_name_their_variable(monkeypatch, tmp_path):
    from cag import settings
    from cag.cache import stores

    monkeypatch.setenv("CAG_HOME", str(tmp_path / "h1"))
    first = settings.current()
    assert first.home == tmp_path / "h1" and settings.current() is first  # parsed once for the same environment
    monkeypatch.setenv("CAG_HOME", str(tmp_path / "h2"))
    assert settings.current().home == tmp_path / "h2" == paths.home()
    monkeypatch.setenv("CAG_MEMORY_BYTES", "lots")
    with pytest.raises(cag.CagError, match="CAG_MEMORY_BYTES must be a byte count"):
        stores.default()
    monkeypatch.setenv("CAG_MEMORY_BYTES", "512M")
    monkeypatch.setenv("CAG_REDIS_TTL", "soon")
    with pytest.raises(cag.CagError, match="CAG_REDIS_TTL must be a number"):
        settings.current()
