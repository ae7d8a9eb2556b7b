"""Screenshots of the web chat page for the README: the real page, served by `cag serve`, answering with the
real default model from the sample knowledge base, in headless Chromium at 1100 and 390 px wide.

    .venv/bin/python scripts/screenshots.py [--out docs]

Writes docs/chat-1100.png, docs/chat-390.png and docs/chat-390-list.png (the conversation list open).
The knowledge base is built in a temporary CAG_HOME that borrows the converted model from the usual one
(so the model is converted at most once); answers come from the model as it is, and the timings in them
are this machine's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "examples" / "sample_kb" / "docs"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
         "--disable-background-networking", "--disable-component-update", "--disable-sync"]
# (question, max_tokens): the earlier conversations fill the list, the last one is on screen
EARLIER = [("How long is parental leave?", 24), ("Who must approve expense claims above 900 crowns?", 24)]
SHOWN = [("What are the company's history milestones? Answer as a list.", 110),
         ("Who is the chief executive now?", 60)]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(home: Path, port: int) -> subprocess.Popen:
    env = {**os.environ, "CAG_HOME": str(home), "CAG_API_KEYS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "cag", "serve", "--host", "127.0.0.1", "--port", str(port)],
                            env=env, cwd=ROOT)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        try:
            if httpx.get(f"http://127.0.0.1:{port}/healthz").status_code == 200:
                return proc
        except httpx.TransportError:
            time.sleep(0.3)
    proc.kill()
    raise SystemExit("cag serve did not start")


def ask(page, question: str, max_tokens: int) -> None:
    page.locator("#settings summary").click()
    page.locator("#max-tokens").fill(str(max_tokens))
    page.locator("#max-tokens").dispatch_event("change")
    page.locator("#settings summary").click()
    done = page.locator("#log .msg.assistant .stats:not(:empty)").count() + 1
    page.locator("#question").fill(question)
    page.locator("#question").press("Enter")
    page.wait_for_function("(n) => document.querySelectorAll('#log .msg.assistant .stats:not(:empty)').length >= n",
                           arg=done, timeout=600_000)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs", help="folder for the PNG files")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    import cag
    from cag.engines.torch import models
    from cag import paths

    converted = paths.models_dir()
    with tempfile.TemporaryDirectory(prefix="cag-screens-") as tmp:
        home = Path(tmp)
        converted.mkdir(parents=True, exist_ok=True)
        (home / "models").symlink_to(converted)
        os.environ["CAG_HOME"] = str(home)
        lm = models.load(None, device="cpu", dtype="float32")
        cag.build([DOCS], name="quillfeather", lm=lm, log=print)
        del lm
        port = free_port()
        server = serve(home, port)
        try:
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
                page = browser.new_page(viewport={"width": 1100, "height": 720}, device_scale_factor=2)
                page.goto(f"http://127.0.0.1:{port}/")
                page.wait_for_selector("#kb option[value=quillfeather]", state="attached")
                for question, max_tokens in EARLIER:
                    ask(page, question, max_tokens)
                    page.locator("#new").click()
                for question, max_tokens in SHOWN:
                    ask(page, question, max_tokens)
                page.mouse.move(0, 0)
                args.out.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=args.out / "chat-1100.png")
                page.set_viewport_size({"width": 390, "height": 844})
                page.wait_for_timeout(300)
                page.screenshot(path=args.out / "chat-390.png")
                page.locator("#menu").click()  # the conversation list, slid in over the thread
                page.wait_for_timeout(400)
                page.screenshot(path=args.out / "chat-390-list.png")
                browser.close()
        finally:
            server.terminate()
            server.wait(30)
    print(f"wrote chat-1100.png, chat-390.png and chat-390-list.png in {args.out}")


if __name__ == "__main__":
    main()
