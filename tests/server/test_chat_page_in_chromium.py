"""The web chat page in real headless Chromium (Debian's), driven by Playwright, against a real server.

The page sends with Enter, streams and renders answers as sanitized Markdown (the vendored marked +
DOMPurify, served by cag itself), stops an answer mid-stream (and the server stops decoding it), keeps
conversations in localStorage, lists knowledge bases without their shards, and fits at 1100 and 390 px,
on an open server and on one that asks for an API key.
"""

from __future__ import annotations

import json
import re
import shutil
import time

import httpx
import pytest

import cag
from cag.server import ServerConfig, create_app, with_flags
from conftest import SAMPLE_DOCS
from serverutil import hold_until_the_client_leaves, serving, visible_pieces, write_docs
from browserutil import ask, browser, metric  # noqa: F401 - browser: the module-wide Chromium, a fixture

QUESTION = "How much is the Heron?"  # the sharp tiny model rambles on this one until max_tokens

pytestmark = pytest.mark.skipif(not shutil.which("chromium"), reason="chromium not installed (scripts/setup.sh)")


@pytest.fixture
def lanterns(cag_home, sharp_lm, tmp_path):
    return cag.build([write_docs(tmp_path / "docs")], name="lanterns", lm=sharp_lm, log=lambda _m: None)


def open_page(browser, url: str, width: int = 1100, height: int = 800, ready: bool = True):
    page = browser.new_page(viewport={"width": width, "height": height})
    errors = []
    page.on("pageerror", lambda err: errors.append(str(err)))
    page.on("console", lambda msg: errors.append(msg.text) if msg.type == "error" else None)
    page.on("request", lambda req: None if req.url.startswith((url + "/", "data:")) else errors.append(req.url))
    page.goto(url + "/")
    if ready:
        page.wait_for_selector("#kb option[value=lanterns]", state="attached")
    page.errors = errors  # page errors, console errors (CSP refusals too) and requests to anywhere but the server
    return page


def stored(page) -> list[dict]:
    return json.loads(page.evaluate("localStorage.getItem('cag-conversations')") or "[]")


def no_horizontal_overflow(page) -> bool:
    return page.evaluate("document.documentElement.scrollWidth <= document.documentElement.clientWidth")


def inside_viewport(page, selector: str) -> bool:
    box, width = page.locator(selector).bounding_box(), page.viewport_size["width"]
    return box is not None and box["x"] >= 0 and box["x"] + box["width"] <= width and box["width"] > 0


def test_enter_sends_and_the_streamed_answer_renders_through_the_markdown_path(lanterns, sharp_lm, browser):
    want = lanterns.ask(QUESTION, max_new_tokens=256).answer
    assert want  # the sharp tiny model gives a non-empty, question-specific answer
    with serving(create_app(ServerConfig(semantic_threshold=None), sharp_lm)) as url:
        page = open_page(browser, url)
        # a MutationObserver notes the typing indicator, which lives only until the first token
        page.evaluate("""new MutationObserver(() => { if (document.querySelector('#log .typing')) window.sawTyping = true; })
                         .observe(document.getElementById('log'), {childList: true, subtree: true})""")
        q = page.locator("#question")
        q.press_sequentially("first line")
        q.press("Shift+Enter")
        q.press_sequentially("second line")
        assert q.input_value() == "first line\nsecond line"  # Shift+Enter is a newline, nothing was sent
        assert page.locator("#log .msg").count() == 0
        ask(page, QUESTION)
        answer = page.locator("#log .msg.assistant").first
        stats = answer.locator(".stats")
        assert page.evaluate("window.sawTyping") is True and page.locator("#log .typing").count() == 0
        assert page.locator("#log .msg.user .bubble").first.inner_text() == QUESTION
        assert stats.get_attribute("data-cached") == str(lanterns.tokens)
        assert "TTFT" in stats.inner_text() and "stopped" not in stats.inner_text()
        [conversation] = stored(page)
        assert conversation["kb"] == "lanterns" and conversation["title"] == QUESTION
        assert [m["role"] for m in conversation["messages"]] == ["user", "assistant"]
        assert conversation["messages"][1]["content"].strip() == want  # every streamed token arrived, in order
        # what the page shows is the page's own Markdown render of the streamed text (and kept after a reload)
        rendered = page.evaluate("(t) => window.cagChat.renderMarkdown(t)", conversation["messages"][1]["content"])
        assert answer.locator(".body").inner_html() == rendered
        page.reload()
        page.wait_for_selector("#log .msg.assistant .body")
        assert page.locator("#log .msg.assistant .body").inner_html() == rendered
        assert page.locator("#conversations .conv.active .conv-title").inner_text() == QUESTION
        page.locator("#conversations .conv-delete").click()  # deleted, and gone after a reload too
        assert page.locator("#log .msg").count() == 0 and page.locator("#conversations .conv").count() == 0
        page.reload()
        page.wait_for_selector("#kb option[value=lanterns]", state="attached")
        assert stored(page) == [] and page.locator("#log .msg").count() == 0
        assert page.errors == []


