"""The one completion path of every endpoint that answers (OpenAI's chat and prompt completions, Ollama's chat
and generate): checks, plan, response cache or the model in the generation pool, metrics and the access log.

Endpoints differ only in how they word what comes out, so each takes the answer from here (whole, or as the
stream of its text pieces) and formats it; no endpoint runs the model another way. That is what keeps their
answers token-identical, their limits the same and the response cache shared.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from concurrent.futures import Executor
from dataclasses import dataclass
from typing import AsyncIterator, Callable

from starlette.concurrency import run_in_threadpool

from . import guard
from .answered import Answered
from .chat import Cancelled, ChatService, Plan, Query
from .http_errors import ApiError
from .metrics import Metrics
from .middleware import note, server_error
from .schemas import GenerationRequest

log = logging.getLogger("cag.server")


@dataclass
class Done:
    """The last item of a stream that answered: the whole result (usage, finish reason, sources…)."""

    result: Answered


@dataclass
class Failed:
    """The last item of a stream that failed once it had begun: the status and the OpenAI-shaped error body."""

    status: int
    body: dict


class Completions:
    def __init__(self, service: ChatService, metrics: Metrics, pool: Executor):
        self.service, self.metrics, self.pool = service, metrics, pool

    async def start(self, who: str, req: GenerationRequest, query: Callable[[], Query]) -> tuple[Plan, Answered | None]:
        """Check and plan a request, and look it up in the response cache: (plan, the cached result or None).
        A refused request is counted and raised (ApiError) before any response begins."""
        note(model=req.model)
        try:
            guard.check_parameters(req)
            plan = await run_in_threadpool(self.service.plan, who, query())
            hit = await run_in_threadpool(self.service.cached, plan)
        except ApiError as err:
            self.metrics.requests.labels(str(err.status)).inc()
            raise
        return plan, hit

    async def whole(self, plan: Plan, hit: Answered | None) -> Answered:
        """The answer, all at once (the cached one, or the model's from the generation pool)."""
        try:
            result = hit or await asyncio.get_running_loop().run_in_executor(self.pool, self.service.answer, plan)
        except ApiError as err:
            self.metrics.requests.labels(str(err.status)).inc()
            raise
        except Exception:
            self.metrics.requests.labels("500").inc()
            raise
        self.metrics.requests.labels("200").inc()
        note_usage(result)
        return result

    async def stream(self, plan: Plan, hit: Answered | None) -> AsyncIterator[str | Done | Failed]:
        """The answer's text pieces as they are decoded (they add up to the whole answer), then Done, or Failed
        when it fails midway (a response has begun by then, so the error must travel inside it). A client
        that goes away stops the generation at its next token."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancel = threading.Event()
        try:
            if hit is None:
                future = loop.run_in_executor(
                    self.pool, self.service.answer, plan, lambda t: loop.call_soon_threadsafe(queue.put_nowait, t),
                    cancel)
                future.add_done_callback(lambda _f: queue.put_nowait(None))
                future.add_done_callback(lambda f: self._stopped(plan, f))
                while (text := await queue.get()) is not None:
                    yield text
                result = future.result()
            else:
                result = hit
                yield hit.text
        except Exception as err:  # noqa: BLE001 - a stream that fails still ends, with the error inside it
            if isinstance(err, ApiError):
                status, body = err.status, err.body()
            else:
                log.error("generation failed on %r", plan.name, exc_info=err)
                status, body = 500, server_error()
            self.metrics.requests.labels(str(status)).inc()
            note(error=body["error"]["code"])
            yield Failed(status, body)
            return
        finally:
            cancel.set()
        self.metrics.requests.labels("200").inc()
        note_usage(result)
        yield Done(result)

    def _stopped(self, plan: Plan, future: asyncio.Future) -> None:
        """Count a generation that ended because its client went away (the cancel event stopped it early)."""
        if not future.cancelled() and isinstance(future.exception(), Cancelled):
            self.metrics.requests.labels("cancelled").inc()
            log.info("stopped generating on %r: the client went away", plan.name)


def note_usage(result: Answered) -> None:
    u = result.usage
    note(prompt_tokens=u.prompt_tokens, completion_tokens=u.completion_tokens, cached_tokens=u.cached_tokens,
         response_cache=result.response_cache)
