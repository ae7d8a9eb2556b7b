"""The conventions OpenAI-compatible servers share (llama-server, vLLM, Ollama), on the tiny model:
POST /v1/completions through the same path as chat, GET /health, the model behind each knowledge base in
/v1/models, `cag serve --api-key/--log-level/--max-batch/--workers`, CAG_HOST / CAG_PORT, and one
JSON access-log line per request carrying the X-Request-Id returned to the client."""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest

import cag
from cag.api import KnowledgeBase
from cag.sampling import Sampling
from cag.server import ServerConfig, create_app, with_flags
from cag.server.config import OPEN_TENANT, ConfigError
from serverutil import client, free_port, kb, serving, url, wait_until_serving, write_docs  # noqa: F401 - fixtures
from serverutil import openai_error as _error
from serverutil import sse_events as _events

QUESTION = "Who founded the company?"
MAX = 12
HOT = 1.0
PROMPT = {"model": "lanterns", "max_tokens": 4, "prompt": "How much is the Heron?"}


# -- POST /v1/completions ----------------------------------------------------------------------------

def test_completion_answers_the_prompt_as_chat_and_kb_ask_do(client, kb):
    want = kb.ask(QUESTION, max_new_tokens=MAX, sampling=Sampling(temperature=HOT, seed=1))
    got = client.completions.create(model="lanterns", prompt=QUESTION, max_tokens=MAX, temperature=HOT, seed=1)
    assert got.object == "text_completion" and got.id.startswith("cmpl-") and got.model == "lanterns"
    assert got.choices[0].text == want.answer and want.answer.strip()
    assert got.choices[0].finish_reason == ("length" if want.new_tokens == MAX else "stop")
    assert got.usage.prompt_tokens == want.prompt_tokens and got.usage.completion_tokens == want.new_tokens
    assert got.usage.total_tokens == want.prompt_tokens + want.new_tokens
    # a list of one prompt is the same request; greedy, it answers what chat answers
    listed = client.completions.create(model="lanterns", prompt=[QUESTION], max_tokens=MAX)
    chat = client.chat.completions.create(model="lanterns", max_tokens=MAX,
                                          messages=[{"role": "user", "content": QUESTION}])
    assert listed.choices[0].text == chat.choices[0].message.content == kb.ask(QUESTION, max_new_tokens=MAX).answer


def test_completion_streams_text_completion_chunks_ending_in_done(client, url, kb):
    want = kb.ask(QUESTION, max_new_tokens=MAX, sampling=Sampling(temperature=HOT, seed=2))
    chunks = list(client.completions.create(model="lanterns", prompt=QUESTION, max_tokens=MAX, temperature=HOT,
                                            seed=2, stream=True, stream_options={"include_usage": True}))
    assert {c.object for c in chunks} == {"text_completion"} and len({c.id for c in chunks}) == 1
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == want.answer  # the streamed pieces add up to the whole (stripped) answer
    assert len([c for c in chunks if c.choices and c.choices[0].text]) >= 2  # really streamed
    assert chunks[-2].choices[0].finish_reason in ("stop", "length") and chunks[-1].choices == []
    assert chunks[-1].usage.completion_tokens == want.new_tokens
    assert chunks[-1].usage.prompt_tokens_details.cached_tokens == want.cached_tokens == kb.tokens
    r = httpx.post(url + "/v1/completions", json={**PROMPT, "stream": True}, timeout=60)
    assert r.headers["content-type"].startswith("text/event-stream")
    events = _events(r)
    assert events[-1] == "[DONE]" and all(e["object"] == "text_completion" for e in events[:-1])
    assert "usage" not in events[-2]  # no usage chunk unless asked for


def _decoded(kb, question: str, max_tokens: int, stop: tuple[str, ...] = ()) -> str:
    """The answer as the model decodes it, before it is stripped: the pieces kb.ask streams."""
    pieces: list[str] = []
    kb.ask(question, max_new_tokens=max_tokens, on_text=pieces.append, stop=stop)
    return "".join(pieces)


