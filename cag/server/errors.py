"""HTTP-facing errors: a status code plus an OpenAI-shaped body, so clients show our message verbatim."""

from __future__ import annotations

from ..errors import CagError


class ApiError(CagError):
    """A request the server refuses; `status` and `kind` become the HTTP status and error.type."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None):
        super().__init__(message)
        self.status, self.kind, self.code = status, kind, code

    def body(self) -> dict:
        return error_body(str(self), self.kind, self.code)


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def not_found(name: str) -> ApiError:
    # The same words whether the knowledge base does not exist or belongs to another tenant.
    return ApiError(404, f"no knowledge base named {name!r}; list yours with GET /v1/models", "not_found_error",
                    "model_not_found")
