"""HTTP-facing errors: a status code plus an OpenAI-shaped body, so clients show our message verbatim.

Every body the server sends for an error goes through `error_body`, which also keeps the server's file
system out of it: messages from cag often name files under CAG_HOME or the uploaded documents' folder.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from .. import paths
from ..errors import CagError

# An absolute POSIX path inside a sentence: starts with "/" not glued to a word, runs to whitespace/quote/punctuation.
_ABSOLUTE = re.compile(r"(?<![\w.~$/-])/[^\s'\"`<>|:,;()\[\]{}]+")


class ApiError(CagError):
    """A request the server refuses; `status` and `kind` become the HTTP status and error.type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code, self.param = status, kind, code, param

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.code, self.param)


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    """OpenAI's error shape: {"error": {"message", "type", "param", "code"}}."""
    return {"error": {"message": public_message(message), "type": kind, "param": param, "code": code}}


def public_message(message: str) -> str:
    """The message without the server's absolute paths: CAG_HOME becomes "$CAG_HOME", any other path on this
    machine its last component. Route paths such as /v1/models are not on the file system and stay."""
    home = paths.home()
    for root in sorted({str(home), str(home.resolve())}, key=len, reverse=True):
        if len(root) > 1:
            message = message.replace(root, "$CAG_HOME")
    return _ABSOLUTE.sub(_last_component, message)


def _last_component(match: re.Match) -> str:
    text = match.group(0)
    path, dots = text.rstrip("."), text[len(text.rstrip(".")):]  # a sentence's full stop is not part of the path
    top = path.split("/")[1]
    if not top or not os.path.isdir("/" + top):
        return text
    return (Path(path).name or path) + dots


def not_found(name: str) -> ApiError:
    # The same words whether the knowledge base does not exist or belongs to another tenant.
    return ApiError(404, f"no knowledge base named {name!r}; list yours with GET /v1/models", "not_found_error",
                    "model_not_found")