def _whitespace_cases(kb) -> list[dict]:
    """Requests whose decoded answer starts or ends with whitespace, found from the model's own greedy output
    (its byte-level tokens put spaces before words, so an answer ends on a space only where a stop string
    cuts it)."""
    stream = kb.lm.codec.stream()  # the model's own text, before the reader's view drops its leading space
    decoded = "".join(stream.push(t) for t in kb.ask(QUESTION, max_new_tokens=MAX).token_ids) + stream.flush()
    assert decoded != decoded.lstrip() and decoded.strip()  # the sharp tiny model starts this answer with a space
    first = decoded.lstrip()[:2]
    assert decoded.find(first) == len(decoded) - len(decoded.lstrip())
    cases = [{"max_tokens": MAX}, {"max_tokens": MAX, "stop": [first]}]  # the second: nothing but whitespace
    for at in range(1, len(decoded) - 2):  # a stop string right after a space: the text before it ends with it
        stop = decoded[at + 1:at + 3]
        if decoded[at].isspace() and decoded[:at].strip() and stop.isalpha() and decoded.find(stop) == at + 1:
            cases.append({"max_tokens": MAX, "stop": [stop]})
            break
    assert len(cases) == 3, decoded
    assert _decoded(kb, QUESTION, MAX, tuple(cases[1]["stop"])) == ""  # whitespace before a stop is never sent
    assert _decoded(kb, QUESTION, MAX, tuple(cases[2]["stop"])).endswith(" "), cases[2]
    return cases


def test_a_streamed_answer_is_exactly_the_whole_answer(url, kb):
    """Streamed or not, the same request gives the same text: the whole answer is stripped, so the stream
    leaves out the whitespace around it too (chat and completions, with and without stop strings)."""
    for case in _whitespace_cases(kb):
        want = kb.ask(QUESTION, max_new_tokens=case["max_tokens"], stop=case.get("stop", ())).answer
        chat = {"model": "lanterns", "messages": [{"role": "user", "content": QUESTION}], **case}
        streamed = [e for e in _events(httpx.post(url + "/v1/chat/completions", json={**chat, "stream": True},
                                                  timeout=60))[:-1] if e["choices"]]
        whole = httpx.post(url + "/v1/chat/completions", json=chat, timeout=60).json()
        assert "".join(e["choices"][0]["delta"].get("content") or "" for e in streamed) == \
            whole["choices"][0]["message"]["content"] == want, case
        prompt = {"model": "lanterns", "prompt": QUESTION, **case}
        streamed = [e for e in _events(httpx.post(url + "/v1/completions", json={**prompt, "stream": True},
                                                  timeout=60))[:-1] if e["choices"]]
        whole = httpx.post(url + "/v1/completions", json=prompt, timeout=60).json()
        assert "".join(e["choices"][0]["text"] for e in streamed) == whole["choices"][0]["text"] == want, case


