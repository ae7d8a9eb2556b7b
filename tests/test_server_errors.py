"""Every error in OpenAI's shape and never a bare 500: routes, methods, malformed JSON, invalid fields,
OpenAI parameters cag refuses, unexpected exceptions (streaming or not), and GET /v1/models/{id}."""

from __future__ import annotations

import logging

import httpx
import openai
import pytest

import cag
from cag.api import KnowledgeBase
from cag.server import ServerConfig, create_app
from serverutil import openai_error as _error
from serverutil import serving, write_docs
from serverutil import sse_events as _events

ASK = {"model": "lanterns", "max_tokens": 4, "messages": [{"role": "user", "content": "How much is the Heron?"}]}


@pytest.fixture
def url(cag_home, sharp_lm, tmp_path):
    cag.build([write_docs(tmp_path / "docs")], name="lanterns", lm=sharp_lm, log=lambda _m: None)
    with serving(create_app(ServerConfig(response_cache=False), sharp_lm)) as base:
        yield base


def test_routes_methods_and_malformed_bodies_answer_in_openai_shape(url):
    _error(httpx.get(url + "/v1/nope"), 404, "unknown_url")
    _error(httpx.post(url + "/nope", json={"a": 1}), 404, "unknown_url")
    wrong = httpx.put(url + "/v1/models", json={})
    _error(wrong, 405, "method_not_allowed")
    assert wrong.headers["allow"] == "GET"
    _error(httpx.delete(url + "/v1/chat/completions"), 405, "method_not_allowed")
    bad_json = httpx.post(url + "/v1/chat/completions", content=b'{"model": "lanterns", "messages": [',
                          headers={"Content-Type": "application/json"})
    _error(bad_json, 400, "invalid_json")
    _error(httpx.post(url + "/v1/chat/completions", json={**ASK, "messages": "hi"}), 400, "invalid_request", "messages")
    _error(httpx.post(url + "/v1/chat/completions", json=[1, 2]), 400, "invalid_request")


@pytest.mark.parametrize("stream", [False, True])
def test_values_that_used_to_crash_are_400s(url, stream):
    for seed in (2**64, -(2**63) - 1):
        r = httpx.post(url + "/v1/chat/completions", json={**ASK, "stream": stream, "temperature": 1.0, "seed": seed})
        assert "than or equal to" in _error(r, 400, "invalid_request", "seed")["message"]
    r = httpx.post(url + "/v1/chat/completions", timeout=60, json={**ASK, "stream": stream, "temperature": 1.0,
                                                                   "seed": 2**64 - 1})
    assert r.status_code == 200 and (not stream or r.text.rstrip().endswith("data: [DONE]"))  # the edge still works
    parts = [{"role": "user", "content": [{"type": "text", "text": 5}]}]
    r = httpx.post(url + "/v1/chat/completions", json={**ASK, "stream": stream, "messages": parts})
    assert "no string 'text'" in _error(r, 400, "invalid_request", "messages.0.content")["message"]
    image = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]
    r = httpx.post(url + "/v1/chat/completions", json={**ASK, "stream": stream, "messages": image})
    assert "'image_url'" in _error(r, 400, "invalid_request", "messages.0.content")["message"]
    text_parts = [{"role": "user", "content": [{"type": "text", "text": "How much "}, {"type": "text", "text": "is it?"}]}]
    assert httpx.post(url + "/v1/chat/completions", timeout=60,
                      json={**ASK, "stream": stream, "messages": text_parts}).status_code == 200


def test_an_unexpected_exception_is_a_generic_500_logged_with_its_traceback(url, cag_home, monkeypatch, caplog):
    secret = f"{cag_home}/kbs/lanterns/internal.bin"

    def broken_ask(self, question, *, on_text=None, **_kwargs):
        if on_text:
            on_text("Partial ")
        raise RuntimeError(f"exploded reading {secret}")

    with monkeypatch.context() as patch, caplog.at_level(logging.ERROR, logger="cag.server"):
        patch.setattr(KnowledgeBase, "ask", broken_ask)
        r = httpx.post(url + "/v1/chat/completions", json=ASK, timeout=60)
        error = _error(r, 500, "internal_error")
        assert error["type"] == "server_error"
        assert "exploded" not in r.text and str(cag_home) not in r.text and "Traceback" not in r.text
        with pytest.raises(openai.InternalServerError):
            openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0).chat.completions.create(**ASK)
        # streaming: the text already sent stays, then an error event, then [DONE]
        r = httpx.post(url + "/v1/chat/completions", json={**ASK, "stream": True}, timeout=60)
    assert r.status_code == 200
    events = _events(r)
    assert events[-1] == "[DONE]"
    assert events[-2]["error"]["code"] == "internal_error" and "exploded" not in r.text and str(cag_home) not in r.text
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-2]) == "Partial "
    logged = [rec for rec in caplog.records if rec.exc_info and "exploded" in str(rec.exc_info[1])]
    assert len(logged) == 3  # each failure logged once, with its traceback
    assert httpx.post(url + "/v1/chat/completions", json=ASK, timeout=60).status_code == 200  # still serving


