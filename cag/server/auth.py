"""API keys -> tenants. A request's tenant decides which knowledge bases it can see.

A key comes as `Authorization: Bearer KEY` (OpenAI's clients) or as `x-api-key: KEY` (Anthropic's clients
and many proxies). A request that sends both must send the same key in each: two different credentials
are refused rather than one of them picked, so a request can never be read as a tenant it did not mean.
"""

from __future__ import annotations

import hmac

from .config import OPEN_TENANT, ServerConfig
from .http_errors import ApiError

HOW = "send 'Authorization: Bearer YOUR_KEY' or 'x-api-key: YOUR_KEY'"


def tenant_for(config: ServerConfig, authorization: str | None, x_api_key: str | None = None) -> str:
    """The caller's tenant from its key; everyone is OPEN_TENANT when no keys exist."""
    if config.open:
        return OPEN_TENANT
    key = _offered_key(authorization, x_api_key)
    for known, tenant in config.api_keys.items():
        if hmac.compare_digest(known.encode(), key.encode()):  # constant time: no key guessing by timing
            return tenant
    raise ApiError(401, "invalid API key", "authentication_error", "invalid_api_key")


def _offered_key(authorization: str | None, x_api_key: str | None) -> str:
    """The one key the request offers, from either header (the same in both when both are sent). An empty
    header offers nothing; an Authorization header of another scheme (Basic…) is no key of ours."""
    scheme, _, value = (authorization or "").strip().partition(" ")
    bearer = value.strip() if scheme.lower() == "bearer" else None
    other = (x_api_key or "").strip() or None
    if scheme and bearer is None and other is not None:
        raise ApiError(401, f"the Authorization header is not 'Bearer YOUR_KEY' beside an x-api-key; {HOW}",
                       "authentication_error", "conflicting_api_keys")
    if not bearer and not other:
        raise ApiError(401, f"missing API key: {HOW}", "authentication_error", "missing_api_key")
    if bearer and other and not hmac.compare_digest(bearer.encode(), other.encode()):
        raise ApiError(401, "the Authorization and x-api-key headers carry different keys; send one key, or the "
                            "same key in both", "authentication_error", "conflicting_api_keys")
    return bearer or other
