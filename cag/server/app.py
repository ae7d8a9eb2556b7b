"""The FastAPI app: OpenAI-compatible chat and prompt completions over cag knowledge bases, KB management,
metrics, health, and one JSON access-log line per request; Ollama's API beside it (cag.server.ollama), answering
through the same completion path (cag.server.completion).

`model` in a request names the knowledge base. Generation runs in a thread pool (config.answer_threads) so the
event loop stays free; concurrent requests on one KB read its cached prefix in place (never copied) and,
with continuous batching, are decoded together by that KB's scheduler thread (cag.scheduler).
"""

from __future__ import annotations

import errno
import json
import logging
import re
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing, asynccontextmanager
from pathlib import Path
from typing import BinaryIO, Callable, Optional

from fastapi import Depends, FastAPI, File, Form, Header, Request, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from .. import __version__, engines
from ..engines.base import Engine
from ..errors import CacheFileError, CagError, json_kind
from ..registry import model_label
from . import auth, ollama
from .chat import ChatService, Plan, Query, chat_query, prompt_query
from .completion import Completions, Failed, extra
from .config import ServerConfig
from .errors import ApiError, error_body
from .metrics import Metrics
from .middleware import AccessLog, BodyLimit, CatchAll, note
from .registry import Registry, safe_doc_name
from .schemas import CHAT, TEXT, ChatRequest, CompletionRequest, GenerationRequest, KBCreate, KBReplace, Shape

log = logging.getLogger("cag.server")
# pydantic names the member of a union it tried in an error's location ("stop.str"); a param has no such part
_TYPE_TAG = re.compile(r"^(str|int|float|bool|none|(list|dict|union|literal|function-\w+)\[.*\])$")
STATIC = Path(__file__).parent / "static"