def test_completion_shares_chats_response_cache_and_tenant_checks(kb, sharp_lm):
    with serving(create_app(ServerConfig(), sharp_lm)) as base:
        chat = httpx.post(base + "/v1/chat/completions", timeout=60, json={
            "model": "lanterns", "max_tokens": MAX, "messages": [{"role": "user", "content": QUESTION}]}).json()
        first = httpx.post(base + "/v1/completions", timeout=60,
                           json={"model": "lanterns", "max_tokens": MAX, "prompt": QUESTION}).json()
        assert first["cag"]["response_cache"] == "exact"  # chat's answer to the same question and limit
        assert first["choices"][0]["text"] == chat["choices"][0]["message"]["content"]
        sampled = httpx.post(base + "/v1/completions", timeout=60, json={
            "model": "lanterns", "max_tokens": MAX, "prompt": QUESTION, "temperature": HOT, "seed": 3}).json()
        assert sampled["cag"]["response_cache"] is None  # sampled answers are never cached, as in chat
    keys = {"key-a": "alpha", "key-b": "beta"}
    with serving(create_app(ServerConfig(api_keys=keys), sharp_lm)) as keyed:
        made = httpx.post(keyed + "/v1/kbs", headers={"Authorization": "Bearer key-a"}, timeout=60, json={
            "name": "notes", "documents": [{"name": "a.md", "text": "The vault code is 4417."}]})
        assert made.status_code == 201, made.text
        mine = httpx.post(keyed + "/v1/completions", headers={"Authorization": "Bearer key-a"}, timeout=60,
                          json={"model": "notes", "max_tokens": 4, "prompt": "What is the code?"})
        assert mine.status_code == 200, mine.text
        other = httpx.post(keyed + "/v1/completions", headers={"Authorization": "Bearer key-b"},
                           json={"model": "notes", "max_tokens": 4, "prompt": "What is the code?"})
        absent = httpx.post(keyed + "/v1/completions", headers={"Authorization": "Bearer key-b"},
                            json={"model": "nothing", "max_tokens": 4, "prompt": "What is the code?"})
        assert _error(other, 404, "model_not_found")["message"].replace("notes", "X") == \
            _error(absent, 404, "model_not_found")["message"].replace("nothing", "X")
        _error(httpx.post(keyed + "/v1/completions", json=PROMPT), 401, "missing_api_key")


def test_x_api_key_is_a_key_like_a_bearer_token(kb, sharp_lm):
    """Anthropic-style clients send `x-api-key`; it names the same tenant a bearer token does. Two different
    keys in one request are refused, never one of them picked."""
    keys = {"key-a": "alpha", "key-b": "beta"}
    ask = {"model": "notes", "max_tokens": 4, "prompt": "What is the code?"}
    with serving(create_app(ServerConfig(api_keys=keys), sharp_lm)) as keyed, httpx.Client(base_url=keyed,
                                                                                             timeout=60) as http:
        made = http.post("/v1/kbs", headers={"x-api-key": "key-a"}, json={
            "name": "notes", "documents": [{"name": "a.md", "text": "The vault code is 4417."}]})
        assert made.status_code == 201 and made.json()["id"] == "notes", made.text
        by_bearer = http.post("/v1/completions", headers={"Authorization": "Bearer key-a"}, json=ask)
        by_x = http.post("/v1/completions", headers={"x-api-key": "key-a"}, json=ask)
        both = http.post("/v1/completions", headers={"x-api-key": "key-a", "Authorization": "Bearer key-a"}, json=ask)
        assert by_bearer.status_code == by_x.status_code == both.status_code == 200, (by_x.text, both.text)
        assert by_x.json()["choices"] == by_bearer.json()["choices"] == both.json()["choices"]
        assert [m["id"] for m in http.get("/v1/models", headers={"x-api-key": "key-a"}).json()["data"]] == ["notes"]
        assert http.get("/v1/models", headers={"x-api-key": "key-b"}).json()["data"] == []  # beta's own view
        _error(http.post("/v1/completions", headers={"x-api-key": "key-b"}, json=ask), 404, "model_not_found")
        # a wrong x-api-key is refused exactly as a wrong bearer token is
        wrong_x = _error(http.get("/v1/models", headers={"x-api-key": "key-z"}), 401, "invalid_api_key")
        assert wrong_x == _error(http.get("/v1/models", headers={"Authorization": "Bearer key-z"}), 401,
                                 "invalid_api_key")
        # two keys that disagree (even two valid ones), or a key beside another scheme: refused, whichever is right
        for headers in ({"x-api-key": "key-b", "Authorization": "Bearer key-a"},
                        {"x-api-key": "key-z", "Authorization": "Bearer key-a"},
                        {"x-api-key": "key-a", "Authorization": "Bearer key-z"},
                        {"x-api-key": "key-a", "Authorization": "Basic a2V5LWE6"}):
            for r in (http.post("/v1/completions", headers=headers, json=ask), http.get("/v1/models", headers=headers)):
                assert _error(r, 401)["type"] == "authentication_error", headers
        assert "x-api-key" in _error(http.get("/v1/models"), 401, "missing_api_key")["message"]
        # an empty header beside a key offers nothing, so it does not disagree
        assert http.get("/v1/models", headers={"x-api-key": "", "Authorization": "Bearer key-a"}).status_code == 200


