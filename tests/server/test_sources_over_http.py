"""Answers a user can check, over HTTP: every answer comes with the passages it rests on and whether they
support it (the `cag` object of a response, and of a stream's last chunk), a request's `cag` options choose
how many sources and whether an unsupported answer is refused, the response cache judges its text again for
each request, /metrics counts answers by support, and the chat page shows the sources and marks unsupported
answers. Servers are real (uvicorn on loopback); the tiny random-weight model where only the plumbing
matters, the real default model where an answer must be (un)supported for a reason.
"""

from __future__ import annotations

import shutil
import time

import httpx
import pytest

import cag
from cag.kb.grounding import REFUSAL
from cag.registry import OPEN_TENANT
from cag.server import ServerConfig, create_app
from cag.server.config import ConfigError, load_config
from conftest import SAMPLE_DOCS
from serverutil import hold_until_the_client_leaves, openai_error, serving, sse_events, write_docs
from browserutil import ask as ask_on_page
from browserutil import browser  # noqa: F401 - the module-wide Chromium, a fixture
from browserutil import metric

MAX = 12
Q = "How much is the Heron lantern?"
SOURCE_KEYS = {"document", "locator", "snippet", "score", "page", "lines", "heading"}
# Six passages over three documents; the last one's heading and text are HTML, which the page must show as text.
DOCS = {
    "lanterns.md": "# Lanterns\n\n## Heron\nThe Heron lantern costs 148 crowns and is blue.\n\n"
                   "## Wren\nThe Wren lantern runs 40 hours on one battery.\n\n"
                   "## Repairs\nA repair takes 9 days at the Tinder Lane workshop.\n",
    "company.txt": "Quillfeather was founded in 1987 by Odalys Renn.\n\nIts mascot is a grey moth named Pemberly.\n",
    "notes.md": '# Notes <b id="bold">bold</b>\nThe night lamp is <img src=x onerror="window.pwned=1"> & "quoted".\n',
}
PASSAGES = 6
CHROMIUM = shutil.which("chromium")
needs_chromium = pytest.mark.skipif(not CHROMIUM, reason="chromium not installed (scripts/setup.sh)")


@pytest.fixture
def kb(cag_home, sharp_lm, tmp_path):
    return cag.build([write_docs(tmp_path / "docs", DOCS)], name="lanterns", lm=sharp_lm, log=lambda _m: None)


def _post(url: str, path: str = "/v1/chat/completions", q: str = Q, model: str = "lanterns", max_tokens: int = MAX,
          **extra) -> httpx.Response:
    body = {"model": model, "max_tokens": max_tokens, **extra}
    body.update({"prompt": q} if path == "/v1/completions" else {"messages": [{"role": "user", "content": q}]})
    return httpx.post(url + path, json=body, timeout=300)


def _chat(url: str, q: str = Q, **extra) -> dict:
    r = _post(url, q=q, **extra)
    assert r.status_code == 200, r.text
    return r.json()


def _content(body: dict) -> str:
    return body["choices"][0]["message"]["content"]


def _stream(url: str, q: str = Q, path: str = "/v1/chat/completions", usage: bool = True,
            **extra) -> tuple[list[str], list[dict]]:
    """(the content pieces, every chunk before [DONE]) of a streamed request."""
    r = _post(url, path, q, stream=True, stream_options={"include_usage": usage}, **extra)
    assert r.status_code == 200, r.text
    events = sse_events(r)
    assert events[-1] == "[DONE]" and not any("error" in e for e in events[:-1]), r.text
    chunks = events[:-1]
    pieces = [c["choices"][0]["delta"].get("content") if "delta" in c["choices"][0] else c["choices"][0]["text"]
              for c in chunks if c["choices"]]
    return [p for p in pieces if p], chunks


