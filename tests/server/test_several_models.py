"""One server, several models: each knowledge base is answered by the model it was built with.

A knowledge base built with a Hugging Face folder (transformers) and one built with a GGUF file (llama.cpp)
served at once to 16 concurrent clients, streaming and not, each getting its one-at-a-time answer; models
load on first use and leave under a memory budget; a model that cannot load is an error with a code.
"""

from __future__ import annotations

import shutil
import threading

import httpx
import pytest
from conftest import SAMPLE_DOCS
from serverutil import chat_answer, serving, write_docs

import cag
from cag.kb.prompt import Turn
from cag.sampling import Sampling
from cag.server import ServerConfig, create_app

QUIET = {"log": lambda _m: None}
ASKED = {"lanterns": ["Who founded the company?", "How much is the Heron?", "What colour is it?", "When?"],
         "handbook": ["How many vacation days do I get?", "Who is the CEO?", "What is the refund policy?",
                      "Can I work from home?"]}


@pytest.fixture
def two_kbs(cag_home, sharp_lm, smollm2_gguf, gguf_engines, tmp_path):
    gguf = tmp_path / "handbook-model.gguf"
    shutil.copy(smollm2_gguf, gguf)  # a file of its own: one test removes it
    docs = tmp_path / "handbook"
    docs.mkdir()
    for f in sorted(SAMPLE_DOCS.iterdir())[:2]:
        shutil.copy(f, docs / f.name)
    return {"lanterns": cag.build([write_docs(tmp_path / "docs")], name="lanterns", lm=sharp_lm, **QUIET),
            "handbook": cag.build([docs], name="handbook", model=str(gguf), lm=gguf_engines(gguf), **QUIET),
            "gguf": gguf}


def _ask(url: str, job: dict) -> tuple[str, str, int]:
    body = {"model": job["kb"], "max_tokens": job["max"], "messages": job["messages"], "stream": job["stream"]}
    if job.get("stop"):
        body["stop"] = [job["stop"]]
    if job.get("seed") is not None:
        body.update(temperature=0.8, seed=job["seed"])
    return chat_answer(url, body)


def test_one_server_answers_two_models_to_sixteen_concurrent_clients(two_kbs):
    jobs = []
    for i in range(16):
        kb = "lanterns" if i % 2 else "handbook"
        q = ASKED[kb][(i // 2) % 4]
        jobs.append({"kb": kb, "q": q, "max": 8 + 4 * (i % 4), "stream": i % 4 in (1, 2), "history": [],
                     "sampling": Sampling()})
    for i in (4, 7):
        jobs[i].update(seed=i, sampling=Sampling(temperature=0.8, seed=i))
    jobs[6]["history"] = [Turn("Who is the CEO?", "The CEO is Ilse Varnocky.")]
    jobs[9]["history"] = [Turn("Who founded the company?", "Odalys Renn founded it.")]
    for job in jobs:
        job["messages"] = [m for t in job["history"] for m in ({"role": "user", "content": t.question},
                                                                 {"role": "assistant", "content": t.answer})]
        job["messages"].append({"role": "user", "content": job["q"]})
    want = {i: two_kbs[j["kb"]].ask(j["q"], history=j["history"], max_new_tokens=j["max"], sampling=j["sampling"])
            for i, j in enumerate(jobs)}
    for i in (10, 13):  # stop strings on both models: the answer is cut where the stop string starts
        text = want[i].answer
        jobs[i]["stop"] = text[len(text) // 2:len(text) // 2 + 3] if len(text) > 8 and text[len(text) // 2:].strip() \
            else None
        if jobs[i]["stop"]:
            want[i] = two_kbs[jobs[i]["kb"]].ask(jobs[i]["q"], max_new_tokens=jobs[i]["max"], stop=[jobs[i]["stop"]])
    app = create_app(ServerConfig(response_cache=False, max_batch=8, workers=16))  # no model loaded yet
    results: dict[int, tuple] = {}
    start = threading.Barrier(len(jobs))

    def client(i: int) -> None:
        start.wait()
        results[i] = _ask(url, jobs[i])

    with serving(app) as url:
        rows = {m["id"]: m for m in httpx.get(url + "/v1/models").json()["data"]}
        threads = [threading.Thread(target=client, args=(i,)) for i in range(len(jobs))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(900)
        loaded = {e.kind for e in app.state.service.registry.models.loaded()}
    for i, job in enumerate(jobs):
        assert results[i] == (want[i].answer, want[i].finish_reason, want[i].new_tokens), (i, job["kb"], job["q"])
    assert loaded == {"torch", "llamacpp"}  # each knowledge base was answered by its own model
    assert rows["handbook"]["root"] == "handbook-model.gguf" and rows["handbook"]["cag"]["engine"] == "llamacpp"
    assert rows["lanterns"]["root"] == two_kbs["lanterns"].lm.path.name and rows["lanterns"]["cag"]["engine"] == "torch"
    assert len({r[0] for r in results.values()}) > 6  # the answers differ: equality means something


def test_models_leave_under_the_budget_and_one_that_cannot_load_is_an_error_with_a_code(two_kbs):
    app = create_app(ServerConfig(response_cache=False, model_bytes=1))  # room for one model at a time
    registry = app.state.service.registry

    def chat(url: str, kb: str) -> httpx.Response:
        return httpx.post(url + "/v1/chat/completions", timeout=600, json={
            "model": kb, "max_tokens": 6, "messages": [{"role": "user", "content": ASKED[kb][0]}]})

    with serving(app) as url:
        for kb in ("lanterns", "handbook", "lanterns"):
            r = chat(url, kb)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == two_kbs[kb].ask(ASKED[kb][0], max_new_tokens=6).answer
            assert [e.kind for e in registry.models.loaded()] == [two_kbs[kb].lm.kind]  # the other one left
        two_kbs["gguf"].unlink()  # the handbook's model file is gone
        r = chat(url, "handbook")
        err = r.json()["error"]
        assert r.status_code == 503 and err["code"] == "model_unavailable", r.text
        assert "handbook-model.gguf" in err["message"] and "no model at" in err["message"]
        assert chat(url, "lanterns").status_code == 200  # nothing else is harmed
        assert {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]} == {"lanterns", "handbook"}