def test_a_failing_stream_of_a_refused_generation_ends_with_error_and_done(url, monkeypatch):
    def refused(self, question, *, on_text=None, **_kwargs):
        on_text("Half ")
        raise cag.errors.PromptError("the chat template cannot be split here")

    monkeypatch.setattr(KnowledgeBase, "ask", refused)
    r = httpx.post(url + "/v1/chat/completions", json={**ASK, "stream": True}, timeout=60)
    events = _events(r)
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "generation_failed"
    assert "cannot be split" in events[-2]["error"]["message"]


UNSUPPORTED = [("n", 2), ("best_of", 3), ("logprobs", True), ("top_logprobs", 2), ("logit_bias", {"50": 5}),
               ("presence_penalty", 0.5), ("frequency_penalty", -1.0),
               ("tools", [{"type": "function", "function": {"name": "lookup"}}]), ("tool_choice", "required"),
               ("functions", [{"name": "lookup"}]), ("function_call", {"name": "lookup"}),
               ("response_format", {"type": "json_object"}), ("modalities", ["text", "audio"]),
               ("audio", {"voice": "alloy", "format": "wav"}), ("prediction", {"type": "content", "content": "x"}),
               ("reasoning_effort", "high"), ("verbosity", "low"), ("web_search_options", {}),
               ("repetition_penalty", 1.1), ("min_tokens", 5), ("ignore_eos", True), ("guided_json", {"type": "object"}),
               ("grammar", "root ::= \"yes\"")]
SAMPLED_ONLY = [("top_k", 40), ("min_p", 0.05), ("typical_p", 0.9), ("mirostat", 2)]
HARMLESS = {"user": "u-1", "metadata": {"team": "docs"}, "store": False, "stream_options": {"include_usage": True},
            "n": 1, "best_of": 1, "presence_penalty": 0, "frequency_penalty": 0.0, "parallel_tool_calls": True,
            "logprobs": False, "top_logprobs": 0, "tools": [], "tool_choice": "none", "response_format": {"type": "text"},
            "modalities": ["text"], "service_tier": "auto", "some_future_field": {"x": 1},
            "repetition_penalty": 1, "min_tokens": 0, "ignore_eos": False,
            "top_k": 40, "min_p": 0.05}  # top_k and min_p change nothing in a greedy answer


def test_openai_parameters_cag_cannot_honour_are_refused_by_name(url):
    for name, value in UNSUPPORTED:
        for stream in (False, True):
            r = httpx.post(url + "/v1/chat/completions", json={**ASK, "stream": stream, name: value})
            assert f"{name}=" in _error(r, 400, "unsupported_parameter", name)["message"]
    for name, value in SAMPLED_ONLY:  # refused when the request samples
        r = httpx.post(url + "/v1/chat/completions", json={**ASK, "temperature": 0.7, name: value})
        assert f"{name}=" in _error(r, 400, "unsupported_parameter", name)["message"]
    r = httpx.post(url + "/v1/chat/completions", json={**ASK, **HARMLESS}, timeout=60)
    assert r.status_code == 200, r.text
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(n=2, **ASK)
    assert caught.value.code == "unsupported_parameter" and caught.value.param == "n"
    with pytest.raises(openai.BadRequestError, match="tools"):
        client.chat.completions.create(tools=[{"type": "function", "function": {"name": "lookup"}}], **ASK)


def test_retrieve_a_model(url, cag_home, sharp_lm):
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
    model = client.models.retrieve("lanterns")
    assert model.id == "lanterns" and model.object == "model" and model.owned_by == "cli"
    assert model.model_extra["tokens"] == client.models.list().data[0].model_extra["tokens"]
    with pytest.raises(openai.NotFoundError, match="no knowledge base named 'nope'"):
        client.models.retrieve("nope")
    with serving(create_app(ServerConfig(api_keys={"key-a": "alpha", "key-b": "beta"}), sharp_lm)) as keyed:
        r = httpx.post(keyed + "/v1/kbs", headers={"Authorization": "Bearer key-a"}, timeout=60,
                       json={"name": "notes", "documents": [{"name": "a.md", "text": "The vault code is 4417."}]})
        assert r.status_code == 201, r.text
        mine = openai.OpenAI(base_url=keyed + "/v1", api_key="key-a", max_retries=0).models.retrieve("notes")
        assert mine.id == "notes" and mine.owned_by == "alpha"
        other = httpx.get(keyed + "/v1/models/notes", headers={"Authorization": "Bearer key-b"})
        absent = httpx.get(keyed + "/v1/models/nothing", headers={"Authorization": "Bearer key-b"})
        assert _error(other, 404, "model_not_found")["message"].replace("notes", "X") == \
            _error(absent, 404, "model_not_found")["message"].replace("nothing", "X")
        assert _error(httpx.get(keyed + "/v1/models/lanterns", headers={"Authorization": "Bearer key-a"}), 404)
