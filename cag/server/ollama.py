"""Ollama's HTTP API beside the OpenAI one, so that tools made for Ollama can ask cag's knowledge bases.

`model` names a knowledge base, exactly as on the OpenAI routes (an Ollama-style ":latest" tag is accepted and
dropped). /api/chat and /api/generate are translated into an OpenAI chat request and take the one completion
path (cag.server.completion): the same checks, limits, response cache and model, so their answers are
token-identical to /v1/chat/completions'. They stream NDJSON (one JSON object a line, `done: true` on the
last) unless `stream` is false. `options` maps onto the OpenAI fields (num_predict -> max_tokens, temperature,
top_p, top_k, seed, stop, the penalties); left out, an answer is greedy, as on the OpenAI routes (Ollama's own
models default to 0.8). `keep_alive` (cag.server.config.keep_alive_seconds) says how long the model stays
loaded once idle; an empty prompt or message list only loads the model, or with keep_alive 0 unloads it.

Every error on these routes leaves in Ollama's shape, {"error": "message"}, with the status the OpenAI
routes give (401 without a key, 404 for an unknown model, 400 for a bad body, 413 for a large one).
GET /v1/cag/loaded reports, in cag's own shape, what /api/ps reports in Ollama's.

This module holds what those routes read and write (bodies, translation, rows, errors, answering); the routes
themselves are named handlers in cag.server.routes.ollama.
"""

from __future__ import annotations

import hashlib
import json
import time
from contextlib import aclosing
from datetime import datetime, timezone
from typing import Any, Callable, Literal, Optional, Union

from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError, field_validator
from starlette.concurrency import run_in_threadpool
from starlette.types import Message, Receive, Scope, Send

from .. import engines
from ..registry import model_label
from .chat import Plan, Query, chat_query
from .answered import Answered
from .completion import Completions, Done, Failed
from .config import ServerConfig, keep_alive_seconds
from .http_errors import ApiError
from .middleware import _HttpOnly, note
from .knowledge_bases import KnowledgeBases
from .schemas import Body, ChatRequest, Flag

API_VERSION = "0.12.0"  # the Ollama release whose API shapes these routes follow (GET /api/version)
FOREVER = "9999-12-31T23:59:59Z"  # expires_at of a model kept for ever
# Ollama's options -> the OpenAI chat fields they set; the penalties and samplers cag lacks are passed on
# under their own names, for guard.check_parameters to refuse any value that would change the answer
_OPTIONS = {"num_predict": "max_tokens", "temperature": "temperature", "top_p": "top_p", "top_k": "top_k",
            "seed": "seed", "stop": "stop", "presence_penalty": "presence_penalty",
            "frequency_penalty": "frequency_penalty", "repeat_penalty": "repeat_penalty", "min_p": "min_p",
            "typical_p": "typical_p", "mirostat": "mirostat"}
_FIELD = {v: k for k, v in _OPTIONS.items()}


# -- request bodies ----------------------------------------------------------------------------------------
class OllamaMessage(Body):
    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: Optional[list[str]] = None
    tool_calls: Optional[list[dict[str, Any]]] = None


