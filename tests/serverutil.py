"""A real uvicorn server on a free loopback port, in a thread of the test process (shares the tiny model)."""

from __future__ import annotations

import json
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import httpx
import openai
import pytest
import uvicorn
from prometheus_client.parser import text_string_to_metric_families

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
    deadline = time.time() + 60
    while not server.started:
        if time.time() > deadline or not thread.is_alive():
            raise RuntimeError("uvicorn did not start")
        time.sleep(0.02)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)


def visible_pieces(kb, question: str, tokens: int) -> int:
    """How many pieces of visible (not blank) text kb.ask streams for `question` within `tokens` tokens: the
    pieces a streaming client gets as content chunks."""
    pieces: list[str] = []
    kb.ask(question, max_new_tokens=tokens, on_text=pieces.append)
    return sum(bool(p.strip()) for p in pieces)


def hold_until_the_client_leaves(monkeypatch, max_tokens: int, after: int, seconds: float = 120) -> dict:
    """Answers asked with `max_tokens` pause in the decoder once they have `after` tokens, and go on only
    when their client has gone (the server set the request's cancel event): such an answer is provably still
    being generated when its client leaves, however fast or slow the machine. One such request at a time.

    While one is paused nothing is sent, so the server must notice the client leaving from the connection
    itself (uvicorn reports http.disconnect: ASGI spec 2.3). Returns what happened, for the test to check:
    "rows" (rows in each decoding step), "produced" (the most tokens a held answer reached), "held" (steps
    that waited) and "late" (holds that ran out of `seconds` without the client leaving).
    """
    from cag.engines.torch import batch
    from cag.server.chat import ChatService

    seen = {"cancels": [], "rows": [], "produced": 0, "held": 0, "late": 0}
    answer, step = ChatService.answer, batch.Decoder.step

    def answering(self, plan, on_text=None, cancel=None):
        if plan.max_tokens == max_tokens and cancel is not None:
            seen["cancels"].append(cancel)
        return answer(self, plan, on_text, cancel)

    def stepping(self, jobs):
        held = [j for j in jobs if j.max_new_tokens == max_tokens]
        if any(j.produced >= after for j in held) and not seen["cancels"][-1].is_set():
            seen["held"] += 1
            seen["late"] += not seen["cancels"][-1].wait(seconds)
        seen["rows"].append(len(jobs))
        tokens = step(self, jobs)
        seen["produced"] = max([seen["produced"]] + [j.produced for j in held])
        return tokens

    monkeypatch.setattr(ChatService, "answer", answering)
    monkeypatch.setattr(batch.Decoder, "step", stepping)
    return seen


def write_docs(folder: Path, docs: dict[str, str] = LANTERN_DOCS) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text)
    return folder



class Replica:
    """`python -m cag serve` in its own process with its own CAG_HOME: one replica of a deployment.

    `stop()` and `start()` again keep the home (a restart); stderr goes to a file named after the home,
    so a failing test can show what the server said.
    """

    def __init__(self, home: Path, config: Path, env: dict[str, str]):
        self.home, self.config, self.env = home, config, env
        self.proc, self.url = None, None
        self.log = home.with_name(home.name + ".log")

    def start(self, timeout: float = 120) -> "Replica":
        import os
        import subprocess
        import sys

        import httpx

        port = free_port()
        env = {**os.environ, "CAG_HOME": str(self.home), **self.env}
        with open(self.log, "a") as err:
            self.proc = subprocess.Popen([sys.executable, "-m", "cag", "serve", "--port", str(port), "--config",
                                          str(self.config)], env=env, stdout=subprocess.DEVNULL, stderr=err)
        self.url = f"http://127.0.0.1:{port}"
        deadline = time.time() + timeout
        while True:
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if self.proc.poll() is not None or time.time() > deadline:
                self.stop()
                raise RuntimeError(f"cag serve did not start: {self.log.read_text()[-3000:]}")
            time.sleep(0.2)

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=10)
            self.proc = None

    def restart(self) -> "Replica":
        self.stop()
        return self.start()


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


def openai_error(r: httpx.Response, status: int, code: str | None = None, param: str | None = None) -> dict:
    """The error of an OpenAI-shaped error response, after checking its status, shape, code and param."""
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"], error
    assert (code is None or error["code"] == code) and error["param"] == param, error
    return error


def sse_events(r: httpx.Response) -> list:
    """The events of a server-sent-events body: JSON objects, and "[DONE]" for the end marker."""
    return [json.loads(line[6:]) if line != "data: [DONE]" else "[DONE]" for line in r.text.splitlines() if line]


# -- fixtures: the lantern knowledge base on the sharp tiny model, served with the response cache off ----------
@pytest.fixture
def kb(cag_home, sharp_lm, tmp_path):
    import cag

    return cag.build([write_docs(tmp_path / "docs")], name="lanterns", lm=sharp_lm, log=lambda _m: None)


@pytest.fixture
def url(kb, sharp_lm):
    from cag.server import ServerConfig, create_app

    with serving(create_app(ServerConfig(response_cache=False), sharp_lm)) as base:
        yield base


@pytest.fixture
def client(url):
    return openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0)


def chat_answer(url: str, body: dict, cancel_after: int | None = None, timeout: float = 600) -> tuple:
    """(text, finish_reason, completion tokens) of a chat request, streamed (`body["stream"]`) or not; with
    `cancel_after`, the stream is left after that many content chunks: ("cancelled", text so far)."""
    if not body.get("stream"):
        r = httpx.post(url + "/v1/chat/completions", json=body, timeout=timeout)
        assert r.status_code == 200, r.text
        got = r.json()
        return (got["choices"][0]["message"]["content"], got["choices"][0]["finish_reason"],
                got["usage"]["completion_tokens"])
    text, finish, usage, chunks = "", None, None, 0
    body = {**body, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=timeout) as r:
        assert r.status_code == 200
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            assert "error" not in event, event
            if event.get("usage"):
                usage = event["usage"]["completion_tokens"]
            elif event["choices"]:
                text += event["choices"][0]["delta"].get("content") or ""
                finish = event["choices"][0]["finish_reason"] or finish
                chunks += bool(event["choices"][0]["delta"].get("content"))
            if cancel_after and chunks >= cancel_after:
                return "cancelled", text  # leaving the block closes the connection mid-stream
    return text.strip(), finish, usage


def metrics_of(text: str) -> dict:
    """{(sample name, first label value or ''): value} from Prometheus text."""
    out = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, next(iter(sample.labels.values()), ""))] = sample.value
    return out
