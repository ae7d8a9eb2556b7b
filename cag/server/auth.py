"""API keys -> tenants. A request's tenant decides which knowledge bases it can see."""

from __future__ import annotations

import hmac

from .config import OPEN_TENANT, ServerConfig
from .errors import ApiError


def tenant_for(config: ServerConfig, authorization: str | None) -> str:
    """The caller's tenant from `Authorization: Bearer KEY`; everyone is OPEN_TENANT when no keys exist."""
    if config.open:
        return OPEN_TENANT
    scheme, _, key = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not key.strip():
        raise ApiError(401, "missing API key: send 'Authorization: Bearer YOUR_KEY'", "authentication_error",
                       "missing_api_key")
    key = key.strip()
    for known, tenant in config.api_keys.items():
        if hmac.compare_digest(known.encode(), key.encode()):  # constant time: no key guessing by timing
            return tenant
    raise ApiError(401, "invalid API key", "authentication_error", "invalid_api_key")