UNSUPPORTED = [("echo", True), ("best_of", 2), ("n", 2), ("logprobs", 1), ("logprobs", 0), ("suffix", " the end"),
               ("presence_penalty", 0.5), ("logit_bias", {"50": 5})]
NEUTRAL = {"echo": False, "best_of": 1, "n": 1, "suffix": "", "presence_penalty": 0, "frequency_penalty": 0,
           "user": "u-1", "stream_options": {"include_usage": True}, "some_future_field": 1}


def test_completion_refuses_what_it_cannot_do_and_checks_its_input(url, client):
    for name, value in UNSUPPORTED:
        for stream in (False, True):
            r = httpx.post(url + "/v1/completions", json={**PROMPT, "stream": stream, name: value})
            assert f"{name}=" in _error(r, 400, "unsupported_parameter", name)["message"]
    assert httpx.post(url + "/v1/completions", json={**PROMPT, **NEUTRAL}, timeout=60).status_code == 200
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model="lanterns", prompt="hi", echo=True)
    assert caught.value.code == "unsupported_parameter" and caught.value.param == "echo"
    two = httpx.post(url + "/v1/completions", json={**PROMPT, "prompt": ["a?", "b?"]})
    assert "one prompt per request" in _error(two, 400, "invalid_request", "prompt")["message"]
    ids = httpx.post(url + "/v1/completions", json={**PROMPT, "prompt": [15, 27, 3]})
    assert "token-id" in _error(ids, 400, "invalid_request", "prompt")["message"]
    _error(httpx.post(url + "/v1/completions", json={**PROMPT, "prompt": [[15, 27]]}), 400, "invalid_request", "prompt")
    _error(httpx.post(url + "/v1/completions", json={**PROMPT, "prompt": "  "}), 400, "empty_question", "prompt")
    _error(httpx.post(url + "/v1/completions", json={**PROMPT, "prompt": "x" * 4001}), 400, "prompt_too_long",
           "prompt")
    _error(httpx.post(url + "/v1/completions", json={**PROMPT, "max_tokens": 1000}), 400, "context_length_exceeded")
    _error(httpx.post(url + "/v1/completions", json={**PROMPT, "max_tokens": 5000}), 400, "max_tokens_too_large")
    _error(httpx.post(url + "/v1/completions", json={**PROMPT, "stop": ["a", "b", "c", "d", "e"]}), 400,
           "invalid_request", "stop")
    _error(httpx.post(url + "/v1/completions", json={**PROMPT, "model": "nope"}), 404, "model_not_found")


def test_completion_errors_keep_openais_shape(url, monkeypatch):
    _error(httpx.get(url + "/v1/completions"), 405, "method_not_allowed")
    _error(httpx.post(url + "/v1/completion", json=PROMPT), 404, "unknown_url")
    _error(httpx.post(url + "/v1/completions", content=b'{"model": "lanterns", "prompt": ',
                      headers={"Content-Type": "application/json"}), 400, "invalid_json")
    _error(httpx.post(url + "/v1/completions", json={"model": "lanterns"}), 400, "invalid_request", "prompt")
    _error(httpx.post(url + "/v1/completions", json={**PROMPT, "temperature": 3}), 400, "invalid_request",
           "temperature")
    _error(httpx.post(url + "/v1/completions", content=b"x" * 2_000_001,
                      headers={"Content-Type": "application/json"}), 413, "request_too_large")

    def refused(self, question, *, on_text=None, **_kwargs):
        on_text("Half ")
        raise cag.errors.PromptError("the chat template cannot be split here")

    monkeypatch.setattr(KnowledgeBase, "ask", refused)
    events = _events(httpx.post(url + "/v1/completions", json={**PROMPT, "stream": True}, timeout=60))
    assert events[0]["choices"][0]["text"] == "Half"  # the space waits for visible text, which never came
    assert events[-1] == "[DONE]" and events[-2]["error"]["code"] == "generation_failed"


