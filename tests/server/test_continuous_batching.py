"""Continuous batching in the server: concurrent clients on one knowledge base are decoded together, and
each gets exactly the answer it gets alone (streaming or not, greedy or seeded sampling, any max_tokens,
stop strings, history), while a client that goes away leaves the running batch."""

from __future__ import annotations

import re
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

import cag
from cag.kb.prompt import Turn
from cag.sampling import Sampling
from cag.server import ServerConfig, create_app
from serverutil import chat_answer, hold_until_the_client_leaves, serving, visible_pieces, write_docs

QUESTIONS = ["Who founded the company?", "How much is the Heron?", "What colour is it?", "When was it founded?",
             "Where are the lanterns made?", "Is there a warranty?", "How do I return a lantern?",
             "What does the blue one cost?"]


@pytest.fixture
def kb(cag_home, sharp_lm, tmp_path):
    return cag.build([write_docs(tmp_path / "docs")], name="lanterns", lm=sharp_lm, log=lambda _m: None)


def _stop_in_the_middle(text: str) -> str:
    """A 3-character piece of `text` whose first occurrence is past its first third."""
    for at in range(len(text) // 3, len(text) - 3):
        piece = text[at:at + 3]
        if text.find(piece) == at and piece.strip():
            return piece
    pytest.skip("no usable stop string in this answer")


def _request(url: str, job: dict, results: dict, i: int, start: threading.Barrier) -> None:
    body = {"model": "lanterns", "max_tokens": job["max"], "messages": job["messages"], "stream": job["stream"]}
    if job.get("stop"):
        body["stop"] = [job["stop"]]
    if job.get("seed") is not None:
        body.update(temperature=job["temperature"], seed=job["seed"])
    start.wait()
    results[i] = chat_answer(url, body, job.get("cancel_after"), timeout=300)


def _metric(url: str, name: str, labels: str) -> float:
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", httpx.get(url + "/metrics").text, re.M)
    return float(found.group(1)) if found else 0.0


def test_sixteen_concurrent_clients_each_get_their_one_at_a_time_answer(kb, sharp_lm, monkeypatch):
    history = [Turn("Who founded the company?", "Odalys Renn founded it.")]
    jobs = []
    for i in range(16):
        q = QUESTIONS[i % len(QUESTIONS)]
        job = {"q": q, "max": 10 + 3 * (i % 5), "stream": i % 2 == 1, "history": [], "sampling": Sampling()}
        jobs.append(job)
    jobs[3].update(seed=11, temperature=0.9, sampling=Sampling(temperature=0.9, seed=11))
    jobs[8].update(seed=12, temperature=0.9, sampling=Sampling(temperature=0.9, seed=12))
    jobs[5]["history"] = jobs[10]["history"] = history
    for job in jobs:
        job["messages"] = [m for t in job["history"] for m in ({"role": "user", "content": t.question},
                                                                 {"role": "assistant", "content": t.answer})]
        job["messages"].append({"role": "user", "content": job["q"]})
    # one at a time, no server: what each client must get
    want = {i: kb.ask(j["q"], history=j["history"], max_new_tokens=j["max"], sampling=j["sampling"])
            for i, j in enumerate(jobs)}
    for i in (6, 9):  # stop strings, streamed (9) and not (6): cut mid-answer
        jobs[i]["stop"] = _stop_in_the_middle(want[i].answer)
        want[i] = kb.ask(jobs[i]["q"], max_new_tokens=jobs[i]["max"], stop=[jobs[i]["stop"]])
        assert want[i].finish_reason == "stop"
    long = max(QUESTIONS, key=lambda q: kb.ask(q, max_new_tokens=300).new_tokens)
    assert kb.ask(long, max_new_tokens=300).new_tokens > 40  # runs on well past the cancel
    jobs[15] = {"q": long, "max": 300, "stream": True, "history": [], "cancel_after": 3,
                "messages": [{"role": "user", "content": long}]}
    assert len({want[i].answer for i in range(15)}) > 5  # different answers: equality means something
    # The cancelled answer pauses at its 20th token until its client has gone: by then the client has its 3
    # chunks (4 visible pieces come in 20 tokens), and more text is still to come (the answer's next piece
    # raises the cancel), so it is cancelled mid-answer however fast or slow the machine.
    before, whole = visible_pieces(kb, long, 20), visible_pieces(kb, long, 300)
    assert before >= 4 and whole >= before + 2, (before, whole)
    seen = hold_until_the_client_leaves(monkeypatch, max_tokens=300, after=20)

    # the window: the batch starts once all 16 have arrived (they come together, released by a barrier)
    app = create_app(ServerConfig(response_cache=False, max_batch=16, batch_window_ms=10_000), sharp_lm)
    with serving(app) as url:
        results: dict = {}
        start = threading.Barrier(len(jobs))
        threads = [threading.Thread(target=_request, args=(url, job, results, i, start)) for i, job in enumerate(jobs)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(300)
        deadline = time.time() + 60
        while _metric(url, "cag_requests_total", 'status="cancelled"') < 1 and time.time() < deadline:
            time.sleep(0.2)
        assert _metric(url, "cag_requests_total", 'status="cancelled"') == 1
        assert _metric(url, "cag_requests_total", 'status="200"') == 15
        loaded = app.state.service.registry.peek("lanterns").kb
    for i in range(15):
        text, finish, tokens = results[i]
        assert (text, finish, tokens) == (want[i].answer, want[i].finish_reason, want[i].new_tokens), (i, jobs[i])
    assert results[15][0] == "cancelled" and results[15][1]
    assert not seen["late"] and seen["produced"] < 300, seen  # stopped mid-answer (held there if need be)
    # decoding steps ran many answers at once: all 16 in the first (none ends at its first token)
    assert seen["rows"][0] == len(jobs), (f"the first step ran {seen['rows'][0]} answers, not all {len(jobs)}: "
                                          "they did not all reach the server within its 10 s batch window")
    sched = loaded.scheduler()
    deadline = time.time() + 60
    while time.time() < deadline and sched.rows:
        time.sleep(0.1)
    assert sched.rows == 0 and not sched._waiting  # every answer left the batch, the cancelled one included


def test_without_continuous_batching_answers_are_the_same(kb, sharp_lm):
    want = [kb.ask(q, max_new_tokens=12) for q in QUESTIONS[:4]]
    app = create_app(ServerConfig(response_cache=False, continuous_batching=False, workers=4), sharp_lm)

    def ask(q: str) -> str:
        r = httpx.post(url + "/v1/chat/completions", timeout=120,
                       json={"model": "lanterns", "max_tokens": 12, "messages": [{"role": "user", "content": q}]})
        assert r.status_code == 200, r.text
        return r.json()["choices"][0]["message"]["content"]

    with serving(app) as url:
        with ThreadPoolExecutor(4) as pool:
            got = list(pool.map(ask, QUESTIONS[:4]))
        assert app.state.service.registry.peek("lanterns").kb._scheduler is None  # inline, no scheduler
    assert got == [w.answer for w in want]
