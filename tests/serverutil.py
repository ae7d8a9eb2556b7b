"""A real uvicorn server on a free loopback port, in a thread of the test process (shares the tiny model)."""

from __future__ import annotations

import threading
import time
from contextlib import contextmanager
from pathlib import Path

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