def test_answers_carry_their_sources_streamed_or_not(kb, sharp_lm):
    want = kb.ask(Q, max_new_tokens=MAX)  # the library's answer, sources and support for the same question
    assert want.answer and len(want.sources) == 3
    with serving(create_app(ServerConfig(response_cache=False), sharp_lm)) as url:
        whole = _chat(url)
        extra = whole["cag"]
        assert _content(whole) == want.answer
        assert extra["sources"] == [s.to_dict() for s in want.sources]
        assert all(set(s) == SOURCE_KEYS and s["snippet"] for s in extra["sources"])
        assert (extra["supported"], extra["support"], extra["generated"]) == (want.supported, want.support, None)
        assert extra["grounding_s"] >= 0
        for usage in (True, False):  # the last chunk before [DONE] carries the object, usage chunk or not
            pieces, chunks = _stream(url, usage=usage)
            assert "".join(pieces) == want.answer
            assert [("cag" in c) for c in chunks] == [False] * (len(chunks) - 1) + [True]
            last = chunks[-1]["cag"]
            assert (last["sources"], last["supported"], last["support"]) == (extra["sources"], want.supported,
                                                                             want.support)
        prompt = _post(url, "/v1/completions").json()["cag"]
        assert prompt["sources"] == extra["sources"]
        _pieces, chunks = _stream(url, path="/v1/completions", usage=False)
        assert chunks[-1]["cag"]["sources"] == extra["sources"]
        none = _chat(url, cag={"sources": 0})
        assert none["cag"]["sources"] == [] and _content(none) == want.answer
        assert none["cag"]["supported"] == want.supported  # support is measured whether sources are shown or not
        assert _chat(url, cag={"sources": 1})["cag"]["sources"] == extra["sources"][:1]
        every = _chat(url, cag={"sources": 20})["cag"]["sources"]
        assert len(every) == PASSAGES and every[:3] == extra["sources"]


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_bad_options_are_400s_naming_the_field(kb, sharp_lm, path):
    bad = [({"sources": 21}, "cag.sources", "from 0 to 20"), ({"sources": -1}, "cag.sources", "from 0 to 20"),
           ({"sources": True}, "cag.sources", "integer"), ({"sources": "3"}, "cag.sources", "integer"),
           ({"sources": 2.5}, "cag.sources", "integer"), ({"unsupported": "hide"}, "cag.unsupported", "flag, refuse"),
           ({"unsupported": 1}, "cag.unsupported", "string"), ({"unsuported": "refuse"}, "cag.unsuported", "Extra"),
           (3, "cag", "dictionary")]
    with serving(create_app(ServerConfig(response_cache=False), sharp_lm)) as url:
        for options, param, words in bad:
            error = openai_error(_post(url, path, cag=options), 400, "invalid_request", param)
            assert words.lower() in error["message"].lower(), (options, error)
        assert _post(url, path, cag={"sources": 0, "unsupported": "refuse"}).status_code == 200
        assert _post(url, path, cag=None).status_code == 200


def test_the_server_config_sets_the_defaults(kb, sharp_lm, tmp_path, monkeypatch):
    monkeypatch.delenv("CAG_API_KEYS", raising=False)
    path = tmp_path / "server.json"
    path.write_text('{"sources": 1, "unsupported": "refuse", "response_cache": false}')
    config = load_config(path)
    assert (config.sources, config.unsupported) == (1, "refuse")
    assert (ServerConfig().sources, ServerConfig().unsupported) == (3, "flag")
    for bad, words in (({"sources": 21}, "sources must be a whole number from 0 to 20"),
                       ({"sources": True}, "sources must be"), ({"unsupported": "hide"}, "unsupported must be one of")):
        with pytest.raises(ConfigError, match=words):
            ServerConfig(**bad)
    model = kb.ask(Q, max_new_tokens=MAX)
    assert not model.supported  # the random model's words are not the documents': refusing it changes it
    with serving(create_app(config, sharp_lm)) as url:
        default = _chat(url)
        assert _content(default) == REFUSAL and default["cag"]["generated"] == model.answer
        assert len(default["cag"]["sources"]) == 1
        asked = _chat(url, cag={"unsupported": "flag", "sources": 2})  # a request's own options win
        assert _content(asked) == model.answer and asked["cag"]["generated"] is None
        assert len(asked["cag"]["sources"]) == 2


def test_a_cached_answer_is_judged_again_for_each_request(kb, sharp_lm):
    app = create_app(ServerConfig(semantic_threshold=None), sharp_lm)
    with serving(app) as url:
        first = _chat(url, cag={"unsupported": "refuse"})  # the model's answer, refused: the cache keeps its text
        text = first["cag"]["generated"]
        assert first["cag"]["response_cache"] is None and _content(first) == REFUSAL and text
        again = _chat(url)  # a flag request after a refused one gets the model's text, not the refusal
        sources = again["cag"]["sources"]
        assert again["cag"]["response_cache"] == "exact" and _content(again) == text
        assert again["cag"]["supported"] is False and again["cag"]["generated"] is None
        assert sources == first["cag"]["sources"] and len(sources) == 3
        one = _chat(url, cag={"unsupported": "refuse", "sources": 1})
        assert one["cag"]["response_cache"] == "exact" and _content(one) == REFUSAL
        assert one["cag"]["sources"] == sources[:1] and one["cag"]["generated"] == text
        pieces, chunks = _stream(url, cag={"unsupported": "refuse"})
        assert pieces == [REFUSAL] and chunks[-1]["cag"]["response_cache"] == "exact"
        assert chunks[-1]["cag"]["sources"] == sources and chunks[-1]["cag"]["generated"] == text
        talk = _chat(url, conversation_id="c1", cag={"unsupported": "refuse"})
        assert talk["cag"]["response_cache"] == "exact" and _content(talk) == REFUSAL
        service = app.state.service
        folder = service.registry.folder_for(OPEN_TENANT, "lanterns")
        [turn] = service.conversations.get((OPEN_TENANT, folder, "c1"))
        assert (turn.question, turn.answer) == (Q, REFUSAL)  # the conversation holds what the user was given
        assert metric(url, "cag_answers_supported_total", 'supported="false"') == 5
        assert metric(url, "cag_answers_supported_total", 'supported="true"') == 0
        assert _unlabelled(url, "cag_grounding_seconds_count") == 5  # hits are judged too


