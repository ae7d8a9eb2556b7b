"""What every route of one server shares: its config, knowledge bases, metrics, answering service and the
one completion path, made once by create_app and reached from a route through FastAPI's dependencies.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Optional

from fastapi import Depends, Header, Request

from ..engines.base import Engine
from . import auth
from .chat import ChatService
from .completion import Completions
from .config import ServerConfig
from .metrics import Metrics
from .middleware import note
from .knowledge_bases import KnowledgeBases


@dataclass
class Server:
    config: ServerConfig
    registry: KnowledgeBases
    metrics: Metrics
    service: ChatService
    pool: ThreadPoolExecutor  # generation runs here, so the event loop stays free
    completer: Completions  # the one completion path of every answering route

    @classmethod
    def make(cls, config: ServerConfig, lm: Engine | None) -> "Server":
        registry = KnowledgeBases(config, lm)
        metrics = Metrics(config.price_per_1k_tokens)
        service = ChatService(config, registry, metrics)
        pool = ThreadPoolExecutor(max_workers=config.answer_threads, thread_name_prefix="cag-gen")
        return cls(config, registry, metrics, service, pool, Completions(service, metrics, pool))


def server(request: Request) -> Server:
    """The server a request reached (a dependency of every route)."""
    return request.app.state.server


def tenant(request: Request, authorization: Optional[str] = Header(None),
           x_api_key: Optional[str] = Header(None)) -> str:
    """The caller's tenant: a dependency of every knowledge-base route, so a 401 comes before anything else."""
    who = auth.tenant_for(server(request).config, authorization, x_api_key)
    note(tenant=who)
    return who


Caller = Depends(tenant)
This = Depends(server)