def test_stop_ends_the_stream_and_the_server_stops_generating(lanterns, sharp_lm, browser, monkeypatch):
    # The tiny model decodes 800 tokens in well under a second. So the answer pauses at its 20th token
    # until the page has left (its visible text has begun by then, and more is to come): the answer is
    # still running when the click lands, however fast or slow the machine is.
    before, whole = visible_pieces(lanterns, QUESTION, 20), visible_pieces(lanterns, QUESTION, 800)
    assert before >= 1 and whole >= before + 2, (before, whole)
    seen = hold_until_the_client_leaves(monkeypatch, max_tokens=800, after=20)
    with serving(create_app(ServerConfig(semantic_threshold=None, response_cache=False), sharp_lm)) as url:
        page = open_page(browser, url)
        page.locator("#settings summary").click()
        page.locator("#max-tokens").fill("800")  # a long answer: ~800 tokens, many seconds on a CPU
        page.locator("#max-tokens").dispatch_event("change")
        page.locator("#question").fill(QUESTION)
        page.locator("#question").press("Enter")
        body = page.locator("#log .msg.assistant .body").first
        page.wait_for_function("() => document.querySelector('#log .msg.assistant .body').textContent.length > 0")
        assert page.locator("#stop").is_visible() and not page.locator("#send").is_visible()
        page.locator("#stop").click()
        stats = page.locator("#log .msg.assistant .stats").first
        stats.filter(has_text="stopped").wait_for(timeout=10_000)
        partial = stored(page)[0]["messages"][1]["content"]
        assert partial and body.inner_text().strip()  # the partial answer stays on the page
        assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()

        # server side: the generation ended early, stopped by its cancel event (not run on to max_tokens)
        deadline = time.time() + 60
        while metric(url, "cag_requests_total", 'status="cancelled"') < 1 and time.time() < deadline:
            time.sleep(0.2)
        assert metric(url, "cag_requests_total", 'status="cancelled"') == 1
        assert metric(url, "cag_requests_total", 'status="200"') == 0
        assert metric(url, "cag_tokens_total", 'kind="generated"') == 0  # no answer was completed
        assert not seen["late"] and seen["produced"] < 800, seen  # the decoder stopped mid-answer

        # and the page is ready again: a new conversation answers in full
        page.locator("#new").click()
        assert page.locator("#log .msg").count() == 0
        page.locator("#max-tokens").fill("")
        page.locator("#max-tokens").dispatch_event("change")
        ask(page, "Who founded Quillfeather?")
        assert "stopped" not in page.locator("#log .msg.assistant .stats").first.inner_text()
        assert metric(url, "cag_requests_total", 'status="200"') == 1
        assert len(stored(page)) == 2
        assert page.errors == []


