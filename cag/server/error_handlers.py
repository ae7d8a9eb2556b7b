"""How every error leaves the server: in OpenAI's shape {"error": {"message", "type", "param", "code"}},
with the status a client can act on, file system paths removed (cag.server.http_errors.error_body), and the
error's code noted in the access log.
"""

from __future__ import annotations

import errno
import json
import re

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

from ..errors import CacheFileError, CagError, json_kind
from .http_errors import ApiError, error_body
from .middleware import note

# pydantic names the member of a union it tried in an error's location ("stop.str"); a param has no such part
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|(list|dict|union|literal|function-\w+)\[.*\])$")
_FULL_DISK = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


def install(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(CagError, cag_error)
    app.add_exception_handler(CacheFileError, cache_error)
    app.add_exception_handler(OSError, os_error)
    app.add_exception_handler(RequestValidationError, invalid)
    app.add_exception_handler(HTTPException, http_error)


def refuse(body: dict, status: int, headers: dict | None = None) -> JSONResponse:
    note(error=body["error"]["code"] or body["error"]["type"])
    return JSONResponse(body, status_code=status, headers=headers)


async def api_error(_request: Request, err: ApiError):
    return refuse(err.body(), err.status)


async def cag_error(_request: Request, err: CagError):
    return refuse(error_body(str(err), "invalid_request_error"), 400)


async def cache_error(_request: Request, err: CacheFileError):
    """A knowledge base whose cache cannot be used (damaged, forged, made for something else) until rebuilt."""
    return refuse(error_body(str(err), "invalid_request_error", "cache_unusable"), 409)


async def os_error(_request: Request, err: OSError):
    """A full disk while a knowledge base is written: the server's to fix, and nothing stored changed
    (builds commit in one step). Other OS errors are faults of the server: the catch-all's 500."""
    if err.errno not in _FULL_DISK:
        raise err
    return refuse(error_body("the server's disk is full: the knowledge base was not written (what was stored "
                             "before is unchanged); try again once there is room", "server_error",
                             "insufficient_storage"), 507)


async def invalid(_request: Request, err: RequestValidationError):
    first = err.errors()[0] if err.errors() else {}
    if first.get("type") == "json_invalid":
        why = (first.get("ctx") or {}).get("error", "malformed")
        return refuse(error_body(f"the request body is not valid JSON: {why}", "invalid_request_error",
                                 "invalid_json"), 400)
    where = ".".join(str(p) for p in first.get("loc", ()) if p != "body" and not _TYPE_TAG.match(str(p)))
    msg = str(first.get("msg", "malformed")).removeprefix("Value error, ") + _given(first)
    return refuse(error_body(f"invalid request: {where}: {msg}", "invalid_request_error", "invalid_request",
                             where or None), 400)


async def http_error(request: Request, err: HTTPException):
    if err.status_code == 404:
        body = error_body(f"Invalid URL ({request.method} {request.url.path})", "invalid_request_error",
                          "unknown_url")
    elif err.status_code == 405:
        body = error_body(f"method {request.method} is not allowed for {request.url.path}",
                          "invalid_request_error", "method_not_allowed")
    elif err.status_code == 413:
        body = error_body(str(err.detail), "invalid_request_error", "request_too_large")
    elif err.status_code == 400 and isinstance(err.__cause__, (RecursionError, UnicodeDecodeError)):
        body = error_body(_unparsable(err.__cause__), "invalid_request_error", "invalid_json")
    else:
        body = error_body(str(err.detail), "invalid_request_error" if err.status_code < 500 else "server_error")
    return refuse(body, err.status_code, err.headers)


def _given(error: dict) -> str:
    """What a field of the wrong type was sent as. Pydantic says only what it should be, and "Input should be
    a valid integer" alone puzzles a client that sent "8"."""
    if not str(error.get("type", "")).endswith("_type") or "input" not in error:
        return ""
    value = error["input"]
    if isinstance(value, (list, dict)):  # its kind says enough; its text may be long or deep
        return f" (got {json_kind(value)})"
    text = json.dumps(value, default=str)  # ASCII: a lone surrogate stays an escape
    return f" (got {text if len(text) <= 40 else text[:37] + '...'}, {json_kind(value)})"


def _unparsable(cause: BaseException) -> str:
    """Why FastAPI could not parse a JSON body that is not malformed in a way json reports (its own 400 says
    only "There was an error parsing the body")."""
    if isinstance(cause, RecursionError):
        return "the request body nests arrays or objects too deeply to be read as JSON; send a flatter body"
    return f"the request body is not valid JSON: it is not UTF-8 text ({cause.reason} at byte {cause.start})"
