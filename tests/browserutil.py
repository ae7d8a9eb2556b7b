"""The chat page in real headless Chromium (Debian's), driven by Playwright: one browser per test module,
asking as a user does (Enter, no click), and a metric read from /metrics."""

from __future__ import annotations

import re
import shutil

import httpx
import pytest


CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"


FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        try:
            yield chromium
        finally:
            chromium.close()


def ask(page, question: str) -> None:
    """Type the question and press Enter (no click); wait until the answer's stats line is written."""
    done = page.locator("#log .msg.assistant .stats").count() + 1
    page.locator("#question").fill(question)
    page.locator("#question").press("Enter")
    page.wait_for_function("(n) => document.querySelectorAll('#log .msg.assistant .stats:not(:empty)').length >= n",
                           arg=done, timeout=120_000)


def metric(url: str, name: str, labels: str) -> float:
    text = httpx.get(url + "/metrics").text
    found = re.search(rf"^{re.escape(name)}\{{{re.escape(labels)}\}} (\S+)$", text, re.M)
    return float(found.group(1)) if found else 0.0