def test_markdown_renders_and_html_in_answers_and_questions_is_inert(lanterns, sharp_lm, browser):
    payload = ('**bold** and `code`\n\n[link](javascript:window.pwned=3)\n\n<script>window.pwned = 1</script>'
               '<img src="x" onerror="window.pwned = 2"> '
               '<a href="#" onclick="window.pwned = 4">a</a> <iframe src="javascript:window.pwned=5"></iframe>')
    question = '<b>not bold</b> <img src="x" onerror="window.pwned = 6">'
    with serving(create_app(ServerConfig(semantic_threshold=None), sharp_lm)) as url:
        page = open_page(browser, url)
        html = page.evaluate("(t) => window.cagChat.renderMarkdown(t)", payload)
        assert "<strong>bold</strong>" in html and "**" not in html and "<code>code</code>" in html
        assert ">link</a>" in html and not re.search(r"<script|<img|<iframe|onerror|onclick|javascript:", html, re.I)
        # a conversation restored from localStorage goes through the same path into the real DOM
        saved = [{"id": "c1", "title": "t", "kb": "lanterns", "updated": 0, "messages": [
            {"role": "user", "content": question}, {"role": "assistant", "content": payload}]}]
        page.evaluate("(s) => { localStorage.setItem('cag-conversations', s); localStorage.setItem('cag-current', 'c1') }",
                      json.dumps(saved))
        page.reload()
        body = page.locator("#log .msg.assistant .body")
        body.wait_for()
        assert body.locator("strong").inner_text() == "bold" and "**" not in body.inner_text()
        assert body.locator("script, img, iframe, [onerror], [onclick]").count() == 0
        bubble = page.locator("#log .msg.user .bubble")
        assert bubble.inner_text() == question and bubble.locator("b, img").count() == 0  # shown as text
        page.wait_for_timeout(300)  # an error handler of a broken image would have run by now
        assert page.evaluate("window.pwned") is None
        # Chromium reports the page's CSP refusing the handlers as DOMPurify's inert parse sees them: expected
        assert [e for e in page.errors if "Content Security Policy" not in e] == []


def test_picker_lists_name_tokens_and_model_without_shards(lanterns, sharp_lm, browser):
    big = cag.build([SAMPLE_DOCS], name="big", lm=sharp_lm, shard=True, reserve=256, log=lambda _m: None)
    assert len(big.shards) >= 2
    with serving(create_app(ServerConfig(semantic_threshold=None), sharp_lm)) as url:
        rows = {r["id"]: r for r in httpx.get(url + "/v1/models").json()["data"]}
        page = open_page(browser, url)
        options = page.locator("#kb option")
        assert sorted(options.evaluate_all("os => os.map(o => o.value)")) == sorted(rows) == ["big", "lanterns"]
        for name, kb in (("big", big), ("lanterns", lanterns)):
            text = page.locator(f"#kb option[value={name}]").inner_text()
            assert text.startswith(name) and f"{kb.tokens:,} tokens" in text and ".shard" not in text
            row = rows[name]
            model = row.get("model_name") or (row.get("cag") or {}).get("model") or row.get("root")
            if model:  # where the server's rows name the model, the picker shows it
                assert model in text
        # every place a row may carry the model name is read
        for row in ({"id": "kb", "tokens": 1200, "model_name": "m1"}, {"id": "kb", "cag": {"model": "m1", "tokens": 1200}},
                    {"id": "kb", "tokens": 1200, "root": "m1"}):
            assert page.evaluate("(r) => window.cagChat.modelLabel(r).text", row) == "kb · 1,200 tokens · m1"
        page.select_option("#kb", "big")
        assert f"{big.tokens:,} tokens" in page.locator("#kb").get_attribute("title")
        assert page.locator("#kb-info").inner_text() == f"{rows['big']['documents']} documents"
        assert page.errors == []


@pytest.mark.parametrize("width", [1100, 390])
def test_layout_fits_with_a_conversation(lanterns, sharp_lm, browser, width):
    with serving(create_app(ServerConfig(semantic_threshold=None), sharp_lm)) as url:
        page = open_page(browser, url, width=width, height=844)
        ask(page, QUESTION)  # a long answer of random tokens: long "words" must wrap, not widen the page
        assert no_horizontal_overflow(page)
        assert inside_viewport(page, "#question") and inside_viewport(page, "#send")
        if width >= 760:  # the list and the new-conversation control sit in a sidebar
            assert page.locator("#conversations .conv").is_visible() and inside_viewport(page, "#conversations")
            assert inside_viewport(page, "#new") and not page.locator("#menu").is_visible()
            page.locator("#new").click()
        else:  # the list hides behind a menu button; new conversation stays in the top bar
            assert not page.locator("#conversations").is_visible()
            assert inside_viewport(page, "#new-top") and inside_viewport(page, "#menu") and inside_viewport(page, "#kb")
            page.locator("#menu").click()
            page.locator("#conversations .conv").wait_for()
            page.wait_for_timeout(300)  # the slide-in transition
            assert inside_viewport(page, "#conversations") and inside_viewport(page, "#new")
            assert no_horizontal_overflow(page)
            page.locator("#conversations .conv-open").click()  # picking a conversation closes the list
            page.locator("#conversations").wait_for(state="hidden")
            page.locator("#new-top").click()
        assert page.locator("#log .msg").count() == 0 and page.locator("#empty").is_visible()
        assert no_horizontal_overflow(page)
        assert page.errors == []