# -- /health and /v1/models ---------------------------------------------------------------------------

def test_health_alias_and_the_model_behind_each_knowledge_base(url, client, kb, sharp_model_dir):
    health = httpx.get(url + "/health")
    assert health.status_code == 200 and health.json() == httpx.get(url + "/healthz").json()
    assert health.json()["status"] == "ok"
    model = client.models.retrieve("lanterns")
    assert model.id == "lanterns" and model.object == "model" and model.owned_by == "cli"
    assert model.model_extra["root"] == Path(sharp_model_dir).name  # a local folder by its name only
    extra = model.model_extra["cag"]
    assert extra["model"] == model.model_extra["root"] and extra["tokens"] == kb.tokens == model.model_extra["tokens"]
    assert extra["documents"] == 2 and re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ", extra["created"])
    assert model.created > 1_600_000_000
    listed = httpx.get(url + "/v1/models")
    assert listed.json()["data"] == [httpx.get(url + "/v1/models/lanterns").json()]
    assert str(sharp_model_dir) not in listed.text


def test_a_hub_model_name_is_shown_as_given(cag_home, sharp_lm, tmp_path):
    """`root` is the model a knowledge base was built with: a hub id as given, a local folder by its name only."""
    import cag

    docs = write_docs(tmp_path / "docs")
    cag.build([docs], name="hub", model="HuggingFaceTB/SmolLM2-135M-Instruct", lm=sharp_lm, log=lambda _m: None)
    cag.build([docs], name="local", lm=sharp_lm, log=lambda _m: None)
    with serving(create_app(ServerConfig(), sharp_lm)) as base:
        assert httpx.get(base + "/v1/models/hub").json()["root"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
        assert httpx.get(base + "/v1/models/local").json()["root"] == sharp_lm.path.name


# -- access log --------------------------------------------------------------------------------------

def _access(caplog) -> list[dict]:
    return [json.loads(r.getMessage()) for r in caplog.records if r.name == "cag.access"]


def _logged(caplog, rid: str, seconds: float = 60) -> dict:
    """The access line of request `rid` (written just after the response ends, so wait for it a moment)."""
    deadline = time.time() + seconds
    while time.time() < deadline:
        found = [line for line in _access(caplog) if line["request_id"] == rid]
        if found:
            assert len(found) == 1, found
            return found[0]
        time.sleep(0.05)
    raise AssertionError(f"no access line for {rid}: {_access(caplog)}")


def test_one_json_access_line_per_request_with_the_id_it_returned(url, caplog):
    secret_question = "What does the heliotrope ledger say about Quillfeather?"
    with caplog.at_level(logging.INFO, logger="cag.access"):
        r = httpx.post(url + "/v1/completions", headers={"X-Request-Id": "trace-42.a:b"}, timeout=60,
                       json={**PROMPT, "prompt": secret_question})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-42.a:b"
        line = _logged(caplog, "trace-42.a:b")
        assert line["method"] == "POST" and line["path"] == "/v1/completions" and line["status"] == 200
        assert line["model"] == "lanterns" and line["tenant"] == OPEN_TENANT and line["duration_ms"] > 0
        usage = r.json()["usage"]
        assert (line["prompt_tokens"], line["completion_tokens"]) == (usage["prompt_tokens"], usage["completion_tokens"])
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["time"]) and "aborted" not in line
        # an id that does not look like one is replaced; every route and every error gets one
        for bad in ("has space", "x" * 129, "-leading-dash", "ünïcode"):
            r = httpx.get(url + "/health", headers={"X-Request-Id": bad.encode("utf-8")})
            assert re.fullmatch(r"[0-9a-f]{32}", r.headers["x-request-id"]), bad
            assert _logged(caplog, r.headers["x-request-id"])["path"] == "/health"
        for r, status in ((httpx.get(url + "/v1/nope"), 404), (httpx.delete(url + "/v1/completions"), 405),
                          (httpx.post(url + "/v1/completions", json={"model": "lanterns"}), 400),
                          (httpx.post(url + "/v1/completions", content=b"{" * 2_000_001), 413)):
            line = _logged(caplog, r.headers["x-request-id"])
            assert line["status"] == status == r.status_code
            assert line["error"] == r.json()["error"]["code"]
        # each request its own id
        ids = {httpx.get(url + "/healthz").headers["x-request-id"] for _ in range(3)}
        assert len(ids) == 3
    assert secret_question not in caplog.text and "Quillfeather" not in caplog.text


