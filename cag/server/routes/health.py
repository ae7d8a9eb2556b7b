"""Health, Prometheus metrics and the chat page."""

from __future__ import annotations

from pathlib import Path

from fastapi import APIRouter
from fastapi.responses import FileResponse, Response

from ... import __version__
from ..state import Server, This

STATIC = Path(__file__).resolve().parent.parent / "static"
router = APIRouter()


@router.get("/healthz")
@router.get("/health", include_in_schema=False)  # llama-server's and vLLM's name for it
def healthz(srv: Server = This):
    return {"status": "ok", "version": __version__, "open": srv.config.open}


@router.get("/metrics")
def metrics(srv: Server = This):
    srv.metrics.memory(srv.registry.models.usage(), srv.registry.models.budget)
    return Response(srv.metrics.render(), media_type="text/plain; version=0.0.4")


@router.get("/", include_in_schema=False)
def page():
    return FileResponse(STATIC / "index.html")
