"""A cache that cannot serve is refused saying exactly what mismatched, so that a user can act: a cache file
copied over from another knowledge base names that knowledge base (its files did not change), values that
print alike ('8192' the text, 8192 the number) show their types, and long values such as a llama.cpp build
show the part where they differ, not the beginning they share."""

from __future__ import annotations

import shutil

import pytest

import cag
from cag import api, paths
from cag.cache import kvfile
from cag.cache.stores.disk import CACHE_FILE
from cag.cache.kvfile import Expect
from cag.errors import CacheMismatchError, StaleKnowledgeError
from serverutil import write_docs
from cacheutil import IDENTITY, cache, resave, saved  # noqa: F401 - cache, saved: fixtures

OTHER_DOCS = {"c.md": "The Wren lantern costs 12 crowns and is green."}


def _quiet(_message: str) -> None:
    pass


@pytest.fixture
def swapped(cag_home, tiny_lm, tmp_path) -> str:
    """Knowledge bases 'gb' and 'other' on one model, then other's cache file copied over gb's."""
    cag.build([write_docs(tmp_path / "gb")], name="gb", lm=tiny_lm, log=_quiet)
    cag.build([write_docs(tmp_path / "other", OTHER_DOCS)], name="other", lm=tiny_lm, log=_quiet)
    shutil.copyfile(paths.kb_dir("other") / CACHE_FILE, paths.kb_dir("gb") / CACHE_FILE)
    return "the cache file of 'gb' was made for the knowledge base 'other'"


def test_a_cache_file_from_another_knowledge_base_is_refused_naming_it(swapped, tiny_lm):
    with pytest.raises(StaleKnowledgeError) as before_the_model:
        api.check_servable("gb")
    with pytest.raises(StaleKnowledgeError) as on_load:
        cag.load("gb", lm=tiny_lm, rebuild=False, log=_quiet)
    for refused in (before_the_model, on_load):
        assert swapped in str(refused.value) and "changed" not in str(refused.value), refused.value


def test_a_cache_file_from_another_knowledge_base_is_rebuilt_saying_why(swapped, tiny_lm):
    logs: list[str] = []
    kb = cag.load("gb", lm=tiny_lm, log=logs.append)
    assert kb.cache_source == "built" and kb.manifest["knowledge"]["name"] == "gb"
    assert any(swapped[1:] in m and "rebuilding" in m and "changed" not in m for m in logs), logs
    assert cag.load("gb", lm=tiny_lm, rebuild=False, log=_quiet).cache_source in ("memory", "disk")


def test_caches_made_before_the_name_was_recorded_still_say_their_files_changed(cag_home, tiny_lm, tmp_path):
    docs = write_docs(tmp_path / "gb")
    cag.build([docs], name="gb", lm=tiny_lm, log=_quiet)
    resave(paths.kb_dir("gb") / CACHE_FILE, edit_manifest=lambda m: m["knowledge"].pop("name", None),
            recompute=True)
    assert cag.load("gb", lm=tiny_lm, rebuild=False, log=_quiet).cache_source == "disk"  # an older cache still serves
    (docs / "b.txt").write_text("Quillfeather was founded in 1990.")
    with pytest.raises(StaleKnowledgeError, match="the knowledge files of 'gb' changed since its cache was built"):
        api.check_servable("gb")


def _file_with_model(tmp_path, cache, **model) -> str:  # cache: the fixture's value
    path = tmp_path / "made.safetensors"
    kvfile.save(path, cache[0], cache[1], {**IDENTITY, "model": {**IDENTITY["model"], **model}})
    return str(path)


def test_a_context_size_stored_as_text_is_shown_as_text(tmp_path, cache, monkeypatch):
    monkeypatch.delenv("CAG_SIGNING_KEY", raising=False)
    path = _file_with_model(tmp_path, cache, context="8192")
    with pytest.raises(CacheMismatchError) as refused:
        kvfile.load(path, Expect(context=8192))
    assert "context size (file has '8192' (a string), expected 8192 (a whole number))" in str(refused.value)


def test_a_format_version_stored_as_text_is_shown_as_text(saved):
    resave(saved, edit_manifest=lambda m: m.update(format_version="1"))
    with pytest.raises(CacheMismatchError) as refused:
        kvfile.load(saved)
    assert "format version (file has '1' (a string), expected 1 (a whole number))" in str(refused.value)


@pytest.mark.parametrize("have", [8192.0, True, "8192"])
def test_values_equal_only_after_conversion_do_not_match(have):
    """Whatever reaches the comparison (a manifest read elsewhere, a tier's copy): no conversion makes it match."""
    want = 1 if have is True else 8192
    assert kvfile.mismatch({"model": {"context": have}}, Expect(context=want)) == ("context size", want, have)


def test_a_llamacpp_build_mismatch_shows_the_part_that_differs(tmp_path, cache, monkeypatch):
    monkeypatch.delenv("CAG_SIGNING_KEY", raising=False)
    made, runs = "llama-cpp-python 0.3.36, libraries 0123456789abcdef", "llama-cpp-python 0.3.36, libraries fedcba9876543210"
    path = _file_with_model(tmp_path, cache, runtime=made)
    with pytest.raises(CacheMismatchError) as refused:
        kvfile.load(path, Expect(runtime=runs))
    assert f"llama.cpp version and build (file has {made}, expected {runs})" in str(refused.value)


def test_long_values_are_shown_around_where_they_differ(tmp_path, cache, monkeypatch):
    monkeypatch.delenv("CAG_SIGNING_KEY", raising=False)
    shared = "0123456789" * 4
    path = _file_with_model(tmp_path, cache, fingerprint=shared + "a" * 24)
    with pytest.raises(CacheMismatchError) as refused:
        kvfile.load(path, Expect(model=shared + "b" * 24))
    message = str(refused.value)
    assert "a" * 16 in message and "b" * 16 in message and message.count("…") >= 2, message
