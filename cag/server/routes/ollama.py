"""Ollama's API: chat and generate (through the one completion path, whole or as NDJSON, or a load request),
the knowledge bases as Ollama's models (tags, show), what is loaded (ps, and cag's own GET /v1/cag/loaded) and
the API version. Bodies, translation and wording are cag.server.ollama's; its OllamaErrors middleware gives
these routes' errors Ollama's shape."""

from __future__ import annotations

from fastapi import APIRouter

from ... import __version__
from ..middleware import note
from ..ollama import (API_VERSION, Answering, OllamaChat, OllamaGenerate, OllamaShow, kb_name, loaded_body,
                      loaded_rows, openai_request, ps_rows, refuse_unsupported, show_body, tag_row)
from ..state import Caller, Server, This

router = APIRouter()


@router.post("/api/chat")
async def chat(req: OllamaChat, who: str = Caller, srv: Server = This):
    answering = Answering(srv.config, srv.registry, srv.completer)
    if not req.messages:
        return await answering.load_only(who, req, {"message": {"role": "assistant", "content": ""}})
    refuse_unsupported(req)
    oreq = openai_request(req, [{"role": m.role, "content": m.content} for m in req.messages], req.tools)
    return await answering.answer(who, req, oreq, lambda text: {"message": {"role": "assistant", "content": text}})


@router.post("/api/generate")
async def generate(req: OllamaGenerate, who: str = Caller, srv: Server = This):
    answering = Answering(srv.config, srv.registry, srv.completer)
    if not req.prompt:
        return await answering.load_only(who, req, {"response": ""})
    refuse_unsupported(req)
    system = [{"role": "system", "content": req.system}] if req.system else []
    oreq = openai_request(req, [*system, {"role": "user", "content": req.prompt}])
    return await answering.answer(who, req, oreq, lambda text: {"response": text})


@router.get("/api/tags")
def tags(who: str = Caller, srv: Server = This):
    return {"models": [tag_row(kb) for kb in srv.registry.list(who)]}


@router.post("/api/show")
def show(req: OllamaShow, who: str = Caller, srv: Server = This):
    name = kb_name(req.model or req.name or "")
    note(model=name)
    return show_body(srv.registry.row(who, name))


@router.get("/api/ps")
def ps(who: str = Caller, srv: Server = This):
    return {"models": ps_rows(loaded_rows(srv.registry, who))}


@router.get("/api/version")
def version():
    return {"version": API_VERSION, "cag": __version__}


@router.get("/v1/cag/loaded")
def loaded(who: str = Caller, srv: Server = This):
    return loaded_body(loaded_rows(srv.registry, who))