def _unlabelled(url: str, name: str) -> float:
    """A metric without labels from /metrics."""
    return float(next(x for x in httpx.get(url + "/metrics").text.splitlines() if x.startswith(name + " ")).split()[-1])


def test_a_refused_stream_sends_the_final_answer_only_and_stops_when_its_client_leaves(
        cag_home, endless_model_dir, tmp_path, monkeypatch):
    from cag.engines.torch import models

    endless = models.load(str(endless_model_dir), device="cpu", dtype="float32")  # never ends its turn
    # its two words ("Quillfeather", "Brackwater") are nowhere in these documents: its answers are unsupported
    docs = {"lamps.md": "# Lamps\nThe Heron lamp costs 148 crowns.\n\n## Wren\nThe Wren lamp runs 40 hours.\n"}
    cag.build([write_docs(tmp_path / "docs", docs)], name="lanterns", lm=endless, log=lambda _m: None)
    app = create_app(ServerConfig(response_cache=False), endless)
    with serving(app) as url:
        pieces, chunks = _stream(url, cag={"unsupported": "refuse"})
        generated = chunks[-1]["cag"]["generated"]
        assert pieces == [REFUSAL] and len(generated) > 10 * MAX  # nothing of the model's text was sent
        assert chunks[-1]["cag"]["supported"] is False
        seen = hold_until_the_client_leaves(monkeypatch, max_tokens=300, after=20)
        body = {"model": "lanterns", "max_tokens": 300, "stream": True, "cag": {"unsupported": "refuse"},
                "messages": [{"role": "user", "content": Q}]}
        with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=120) as r:
            lines = r.iter_lines()  # kept: a dropped iterator closes the response, and the client would leave now
            first = next(lines)  # the opening chunk (the role); the answer is withheld until judged
            assert first.startswith("data: {") and '"role": "assistant"' in first
            deadline = time.time() + 60
            while not seen["held"] and time.time() < deadline:  # leave once it is provably mid-answer
                time.sleep(0.05)
        deadline = time.time() + 60
        while metric(url, "cag_requests_total", 'status="cancelled"') < 1 and time.time() < deadline:
            time.sleep(0.1)
        assert metric(url, "cag_requests_total", 'status="cancelled"') == 1
    assert seen["held"] and not seen["late"] and seen["produced"] < 300, seen  # stopped mid-answer


# -- the chat page -----------------------------------------------------------------------------------------

def open_chat(browser, url: str, kb: str, max_tokens: int | None = None):
    """The chat page on `kb`, its errors collected (page errors, console errors, requests elsewhere)."""
    page = browser.new_page(viewport={"width": 1100, "height": 800})
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("request", lambda req: None if req.url.startswith((url + "/", "data:")) else errors.append(req.url))
    page.goto(url + "/")
    page.wait_for_selector(f"#kb option[value={kb}]", state="attached")
    if max_tokens:
        page.locator("#settings summary").click()
        page.locator("#max-tokens").fill(str(max_tokens))
        page.locator("#max-tokens").dispatch_event("change")
    page.errors = errors
    return page


def shown_sources(answer) -> list[str]:
    return [s.inner_text() for s in answer.locator(".grounding .source summary").all()]


