"""Every error in OpenAI's shape and never a bare 500: routes, methods, malformed JSON, invalid fields,
OpenAI parameters cag refuses, unexpected exceptions (streaming or not), and GET /v1/models/{id}; sampling
values at and past their limits, text that is not valid Unicode, and a sweep of odd values over every field."""

from __future__ import annotations

import json
import logging

import httpx
import openai
import pytest

import cag
from cag.api import KnowledgeBase
from cag.errors import CagError
from cag.sampling import Sampling
from cag.server import ServerConfig, create_app
from cag.server.schemas import ChatRequest, CompletionRequest
from serverutil import openai_error as _error
from serverutil import kb, serving, url  # noqa: F401 - kb, url: the shared fixtures
from serverutil import sse_events as _events

ASK = {"model": "lanterns", "max_tokens": 4, "messages": [{"role": "user", "content": "How much is the Heron?"}]}


def _post(url: str, path: str, body, method: str = "POST") -> httpx.Response:
    """Send `body` as JSON with every non-ASCII character escaped, so a lone surrogate travels as the JSON
    escape "\\ud800" (as a JavaScript client's JSON.stringify sends it)."""
    return httpx.request(method, url + path, content=json.dumps(body).encode(), timeout=60,
                         headers={"Content-Type": "application/json"})


def _answer(r: httpx.Response) -> str:
    """The answer's text, from a whole chat completion or the deltas of a streamed one."""
    assert r.status_code == 200, r.text
    if not r.headers["content-type"].startswith("text/event-stream"):
        return r.json()["choices"][0]["message"]["content"]
    events = _events(r)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), events
    return "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-1] if e["choices"])


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
    # the text already sent stays (whitespace at its end is held back until visible text follows)
    assert "".join(e["choices"][0]["delta"].get("content") or "" for e in events[:-2]) == "Partial"
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


# -- sampling values at and past their limits ----------------------------------------------------------

@pytest.mark.parametrize("stream", [False, True])
def test_a_vanishing_temperature_or_top_p_answers_greedily(url, stream):
    """A temperature too small to divide by (1e-300 is 0 in float32) is greedy, and a top_p too small to
    compare with keeps the most likely token only: the same answer as temperature 0, never a 500."""
    ask = {**ASK, "max_tokens": 8, "stream": stream}
    greedy = _answer(_post(url, "/v1/chat/completions", ask))
    assert greedy  # the sharp tiny model answers this question with visible text
    for temperature in (1e-300, 1e-45, 5e-324, 1e-40, 1e-6):
        assert _answer(_post(url, "/v1/chat/completions", {**ask, "temperature": temperature})) == greedy, temperature
    for top_p in (1e-300, 1e-46, 0):
        got = _post(url, "/v1/chat/completions", {**ask, "temperature": 0.7, "top_p": top_p, "seed": 3})
        assert _answer(got) == greedy, top_p


def test_sampling_values_past_their_limits_are_400s_naming_the_field(url):
    prompt = {"model": "lanterns", "max_tokens": 4, "prompt": "How much is the Heron?"}
    for path, base in (("/v1/chat/completions", ASK), ("/v1/completions", prompt)):
        for stream in (False, True):
            for field, value in (("temperature", 2.01), ("temperature", -1e-9), ("top_p", 1.0001), ("top_p", -0.5)):
                _error(_post(url, path, {**base, "stream": stream, field: value}), 400, "invalid_request", field)
            # JSON numbers Python reads as infinities, and the NaN / Infinity literals it also accepts
            for field in ("temperature", "top_p", "presence_penalty", "frequency_penalty"):
                for literal in ("1e999", "-1e999", "NaN", "Infinity", "-Infinity"):
                    body = json.dumps({**base, "stream": stream, field: "@"}).replace('"@"', literal)
                    r = httpx.post(url + path, content=body, headers={"Content-Type": "application/json"})
                    assert "finite" in _error(r, 400, "invalid_request", field)["message"], (field, literal)
    assert _post(url, "/v1/chat/completions", {**ASK, "temperature": 2, "top_p": 1, "seed": 1}).status_code == 200


def test_sampling_is_checked_once_for_the_api_the_cli_and_the_server(kb):
    """Sampling refuses what cannot be sampled with (the CLI's --temperature/--top-p build the same object),
    and treats the limits as the server does."""
    for bad in ({"temperature": float("nan")}, {"temperature": float("inf")}, {"temperature": -0.5},
                {"top_p": float("nan")}, {"top_p": 1.5}, {"top_p": -0.1}, {"temperature": "0.7"}):
        with pytest.raises(CagError, match="temperature|top_p"):
            Sampling(**bad)
    greedy = kb.ask("How much is the Heron?", max_new_tokens=8).answer
    assert kb.ask("How much is the Heron?", max_new_tokens=8, sampling=Sampling(temperature=5e-324)).answer == greedy
    only_top = Sampling(temperature=0.7, top_p=0.0, seed=4)
    assert kb.ask("How much is the Heron?", max_new_tokens=8, sampling=only_top).answer == greedy
    hot = kb.ask("How much is the Heron?", max_new_tokens=8, sampling=Sampling(temperature=1e30, seed=4))
    assert hot.new_tokens >= 1  # a huge temperature samples (near) uniformly, without inf or nan


# -- text that is not valid Unicode ----------------------------------------------------------------------

LONE = "\ud800"  # a lone UTF-16 surrogate: JSON can spell it, but it is no character