def test_a_stream_is_logged_when_it_ends(url, caplog, monkeypatch):
    real, gate = KnowledgeBase.ask, threading.Event()

    def held(self, question, *, on_text=None, **kwargs):  # the real answer, paused after its first piece
        def first_then_wait(text):
            on_text(text)
            assert gate.wait(300), "the test never let the answer go on"
        return real(self, question, on_text=first_then_wait if on_text else None, **kwargs)

    monkeypatch.setattr(KnowledgeBase, "ask", held)
    with caplog.at_level(logging.INFO, logger="cag.access"):
        with httpx.stream("POST", url + "/v1/completions", timeout=60, json={
                **PROMPT, "max_tokens": MAX, "stream": True, "stream_options": {"include_usage": True}}) as r:
            rid = r.headers["x-request-id"]
            lines = r.iter_lines()
            assert json.loads(next(line for line in lines if line)[6:])["choices"][0]["text"]
            time.sleep(0.3)
            assert not [line for line in _access(caplog) if line["request_id"] == rid]  # still streaming
            gate.set()
            events = [line for line in lines if line]
        usage = json.loads(events[-2][6:])["usage"]
        line = _logged(caplog, rid)
    assert line["status"] == 200 and line["completion_tokens"] == usage["completion_tokens"] >= 1
    assert "aborted" not in line and "error" not in line


def test_a_failed_stream_logs_its_error(url, caplog, monkeypatch):
    def broken(self, question, *, on_text=None, **_kwargs):
        raise RuntimeError("exploded")

    monkeypatch.setattr(KnowledgeBase, "ask", broken)
    with caplog.at_level(logging.INFO, logger="cag.access"):
        r = httpx.post(url + "/v1/chat/completions", timeout=60, json={
            "model": "lanterns", "stream": True, "max_tokens": 4, "messages": [{"role": "user", "content": "hi"}]})
        line = _logged(caplog, r.headers["x-request-id"])
    assert r.status_code == 200 and line["error"] == "internal_error"


# -- `cag serve` flags and environment ------------------------------------------------------------------

def test_with_flags_overrides_the_config():
    base = ServerConfig(max_batch=8, workers=4)
    c = with_flags(base, continuous_batching=False, max_batch=4, batch_window_ms=2.5, workers=2, api_key="k-1")
    assert (c.continuous_batching, c.max_batch, c.batch_window_ms, c.workers, c.api_keys, c.share_cli_kbs) == \
        (False, 4, 2.5, 2, {"k-1": OPEN_TENANT}, True)
    assert (base.answer_threads, c.answer_threads) == (8, 2)  # batched answers each hold a thread while they wait
    assert with_flags(base) == base
    m = with_flags(base, model="m.gguf", kv_type="q8_0", context=2048, threads=3)
    assert (m.model, m.kv_type, m.context, m.threads) == ("m.gguf", "q8_0", 2048, 3)
    with pytest.raises(ConfigError, match="already configured"):
        with_flags(ServerConfig(api_keys={"k": "teamA"}), api_key="k-2")
    with pytest.raises(ConfigError, match="empty"):
        with_flags(base, api_key=" ")
    for bad in ({"workers": 0}, {"workers": 2.5}, {"max_batch": 0}, {"max_batch": True},
                {"continuous_batching": "yes"}, {"batch_window_ms": -1}, {"batch_window_ms": "5"},
                {"batch_window_ms": 60_000}, {"threads": 0}, {"context": True}, {"model_bytes": -1},
                {"kv_type": "q4_0"}):
        with pytest.raises(ConfigError):
            ServerConfig(**bad)