def grid(page) -> dict:
    """How the page is laid out: the cells of the app's grid (children that take part in its layout), the
    widths of the grid, the sidebar and the chat column, and how the drawer's overlay is displayed."""
    return page.evaluate("""() => {
        const app = document.getElementById('app'), main = document.querySelector('main.main');
        const cells = [...app.children].filter((n) => {
            const s = getComputedStyle(n);
            return s.display !== 'none' && s.position !== 'fixed' && s.position !== 'absolute';
        });
        return {cells: cells.map((n) => n.tagName.toLowerCase()), app: app.getBoundingClientRect().width,
                sidebar: document.getElementById('sidebar').getBoundingClientRect().width,
                chat: main.getBoundingClientRect().width, chatLeft: main.getBoundingClientRect().left,
                scrim: getComputedStyle(document.getElementById('scrim')).display};
    }""")


def chat_beside_the_list(page) -> None:
    """Wide: two grid cells, the conversation list and the chat column, which takes all the width the list
    leaves (not a 272 px column); the drawer's overlay is no cell of the grid."""
    got = grid(page)
    assert got["cells"] == ["aside", "main"] and got["scrim"] == "none", got
    assert got["chat"] == got["app"] - got["sidebar"] and got["chatLeft"] == got["sidebar"], got
    assert got["chat"] > 272 and no_horizontal_overflow(page), got


def test_a_keyed_server_asks_for_the_key_and_keeps_the_chat_full_width(lanterns, sharp_lm, browser):
    key = "sk-page-7f3a"
    with serving(create_app(with_flags(ServerConfig(semantic_threshold=None), api_key=key), sharp_lm)) as url:
        page = open_page(browser, url, ready=False)
        page.locator("#notice").filter(has_text="missing API key").wait_for()  # the first request got its 401
        chat_beside_the_list(page)
        assert page.locator("#key").is_visible()  # the settings opened beside the chat, where the field is
        assert page.evaluate("document.activeElement.id") == "key"
        page.locator("#key").fill(key)
        page.locator("#key").dispatch_event("change")
        page.wait_for_selector("#kb option[value=lanterns]", state="attached")
        assert page.locator("#notice").is_hidden()
        chat_beside_the_list(page)
        ask(page, QUESTION)
        assert page.locator("#log .msg.assistant .stats").first.get_attribute("data-cached") == str(lanterns.tokens)
        chat_beside_the_list(page)
        page.reload()  # the key is remembered: no 401, the page is ready at once
        page.wait_for_selector("#kb option[value=lanterns]", state="attached")
        chat_beside_the_list(page)
        assert page.locator("#log .msg.assistant").count() == 1
        # the one console error is Chromium reporting the first request's 401
        assert [e for e in page.errors if "status of 401" not in e] == [] and len(page.errors) == 1

        narrow = open_page(browser, url, width=390, height=844, ready=False)  # a new context: no key stored
        narrow.locator("#notice").filter(has_text="missing API key").wait_for()
        narrow.wait_for_timeout(300)  # the slide-in transition
        assert inside_viewport(narrow, "#key") and grid(narrow)["scrim"] == "block"  # narrow: the drawer opens
        narrow.locator("#key").fill(key)
        narrow.locator("#key").dispatch_event("change")
        narrow.wait_for_selector("#kb option[value=lanterns]", state="attached")
        narrow.locator("#scrim").wait_for(state="hidden")  # and closes once the key works
        assert grid(narrow)["cells"] == ["main"] and no_horizontal_overflow(narrow)
