"""One completion, transport-free: a request -> Query (question, history, limits) -> response cache or the model.

Both OpenAI endpoints become the same Query, so they share one plan/answer path (limits, context-window
check, response cache, continuous batching, tenant checks). With continuous batching (on by default) every
answer is handed to its knowledge base's scheduler (cag.scheduler): it joins the answers in progress there at the
next decoding step and leaves when it ends (end of turn, stop string, max_tokens, client gone); each row is
computed as it would be alone, so answers are the same batched or not. Mapping from chat messages: system/developer
messages are honoured: their text (joined, in order) is a system message placed after the cached knowledge
(kb.prompt; the knowledge base's own instruction stays first, inside the cached prefix, which it leaves
unchanged), and it is part of the response-cache key; earlier user/assistant pairs become history turns
after the cached knowledge; the last message must be the user's question. With a conversation_id, turns stored server-side come first, and everything is trimmed to
the history token budget. A prompt completion's prompt is the question, with no history.

Every answer comes with the passages it rests on and whether they support it (cag.kb.grounding), as many
sources as the request's `cag.sources` asks (else the server's `sources`); with `unsupported` "refuse" an
unsupported answer is replaced by grounding.REFUSAL. The response cache keeps the model's own text and judges
it again for each request that hits it, so no request's options decide what another one is given.
"""

from __future__ import annotations

import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Callable

from ..errors import CagError, ContextLengthError
from ..kb.grounding import DEFAULT_SOURCES, decided
from ..kb.prompt import Turn
from ..sampling import Sampling
from ..scheduler import Batching
from . import conversations, guard
from .answered import Answered, Usage, judged_fields
from .config import ServerConfig
from .conversations import Conversations
from .http_errors import ApiError
from .metrics import Metrics
from .knowledge_bases import LoadedKB, KnowledgeBases
from .respcache import ResponseCache
from .schemas import ChatRequest, CompletionRequest, GenerationRequest


class Cancelled(Exception):
    """The client went away mid-stream: stop generating (the engine leaves the prefix intact)."""


@dataclass
class Query:
    """What one request asks, whichever endpoint it came through."""

    model: str  # the knowledge base's name as the caller knows it
    question: str
    history: list[Turn]
    max_tokens: int | None  # None: the server's default
    temperature: float | None
    top_p: float | None
    seed: int | None
    stop: tuple[str, ...] = ()
    conversation_id: str | None = None
    system: str | None = None  # the system/developer messages' text, placed after the cached knowledge
    sources: int | None = None  # sources given with the answer; None: the server's default
    unsupported: str | None = None  # "flag" or "refuse"; None: the server's default
    keep_alive: float | None = None  # seconds its model stays loaded once idle (inf: for ever); None: the server's
    draft: bool | None = None  # verify drafts from the knowledge; None: the server's default


@dataclass
class Plan:
    name: str
    folder: str
    entry: LoadedKB
    question: str
    history: list[Turn]
    sampling: Sampling
    max_tokens: int
    conversation: tuple | None
    flagged: bool
    key: tuple = field(default=())  # response-cache key, empty when not cacheable
    tenant: str = ""  # who asked: part of the response-cache key (no tenant learns what another asked)
    stop: tuple[str, ...] = ()  # the answer ends before the first of these strings
    system: str | None = None  # see Query.system
    sources: int = DEFAULT_SOURCES  # sources given with the answer
    unsupported: str = "flag"  # what an answer its sources do not hold gets: "flag" or "refuse"
    draft: bool = True  # verify drafts from the knowledge (the same tokens, sooner)
    done: Callable[[], object] = field(default=lambda: None, repr=False)  # lets the knowledge base go (once)


def chat_query(config: ServerConfig, req: ChatRequest) -> Query:
    guard.check_messages(config, req.messages)
    question, history, system = split_messages(req)
    return Query(req.model, question, history, req.max_completion_tokens or req.max_tokens, req.temperature,
                 req.top_p, req.seed, req.stop_sequences, req.conversation_id, system, **_answer_options(req))


def prompt_query(config: ServerConfig, req: CompletionRequest) -> Query:
    guard.check_prompt(config, req.prompt)
    question = req.prompt.strip()
    if not question:
        raise ApiError(400, "the prompt is empty", code="empty_question", param="prompt")
    return Query(req.model, question, [], req.max_tokens, req.temperature, req.top_p, req.seed, req.stop_sequences,
                 **_answer_options(req))


