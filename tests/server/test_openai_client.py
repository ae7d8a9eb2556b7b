"""The HTTP server on the tiny model: OpenAI client (streaming and not), message mapping, concurrency."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

from cag.sampling import Sampling
from cag.kb.prompt import Turn
from cag.server import ServerConfig, create_app
from serverutil import client, kb, serving, url, write_docs  # noqa: F401 - fixtures

QUESTIONS = ["Who founded the company?", "How much is the Heron?", "What colour is it?", "When was it founded?",
             "Where are the lanterns made?", "Is there a warranty?", "How do I return a lantern?",
             "What does the blue one cost?"]
MAX = 12
HOT = 1.0  # sampled requests carry their own seed: an answer equal to kb.ask's proves seed and prompt were its own


def sampled(i: int) -> Sampling:
    return Sampling(temperature=HOT, seed=i)


def test_health_and_models(url, client, kb):
    assert httpx.get(url + "/healthz").json()["status"] == "ok"
    models = client.models.list().data
    assert [m.id for m in models] == ["lanterns"]
    assert models[0].model_extra["tokens"] == kb.tokens


def test_openai_client_non_streaming_matches_kb_ask(client, kb):
    want = kb.ask(QUESTIONS[0], max_new_tokens=MAX, sampling=sampled(1), system="Be brief.")
    assert want.answer.strip()
    got = client.chat.completions.create(model="lanterns", max_tokens=MAX, temperature=HOT, seed=1,
                                         messages=[{"role": "system", "content": "Be brief."},
                                                   {"role": "user", "content": QUESTIONS[0]}])
    assert got.choices[0].message.content == want.answer
    assert got.choices[0].message.role == "assistant"
    assert got.usage.prompt_tokens == want.prompt_tokens
    assert got.usage.completion_tokens == want.new_tokens
    # the system message comes after the cached knowledge: all but the prefix's last few tokens are cached
    assert kb.tokens - 8 <= got.usage.prompt_tokens_details.cached_tokens == want.cached_tokens < kb.tokens
    assert got.choices[0].finish_reason == ("length" if want.new_tokens == MAX else "stop")


def test_openai_client_streams_the_same_answer(client, kb):
    want = kb.ask(QUESTIONS[1], max_new_tokens=MAX, sampling=sampled(2))
    stream = client.chat.completions.create(model="lanterns", max_tokens=MAX, stream=True, temperature=HOT, seed=2,
                                            stream_options={"include_usage": True},
                                            messages=[{"role": "user", "content": QUESTIONS[1]}])
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.strip() == want.answer
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # really streamed
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == kb.tokens
    assert chunks[-2].choices[0].finish_reason in ("stop", "length")


def test_raw_sse_ends_with_done(url):
    with httpx.stream("POST", url + "/v1/chat/completions", timeout=60, json={
            "model": "lanterns", "stream": True, "max_tokens": 4,
            "messages": [{"role": "user", "content": "Hi"}]}) as r:
        assert r.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in r.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]"


def test_earlier_turns_become_history_and_sampling_maps(client, kb):
    a1 = kb.ask(QUESTIONS[0], max_new_tokens=MAX, sampling=sampled(3)).answer
    want = kb.ask(QUESTIONS[1], history=[Turn(QUESTIONS[0], a1)], max_new_tokens=MAX, sampling=sampled(4))
    assert want.answer != kb.ask(QUESTIONS[1], max_new_tokens=MAX, sampling=sampled(4)).answer  # history matters
    got = client.chat.completions.create(model="lanterns", max_tokens=MAX, temperature=HOT, seed=4, messages=[
        {"role": "user", "content": QUESTIONS[0]}, {"role": "assistant", "content": a1},
        {"role": "user", "content": QUESTIONS[1]}])
    assert got.choices[0].message.content == want.answer
    assert got.usage.prompt_tokens == want.prompt_tokens
    nucleus = kb.ask(QUESTIONS[2], max_new_tokens=MAX, sampling=Sampling(temperature=1.5, top_p=0.9, seed=7))
    got = client.chat.completions.create(model="lanterns", max_tokens=MAX, temperature=1.5, top_p=0.9, seed=7,
                                         messages=[{"role": "user", "content": QUESTIONS[2]}])
    assert got.choices[0].message.content == nucleus.answer
    assert nucleus.answer != kb.ask(QUESTIONS[2], max_new_tokens=MAX, sampling=sampled(7)).answer  # top_p used
    greedy = client.chat.completions.create(model="lanterns", max_tokens=MAX, messages=[
        {"role": "user", "content": QUESTIONS[2]}])  # no temperature: greedy
    assert greedy.choices[0].message.content == kb.ask(QUESTIONS[2], max_new_tokens=MAX).answer


def test_unknown_kb_and_bad_requests_are_openai_errors(client, url):
    with pytest.raises(openai.NotFoundError, match="no knowledge base named 'nope'"):
        client.chat.completions.create(model="nope", messages=[{"role": "user", "content": "hi"}])
    r = httpx.post(url + "/v1/chat/completions", json={"model": "lanterns", "messages": [
        {"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "no_question"
    r = httpx.post(url + "/v1/chat/completions", json={"model": "lanterns"})
    assert r.status_code == 400 and "messages" in r.json()["error"]["message"]


def test_concurrent_requests_get_exactly_their_own_answers(url, kb):
    """8 clients at once on one KB (workspace + shared-prefix fallback): each answer equals a sequential ask."""
    want = {q: kb.ask(q, max_new_tokens=MAX, sampling=sampled(i)).answer for i, q in enumerate(QUESTIONS)}

    def call(q: str, stream: bool) -> str:
        body = {"model": "lanterns", "max_tokens": MAX, "stream": stream, "temperature": HOT,
                "seed": QUESTIONS.index(q), "messages": [{"role": "user", "content": q}]}
        c = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        if stream:
            return "".join(ch.choices[0].delta.content or "" for ch in c.chat.completions.create(**body)).strip()
        return c.chat.completions.create(**body).choices[0].message.content

    jobs = [(q, i % 2 == 0) for _ in range(3) for i, q in enumerate(QUESTIONS)]
    with ThreadPoolExecutor(8) as pool:
        got = list(pool.map(lambda job: call(*job), jobs))
    for (q, _stream), answer in zip(jobs, got):
        assert answer == want[q], q
    assert len(set(want.values())) == len(QUESTIONS)  # every request has its own answer