class OllamaRequest(Body):
    """What /api/chat and /api/generate share. `keep_alive` is checked here, so a bad one is a 400 naming it."""

    model: str
    stream: Flag = True
    options: Optional[dict[str, Any]] = None
    keep_alive: Union[float, str, None] = None
    format: Union[str, dict[str, Any], None] = None
    think: Union[bool, str, None] = None

    @field_validator("keep_alive", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        if value is not None:
            keep_alive_seconds(value)  # ValueError: pydantic's 400 names the field
        return value

    @property
    def keep_alive_s(self) -> float | None:
        return None if self.keep_alive is None else keep_alive_seconds(self.keep_alive)


class OllamaChat(OllamaRequest):
    messages: list[OllamaMessage] = []
    tools: Optional[list[dict[str, Any]]] = None


class OllamaGenerate(OllamaRequest):
    prompt: str = ""
    system: Optional[str] = None
    suffix: Optional[str] = None
    template: Optional[str] = None
    raw: Optional[Flag] = None
    context: Optional[list[int]] = None
    images: Optional[list[str]] = None


class OllamaShow(Body):
    model: Optional[str] = None
    name: Optional[str] = None  # what older clients send


# -- translation ---------------------------------------------------------------------------------------------
def kb_name(model: str) -> str:
    """The knowledge base an Ollama model name means: ":latest" is dropped (knowledge base names have no
    tags, so any other tag names nothing and is a 404 later)."""
    return model[: -len(":latest")] if model.endswith(":latest") else model


def refuse_unsupported(req: OllamaRequest) -> None:
    """Refuse what asks for something cag cannot do, rather than answering something else than was asked."""
    asks = {"format": req.format not in (None, "", "text"), "think": bool(req.think)}
    if isinstance(req, OllamaGenerate):
        asks.update(images=bool(req.images), raw=bool(req.raw), template=bool(req.template),
                    suffix=bool(req.suffix), context=bool(req.context))
    if isinstance(req, OllamaChat):
        asks["images"] = any(m.images for m in req.messages)
        asks["tool_calls"] = any(m.tool_calls for m in req.messages)
    for name, asked in asks.items():
        if asked:
            raise ApiError(400, f"{name} is not supported: cag answers a text question from a knowledge base in "
                                "plain text; leave it out", code="unsupported_parameter", param=name)


def openai_request(req: OllamaRequest, messages: list[dict], tools: list | None = None) -> ChatRequest:
    """The OpenAI chat request an Ollama one asks for: its options under their OpenAI names, each checked as
    the OpenAI routes check it (a bad value is a 400 naming the Ollama option)."""
    body: dict[str, Any] = {"model": kb_name(req.model), "messages": messages, "stream": req.stream}
    for option, value in (req.options or {}).items():
        if option in _OPTIONS and value is not None:
            body[_OPTIONS[option]] = value
    if isinstance(body.get("max_tokens"), int) and not isinstance(body["max_tokens"], bool) \
            and body["max_tokens"] < 0:
        del body["max_tokens"]  # Ollama's -1 (no limit) and -2 (fill the context): the server's default
    if tools:
        body["tools"] = tools
    try:
        return ChatRequest.model_validate(body)
    except ValidationError as err:
        first = err.errors()[0]
        loc = [str(p) for p in first.get("loc", ())]
        where = f"options.{_FIELD[loc[0]]}" if loc and loc[0] in _FIELD else ".".join(loc)
        msg = str(first.get("msg", "malformed")).removeprefix("Value error, ")
        raise ApiError(400, f"invalid request: {where}: {msg}", code="invalid_request", param=where) from None


def now_iso(at: float | None = None) -> str:
    """A time as Ollama writes one (RFC 3339, UTC)."""
    when = datetime.fromtimestamp(time.time() if at is None else at, timezone.utc)
    return when.isoformat(timespec="microseconds").replace("+00:00", "Z")


def ns(seconds: float | None) -> int:
    return int(round((seconds or 0.0) * 1e9))


def final_fields(plan: Plan, result: Answered, begun: float, load_s: float) -> dict:
    """The last object's numbers, in Ollama's names (durations in ns); cag's own object beside them."""
    u, ttft = result.usage, result.ttft_s or 0.0
    return {"done": True, "done_reason": result.finish_reason, "total_duration": ns(time.perf_counter() - begun),
            "load_duration": ns(load_s), "prompt_eval_count": u.prompt_tokens, "prompt_eval_duration": ns(ttft),
            "eval_count": u.completion_tokens,
            "eval_duration": ns(max(0.0, result.total_s - ttft) if result.ttft_s is not None else 0.0),
            "cag": {**result.cag(plan), "cached_tokens": u.cached_tokens}}


def line(body: dict) -> str:
    return json.dumps(body, ensure_ascii=False) + "\n"


# -- what is loaded --------------------------------------------------------------------------------------------
def loaded_rows(registry: KnowledgeBases, who: str) -> list[dict]:
    """Each loaded model (ModelPool.usage) with the knowledge bases loaded on it that `who` may see, by name;
    other tenants' knowledge bases count in its bytes but are not named."""
    registry.models.expire()  # exact at the moment of asking, whatever the expiry thread's last look saw
    rows = registry.models.usage()
    loaded = {f for r in rows for f in r["folders"]}
    names = {}
    if loaded:
        for kb in registry.list(who):
            try:
                folder = registry.folder_for(who, kb["name"])
            except ApiError:
                continue
            if folder in loaded:
                names[folder] = kb
    for r in rows:
        r["kbs"] = {names[f]["name"]: (nbytes, names[f]) for f, nbytes in r.pop("folders").items() if f in names}
    return rows


def expires_at(row: dict) -> str:
    """When a model goes if nothing uses it meanwhile (a busy one: its whole keep-alive after now)."""
    return FOREVER if row["expires_in_s"] is None else now_iso(time.time() + row["expires_in_s"])


def details(kb: dict) -> dict:
    label = model_label(kb.get("model") or engines.DEFAULT_MODEL)
    return {"parent_model": "", "format": "gguf" if kb.get("engine") == "llamacpp" else "safetensors",
            "family": label, "families": [label], "parameter_size": "", "quantization_level": ""}


def digest(kb: dict) -> str:
    """A stable id of one build of a knowledge base (another build, another digest), as Ollama's sha256."""
    return hashlib.sha256(f"{kb['name']}\n{kb.get('created')}\n{kb.get('bytes')}".encode()).hexdigest()


def tag_row(kb: dict) -> dict:
    created = kb.get("created") or "1970-01-01T00:00:00Z"
    return {"name": kb["name"], "model": kb["name"], "modified_at": created, "size": kb.get("bytes") or 0,
            "digest": digest(kb), "details": details(kb),
            "cag": {"tokens": kb.get("tokens"), "documents": kb.get("documents"), "owned_by": kb.get("owned_by")}}


def ps_rows(rows: list[dict]) -> list[dict]:
    out = []
    for r in rows:
        for name, (nbytes, kb) in r["kbs"].items():
            out.append({"name": name, "model": name, "size": r["weights"] + nbytes, "size_vram": 0,
                        "digest": digest(kb), "details": details(kb), "expires_at": expires_at(r),
                        "context_length": kb.get("tokens") or 0,
                        "cag": {"model": r["model"], "engine": r["engine"], "weights": r["weights"], "prefix": nbytes,
                                "busy": r["busy"], "idle_s": round(r["idle_s"], 3),
                                "keep_alive_s": r["keep_alive_s"]}})
    return out


# -- errors in Ollama's shape ------------------------------------------------------------------------------------
class OllamaErrors(_HttpOnly):
    """Rewrites the server's OpenAI-shaped error bodies on /api/ routes as Ollama's {"error": "message"}; the
    status stays. Outermost, so it sees every error: a 401, a 413 refused before the body was read, a 500."""

    async def http(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not scope["path"].startswith("/api/"):
            await self.app(scope, receive, send)
            return
        start: Message | None = None
        held: list[bytes] = []

        async def reshaped(message: Message) -> None:
            nonlocal start
            if message["type"] == "http.response.start" and message["status"] >= 400:
                start = message
                return
            if start is None:
                await send(message)
                return
            held.append(message.get("body", b""))
            if message.get("more_body", False):
                return
            body = ollama_error(b"".join(held))
            headers = [(k, v) for k, v in start.get("headers", ()) if k.lower() != b"content-length"]
            await send({**start, "headers": [*headers, (b"content-length", str(len(body)).encode())]})
            await send({"type": "http.response.body", "body": body})

        await self.app(scope, receive, reshaped)


def ollama_error(body: bytes) -> bytes:
    try:
        error = json.loads(body)["error"]
        message = error["message"] if isinstance(error, dict) else str(error)
    except (ValueError, KeyError, TypeError):
        return body
    return json.dumps({"error": message}).encode()


# -- answering ---------------------------------------------------------------------------------------------------
class Answering:
    """What /api/chat and /api/generate do once their body is read: a load request, or an answer through the
    one completion path, whole or as NDJSON."""

    def __init__(self, config: ServerConfig, registry: KnowledgeBases, completions: Completions):
        self.config, self.registry, self.completions = config, registry, completions

    async def answer(self, who: str, req: OllamaRequest, oreq: ChatRequest, piece: Callable[[str], dict]):
        begun = time.perf_counter()
        plan, hit = await self.completions.start(who, oreq, lambda: self.query(oreq, req.keep_alive_s))
        load_s, head = time.perf_counter() - begun, {"model": req.model, "created_at": now_iso()}
        if not req.stream:
            result = await self.completions.whole(plan, hit)
            return JSONResponse({**head, **piece(result.text), **final_fields(plan, result, begun, load_s)})
        return StreamingResponse(self.ndjson(plan, hit, head, piece, begun, load_s),
                                 media_type="application/x-ndjson")

    def query(self, oreq: ChatRequest, keep: float | None) -> Query:
        """The OpenAI request's query (chat_query: the same checks), with the Ollama request's keep-alive."""
        q = chat_query(self.config, oreq)
        q.keep_alive = keep
        return q

    async def ndjson(self, plan: Plan, hit: Answered | None, head: dict, piece: Callable[[str], dict], begun: float,
                     load_s: float):
        async with aclosing(self.completions.stream(plan, hit)) as events:  # a client gone stops the generation
            async for event in events:
                if isinstance(event, str):
                    yield line({**head, "created_at": now_iso(), **piece(event), "done": False})
                elif isinstance(event, Failed):  # a response has begun: the error travels as its last line
                    yield line({"error": event.body["error"]["message"]})
                    return
                elif isinstance(event, Done):
                    yield line({**head, "created_at": now_iso(), **piece(""),
                                **final_fields(plan, event.result, begun, load_s)})

    async def load_only(self, who: str, req: OllamaRequest, empty: dict) -> JSONResponse:
        """Ollama's load request (no prompt): load the knowledge base and its model and set the model's
        keep-alive; with keep_alive 0 that unloads it instead (done_reason "unload")."""
        name = kb_name(req.model)
        note(model=name)
        entry = await run_in_threadpool(self.registry.lease, who, name)
        self.registry.models.keep(entry, req.keep_alive_s)
        await run_in_threadpool(self.registry.release, entry)  # a keep-alive of 0 unloads it here
        reason = "unload" if req.keep_alive_s == 0 else "load"
        return JSONResponse({"model": req.model, "created_at": now_iso(), **empty, "done": True,
                             "done_reason": reason})


def show_body(kb: dict) -> dict:
    d = details(kb)
    return {"modelfile": "", "parameters": "", "template": "", "license": "", "details": d,
            "modified_at": kb.get("created") or "1970-01-01T00:00:00Z", "capabilities": ["completion"],
            "model_info": {"general.architecture": d["family"], "cag.model": d["family"], "cag.engine": kb.get("engine"),
                           "cag.tokens": kb.get("tokens"), "cag.documents": kb.get("documents"),
                           "cag.bytes": kb.get("bytes")}}


def loaded_body(rows: list[dict]) -> dict:
    """GET /v1/cag/loaded: each model, its bytes, idle seconds and keep-alive, and the caller's knowledge
    bases loaded on it (how many are loaded in all, too)."""
    return {"object": "list", "data": [
        {**{k: v for k, v in r.items() if k != "kbs"}, "expires_at": expires_at(r),
         "knowledge_bases": [{"name": n, "bytes": b} for n, (b, _kb) in r["kbs"].items()],
         "knowledge_bases_loaded": r["knowledge_bases"]} for r in rows]}
