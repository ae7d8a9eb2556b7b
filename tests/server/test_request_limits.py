"""The server survives any request: body limits on bytes actually received (chunked bodies too), uploads
streamed to disk, failed creates that leave nothing behind, hostile PDFs, and OpenAI-shaped errors with no
server paths in them. Real uvicorn on loopback; the memory checks run `cag serve` as its own process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

import cag
from cag.server import ServerConfig, create_app
from pdfutil import bomb
from serverutil import free_port, serving, wait_until_serving, write_docs

KEYS = {"key-a": "alpha", "key-b": "beta"}
A = {"Authorization": "Bearer key-a"}
CHUNK = 64 * 1024
SLACK = 512 * 1024  # the server hands the app what a socket read gave (asyncio reads up to 256 KB at once)


class Counting:
    """ASGI wrapper counting the request-body bytes the app pulled from the server."""

    def __init__(self, app):
        self.app, self.received = app, 0

    async def __call__(self, scope, receive, send):
        async def counted():
            message = await receive()
            if message["type"] == "http.request":
                self.received += len(message.get("body", b""))
            return message

        await self.app(scope, counted, send)


def _zeros(total: int):
    """A request body of `total` bytes sent chunked (a generator: httpx sends no Content-Length)."""
    for _ in range(total // CHUNK):
        yield b"0" * CHUNK


def _multipart(name: str, filename: str, total: int, boundary: str = "cagboundary"):
    """A multipart upload whose one file is `total` bytes, streamed chunked; returns (headers, body iterator)."""
    def body():
        yield (f"--{boundary}\r\nContent-Disposition: form-data; name=\"name\"\r\n\r\n{name}\r\n"
               f"--{boundary}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"{filename}\"\r\n"
               "Content-Type: text/plain\r\n\r\n").encode()
        sent = 0
        while sent < total:
            piece = b"lantern " * (CHUNK // 8)
            sent += len(piece)
            yield piece
        yield f"\r\n--{boundary}--\r\n".encode()

    return {"Content-Type": f"multipart/form-data; boundary={boundary}"}, body()


def _is_error(r: httpx.Response, status: int, code: str | None = None) -> dict:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


# -- body limits ----------------------------------------------------------------------------------------

def test_chunked_bodies_are_cut_off_at_the_limit(cag_home, sharp_lm):
    counting = Counting(create_app(ServerConfig(api_keys=KEYS, max_body_bytes=200_000, max_upload_bytes=500_000),
                                   sharp_lm))
    with serving(counting) as url:
        r = httpx.post(url + "/v1/chat/completions", headers={**A, "Content-Type": "application/json"},
                       content=_zeros(50_000_000), timeout=120)
        assert "content-length" not in r.request.headers
        _is_error(r, 413, "request_too_large")
        assert "200000" in r.json()["error"]["message"]
        assert counting.received <= 200_000 + SLACK  # stopped reading right after the limit

        counting.received = 0
        headers, body = _multipart("big", "big.txt", 50_000_000)
        r = httpx.post(url + "/v1/kbs/upload", headers={**A, **headers}, content=body, timeout=120)
        _is_error(r, 413, "request_too_large")
        assert counting.received <= 500_000 + SLACK
        assert not (cag_home / "kbs" / "alpha__big").exists()

        declared = httpx.post(url + "/v1/chat/completions", headers=A, content=b"x" * 300_000)
        _is_error(declared, 413, "request_too_large")  # a declared length is refused before reading
        assert httpx.get(url + "/healthz").json()["status"] == "ok"


@pytest.fixture(scope="module")
def served(tmp_path_factory, sharp_model_dir):
    """`cag serve` in its own process (default limits), so its memory can be read from /proc."""
    home = tmp_path_factory.mktemp("served-home")
    config = home / "server.json"
    config.write_text(json.dumps({"model": str(sharp_model_dir), "semantic_threshold": None}))
    port = free_port()
    env = {**os.environ, "CAG_HOME": str(home), "CAG_API_KEYS": "key-a=alpha"}
    proc = subprocess.Popen([sys.executable, "-m", "cag", "serve", "--port", str(port), "--config", str(config)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_until_serving(url, proc)
        yield url, proc.pid, home
    finally:
        proc.terminate()
        proc.wait(30)


def _peak_rss(pid: int) -> int:
    """The process's peak resident memory in bytes (VmHWM)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_a_200mb_chunked_upload_keeps_the_server_small(served):
    url, pid, home = served
    warm = httpx.post(url + "/v1/kbs/upload", headers=A, data={"name": "warm"},
                      files=[("files", ("x.exe", b"MZ", "application/octet-stream"))])
    _is_error(warm, 400, "unsupported_file")  # the multipart path has run once
    before = _peak_rss(pid)
    headers, body = _multipart("big", "big.txt", 200_000_000)
    r = httpx.post(url + "/v1/kbs/upload", headers={**A, **headers}, content=body, timeout=300)
    _is_error(r, 413, "request_too_large")
    grown = _peak_rss(pid) - before
    assert grown < 64_000_000, f"the server's peak memory grew by {grown} bytes"
    assert httpx.get(url + "/healthz").status_code == 200
    assert not (home / "kbs" / "alpha__big").exists()
    ok = httpx.post(url + "/v1/kbs", headers=A, timeout=120,
                    json={"name": "big", "documents": [{"name": "a.md", "text": "The Heron lantern is blue."}]})
    assert ok.status_code == 201, ok.text


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the server's memory from /proc")
def test_a_16mb_upload_is_refused_by_the_token_budget_and_the_server_lives(served):
    url, pid, home = served
    before = _peak_rss(pid)
    text = b"The Heron lantern costs 148 crowns and is blue. " * 330_000  # ~16 MB, under the 20 MB upload limit
    assert 15_000_000 < len(text) < 20_000_000
    r = httpx.post(url + "/v1/kbs/upload", headers=A, data={"name": "huge"},
                   files=[("files", ("huge.txt", text, "text/plain"))], timeout=600)
    error = _is_error(r, 400)
    assert "tokens" in error["message"] and "at most" in error["message"] and "fit" in error["message"]
    assert httpx.get(url + "/healthz").status_code == 200
    assert not (home / "kbs" / "alpha__huge").exists()
    # Refused by counting tokens only until the context is full, not by tokenizing 16 MB first (which took
    # the server's peak memory up by 2.5 GB on the tiny model's tokenizer).
    grown = _peak_rss(pid) - before
    assert grown < 512_000_000, f"the server's peak memory grew by {grown} bytes"


