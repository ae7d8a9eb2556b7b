"""Knowledge-base management: list, show, create (JSON or uploaded files), replace and delete a tenant's
knowledge bases. A change drops the knowledge base's cached answers and conversations."""

from __future__ import annotations

from typing import BinaryIO, Optional

from fastapi import APIRouter, File, Form, UploadFile
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from ...registry import model_label
from ..middleware import note
from ..knowledge_bases import safe_doc_name
from ..schemas import KBCreate, KBReplace
from ..state import Caller, Server, This

router = APIRouter()


@router.get("/v1/kbs")
def list_kbs(who: str = Caller, srv: Server = This):
    return {"object": "list", "data": srv.registry.list(who)}


@router.get("/v1/kbs/{name}")
def get_kb(name: str, who: str = Caller, srv: Server = This):
    note(model=name)
    return kb_body(name, srv.registry.get(who, name))


@router.post("/v1/kbs", status_code=201)
async def create_kb(body: KBCreate, who: str = Caller, srv: Server = This):
    note(model=body.name)
    docs = [(safe_doc_name(d.name), d.text.encode()) for d in body.documents]
    entry = await run_in_threadpool(srv.registry.create, who, body.name, docs, body.model)
    return JSONResponse(kb_body(body.name, entry), status_code=201)


@router.post("/v1/kbs/upload", status_code=201)
async def upload_kb(name: str = Form(...), files: list[UploadFile] = File(...), model: Optional[str] = Form(None),
                    who: str = Caller, srv: Server = This):
    note(model=name)
    entry = await run_in_threadpool(srv.registry.create, who, name, _files(files), model)
    return JSONResponse(kb_body(name, entry), status_code=201)


@router.put("/v1/kbs/{name}")
async def replace_kb(name: str, body: KBReplace, who: str = Caller, srv: Server = This):
    return await _replace(srv, who, name, [(safe_doc_name(d.name), d.text.encode()) for d in body.documents])


@router.put("/v1/kbs/{name}/upload")
async def replace_kb_upload(name: str, files: list[UploadFile] = File(...), who: str = Caller, srv: Server = This):
    return await _replace(srv, who, name, _files(files))


@router.delete("/v1/kbs/{name}")
async def delete_kb(name: str, who: str = Caller, srv: Server = This):
    note(model=name)
    folder = await run_in_threadpool(srv.registry.delete, who, name)
    srv.service.forget(who, folder)
    return {"id": name, "object": "knowledge_base", "deleted": True}


async def _replace(srv: Server, who: str, name: str, docs: list[tuple[str, bytes | BinaryIO]]) -> dict:
    note(model=name)
    folder = srv.registry.folder_for(who, name)
    entry = await run_in_threadpool(srv.registry.replace, who, name, docs)
    srv.service.forget(who, folder)
    return kb_body(name, entry)


def kb_body(name: str, entry) -> dict:
    kb = entry.kb
    lm = getattr(kb, "lm", None)
    return {"id": name, "object": "knowledge_base", "tokens": kb.tokens, "documents": [d.name for d in kb.docs],
            "build_seconds": kb.build_stats.seconds if kb.build_stats else None,
            "model": model_label(lm.name) if lm is not None else None}


def _files(files: list[UploadFile]) -> list[tuple[str, BinaryIO]]:
    """The uploads as the files the multipart parser spooled them to (to disk past 1 MB), not bytes in memory."""
    return [(safe_doc_name(f.filename or "", default_suffix=None), f.file) for f in files]