def _answer_options(req: GenerationRequest) -> dict:
    """The request's `cag` options (sources, unsupported) that it set; the rest are the server's defaults."""
    return {} if req.cag is None else {"sources": req.cag.sources, "unsupported": req.cag.unsupported,
                                       "draft": req.cag.draft}


def split_messages(req: ChatRequest) -> tuple[str, list[Turn], str | None]:
    """(question, history, system message) of a chat request; the system message is None without one."""
    system = "\n\n".join(t for m in req.messages if m.role in ("system", "developer") and (t := m.text.strip()))
    turns, pending = [], []
    talk = [m for m in req.messages if m.role in ("user", "assistant")]
    if not talk or talk[-1].role != "user":
        raise ApiError(400, "the last message must be the user's question", code="no_question")
    for m in talk[:-1]:
        if m.role == "user":
            pending.append(m.text)
        elif pending:
            turns.append(Turn("\n".join(pending), m.text))
            pending = []
    question = "\n".join(pending + [talk[-1].text]).strip()
    if not question:
        raise ApiError(400, "the question is empty", code="empty_question")
    return question, turns, system or None


class Trimmed:
    """Streams text as the whole answer reads: an answer is returned stripped of leading and trailing
    whitespace (KnowledgeBase.ask), so the stream drops whitespace before the first visible character and
    holds whitespace back until visible text follows it; what is still held at the end is never sent.
    The streamed pieces then add up to the non-streamed answer exactly."""

    def __init__(self, send: Callable[[str], None]):
        self.send, self.started, self.held = send, False, ""

    def push(self, text: str) -> None:
        if not self.started:
            text = text.lstrip()
            self.started = bool(text)
        pending = self.held + text
        visible = pending.rstrip()
        self.held = pending[len(visible):]
        if visible:
            self.send(visible)