class Served:
    """A real `cag serve` process; stdout (the access log) and stderr go to files read after it stops."""

    def __init__(self, tmp_path: Path, cag_home: Path, model_dir: Path, args: list[str], env: dict[str, str],
                 url: str):
        config = tmp_path / "server.json"
        config.write_text(json.dumps({"model": str(model_dir)}))
        self.out, self.err = tmp_path / f"out-{len(args)}.log", tmp_path / f"err-{len(args)}.log"
        environ = {**os.environ, "CAG_HOME": str(cag_home), "CAG_API_KEYS": ""}
        environ.pop("CAG_API_KEY", None)
        environ.update(env)
        with open(self.out, "w") as out, open(self.err, "w") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "cag", "serve", "--config", str(config), *args],
                                         env=environ, stdout=out, stderr=err)
        self.url = url
        try:
            wait_until_serving(url, self.proc)
        except BaseException:
            print(self.stop()[1][-3000:])  # what the server said, shown with the failure
            raise

    def stop(self) -> tuple[str, str]:
        if self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(timeout=30)
        return self.out.read_text(), self.err.read_text()

    def logged(self, ids, seconds: float = 60) -> None:
        """Wait until the access log has a line for each request id in `ids` (a line is written just after its
        response's last byte, so it may come a moment after the client has the whole response)."""
        deadline = time.time() + seconds
        while True:
            done = [line for line in self.out.read_text().splitlines(keepends=True) if line.endswith("\n")]
            missing = set(ids) - {json.loads(line)["request_id"] for line in done}
            if not missing:
                return
            assert time.time() < deadline, f"no access line within {seconds} s for {sorted(missing)}"
            time.sleep(0.05)


def test_cag_serve_api_key_env_address_and_access_log(kb, sharp_model_dir, tmp_path, cag_home):
    port, key, question = free_port(), "sk-cag-test-7f3a9", "Who founded Quillfeather, said the marmoset?"
    served = Served(tmp_path, cag_home, sharp_model_dir, ["--api-key", key, "--max-batch", "4", "--workers", "2"],
                    {"CAG_HOST": "127.0.0.2", "CAG_PORT": str(port)}, f"http://127.0.0.2:{port}")
    try:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health")  # CAG_HOST chose the address
        _error(httpx.get(served.url + "/v1/models"), 401, "missing_api_key")
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0).completions.create(
                model="lanterns", prompt=question, max_tokens=4)
        client = openai.OpenAI(base_url=served.url + "/v1", api_key=key, max_retries=0)
        assert [m.id for m in client.models.list().data] == ["lanterns"]  # the CLI's knowledge bases, behind the key
        raw = client.completions.with_raw_response.create(model="lanterns", prompt=question, max_tokens=MAX)
        got, rid = raw.parse(), raw.headers["x-request-id"]
        assert got.choices[0].text == kb.ask(question, max_new_tokens=MAX).answer
        stream = httpx.post(served.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {key}",
                                                                          "X-Request-Id": "client-chosen-1"},
                            json={"model": "lanterns", "max_tokens": 4, "stream": True,
                                  "messages": [{"role": "user", "content": question}]}, timeout=60)
        assert stream.headers["x-request-id"] == "client-chosen-1"
        served.logged([rid, "client-chosen-1"])  # the stream's line is written just after its last byte
    finally:
        out, err = served.stop()
    lines = [json.loads(line) for line in out.splitlines()]  # stdout is nothing but JSON lines
    by_id = {line["request_id"]: line for line in lines}
    assert by_id[rid]["path"] == "/v1/completions" and by_id[rid]["status"] == 200
    assert by_id[rid]["tenant"] == OPEN_TENANT and by_id[rid]["completion_tokens"] == got.usage.completion_tokens
    assert by_id["client-chosen-1"]["status"] == 200 and by_id["client-chosen-1"]["completion_tokens"] >= 1
    assert sum(line["status"] == 401 for line in lines) == 2
    assert key not in out + err and question not in out + err and "marmoset" not in out + err
    assert "Traceback" not in err


