"""A real uvicorn server on a free loopback port, in a thread of the test process (shares the tiny model)."""

from __future__ import annotations

import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest
import uvicorn

from storeutil import free_port

LANTERN_DOCS = {
    "a.md": "# Lanterns\nThe Heron lantern costs 148 crowns and is blue.",
    "b.txt": "Quillfeather was founded in 1987 by Odalys Renn.",
}


@contextmanager
def serving(app):
    """Yield the base URL of `app` served on loopback; stop the server afterwards."""
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 20
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def write_docs(folder: Path, docs: dict[str, str] = LANTERN_DOCS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text)
    return folder



def wait_until_serving(url: str, proc: subprocess.Popen, seconds: float = 180) -> None:
    """Block until the `cag serve` process at `url` answers /healthz; fail if it exits or takes too long."""
    deadline = time.time() + seconds
    while True:
        try:
            if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.time() > deadline:
            why = proc.stderr.read() if proc.poll() is not None and proc.stderr else "timeout"
            pytest.fail(f"cag serve did not start: {why}")
        time.sleep(0.2)
