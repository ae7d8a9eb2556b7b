"""Shared by the store tests: two small knowledge files, and a real redis-server on a free loopback port."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time

import pytest


def make_docs(folder):
    """Two short documents (a.md, b.txt); tests append or edit to exercise rebuilds."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "a.md").write_text("# Lanterns\nThe Heron lantern costs 148 crowns and is blue.")
    (folder / "b.txt").write_text("Quillfeather was founded in 1987 by Odalys Renn.")
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def redis_url(tmp_path):
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.fail("redis-server is not installed; run scripts/setup.sh (it installs Debian's redis-server)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(tmp_path)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    client = redis.Redis(port=port)
    for _ in range(100):
        try:
            client.ping()
            break
        except redis.ConnectionError:
            time.sleep(0.05)
    else:
        proc.kill()
        pytest.fail("redis-server did not start")
    yield f"redis://127.0.0.1:{port}/0"
    proc.terminate()
    proc.wait(timeout=10)
