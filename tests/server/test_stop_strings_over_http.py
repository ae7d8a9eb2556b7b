"""`stop` over HTTP: the answer ends before the first stop string (not included, finish_reason "stop"), a
stream never sends text that a stop string later cuts, and neither the response cache nor continuous
batching hands a stop request an answer made without its stop strings."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest

import cag
from cag.server import ServerConfig, create_app
from serverutil import serving, write_docs

MAX = 24
Q = "Who founded the company?"


@pytest.fixture
def kb(cag_home, sharp_lm, tmp_path):
    return cag.build([write_docs(tmp_path / "docs")], name="lanterns", lm=sharp_lm, log=lambda _m: None)


def _post(url: str, q: str = Q, **extra) -> httpx.Response:
    return httpx.post(url + "/v1/chat/completions", timeout=120,
                      json={"model": "lanterns", "max_tokens": MAX, "messages": [{"role": "user", "content": q}], **extra})


def _streamed(url: str, q: str = Q, **extra) -> tuple[str, str]:
    """(every content delta joined, finish_reason) of a streaming request."""
    r = _post(url, q, stream=True, **extra)
    assert r.status_code == 200, r.text
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]
    assert r.text.rstrip().endswith("data: [DONE]") and not any("error" in e for e in events)
    text = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e["choices"])
    return text, next(e["choices"][0]["finish_reason"] for e in events if e["choices"] and e["choices"][0]["finish_reason"])


def _stop_in_the_middle(raw: str) -> tuple[str, int]:
    """Three characters first seen in the second half of the answer, and where they begin."""
    for i in range(len(raw) // 2, len(raw) - 3):
        if raw[i:i + 3].strip() and raw.find(raw[i:i + 3]) == i:
            return raw[i:i + 3], i
    raise AssertionError(f"no usable stop string in {raw!r}")


def test_stop_cuts_the_answer_and_the_stream_sends_nothing_past_it(kb, sharp_lm):
    with serving(create_app(ServerConfig(response_cache=False), sharp_lm)) as url:
        raw, finish = _streamed(url)
        assert len(raw.strip()) > 10 and finish == "length"
        stop, at = _stop_in_the_middle(raw)
        got = _post(url, stop=stop).json()["choices"][0]
        assert got["message"]["content"] == raw[:at].strip() and got["finish_reason"] == "stop"
        text, finish = _streamed(url, stop=["\u2603 never", stop])
        assert text == raw[:at] and finish == "stop"  # exactly what precedes the stop string, nothing later cut
        # a stop string whose beginning shows up but never completes: held back, then all of it released
        almost = raw[at:at + 2] + "\u2603"
        text, finish = _streamed(url, stop=almost)
        assert text == raw and finish == "length"
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        answer = client.chat.completions.create(model="lanterns", max_tokens=MAX, stop=[stop],
                                                messages=[{"role": "user", "content": Q}])
        assert answer.choices[0].message.content == raw[:at].strip() and answer.choices[0].finish_reason == "stop"


def test_stop_lists_are_checked(kb, sharp_lm):
    with serving(create_app(ServerConfig(response_cache=False), sharp_lm)) as url:
        for bad in (["a", "b", "c", "d", "e"], "", ["x", ""], [1]):
            r = _post(url, stop=bad)
            assert r.status_code == 400 and r.json()["error"]["param"] == "stop", r.text


def test_a_stop_request_never_gets_an_answer_made_without_its_stops(kb, sharp_lm):
    with serving(create_app(ServerConfig(semantic_threshold=None), sharp_lm)) as url:
        full = _post(url).json()
        assert _post(url).json()["cag"]["response_cache"] == "exact"
        raw, _finish = _streamed(url, "A different question?")  # fills nothing for Q
        stop, at = _stop_in_the_middle(full["choices"][0]["message"]["content"])
        cut = _post(url, stop=stop).json()
        assert cut["cag"]["response_cache"] is None
        assert cut["choices"][0]["message"]["content"] == full["choices"][0]["message"]["content"][:at].strip()
    config = ServerConfig(response_cache=False, workers=4)  # continuous batching: decoded together
    questions = [Q, "How much is the Heron?", "What colour is it?"]
    with serving(create_app(config, sharp_lm)) as url:
        with ThreadPoolExecutor(3) as pool:
            plain = list(pool.map(lambda q: _post(url, q).json(), questions))
        stops = [_stop_in_the_middle(b["choices"][0]["message"]["content"]) for b in plain]
        with ThreadPoolExecutor(6) as pool:  # each stop request beside a plain one: its row ends at its stop
            cut = list(pool.map(lambda i: _post(url, questions[i % 3], stop=stops[i][0]).json() if i < 3
                                else _post(url, questions[i % 3]).json(), range(6)))
    for b, p, (_stop, at) in zip(cut, plain, stops):
        assert b["choices"][0]["message"]["content"] == p["choices"][0]["message"]["content"][:at].strip()
        assert b["choices"][0]["finish_reason"] == "stop"
    assert [b["choices"][0]["message"]["content"] for b in cut[3:]] == \
        [p["choices"][0]["message"]["content"] for p in plain]
