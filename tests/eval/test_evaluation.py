"""The evaluation suite: datasets, the generator, scoring, retrieval, and `cag eval` end to end on the tiny model."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from cag.eval import EvalError, dataset, embed, generate, retrieval, scoring
from cag.eval.runner import run


def _count(tokenizer):
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


# -- datasets -----------------------------------------------------------------------------------

def test_native_dataset_round_trip(tmp_path):
    data = dataset.Dataset("d", [{"name": "a", "text": "Alpha is red."}],
                           [dataset.Question("What colour is Alpha?", "red"), dataset.Question("Two?", "x", 2)])
    loaded = dataset.load(data.save(tmp_path / "d.json"))
    assert loaded == data
    assert loaded.limited(1).questions == data.questions[:1] and loaded.limited(1).documents == data.documents


@pytest.mark.parametrize("body, needle", [
    ({"documents": [], "questions": []}, "at least one document"),
    ({"documents": [{"name": "a", "text": " "}], "questions": [{"q": "x", "a": "y"}]}, "documents[0]"),
    ({"documents": [{"text": "t"}], "questions": [{"q": "x"}]}, "questions[0]"),
    ([1, 2], "expected"),
])
def test_malformed_dataset_is_refused(tmp_path, body, needle):
    path = tmp_path / "bad.json"
    path.write_text(json.dumps(body))
    with pytest.raises(EvalError, match=needle.replace("[", r"\[").replace("]", r"\]")):
        dataset.load(path)


def test_squad_v1_and_v2_import(tmp_path):
    squad = {"version": "v2.0", "data": [{"title": "Harbor", "paragraphs": [
        {"context": "The harbor opened in 1901. Its lighthouse is green.", "qas": [
            {"id": "1", "question": "When did the harbor open?", "answers": [{"text": "1901", "answer_start": 23},
                                                                            {"text": "in 1901", "answer_start": 20}]},
            {"id": "2", "question": "Who owns it?", "answers": [], "is_impossible": True}]},
        {"context": "Ships pay ten crowns.", "qas": [
            {"id": "3", "question": "What do ships pay?", "answers": [{"text": "ten crowns", "answer_start": 10}]}]},
    ]}]}
    path = tmp_path / "squad.json"
    path.write_text(json.dumps(squad))
    data = dataset.load(path)
    assert [d["name"] for d in data.documents] == ["Harbor 1", "Harbor 2"]
    assert data.documents[1]["text"] == "Ships pay ten crowns."
    assert [(q.q, q.a) for q in data.questions] == [("When did the harbor open?", "1901"),
                                                     ("What do ships pay?", "ten crowns")]


# -- generator ----------------------------------------------------------------------------------

def test_generator_is_deterministic_and_answerable():
    a, b = generate.generate(1500, 25, seed=7), generate.generate(1500, 25, seed=7)
    assert a.to_json() == b.to_json()
    assert generate.generate(1500, 25, seed=8).to_json() != a.to_json()
    text = "\n".join(d["text"] for d in a.documents)
    assert sum(generate.estimate_tokens(d["name"] + "\n" + d["text"]) for d in a.documents) >= 1500
    assert len(a.questions) == 25 and len({q.q for q in a.questions}) == 25
    assert {q.hops for q in a.questions} == {1, 2}
    for q in a.questions:
        assert q.a in text, q


def test_generator_sizes_scale():
    small, big = generate.generate(1000, 5, seed=1), generate.generate(6000, 5, seed=1)
    size = lambda d: sum(len(x["text"]) for x in d.documents)  # noqa: E731
    assert 4.5 < size(big) / size(small) < 7.5


# -- scoring ------------------------------------------------------------------------------------

def test_scoring_by_hand():
    assert scoring.normalize("The  Lantern, of Thornmere!") == "lantern of thornmere"
    assert scoring.exact("Thornmere.", "thornmere") == 1.0
    assert scoring.exact("It is Thornmere", "Thornmere") == 0.0
    assert scoring.contains("Velra lives in Thornmere.", "Thornmere") == 1.0
    assert scoring.contains("Velra lives in Thornmeres.", "Thornmere") == 0.0
    assert scoring.contains("", "Thornmere") == 0.0
    assert scoring.token_f1("the cat sat", "cat sat down") == pytest.approx(0.8)  # p=2/2, r=2/3
    assert scoring.token_f1("born in 1873 1873", "1873") == pytest.approx(2 * 0.25 * 1 / 1.25)
    assert scoring.token_f1("no overlap", "Thornmere") == 0.0


def test_similarity_uses_minilm():
    sims = scoring.similarity(["The river Ossel.", "Ossel", "I do not know."], ["Ossel", "Ossel", "Ossel"],
                              embed.default())
    assert sims[1] == pytest.approx(1.0, abs=1e-5)
    assert sims[0] > sims[2]


# -- retrieval ----------------------------------------------------------------------------------

def test_chunking_packs_paragraphs_under_the_limit():
    words = lambda t: len(t.split())  # noqa: E731
    docs = [{"name": "a", "text": "one two three\n\nfour five\n\n" + " ".join(["w"] * 25)}]
    chunks = retrieval.chunk_documents(docs, words, max_tokens=10)
    assert chunks[0] == retrieval.Chunk("a (part 1)", "one two three\n\nfour five")
    assert all(words(c.text) <= 10 for c in chunks)
    assert sum(words(c.text) for c in chunks) == 30


@pytest.mark.parametrize("kind", ["bm25", "dense"])
def test_retrievers_find_the_chunk_that_holds_the_answer(kind):
    data = generate.generate(3000, 40, seed=2, two_hop=0.0)
    chunks = retrieval.chunk_documents(data.documents, generate.estimate_tokens, max_tokens=120)
    index = retrieval.make(kind, chunks, embed.default)
    person = [q for q in data.questions if q.q.startswith("In which town does")]
    assert len(person) >= 3 and len(chunks) > 10
    for q in person:
        name = q.q.removeprefix("In which town does ").removesuffix(" live?")
        top = chunks[index.top(q.q, 3)[0]].text
        assert f"{name} is a" in top and f"lives in {q.a}" in top, (kind, q)


def test_bm25_question_without_known_words_still_returns_chunks():
    chunks = [retrieval.Chunk("a", "Ossel river"), retrieval.Chunk("b", "Thrune river")]
    assert sorted(retrieval.Bm25(chunks).top("what is it?", 5)) == [0, 1]


# -- end to end (tiny random model) --------------------------------------------------------------

def test_run_in_process(tiny_lm, cag_home):
    data = generate.generate(220, 3, seed=4, count_tokens=_count(tiny_lm.tokenizer))
    result = run([data], systems=["cag", "in-context", "bm25", "dense"], top_k=[1], max_new_tokens=6,
                 lm=tiny_lm, show_progress=False)
    by = {s["system"]: s for s in result["summary"]}
    assert list(by) == ["cag", "in-context", "bm25@1", "dense@1"]
    rows = {(r["system"], r["index"]): r for r in result["questions"]}
    for i in range(3):
        # same model, prompt and greedy decoding: the cache must not change the answer
        assert rows["cag", i]["answer"] == rows["in-context", i]["answer"]
        assert rows["cag", i]["prompt_tokens"] < rows["in-context", i]["prompt_tokens"]
        assert rows["bm25@1", i]["prompt_tokens"] < rows["in-context", i]["prompt_tokens"]
        assert rows["in-context", i]["prompt_tokens"] == rows["in-context", i]["context_tokens"]
    assert by["cag"]["build_s"] > 0 and by["in-context"]["build_s"] == 0
    assert by["cag"]["knowledge_tokens"] == by["bm25@1"]["knowledge_tokens"] > 150
    assert not list((cag_home / "kbs").iterdir())  # the temporary knowledge base is removed


def test_cli_eval_end_to_end(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    count = _count(AutoTokenizer.from_pretrained(tiny_model_dir))
    paths = [generate.generate(n, 4, seed=n, count_tokens=count, name=f"d{n}").save(tmp_path / f"d{n}.json")
             for n in (120, 260)]
    out = tmp_path / "out"
    env = {**os.environ, "CAG_HOME": str(tmp_path / "home")}
    proc = subprocess.run([sys.executable, "-m", "cag", "eval", *map(str, paths), "--model", str(tiny_model_dir),
                           "--limit", "3", "--top-k", "1,2", "--max-new-tokens", "5", "--out", str(out)],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    summary = json.loads((out / "results.json").read_text())["summary"]
    assert [(s["dataset"], s["system"]) for s in summary] == [
        (d, s) for d in ("d120", "d260") for s in ("cag", "in-context", "bm25@1", "bm25@2", "dense@1", "dense@2")]
    assert all(s["n"] == 3 for s in summary)
    assert "| d260 | dense@2 | 3 |" in (out / "results.md").read_text()
    assert "| d120 | cag | 3 |" in proc.stdout
    for png in ("accuracy_vs_time.png", "ttft_vs_knowledge.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_eval_bad_system_is_one_line(tmp_path):
    path = generate.generate(100, 2, seed=1).save(tmp_path / "d.json")
    proc = subprocess.run([sys.executable, "-m", "cag", "eval", str(path), "--systems", "cag,grep"],
                          capture_output=True, text=True, env={**os.environ, "CAG_HOME": str(tmp_path / "h")},
                          timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    assert "unknown system(s) grep" in proc.stderr
