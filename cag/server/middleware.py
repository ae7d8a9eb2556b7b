"""The two outermost guards of every request, as plain ASGI middleware.

BodyLimit counts the request body as it arrives, so a chunked body (no Content-Length) is held to the same
limit as a declared one, and nothing past the limit is read. (FastAPI's own max_body_size counts too, but
answers a declared-too-large body in plain text; clients expect OpenAI's error shape.)

CatchAll turns any exception nothing else handled into a 500 with a generic OpenAI-shaped body, and logs
it once with its traceback: the body never carries a traceback or a server path.
"""

from __future__ import annotations

import json
import logging
from typing import Callable

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from .errors import error_body

log = logging.getLogger("cag.server")


class BodyTooLarge(HTTPException):
    """Raised from `receive` once the body passes its limit; the app's HTTPException handler answers 413."""

    def __init__(self, limit: int):
        super().__init__(413, f"the request body is over {limit} bytes; at most {limit} are accepted")


class BodyLimit:
    def __init__(self, app: ASGIApp, limit_for: Callable[[str], int]):
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        declared = _content_length(scope)
        if declared is not None and declared > limit:  # refused before reading a byte
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


class CatchAll:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def tracked(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, tracked)
        except Exception:  # noqa: BLE001 - the last line of defence: log it, answer 500, keep serving
            log.exception("unexpected error answering %s %s", scope.get("method"), scope.get("path"))
            if not started:
                await _send_json(send, 500, server_error())


def server_error() -> dict:
    return error_body("the server failed to answer this request (the error is in its log); try again or report it",
                      "server_error", "internal_error")


def _content_length(scope: Scope) -> int | None:
    for key, value in scope.get("headers", ()):
        if key == b"content-length":
            return int(value) if value.isdigit() else None
    return None


async def _send_json(send: Send, status: int, body: dict) -> None:
    data = json.dumps(body).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]})
    await send({"type": "http.response.body", "body": data})
