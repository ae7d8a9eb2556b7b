"""Shared by the store tests: two small knowledge files, and a real redis-server on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest


def make_docs(folder):
    """Two short documents (a.md, b.txt); tests append or edit to exercise rebuilds."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.md").write_text("# Lanterns\nThe Heron lantern costs 148 crowns and is blue.")
    (folder / "b.txt").write_text("Quillfeather was founded in 1987 by Odalys Renn.")
    return folder


def settings(**more) -> dict:
    """The settings (kb.json) every build records, for entries made without a build; `more` added."""
    return {"model": "tiny", "sources": [], "instruction": "Answer from the documents.", "reserve": 0,
            "built_at": time.time(), **more}


def tiny_entry(name: str, tokens: int, owner: str | None = None, built_at: float | None = None):
    """A store Entry of zeros, 128 bytes per token, made for knowledge `name` (no model needed)."""
    import torch

    from cag.cache.stores import Entry

    layers = [(torch.zeros(1, 2, tokens, 8), torch.zeros(1, 2, tokens, 8))]
    meta = settings() if built_at is None else settings(built_at=built_at)
    snapshot = [{"name": f"{name}.txt", "text": f"The knowledge of {name}."}]
    return Entry(name, layers, list(range(tokens)), {"knowledge": {"sha256": name}}, meta, snapshot, owner=owner)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A real redis-server on one loopback port that a test can kill and start again (no persistence:
    a restart comes back empty, as a cache-only Redis does)."""

    def __init__(self, folder: Path):
        self.exe = shutil.which("redis-server")
        if self.exe is None:
            pytest.fail("redis-server is not installed; run scripts/setup.sh (it installs Debian's redis-server)")
        self.folder, self.port, self.proc = folder, free_port(), None
        self.url = f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        import redis

        self.proc = subprocess.Popen([self.exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                      "--appendonly", "no", "--dir", str(self.folder)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        client = redis.Redis(port=self.port)
        deadline = time.monotonic() + 60  # milliseconds when idle; a busy machine may take seconds
        while time.monotonic() < deadline and self.proc.poll() is None:
            try:
                client.ping()
                return
            except redis.ConnectionError:
                time.sleep(0.05)
        self.stop()
        pytest.fail("redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # as a crash: no goodbye to the clients
            self.proc.wait(timeout=10)
            self.proc = None


@pytest.fixture
def redis_server(tmp_path):
    server = RedisServer(tmp_path)
    server.start()
    yield server
    server.stop()


@pytest.fixture
def redis_url(redis_server):
    """The URL of a fresh redis-server (import `redis_server` too, for pytest to find it)."""
    return redis_server.url
