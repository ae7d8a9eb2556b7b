"""The web chat page in real headless Chromium (Debian's), driven by Playwright, against a real server."""

from __future__ import annotations

import shutil

import pytest

import cag
from cag.server import ServerConfig, create_app
from serverutil import serving, write_docs

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]

pytestmark = pytest.mark.skipif(not shutil.which("chromium"), reason="chromium not installed (scripts/setup.sh)")


def test_page_streams_an_answer_with_ttft_and_cached_tokens(cag_home, sharp_lm, tmp_path):
    from playwright.sync_api import sync_playwright

    kb = cag.build([write_docs(tmp_path / "docs")], name="lanterns", lm=sharp_lm, log=lambda _m: None)
    question = "How much is the Heron?"
    want = kb.ask(question, max_new_tokens=256).answer
    assert want  # the sharp tiny model gives a non-empty, question-specific answer
    with serving(create_app(ServerConfig(semantic_threshold=None), sharp_lm)) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            page = browser.new_page()
            page.goto(url + "/")
            page.wait_for_selector("#kb option[value=lanterns]", state="attached")
            page.fill("#question", question)
            page.click("#send")
            stats = page.locator("#log .stats").first
            stats.filter(has_text="cached tokens").wait_for(timeout=60_000)
            assert page.locator("#log .a").first.inner_text().strip() == want
            assert stats.get_attribute("data-cached") == str(kb.tokens)
            assert "TTFT" in stats.inner_text()
        finally:
            browser.close()