# -- failed creates leave nothing behind --------------------------------------------------------------

@pytest.fixture
def keyed(cag_home, sharp_lm):
    with serving(create_app(ServerConfig(api_keys=KEYS, max_upload_bytes=300_000, semantic_threshold=None),
                            sharp_lm)) as url:
        yield url


def _absent_like_never_created(url: str, name: str) -> None:
    for method in ("GET", "DELETE"):
        got = httpx.request(method, f"{url}/v1/kbs/{name}", headers=A)
        never = httpx.request(method, f"{url}/v1/kbs/never{name}", headers=A)
        assert got.status_code == never.status_code == 404, (method, got.text)
        assert got.json()["error"]["message"].replace(name, "X") == \
            never.json()["error"]["message"].replace(f"never{name}", "X")
    assert name not in [m["id"] for m in httpx.get(url + "/v1/models", headers=A).json()["data"]]


def test_failed_uploads_leave_no_folder_and_the_name_stays_free(keyed, cag_home, tmp_path):
    url = keyed
    declared = httpx.post(url + "/v1/kbs/upload", headers=A, data={"name": "big"},
                          files=[("files", ("big.txt", b"lantern " * 50_000, "text/plain"))])
    _is_error(declared, 413, "request_too_large")
    headers, body = _multipart("big", "big.txt", 5_000_000)
    _is_error(httpx.post(url + "/v1/kbs/upload", headers={**A, **headers}, content=body, timeout=60), 413)
    unparseable = httpx.post(url + "/v1/kbs/upload", headers=A, data={"name": "big"},
                             files=[("files", ("broken.pdf", b"%PDF-1.4\nnot a pdf", "application/pdf"))])
    _is_error(unparseable, 400)
    bombed = httpx.post(url + "/v1/kbs/upload", headers=A, data={"name": "big"},
                        files=[("files", ("bomb.pdf", bomb(tmp_path / "bomb.pdf").read_bytes(), "application/pdf"))])
    assert "bomb.pdf" in _is_error(bombed, 400)["message"]
    too_many_tokens = httpx.post(url + "/v1/kbs/upload", headers=A, data={"name": "big"}, timeout=120,
                                 files=[("files", ("long.txt", b"lantern blue crowns " * 2000, "text/plain"))])
    assert "at most" in _is_error(too_many_tokens, 400)["message"]
    assert not (cag_home / "kbs" / "alpha__big").exists()
    _absent_like_never_created(url, "big")
    r = httpx.post(url + "/v1/kbs/upload", headers=A, data={"name": "big"}, timeout=120,
                   files=[("files", ("small.txt", b"The Heron lantern is blue.", "text/plain"))])
    assert r.status_code == 201 and r.json()["documents"] == ["small.txt"], r.text


def test_a_create_cut_short_by_a_crash_is_as_if_never_made(keyed, cag_home):
    """What a server killed mid-build leaves: the owner sidecar and documents, but no cache."""
    url = keyed
    left = cag_home / "kbs" / "alpha__left"
    (left / "docs").mkdir(parents=True)
    (left / "docs" / "old.txt").write_text("A document of the create that never finished.")
    (left / "tenant.json").write_text(json.dumps({"tenant": "alpha", "name": "left"}))
    _absent_like_never_created(url, "left")
    r = httpx.post(url + "/v1/kbs", headers=A, timeout=120,
                   json={"name": "left", "documents": [{"name": "new.md", "text": "The Heron lantern is blue."}]})
    assert r.status_code == 201, r.text
    assert r.json()["documents"] == ["new.md"]  # nothing of the leftover came along
    assert httpx.get(url + "/v1/kbs/left", headers=A).json()["documents"] == ["new.md"]
    assert httpx.delete(url + "/v1/kbs/left", headers=A).status_code == 200


# -- no server paths in errors --------------------------------------------------------------------------

def test_error_messages_carry_no_server_paths(cag_home, sharp_lm, tmp_path):
    docs = write_docs(tmp_path / "handbook-docs")
    cag.build([docs], name="handbook", lm=sharp_lm, log=lambda _m: None)
    with serving(create_app(ServerConfig(semantic_threshold=None), sharp_lm)) as url:
        up = httpx.post(url + "/v1/kbs/upload", data={"name": "up"},
                        files=[("files", ("broken.pdf", b"%PDF-1.4\nnot a pdf", "application/pdf"))])
        message = _is_error(up, 400)["message"]
        assert "$CAG_HOME/kbs/public__up/docs/broken.pdf" in message and str(cag_home) not in message
        # a CLI knowledge base whose source folder now holds a file that cannot be read: a path outside CAG_HOME
        bomb(docs / "manual.pdf")
        r = httpx.post(url + "/v1/chat/completions", timeout=60,
                       json={"model": "handbook", "messages": [{"role": "user", "content": "Price?"}]})
        message = _is_error(r, 400)["message"]
        assert "manual.pdf" in message and str(tmp_path) not in message and "/handbook-docs" not in message
