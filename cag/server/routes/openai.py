"""OpenAI's API: models (the knowledge bases), chat completions and prompt completions, whole or streamed
as server-sent events. Both completion routes take their answer from the one completion path and differ
only in its wording (cag.server.schemas.Shape)."""

from __future__ import annotations

import json
import time
import uuid
from contextlib import aclosing
from typing import Callable

from fastapi import APIRouter
from fastapi.responses import JSONResponse, StreamingResponse

from ... import engines
from ...registry import model_label
from ..answered import Answered
from ..chat import Plan, Query, chat_query, prompt_query
from ..completion import Failed
from ..middleware import note
from ..schemas import CHAT, TEXT, ChatRequest, CompletionRequest, GenerationRequest, Shape
from ..state import Caller, Server, This

router = APIRouter()


@router.get("/v1/models")
def list_models(who: str = Caller, srv: Server = This):
    return {"object": "list", "data": [model_row(r) for r in srv.registry.list(who)]}


@router.get("/v1/models/{model_id}")
def retrieve_model(model_id: str, who: str = Caller, srv: Server = This):
    note(model=model_id)
    return model_row(srv.registry.row(who, model_id))


@router.post("/v1/chat/completions")
async def chat(req: ChatRequest, who: str = Caller, srv: Server = This):
    return await complete(srv, who, req, lambda: chat_query(srv.config, req), CHAT)


@router.post("/v1/completions")
async def completions(req: CompletionRequest, who: str = Caller, srv: Server = This):
    return await complete(srv, who, req, lambda: prompt_query(srv.config, req), TEXT)


async def complete(srv: Server, who: str, req: GenerationRequest, query: Callable[[], Query], shape: Shape):
    """Both completion routes: the one completion path, in the route's shape, streamed or whole."""
    plan, hit = await srv.completer.start(who, req, query)
    reply = Reply(plan, shape)
    if req.stream:
        include_usage = bool(req.stream_options and req.stream_options.include_usage)
        return StreamingResponse(reply.events(srv.completer.stream(plan, hit), include_usage),
                                 media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    return JSONResponse(reply.whole(await srv.completer.whole(plan, hit)))


class Reply:
    """One completion's response in OpenAI's shape: its id and time, the whole body, or its event stream."""

    def __init__(self, plan: Plan, shape: Shape):
        self.plan, self.shape = plan, shape
        self.id, self.created = f"{shape.id_prefix}-{uuid.uuid4().hex}", int(time.time())

    def whole(self, result: Answered) -> dict:
        return {"id": self.id, "object": self.shape.object, "created": self.created, "model": self.plan.name,
                "choices": [self.shape.choice(result.text, result.finish_reason)],
                "usage": result.usage.openai(), "cag": result.cag(self.plan)}

    def chunk(self, choice: dict | None, **more: dict) -> str:
        body = {"id": self.id, "object": self.shape.chunk_object, "created": self.created, "model": self.plan.name,
                "choices": [] if choice is None else [choice], **more}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    async def events(self, stream, include_usage: bool):
        """The answer's pieces as chunks, then the last chunk(s) and [DONE]; a stream that fails midway still
        ends with an error event and [DONE]. A client gone stops the generation (aclosing)."""
        if self.shape.opening is not None:
            yield self.chunk(self.shape.opening)
        async with aclosing(stream) as pieces:
            async for event in pieces:
                if isinstance(event, str):
                    yield self.chunk(self.shape.piece(event, None))
                elif isinstance(event, Failed):
                    yield f"data: {json.dumps(event.body)}\n\n"
                    yield "data: [DONE]\n\n"
                    return
                else:
                    result = event.result
        for line in self.ending(result, include_usage):
            yield line

    def ending(self, result: Answered, include_usage: bool) -> list[str]:
        """The last chunk before [DONE] carries cag's object (sources, support): the usage chunk when asked for."""
        more = {"cag": result.cag(self.plan)}
        last = [self.chunk(self.shape.piece(None, result.finish_reason), **({} if include_usage else more))]
        if include_usage:
            last.append(self.chunk(None, usage=result.usage.openai(), **more))
        return last + ["data: [DONE]\n\n"]


def model_row(row: dict) -> dict:
    """A knowledge base as an OpenAI model row; `root` names the language model it was built with and is
    answered by (as vLLM's rows name theirs), and `cag` carries cag's own numbers (tokens and documents also
    stay at the top level)."""
    root = model_label(row.get("model") or engines.DEFAULT_MODEL)
    return {"id": row["name"], "object": "model", "created": _epoch(row.get("created")), "owned_by": row["owned_by"],
            "root": root, "tokens": row.get("tokens"), "documents": row.get("documents"),
            "cag": {"model": root, "engine": row.get("engine") or "torch", "tokens": row.get("tokens"),
                    "documents": row.get("documents"), "created": row.get("created")}}


def _epoch(created: str | None) -> int:
    try:
        return int(time.mktime(time.strptime(created, "%Y-%m-%dT%H:%M:%SZ")) - time.timezone)
    except (TypeError, ValueError):
        return 0