@needs_chromium
def test_the_page_shows_sources_as_text_and_marks_an_unsupported_answer(kb, sharp_lm, browser):
    config = ServerConfig(response_cache=False, sources=20, default_max_tokens=MAX)  # every passage is a source
    with serving(create_app(config, sharp_lm)) as url:
        want = _chat(url)["cag"]
        assert want["supported"] is False and len(want["sources"]) == PASSAGES
        page = open_chat(browser, url, "lanterns")
        ask_on_page(page, Q)
        answer = page.locator("#log .msg.assistant").last
        badge = answer.locator(".grounding .badge.unsupported")
        assert badge.is_visible()
        assert badge.inner_text() == f"not supported by the knowledge base · support {round(want['support'] * 100)}%"
        assert shown_sources(answer) == [f"{s['document']} · {s['locator']} · {round(s['score'] * 100)}%"
                                         for s in want["sources"]]
        notes = next(i for i, s in enumerate(want["sources"]) if s["document"] == "notes.md")
        item = answer.locator(".grounding .source").nth(notes)
        snippet = item.locator(".source-snippet")
        assert not snippet.is_visible()  # closed until asked for
        item.locator("summary").click()
        assert snippet.is_visible() and snippet.inner_text() == want["sources"][notes]["snippet"]
        assert '<img src=x onerror="window.pwned=1">' in snippet.inner_text()  # the document's HTML, as text
        assert 'Notes <b id="bold">bold</b>' in item.locator("summary").inner_text()
        assert page.locator("#log img, #log #bold").count() == 0 and page.evaluate("window.pwned") is None
        shown = shown_sources(answer)
        page.reload()  # kept with the conversation
        page.wait_for_selector("#log .msg.assistant .grounding .source")
        restored = page.locator("#log .msg.assistant").last
        assert shown_sources(restored) == shown and restored.locator(".badge.unsupported").is_visible()
        assert page.errors == []


# -- the real default model: answers (un)supported for a reason --------------------------------------------

REAL_MAX = 32
SUPPORTED = "Who is the current chief executive?"  # the documents name her (04_history.txt)
UNSUPPORTED = "What is the capital of France?"  # the model knows; the documents do not say


@pytest.fixture(scope="module")
def real_url(real_home, real_lm, tmp_path_factory):
    docs = tmp_path_factory.mktemp("quillfeather")
    for name in ("01_company.md", "04_history.txt"):  # two of the sample's six documents: a quick build
        shutil.copy(SAMPLE_DOCS / name, docs / name)
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("CAG_HOME", str(real_home))
        mp.delenv("CAG_SIGNING_KEY", raising=False)
        cag.build([docs], name="quillfeather", lm=real_lm, log=lambda _m: None)
        with serving(create_app(ServerConfig(semantic_threshold=None), real_lm)) as url:
            yield url


def _real(url: str, q: str, max_tokens: int = REAL_MAX, **extra) -> dict:
    return _chat(url, q, model="quillfeather", max_tokens=max_tokens, **extra)


@pytest.mark.real_model
def test_refuse_replaces_only_an_unsupported_answer(real_url):
    refused = _real(real_url, UNSUPPORTED, cag={"unsupported": "refuse"})
    said = refused["cag"]["generated"]
    assert _content(refused) == REFUSAL and "Paris" in said and refused["choices"][0]["finish_reason"] == "stop"
    assert refused["cag"]["supported"] is False and refused["cag"]["support"] < 0.6
    assert len(refused["cag"]["sources"]) == 3
    flagged = _real(real_url, UNSUPPORTED)  # the cached text, judged for a flag request: shown, and marked
    assert flagged["cag"]["response_cache"] == "exact" and _content(flagged) == said
    assert flagged["cag"]["supported"] is False and flagged["cag"]["sources"] == refused["cag"]["sources"]
    pieces, chunks = _stream(real_url, UNSUPPORTED, model="quillfeather", max_tokens=REAL_MAX + 1,
                             cag={"unsupported": "refuse"})  # another limit: a model answer, not a hit
    assert chunks[-1]["cag"]["response_cache"] is None
    assert pieces == [REFUSAL] and chunks[-1]["cag"]["generated"] == said
    kept = _real(real_url, SUPPORTED, cag={"unsupported": "refuse"})
    answer = _content(kept)
    assert answer != REFUSAL and "Marrek Solvang" in answer and kept["cag"]["generated"] is None
    assert kept["cag"]["supported"] is True and kept["cag"]["support"] >= 0.6
    assert any("Marrek Solvang" in s["snippet"] for s in kept["cag"]["sources"])
    pieces, chunks = _stream(real_url, SUPPORTED, model="quillfeather", max_tokens=REAL_MAX + 1,
                             cag={"unsupported": "refuse"})
    assert pieces == [answer] and chunks[-1]["cag"]["sources"] == kept["cag"]["sources"]


@needs_chromium
@pytest.mark.real_model
def test_the_page_marks_only_the_unsupported_answer(real_url, browser):
    page = open_chat(browser, real_url, "quillfeather", max_tokens=REAL_MAX)
    ask_on_page(page, SUPPORTED)
    ask_on_page(page, UNSUPPORTED)
    kept, flagged = page.locator("#log .msg.assistant").all()
    assert "Marrek Solvang" in kept.locator(".body").inner_text()
    assert kept.locator(".badge").count() == 0 and len(shown_sources(kept)) == 3
    assert "Paris" in flagged.locator(".body").inner_text()
    assert flagged.locator(".badge.unsupported").is_visible() and len(shown_sources(flagged)) == 3
    assert "not supported by the knowledge base" in flagged.locator(".badge.unsupported").inner_text()
    assert page.errors == []
