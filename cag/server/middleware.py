"""The outermost layers of every request, as plain ASGI middleware.

AccessLog (outermost) gives each request an id, returns it as the X-Request-Id header, and writes one JSON
line per request to the "cag.access" logger once the response has ended (for a stream: when the stream
ends). Routes add what they learn (tenant, knowledge base, tokens) with `note`; nothing else goes in, so an
API key, a question or an answer never reaches the log.

BodyLimit counts the request body as it arrives, so a chunked body (no Content-Length) is held to the same
limit as a declared one, and nothing past the limit is read. (FastAPI's own max_body_size counts too, but
answers a declared-too-large body in plain text; clients expect OpenAI's error shape.)

CatchAll turns any exception nothing else handled into a 500 with a generic OpenAI-shaped body, and logs
it once with its traceback: the body never carries a traceback or a server path.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
import uuid
from contextvars import ContextVar
from datetime import datetime, timezone
from typing import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .http_errors import error_body

log = logging.getLogger("cag.server")
access = logging.getLogger("cag.access")

REQUEST_ID_HEADER = "X-Request-Id"
_SANE_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:-]{0,127}")  # a client's id is kept only if it looks like an id
_RECORD: ContextVar[dict | None] = ContextVar("cag_access_record", default=None)


def configure_logging(level: str = "info") -> None:
    """The server process's logs: diagnostics as "LEVEL: message" lines on stderr, access lines as pure JSON
    lines on stdout (`cag serve > access.jsonl`). Access lines are INFO records: a level above info hides them."""
    logging.basicConfig(level=level.upper(), format="%(levelname)s: %(message)s")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(_Writable(getattr(sys.stdout, "encoding", None) or "utf-8"))
    access.addHandler(handler)
    access.propagate = False


def _json_line(fields: dict, encoding: str = "utf-8") -> str:
    """One JSON line that `encoding` can write: text as it is where it can, else JSON's \\u escapes (a lone
    surrogate from a request's JSON, or any non-ASCII text for a stream that is not UTF-8). Either way it
    reads back as the same values, and the request keeps its one access line."""
    text = json.dumps(fields, ensure_ascii=False)
    try:
        text.encode(encoding)
    except UnicodeEncodeError:
        return json.dumps(fields)
    return text


class _Writable(logging.Formatter):
    """Access lines re-escaped for the stream's own encoding (stdout may be ASCII or Latin-1 under some locales)."""

    def __init__(self, encoding: str):
        super().__init__("%(message)s")
        self.encoding = encoding

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        try:
            text.encode(self.encoding)
            return text
        except UnicodeEncodeError:
            pass
        try:
            return _json_line(json.loads(text), self.encoding)
        except ValueError:  # not an access line: still written, with Python's escapes
            return text.encode(self.encoding, "backslashreplace").decode(self.encoding)


def note(**fields) -> None:
    """Add what a route learned (tenant, model, tokens, an error code) to this request's access-log line."""
    record = _RECORD.get()
    if record is not None:
        record.update({k: v for k, v in fields.items() if v is not None})


class _HttpOnly:
    """Plain ASGI middleware that acts on HTTP requests; lifespan (and any other) messages pass through."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        await self.http(scope, receive, send)

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        raise NotImplementedError


class AccessLog(_HttpOnly):
    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        given = (_header(scope, b"x-request-id") or b"").decode("latin-1")
        rid = given if _SANE_ID.fullmatch(given) else uuid.uuid4().hex
        when, start = datetime.now(timezone.utc), time.perf_counter()
        status, ended, learned = None, False, {}
        token = _RECORD.set(learned)

        async def tagged(message: Message) -> None:
            nonlocal status, ended
            if message["type"] == "http.response.start":
                status = message["status"]
                message = {**message, "headers": [*message.get("headers", ()),
                                                  (REQUEST_ID_HEADER.lower().encode(), rid.encode())]}
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        try:
            await self.app(scope, receive, tagged)
        finally:
            _RECORD.reset(token)
            line = {"time": when.isoformat(timespec="milliseconds").replace("+00:00", "Z"), "request_id": rid,
                    "method": scope.get("method"), "path": scope.get("path"), "status": status,
                    "duration_ms": round((time.perf_counter() - start) * 1000, 1),
                    "client": (scope.get("client") or (None,))[0], **learned}
            if not ended:
                line["aborted"] = True  # the client went away (or the server stopped) before the response ended
            access.info(_json_line(line))


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes its limit; the app's HTTPException handler answers 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over {limit} bytes; at most {limit} are accepted")


class BodyLimit(_HttpOnly):
    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]):
        super().__init__(app)
        self.limit_for = limit_for

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:  # refused before reading a byte
            note(error="request_too_large")
            await _send_json(send, 413, error_body(f"the request body is {declared} bytes; at most {limit} are "
                                                   "accepted", "invalid_request_error", "request_too_large"))
            return
        received = 0

        async def counted() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        await self.app(scope, counted, send)


class CatchAll(_HttpOnly):
    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:  # noqa: BLE001 - the last line of defence: log it, answer 500, keep serving
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            note(error="internal_error")
            if not started:
                await _send_json(send, 500, server_error())


def server_error() -> dict:
    return error_body("the server failed to answer this request (the error is in its log); try again or report it",
                      "server_error", "internal_error")


def _content_length(scope: Scope) -> int | None:
    value = _header(scope, b"content-length")
    return int(value) if value is not None and value.isdigit() else None


def _header(scope: Scope, name: bytes) -> bytes | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value
    return None


async def _send_json(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
