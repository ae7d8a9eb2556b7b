"""Every environment variable cag reads, parsed and checked in one place into one typed object.

    CAG_HOME            where models, knowledge bases and extractions live (default ~/.cache/cag)
    CAG_MEMORY_BYTES    budget of the in-process, on-device cache tier (default 2G; 0 turns it off)
    CAG_HOST_BYTES      budget of the CPU-RAM tier, pinned under CUDA (default 0: off)
    CAG_REDIS_URL       redis://host:port/db: share caches between processes and machines
    CAG_REDIS_TTL       seconds a cache lives in Redis unless a knowledge base sets its own TTL
    CAG_SIGNING_KEY     sign cache manifests with HMAC-SHA256 and refuse unsigned or badly signed ones
    CAG_API_KEYS        key1=tenantA,key2=tenantB: API keys of `cag serve`, on top of its config file
    CAG_PACKED_WEIGHTS  0: plain float32 matmuls instead of packed Q4_1/Q8_0 blocks on the CPU
    CAG_FAST_DECODE     0: every decoding step through transformers' forward
    CAG_NATIVE          0: no C kernels (and so no packed weights)
    CAG_NATIVE_STEP     0: no whole-model C decoding step
    CAG_THREADS         CPU threads for decoding and prefill, both engines (default: the engine's own choice)
    CAG_MODEL_BYTES     budget of models `cag serve` keeps loaded at once (default 8G; least recently used first out)
    CAG_DRAFT           0: no drafts from the knowledge (each step one token per answer); N: draft tokens at most
    CAG_SIMD            the CPU kernel set: auto (default: the best this CPU runs), avx512, avx2, neon, portable
    CC                  the C compiler for the kernels (default: cc, gcc or clang on PATH)
    CAG_DEBUG           1: the CLI shows tracebacks of internal errors

Modules ask `current()`, never `os.environ`: the environment is parsed once per distinct set of values
(tests, and the CLI's --redis flag, change it between calls), and a bad value is one error naming the variable.
"""

from __future__ import annotations

import os
import re
import shutil
import threading
from dataclasses import dataclass
from pathlib import Path

from .errors import CagError

DEFAULT_MEMORY_BYTES = 2 << 30
DEFAULT_MODEL_BYTES = 8 << 30
DEFAULT_DRAFT = 12  # draft tokens an answer verifies in one step at most (cag.drafts)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}
_NAMES = ("CAG_HOME", "CAG_MEMORY_BYTES", "CAG_HOST_BYTES", "CAG_REDIS_URL", "CAG_REDIS_TTL", "CAG_SIGNING_KEY",
          "CAG_API_KEYS", "CAG_PACKED_WEIGHTS", "CAG_FAST_DECODE", "CAG_NATIVE", "CAG_NATIVE_STEP", "CC", "CAG_DEBUG",
          "CAG_THREADS", "CAG_MODEL_BYTES", "CAG_SIMD", "CAG_DRAFT")
SIMD_CHOICES = ("auto", "avx512", "avx2", "neon", "portable")


@dataclass(frozen=True)
class Settings:
    home: Path
    memory_bytes: int
    host_bytes: int
    redis_url: str | None
    redis_ttl_s: float | None
    signing_key: bytes | None
    api_keys: str
    packed_weights: bool
    fast_decode: bool
    native: bool
    native_step: bool
    compiler: str | None
    debug: bool
    threads: int | None = None
    model_bytes: int = DEFAULT_MODEL_BYTES
    simd: str = "auto"
    draft: int = DEFAULT_DRAFT

    @classmethod
    def from_env(cls, env: dict[str, str | None]) -> "Settings":
        ttl = env.get("CAG_REDIS_TTL")
        try:
            ttl_s = float(ttl) if ttl else None
        except ValueError:
            raise CagError(f"CAG_REDIS_TTL must be a number of seconds (got {ttl!r})") from None
        return cls(
            home=Path(env.get("CAG_HOME") or Path.home() / ".cache" / "cag").expanduser(),
            memory_bytes=parse_bytes(env.get("CAG_MEMORY_BYTES") or DEFAULT_MEMORY_BYTES, "CAG_MEMORY_BYTES"),
            host_bytes=parse_bytes(env.get("CAG_HOST_BYTES") or 0, "CAG_HOST_BYTES"),
            redis_url=env.get("CAG_REDIS_URL") or None,
            redis_ttl_s=ttl_s,
            signing_key=(env.get("CAG_SIGNING_KEY") or "").encode() or None,
            api_keys=env.get("CAG_API_KEYS") or "",
            packed_weights=_on(env, "CAG_PACKED_WEIGHTS"),
            fast_decode=_on(env, "CAG_FAST_DECODE"),
            native=_on(env, "CAG_NATIVE"),
            native_step=_on(env, "CAG_NATIVE_STEP"),
            compiler=env.get("CC") or shutil.which("cc") or shutil.which("gcc") or shutil.which("clang"),
            debug=(env.get("CAG_DEBUG") or "0") not in ("", "0"),
            threads=_count(env, "CAG_THREADS"),
            model_bytes=parse_bytes(env.get("CAG_MODEL_BYTES") or DEFAULT_MODEL_BYTES, "CAG_MODEL_BYTES"),
            simd=_simd(env.get("CAG_SIMD")),
            draft=_draft(env.get("CAG_DRAFT")),
        )


_lock = threading.Lock()
_parsed: tuple[tuple, Settings] | None = None


def current() -> Settings:
    """The settings for the environment as it is now (parsed again only when one of its values changed)."""
    global _parsed
    values = tuple(os.environ.get(name) for name in _NAMES)
    with _lock:
        if _parsed is None or _parsed[0] != values:
            _parsed = (values, Settings.from_env(dict(zip(_NAMES, values))))
        return _parsed[1]


def parse_bytes(value: str | int, what: str) -> int:
    """'2G', '512M', '1048576' (or the number 1048576) -> bytes; anything else is a one-line error naming the
    setting. One parser for the environment and the server config, so both take the same forms."""
    if type(value) is int and value >= 0:  # not True, which would pass as 1 byte
        return value
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgt]?)i?b?\s*", value.lower()) if isinstance(value, str) else None
    if not m:
        raise CagError(f"{what} must be a byte count like 1073741824, 512M or 2G (got {value!r})")
    return int(float(m.group(1)) * _UNITS[m.group(2)])


def _count(env: dict[str, str | None], name: str) -> int | None:
    value = env.get(name)
    if not value:
        return None
    if not value.strip().isdigit() or int(value) < 1:
        raise CagError(f"{name} must be a whole number of at least 1 (got {value!r})")
    return int(value)


def _simd(value: str | None) -> str:
    simd = (value or "auto").strip().lower()
    if simd not in SIMD_CHOICES:
        raise CagError(f"CAG_SIMD must be one of {', '.join(SIMD_CHOICES)} (got {value!r})")
    return simd


def _draft(value: str | None) -> int:
    if value is None or not value.strip():
        return DEFAULT_DRAFT
    if not value.strip().isdigit():
        raise CagError(f"CAG_DRAFT must be 0 (no drafts) or the most draft tokens per step, like 12 (got {value!r})")
    return int(value)


def _on(env: dict[str, str | None], name: str) -> bool:
    return (env.get(name) or "1") != "0"