def test_a_lone_surrogate_in_any_text_field_is_a_400_naming_it(url):
    user = lambda text: [{"role": "user", "content": text}]  # noqa: E731
    chat = [({"messages": user("How much is the Heron?" + LONE)}, "messages.0.content"),
            ({"messages": user([{"type": "text", "text": "How " + LONE}])}, "messages.0.content"),
            ({"messages": [{"role": "assistant", "content": LONE}, *user("hi")]}, "messages.0.content"),
            ({"messages": [{"role": "system", "content": "x\udfff"}, *user("hi")]}, "messages.0.content"),
            ({"stop": LONE}, "stop"), ({"stop": ["fine", "a" + LONE]}, "stop"), ({"model": LONE}, "model"),
            ({"user": LONE}, "user"), ({"conversation_id": LONE}, "conversation_id"),
            ({"metadata": {LONE: "x"}}, "metadata"), ({"tool_choice": LONE}, "tool_choice")]
    for stream in (False, True):
        for change, field in chat:
            error = _error(_post(url, "/v1/chat/completions", {**ASK, "stream": stream, **change}), 400,
                           "invalid_request", field)
            assert "lone surrogate" in error["message"], (change, error)
        for change, field in (({"prompt": "How" + LONE}, "prompt"), ({"prompt": [LONE]}, "prompt"),
                              ({"stop": LONE}, "stop"), ({"model": LONE}, "model"), ({"suffix": LONE}, "suffix")):
            body = {"model": "lanterns", "prompt": "How much is the Heron?", "stream": stream, **change}
            _error(_post(url, "/v1/completions", body), 400, "invalid_request", field)
    doc = {"name": "a.md", "text": "The vault code is 4417."}
    for body, field in (({"name": "v" + LONE, "documents": [doc]}, "name"),
                        ({"name": "vault", "documents": [{**doc, "text": "code " + LONE}]}, "documents.0.text"),
                        ({"name": "vault", "documents": [doc, {**doc, "name": "b" + LONE + ".md"}]}, "documents.1.name")):
        _error(_post(url, "/v1/kbs", body), 400, "invalid_request", field)
    replace = {"documents": [{**doc, "text": LONE}]}
    _error(_post(url, "/v1/kbs/lanterns", replace, method="PUT"), 400, "invalid_request", "documents.0.text")
    assert [m["id"] for m in httpx.get(url + "/v1/models").json()["data"]] == ["lanterns"]  # nothing was made
    # the same bytes in an upload (UTF-8 cannot carry a surrogate): refused or cleaned, never a 500
    encoded = b"\xed\xa0\x80"
    for name, filename, content in ((b"up1", b"a" + encoded + b".md", b"hello"), (b"up" + encoded, b"a.md", b"hello"),
                                    (b"up3", b"a.md", b"hello " + encoded)):
        form = (b'--cut\r\nContent-Disposition: form-data; name="name"\r\n\r\n' + name + b"\r\n"
                b'--cut\r\nContent-Disposition: form-data; name="files"; filename="' + filename + b'"\r\n'
                b"Content-Type: text/markdown\r\n\r\n" + content + b"\r\n--cut--\r\n")
        r = httpx.post(url + "/v1/kbs/upload", content=form, timeout=60,
                       headers={"Content-Type": "multipart/form-data; boundary=cut"})
        assert r.status_code in (201, 400), r.text
        assert r.status_code == 400 or "\\ud800" not in r.text  # a 201 names no document with a surrogate
    assert _answer(_post(url, "/v1/chat/completions", ASK))  # still serving


# -- a sweep of odd values over every field ----------------------------------------------------------------

ODD = ["null", "true", "-1", "0", str(2**70), "1e999", "NaN", '""', '"\\u0000"', "[]", "{}", '[""]', '[{"a": []}]',
       '{"\\ud800": 1}', '"' + "y" * 300 + '"']


def test_no_odd_value_in_any_field_is_a_500(url):
    """Every declared field of both completion bodies (and a few undeclared ones clients send) given values
    of every JSON type, out-of-range numbers and odd text: each is answered or refused, never a 500."""
    extensions = ["top_k", "min_p", "repetition_penalty", "guided_json", "ignore_eos"]
    bases = (("/v1/chat/completions", {**ASK, "max_tokens": 1}, [*ChatRequest.model_fields, *extensions]),
             ("/v1/completions", {"model": "lanterns", "max_tokens": 1, "prompt": "hi"},
              [*CompletionRequest.model_fields, *extensions]))
    answered = 0
    with httpx.Client(base_url=url, timeout=60, headers={"Content-Type": "application/json"}) as http:
        for path, base, fields in bases:
            for field in fields:
                for value in ODD:
                    r = http.post(path, content=json.dumps({**base, field: "@"}).replace('"@"', value))
                    assert r.status_code < 500 and "internal_error" not in r.text, (path, field, value, r.text)
                    answered += r.status_code == 200
                    if r.status_code != 200:
                        _error(r, r.status_code, param=r.json()["error"]["param"])  # OpenAI's shape
        assert answered  # some odd values are fine (an ignored field, an empty stop list…)
        for message in ('{"role": "user", "content": {}}', '{"role": "robot", "content": "hi"}', '{"content": "hi"}',
                        '{"role": "user", "content": [{"type": "text"}]}', '"hi"', "null"):
            r = http.post("/v1/chat/completions", content=json.dumps({**ASK, "messages": ["@"]}).replace('"@"', message))
            _error(r, 400, "invalid_request", r.json()["error"]["param"])
    deep = "[" * 100_000 + "]" * 100_000  # past Python's recursion limit when parsed
    for path in ("/v1/chat/completions", "/v1/completions", "/v1/kbs"):
        assert httpx.post(url + path, content=deep, headers={"Content-Type": "application/json"}).status_code == 400
