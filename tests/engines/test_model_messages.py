"""A model named wrongly, damaged, moved or too small for its knowledge: one error line that says what is
wrong and what to do, and what it promises holds (a rebuild naming a moved file reuses the cache)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from storeutil import make_docs
from cliutil import assert_one_line_error, run


def _build(home: Path, docs: Path, model, *more):
    return run(["build", docs, "--name", "g", "--model", model, *more], home, check=False)


def test_a_mistyped_model_path_names_the_file_beside_it(tmp_path, cag_home, tiny_llama_gguf):
    docs = make_docs(tmp_path / "docs")
    shutil.copy(tiny_llama_gguf, tmp_path / "model.gguf")
    assert_one_line_error(_build(cag_home, docs, tmp_path / "model.ggu"), f"no model at {tmp_path / 'model.ggu'}",
                          f"did you mean {tmp_path / 'model.gguf'}?")
    assert_one_line_error(_build(cag_home, docs, tmp_path / "none" / "m.gguf"), "the folder", "does not exist")


def test_a_file_or_folder_that_is_no_model_says_what_a_model_is(tmp_path, cag_home):
    docs = make_docs(tmp_path / "docs")
    notes = tmp_path / "notes.txt"
    notes.write_text("hello\n")
    assert_one_line_error(_build(cag_home, docs, notes), f"{notes} is a file but not a GGUF model", "b'hell'",
                          "a model is a GGUF file")
    folder = tmp_path / "weights"
    folder.mkdir()
    (folder / "w.gguf").write_bytes(b"GGUF")
    assert_one_line_error(_build(cag_home, docs, folder), "without config.json", "it holds w.gguf: name that file")


def test_a_truncated_or_foreign_gguf_is_told_apart(tmp_path, cag_home, tiny_llama_gguf):
    docs = make_docs(tmp_path / "docs")
    data = tiny_llama_gguf.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[: len(data) // 2])
    assert_one_line_error(_build(cag_home, docs, cut), f"{cut} is cut short or damaged", "download or copy")
    arch = data.find(b"llama", 0, 4096)
    alien = tmp_path / "alien.gguf"
    alien.write_bytes(data[:arch] + b"zzzzz" + data[arch + 5:])
    assert_one_line_error(_build(cag_home, docs, alien), "is a zzzzz model, which llama-cpp-python",
                          "`cag version` names")
    assert "llama.cpp engine: llama-cpp-python" in run(["version"], cag_home).stdout


def test_a_gguf_without_its_suffix_is_still_a_gguf(tmp_path, cag_home, tiny_llama_gguf):
    blob = tmp_path / "sha256-0123"
    shutil.copy(tiny_llama_gguf, blob)
    run(["build", make_docs(tmp_path / "docs"), "--name", "g", "--model", blob], cag_home)
    assert json.loads(run(["inspect", "g", "--json"], cag_home).stdout)["manifest"]["engine"] == "llamacpp"


def test_a_moved_gguf_rebuilt_at_its_new_path_reuses_the_whole_cache(tmp_path, cag_home, tiny_llama_gguf):
    docs = make_docs(tmp_path / "docs")
    model = tmp_path / "model.gguf"
    shutil.copy(tiny_llama_gguf, model)
    run(["build", docs, "--name", "g", "--model", model], cag_home)
    model.rename(tmp_path / "moved.gguf")
    proc = run(["ask", "g", "Who founded it?", "--max-new-tokens", "2"], cag_home, check=False)
    assert_one_line_error(proc, f"no model at {model}", f"did you mean {tmp_path / 'moved.gguf'}?",
                          f"cag build {docs} --name g --model NEWPATH", "reuses the whole cache")
    again = run(["build", docs, "--name", "g", "--model", tmp_path / "moved.gguf"], cag_home)
    assert "reused all" in again.stderr and "prefilled 0 new" in again.stderr, again.stderr


def test_knowledge_that_does_not_fit_names_the_reserve(tmp_path, cag_home, tiny_llama_gguf):
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("# Facts\n" + " ".join(f"Item {i} weighs {i} grams." for i in range(60)))
    proc = _build(cag_home, docs, tiny_llama_gguf, "--context", "1024")
    assert_one_line_error(proc, "512 reserved for question and answer", "cag build --reserve", "--shard")
    run(["build", docs, "--name", "g", "--model", tiny_llama_gguf, "--context", "1024", "--reserve", "128"], cag_home)


def test_inspect_shows_a_gguf_knowledge_base(tmp_path, cag_home, tiny_llama_gguf):
    run(["build", make_docs(tmp_path / "docs"), "--name", "g", "--model", tiny_llama_gguf], cag_home)
    info = json.loads(run(["inspect", "g", "--json"], cag_home).stdout)
    assert info["integrity"] == "ok" and list(info["stored"]) == ["state"] and info["passages"] >= 1
    assert "integrity" in run(["inspect", "g"], cag_home).stdout