@pytest.mark.parametrize("encoding", ["utf-8", "ascii"])
def test_cag_serve_writes_one_access_line_for_text_it_cannot_print(kb, sharp_model_dir, tmp_path, cag_home, encoding):
    """A request naming a model with a lone surrogate, or (on an ASCII stdout) with any non-ASCII text, still
    gets its one JSON access line: what the stream cannot encode is written as JSON escapes."""
    port = free_port()
    served = Served(tmp_path, cag_home, sharp_model_dir, ["--port", str(port)], {"PYTHONIOENCODING": encoding},
                    f"http://127.0.0.1:{port}")
    sent = {}
    try:
        with httpx.Client(base_url=served.url, timeout=60, headers={"Content-Type": "application/json"}) as http:
            for model, status in (("\ud800", 400), ("Ünïcode ☃ 知识", 404), ("lanterns", 200)):
                for path, body in (("/v1/completions", {**PROMPT, "model": model}),
                                   ("/v1/chat/completions", {"model": model, "max_tokens": 4,
                                                             "messages": [{"role": "user", "content": "hi"}]})):
                    r = http.post(path, content=json.dumps(body))  # JSON escapes: the surrogate travels as \\ud800
                    assert r.status_code in ((400, 404) if model == "\ud800" else (status,)), r.text
                    sent[r.headers["x-request-id"]] = model
            sent[http.get("/v1/models/%C3%9Cn%C3%AFcode").headers["x-request-id"]] = "Ünïcode"
        served.logged(sent)  # a line is written just after its response's last byte
    finally:
        out, err = served.stop()
    lines = [json.loads(line) for line in out.splitlines()]  # stdout is nothing but JSON lines
    lines = [line for line in lines if line["path"] != "/healthz"]  # the test's wait for the server to start
    assert sorted(line["request_id"] for line in lines) == sorted(sent)  # one line per request, none lost
    for line in lines:  # a body refused before its route read it notes no model
        assert line.get("model", sent[line["request_id"]]) == sent[line["request_id"]]
    if encoding == "utf-8":
        assert "Ünïcode ☃ 知识" in out  # text UTF-8 can hold stays readable
    else:
        out.encode("ascii")
    assert "Logging error" not in err and "UnicodeEncodeError" not in err


def test_cag_serve_flag_beats_env_and_log_level_quiets(kb, sharp_model_dir, tmp_path, cag_home):
    port, env_port = free_port(), free_port()
    served = Served(tmp_path, cag_home, sharp_model_dir, ["--port", str(port), "--log-level", "error"],
                    {"CAG_PORT": str(env_port)}, f"http://127.0.0.1:{port}")
    try:
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{env_port}/health")
        r = httpx.post(served.url + "/v1/completions", json={**PROMPT}, timeout=60)
        assert r.status_code == 200 and r.headers["x-request-id"]
    finally:
        out, err = served.stop()
    assert out == ""  # access lines are info: hidden at error
    assert "no API keys configured" not in err  # a warning: hidden at error (shown by default, see test_server_features)


def test_cag_serve_refuses_an_api_key_beside_configured_keys(tmp_path, cag_home):
    env = {**os.environ, "CAG_HOME": str(cag_home), "CAG_API_KEYS": "k1=teamA"}
    proc = subprocess.run([sys.executable, "-m", "cag", "serve", "--api-key", "k2"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 1 and proc.stderr.startswith("error: --api-key is the single-tenant shortcut")
    assert "Traceback" not in proc.stderr and "k2" not in proc.stderr
