"""The FastAPI app: OpenAI-compatible chat and prompt completions over cag knowledge bases, KB management,
metrics, health, and one JSON access-log line per request; Ollama's API beside it (cag.server.routes.ollama),
answering through the same completion path (cag.server.completion). The routes are named handlers in
cag.server.routes; this module only builds the shared state, installs middleware and error handlers, and
includes the routers.

`model` in a request names the knowledge base. Generation runs in a thread pool (config.answer_threads) so the
event loop stays free; concurrent requests on one KB read its cached prefix in place (never copied) and,
with continuous batching, are decoded together by that KB's scheduler thread (cag.scheduler).
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from .. import __version__
from ..engines.base import Engine
from . import error_handlers
from .config import ServerConfig
from .middleware import AccessLog, BodyLimit, CatchAll
from .ollama import OllamaErrors
from .routes import health, kbs, ollama, openai
from .routes.health import STATIC
from .state import Server

log = logging.getLogger("cag.server")


def create_app(config: ServerConfig | None = None, lm: Engine | None = None) -> FastAPI:
    """Build the app; pass `lm` to share an already loaded model (otherwise it loads on first use)."""
    srv = Server.make(config or ServerConfig(), lm)

    @asynccontextmanager
    async def lifespan(_app: FastAPI):
        srv.registry.models.start_expiry()  # models idle past their keep-alive are unloaded while the app runs
        yield
        srv.registry.models.stop_expiry()
        srv.pool.shutdown(wait=False, cancel_futures=True)

    app = FastAPI(title="cag", version=__version__, description=__doc__, lifespan=lifespan)
    app.state.server, app.state.service = srv, srv.service
    if srv.config.open:
        log.warning("no API keys configured: the server is open to anyone who can reach it (keep it on loopback)")
    _middleware(app, srv.config)
    error_handlers.install(app)
    app.include_router(health.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")  # the page's script, style and libraries
    app.include_router(openai.router)
    app.include_router(kbs.router)
    app.include_router(ollama.router)  # Ollama's API, and GET /v1/cag/loaded
    return app


def _middleware(app: FastAPI, config: ServerConfig) -> None:
    # Every error leaves in OpenAI's shape {"error": {"message", "type", "param", "code"}}, paths removed.
    app.add_middleware(BodyLimit, limit_for=lambda path: config.max_upload_bytes if path.endswith("/upload")
                       else config.max_body_bytes)
    app.add_middleware(CatchAll)  # whatever no handler took becomes a generic 500
    app.add_middleware(AccessLog)  # outside those: sees every status, 413s and 500s included
    app.add_middleware(OllamaErrors)  # added last, so outermost: every error on /api/ in Ollama's shape