def create_app(config: ServerConfig | None = None, lm: Engine | None = None) -> FastAPI:
    """Build the app; pass `lm` to share an already loaded model (otherwise it loads on first use)."""
    config = config or ServerConfig()
    registry = Registry(config, lm)
    metrics = Metrics(config.price_per_1k_tokens)
    service = ChatService(config, registry, metrics)
    pool = ThreadPoolExecutor(max_workers=config.answer_threads, thread_name_prefix="cag-gen")
    completer = Completions(service, metrics, pool)  # the one completion path of every answering route

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        registry.models.start_expiry()  # models idle past their keep-alive are unloaded while the app runs
        yield
        registry.models.stop_expiry()
        pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cag", version=__version__, description=__doc__, lifespan=lifespan)
    app.state.service = service
    if config.open:
        log.warning("no API keys configured: the server is open to anyone who can reach it (keep it on loopback)")

    # Every error leaves in OpenAI's shape {"error": {"message", "type", "param", "code"}}, paths removed.
    app.add_middleware(BodyLimit, limit_for=lambda path: config.max_upload_bytes if path.endswith("/upload")
                       else config.max_body_bytes)
    app.add_middleware(CatchAll)  # whatever no handler took becomes a generic 500
    app.add_middleware(AccessLog)  # added last, so outermost: sees every status, 413s and 500s included

    def refuse(body: dict, status: int, headers: dict | None = None) -> JSONResponse:
        note(error=body["error"]["code"] or body["error"]["type"])
        return JSONResponse(body, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, err: ApiError):
        return refuse(err.body(), err.status)

    @app.exception_handler(CagError)
    async def cag_error(_request: Request, err: CagError):
        return refuse(error_body(str(err), "invalid_request_error"), 400)

    @app.exception_handler(CacheFileError)
    async def cache_error(_request: Request, err: CacheFileError):
        """A knowledge base whose cache cannot be used (damaged, forged, made for something else) until rebuilt."""
        return refuse(error_body(str(err), "invalid_request_error", "cache_unusable"), 409)

    @app.exception_handler(OSError)
    async def os_error(_request: Request, err: OSError):
        """A full disk while a knowledge base is written: the server's to fix, and nothing stored changed
        (builds commit in one step). Other OS errors are faults of the server: the catch-all's 500."""
        if err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
            raise err
        return refuse(error_body("the server's disk is full: the knowledge base was not written (what was stored "
                                 "before is unchanged); try again once there is room", "server_error",
                                 "insufficient_storage"), 507)

    @app.exception_handler(RequestValidationError)
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

    @app.exception_handler(HTTPException)
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

    def tenant(authorization: Optional[str] = Header(None), x_api_key: Optional[str] = Header(None)) -> str:
        """The caller's tenant: a dependency of every knowledge-base route, so a 401 comes before anything else."""
        who = auth.tenant_for(config, authorization, x_api_key)
        note(tenant=who)
        return who

    caller = Depends(tenant)

    # -- health, metrics, page --------------------------------------------------------------------
    @app.get("/healthz")
    @app.get("/health", include_in_schema=False)  # llama-server's and vLLM's name for it
    def healthz():
        return {"status": "ok", "version": __version__, "open": config.open}

    @app.get("/metrics")
    def metrics_endpoint():
        metrics.memory(registry.models.usage(), registry.models.budget)
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/", include_in_schema=False)
    def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the page's script, style and libraries

    # -- OpenAI-compatible -------------------------------------------------------------------------
    @app.get("/v1/models")
    def list_models(who: str = caller):
        return {"object": "list", "data": [_model(r) for r in registry.list(who)]}

    @app.get("/v1/models/{model_id}")
    def retrieve_model(model_id: str, who: str = caller):
        note(model=model_id)
        return _model(registry.row(who, model_id))

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, who: str = caller):
        return await _complete(who, req, lambda: chat_query(config, req), CHAT)

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, who: str = caller):
        return await _complete(who, req, lambda: prompt_query(config, req), TEXT)

    async def _complete(who: str, req: GenerationRequest, query: Callable[[], Query], shape: Shape):
        """Both completion endpoints: the one completion path (cag.server.completion), in the endpoint's shape
        (streamed or whole)."""
        plan, hit = await completer.start(who, req, query)
        cid, created = f"{shape.id_prefix}-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            include_usage = bool(req.stream_options and req.stream_options.include_usage)
            return StreamingResponse(_stream(plan, hit, cid, created, include_usage, shape),
                                     media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        result = await completer.whole(plan, hit)
        return JSONResponse({
            "id": cid, "object": shape.object, "created": created, "model": plan.name,
            "choices": [shape.choice(result["text"], result["finish_reason"])],
            "usage": _usage(result), "cag": extra(plan, result)})

    async def _stream(plan: Plan, hit: dict | None, cid: str, created: int, include_usage: bool, shape: Shape):
        def chunk(choice: dict | None, **more: dict) -> str:
            body = {"id": cid, "object": shape.chunk_object, "created": created, "model": plan.name,
                    "choices": [] if choice is None else [choice], **more}
            return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

        if shape.opening is not None:
            yield chunk(shape.opening)
        async with aclosing(completer.stream(plan, hit)) as events:  # a client gone stops the generation
            async for event in events:
                if isinstance(event, str):
                    yield chunk(shape.piece(event, None))
                elif isinstance(event, Failed):  # a stream that fails still ends with an error event and [DONE]
                    yield f"data: {json.dumps(event.body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:
                    result = event.result
        # the last chunk before [DONE] carries cag's object (sources, support): the usage chunk when asked for
        more = {"cag": extra(plan, result)}
        yield chunk(shape.piece(None, result["finish_reason"]), **({} if include_usage else more))
        if include_usage:
            yield chunk(None, usage=_usage(result), **more)
        yield "data: [DONE]\n\n"

    # -- knowledge-base management ----------------------------------------------------------------
    def _kb_body(name: str, entry) -> dict:
        kb = entry.kb
        lm = getattr(kb, "lm", None)
        return {"id": name, "object": "knowledge_base", "tokens": kb.tokens, "documents": [d.name for d in kb.docs],
                "build_seconds": kb.build_stats.seconds if kb.build_stats else None,
                "model": model_label(lm.name) if lm is not None else None}

    def _files(files: list[UploadFile]) -> list[tuple[str, BinaryIO]]:
        """The uploads as the files the multipart parser spooled them to (to disk past 1 MB), not bytes in memory."""
        return [(safe_doc_name(f.filename or "", default_suffix=None), f.file) for f in files]

    @app.get("/v1/kbs")
    def list_kbs(who: str = caller):
        return {"object": "list", "data": registry.list(who)}

    @app.get("/v1/kbs/{name}")
    def get_kb(name: str, who: str = caller):
        note(model=name)
        return _kb_body(name, registry.get(who, name))

    @app.post("/v1/kbs", status_code=201)
    async def create_kb(body: KBCreate, who: str = caller):
        note(model=body.name)
        docs = [(safe_doc_name(d.name), d.text.encode()) for d in body.documents]
        entry = await run_in_threadpool(registry.create, who, body.name, docs, body.model)
        return JSONResponse(_kb_body(body.name, entry), status_code=201)

    @app.post("/v1/kbs/upload", status_code=201)
    async def upload_kb(name: str = Form(...), files: list[UploadFile] = File(...), model: Optional[str] = Form(None),
                        who: str = caller):
        note(model=name)
        entry = await run_in_threadpool(registry.create, who, name, _files(files), model)
        return JSONResponse(_kb_body(name, entry), status_code=201)

    async def _replace(who: str, name: str, docs: list[tuple[str, bytes | BinaryIO]]) -> dict:
        note(model=name)
        folder = registry.folder_for(who, name)
        entry = await run_in_threadpool(registry.replace, who, name, docs)
        service.forget(who, folder)
        return _kb_body(name, entry)

    @app.put("/v1/kbs/{name}")
    async def replace_kb(name: str, body: KBReplace, who: str = caller):
        return await _replace(who, name, [(safe_doc_name(d.name), d.text.encode()) for d in body.documents])

    @app.put("/v1/kbs/{name}/upload")
    async def replace_kb_upload(name: str, files: list[UploadFile] = File(...), who: str = caller):
        return await _replace(who, name, _files(files))

    @app.delete("/v1/kbs/{name}")
    async def delete_kb(name: str, who: str = caller):
        note(model=name)
        folder = await run_in_threadpool(registry.delete, who, name)
        service.forget(who, folder)
        return {"id": name, "object": "knowledge_base", "deleted": True}

    ollama.install(app, config, registry, completer, tenant)  # Ollama's API, and GET /v1/cag/loaded
    return app


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


def _model(row: dict) -> dict:
    """A knowledge base as an OpenAI model row; `root` names the language model it was built with and is
    answered by (as vLLM's rows name theirs), and `cag` carries cag's own numbers (tokens and documents also
    stay at the top level)."""
    root = model_label(row.get("model") or engines.DEFAULT_MODEL)
    return {"id": row["name"], "object": "model", "created": _epoch(row.get("created")), "owned_by": row["owned_by"],
            "root": root, "tokens": row.get("tokens"), "documents": row.get("documents"),
            "cag": {"model": root, "engine": row.get("engine") or "torch", "tokens": row.get("tokens"),
                    "documents": row.get("documents"), "created": row.get("created")}}


def _usage(result: dict) -> dict:
    u = result["usage"]
    return {"prompt_tokens": u["prompt_tokens"], "completion_tokens": u["completion_tokens"],
            "total_tokens": u["total_tokens"], "prompt_tokens_details": {"cached_tokens": u["cached_tokens"]}}


def _epoch(created: str | None) -> int:
    try:
        return int(time.mktime(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone)
    except (TypeError, ValueError):
        return 0