class ChatService:
    def __init__(self, config: ServerConfig, registry: KnowledgeBases, metrics: Metrics):
        self.config, self.registry, self.metrics = config, registry, metrics
        self.cache = ResponseCache(config.response_cache_size, config.semantic_threshold) if config.response_cache else None
        self.conversations = Conversations()

    def plan(self, tenant: str, query: Query) -> Plan:
        """Check and resolve a request (blocking: may load the knowledge base)."""
        max_tokens = query.max_tokens or min(self.config.default_max_tokens, self.config.max_tokens_limit)
        if max_tokens > self.config.max_tokens_limit:
            raise ApiError(400, f"max_tokens {max_tokens} is over this server's limit of "
                                f"{self.config.max_tokens_limit}", code="max_tokens_too_large")
        flagged = guard.injection(self.config, query.question)
        if flagged:
            self.metrics.guard.labels("flagged").inc()
        folder = self.registry.folder_for(tenant, query.model)
        warm = self.registry.peek(folder) is not None
        entry = self.registry.lease(tenant, query.model)  # held until the answer ends (Plan.done)
        self.registry.models.keep(entry, query.keep_alive)
        try:
            plan = self._plan(tenant, query, folder, entry, warm, max_tokens, flagged)
        except BaseException:
            self.registry.release(entry)
            raise
        # a plan dropped without an answer (a stream whose client left before it began) lets go when collected
        plan.done = weakref.finalize(plan, self.registry.release, entry)
        return plan

    def _plan(self, tenant: str, query: Query, folder: str, entry: LoadedKB, warm: bool, max_tokens: int,
              flagged: bool) -> Plan:
        question, history = query.question, query.history
        # resident in this server, else the tier the prefix was loaded from (memory/host/disk/redis) or "built"
        self.metrics.kb_loads.labels("resident" if warm and self.registry.peek(folder) is entry
                                     else entry.kb.cache_source).inc()
        conv = (tenant, folder, query.conversation_id) if query.conversation_id else None
        if conv:
            history = self.conversations.get(conv) + history
        kb = entry.kb
        count = lambda text: len(kb.builder.tokenize(text))  # noqa: E731
        history = conversations.select(history, question, self.config.history_token_budget, count)
        try:
            kb.fit(question, history, max_tokens, system=query.system)  # the exact prompt length, as kb.ask checks it
        except ContextLengthError as err:
            raise ApiError(400, str(err), code="context_length_exceeded") from None
        sampling = Sampling(temperature=query.temperature or 0.0, seed=query.seed,
                            top_p=1.0 if query.top_p is None else query.top_p)
        plan = Plan(query.model, folder, entry, question, history, sampling, max_tokens, conv, flagged,
                    stop=query.stop, system=query.system,
                    sources=self.config.sources if query.sources is None else query.sources,
                    unsupported=query.unsupported or self.config.unsupported,
                    draft=self.config.draft if query.draft is None else query.draft)
        if self.cache is not None and sampling.greedy and not plan.stop:
            # what the answer depends on besides question, history and limit: the knowledge and the system message
            # (not `sources` nor `unsupported`: the cache keeps the model's text, judged again at each hit)
            context = entry.content_hash if query.system is None else f"{entry.content_hash}\nsystem:{query.system}"
            plan.key = (folder, context, question, tuple((t.question, t.answer) for t in history), max_tokens)
            plan.tenant = tenant
        return plan

    def cached(self, plan: Plan) -> Answered | None:
        """The response cache's answer, if it has one (then the knowledge base is let go: no model runs).

        The cache holds the model's text, never what a request's options made of it: its sources and the
        refusal are worked out again here for this request's question, `sources` and `unsupported` (the same
        text always gets the same sources, so a hit carries what a model answer would)."""
        if not plan.key:
            return None
        start = time.perf_counter()
        try:
            hit = self.cache.get(*plan.key, tenant=plan.tenant)
            judged = None if hit is None else judged_fields(
                plan.entry.kb.citer.judge(plan.question, hit.value["text"], plan.sources, plan.unsupported))
        except BaseException:
            plan.done()
            raise
        self.metrics.response_cache.labels(hit.kind if hit else "miss").inc()
        if hit is None:
            return None
        plan.done()
        result = Answered(**judged, finish_reason=hit.value["finish_reason"], usage=Usage.of(hit.value["usage"]),
                          response_cache=hit.kind, ttft_s=None, total_s=time.perf_counter() - start)
        self._finish(plan, result)
        return result

    def answer(self, plan: Plan, on_text: Callable[[str], None] | None = None,
               cancel: threading.Event | None = None) -> Answered:
        """Run the model (blocking). A set `cancel` stops it at the next token. `on_text` gets the answer's
        text as it is decoded, and those pieces add up to exactly the answer returned (see Trimmed).

        The model is always asked in "flag" mode, so that every token passes `emit` (where a client that left
        is noticed); with unsupported="refuse" nothing is sent until the answer is judged, then the answer
        (or the refusal) is sent whole, as KnowledgeBase.ask does in that mode."""
        streams = on_text is not None and plan.unsupported == "flag"
        trimmed = Trimmed(on_text) if streams else None

        def emit(text: str) -> None:
            if cancel is not None and cancel.is_set():
                raise Cancelled()
            if trimmed:
                trimmed.push(text)

        # with continuous batching the answer joins those in progress on its knowledge base (cag.scheduler)
        batching = Batching(self.config.max_batch, self.config.batch_window_ms / 1000) \
            if self.config.continuous_batching else None
        try:
            a = plan.entry.kb.ask(plan.question, history=plan.history, max_new_tokens=plan.max_tokens,
                                  sampling=plan.sampling, on_text=emit, stop=plan.stop, batching=batching,
                                  system=plan.system, sources=plan.sources, unsupported="flag",
                                  draft=None if plan.draft else 0)
        except CagError as err:
            raise ApiError(400, str(err), code="generation_failed") from None
        finally:
            plan.done()  # the model is done with it: the knowledge base may be let go
        usage = Usage(a.prompt_tokens, a.new_tokens, a.cached_tokens)
        result = Answered(**judged_fields(decided(vars(a), plan.unsupported)), finish_reason=a.finish_reason,
                          usage=usage, ttft_s=a.ttft_s, total_s=a.total_s, cache_source=a.cache_source,
                          mode=a.mode, draft={"drafted": a.drafted, "accepted": a.accepted})
        if on_text is not None and not streams and result.text:
            on_text(result.text)
        if plan.key:  # the model's own text: what a hit makes of it depends on that request's options
            self.cache.put(*plan.key, {"text": a.answer, "usage": usage.to_dict(), "finish_reason": a.finish_reason},
                           tenant=plan.tenant)
        self._finish(plan, result)
        return result

    def _finish(self, plan: Plan, result: Answered) -> None:
        self.metrics.answered(result.usage.to_dict(), result.ttft_s, result.total_s, bool(result.response_cache))
        self.metrics.grounded(result.supported, result.grounding_s)
        self.metrics.drafted(result.draft)
        if plan.conversation:  # what the user was given (the refusal, when the answer was refused)
            self.conversations.add(plan.conversation, Turn(plan.question, result.text))

    def forget(self, tenant: str, folder: str) -> None:
        """A knowledge base changed or went away: drop its cached answers and conversations."""
        if self.cache is not None:
            self.cache.drop(folder)
        self.conversations.drop_kb(tenant, folder)
