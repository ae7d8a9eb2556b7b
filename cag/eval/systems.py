"""The systems under test. All share one model, one instruction, one prompt layout and one decoding loop.

cag         the knowledge base's cached prefix; only the question's tokens run per question
in-context  the same knowledge base asked with use_cache=False: the whole prompt runs every question
bm25@k      a prompt holding only the top-k BM25 chunks, run from scratch with cag's generation loop
dense@k     the same with MiniLM top-k chunks

cag and in-context answers come with the knowledge base's sources and support (cag.kb.grounding); a RAG
system's sources are the chunks it retrieved, best first, and it gives no support signal.

Build cost is what a system does once before its first question: cag's prefill (+ writing the cache),
nothing for in-context, the index for RAG (chunk embedding for dense; the embedder load is excluded).
"""

from __future__ import annotations

import contextlib
import os
import re
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

from .. import api, decode
from ..engines.base import Job
from ..kb import knowledge
from ..kb.prompt import DEFAULT_INSTRUCTION, PromptBuilder
from ..stoptext import StopText
from . import retrieval
from .dataset import Dataset
from ..errors import EvalError


@dataclass
class Reply:
    answer: str
    ttft_s: float
    total_s: float
    prompt_tokens: int  # tokens the model computed for this question's prompt
    context_tokens: int  # tokens of the whole prompt it conditioned on (cached + computed)
    retrieved: list[str] = field(default_factory=list)  # chunk texts a RAG system put in the prompt
    sources: list[str] = field(default_factory=list)  # the texts it cites, first source first
    supported: bool | None = None  # cag's support signal (None: the system gives none)
    support: float | None = None
    grounding_s: float | None = None


class KbSystems:
    """One cag knowledge base per dataset, shared by the `cag` and `in-context` systems."""

    def __init__(self, dataset: Dataset, lm, name_prefix: str = "eval"):
        self.dataset, self.lm = dataset, lm
        # the pid keeps a user's own knowledge base of the same name from being overwritten and deleted
        self.name = re.sub(r"[^A-Za-z0-9._-]+", "-", f"{name_prefix}-{os.getpid()}-{dataset.name}")[:64]
        self.kb: api.KnowledgeBase | None = None
        self.build_s = 0.0

    def ensure(self) -> api.KnowledgeBase:
        if self.kb is None:
            with tempfile.TemporaryDirectory(prefix="cag-eval-") as folder:
                files = []
                for doc in titled(self.dataset):
                    path = Path(folder) / doc["name"]
                    path.write_text(doc["text"], encoding="utf-8")
                    files.append(path)
                start = time.perf_counter()
                self.kb = api.build(files, self.name, lm=self.lm, log=lambda _msg: None)
                self.build_s = time.perf_counter() - start
        return self.kb

    def close(self) -> None:
        if self.kb is not None:
            api.delete(self.name)


class CacheSystem:
    def __init__(self, shared: KbSystems, use_cache: bool):
        self.shared, self.use_cache = shared, use_cache
        self.name = "cag" if use_cache else "in-context"

    def build(self) -> float:
        self.shared.ensure()
        return self.shared.build_s if self.use_cache else 0.0

    def answer(self, question: str, max_new_tokens: int) -> Reply:
        a = self.shared.kb.ask(question, use_cache=self.use_cache, max_new_tokens=max_new_tokens)
        return Reply(a.answer, a.ttft_s, a.total_s, a.question_tokens, a.prompt_tokens,
                     sources=[s.snippet for s in a.sources], supported=a.supported, support=a.support,
                     grounding_s=a.grounding_s)


class RagSystem:
    def __init__(self, kind: str, k: int, index, chunks: list[retrieval.Chunk], lm, build_s: float,
                 instruction: str = DEFAULT_INSTRUCTION):
        self.name, self.k, self.index, self.chunks, self.lm = f"{kind}@{k}", k, index, chunks, lm
        self.build_s, self.instruction = build_s, instruction

    def build(self) -> float:
        return self.build_s

    def answer(self, question: str, max_new_tokens: int) -> Reply:
        start = time.perf_counter()
        picked = [self.chunks[i] for i in self.index.top(question, self.k)]
        builder = PromptBuilder(self.lm.codec, [knowledge.Document(c.name, c.text) for c in picked], self.instruction)
        ids = builder.split(question).ids
        stream, ttft = self.lm.codec.stream(), None
        cut = StopText((), builder.endings)  # where the layout ends an answer, as for the cached systems
        empty = self.lm.prefill([], [])  # the whole prompt runs as the question, from scratch
        try:
            job = Job(ids, 0, max_new_tokens, stops=frozenset(self.lm.stop_ids))
            with contextlib.closing(decode.tokens(self.lm.decoder(empty), job)) as tokens:
                for token in tokens:
                    ttft = ttft if ttft is not None else time.perf_counter() - start
                    cut.push(stream.push(token))
                    if cut.stopped:
                        break
        finally:
            empty.release()
        cut.push(stream.flush())
        cut.flush()
        total = time.perf_counter() - start
        texts = [c.text for c in picked]
        return Reply(cut.text.strip(), ttft if ttft is not None else total, total, len(ids), len(ids),
                     texts, sources=texts)  # the top retrieved chunk is its first source


def make(dataset: Dataset, lm, names: list[str], top_k: list[int], embedder_factory,
         chunk_tokens: int = retrieval.DEFAULT_CHUNK_TOKENS) -> tuple[list, KbSystems]:
    """The requested systems for one dataset (RAG indexes are built here, timed, once per retriever)."""
    check(names, top_k)
    shared = KbSystems(dataset, lm)
    systems: list = []
    count = lambda text: len(lm.codec.encode(text))  # noqa: E731
    chunks = None
    for name in names:
        if name in ("cag", "in-context"):
            systems.append(CacheSystem(shared, use_cache=name == "cag"))
            continue
        chunks = chunks or retrieval.chunk_documents(titled(dataset), count, chunk_tokens)
        if name == "dense":
            embedder_factory()  # loading the embedder is not part of the index's build cost
        start = time.perf_counter()
        index = retrieval.make(name, chunks, embedder_factory)
        build_s = time.perf_counter() - start
        systems += [RagSystem(name, k, index, chunks, lm, build_s) for k in top_k]
    return systems, shared


def check(names: list[str], top_k: list[int]) -> None:
    """Refuse bad options before minutes go into loading models and building caches."""
    unknown = set(names) - {"cag", "in-context", "bm25", "dense"}
    if unknown or not names:
        raise EvalError(f"unknown system(s) {', '.join(sorted(unknown)) or '(none given)'}: "
                        "choose from cag, in-context, bm25, dense")
    if not top_k or any(k < 1 for k in top_k):
        raise EvalError("--top-k values must be 1 or more")


def titled(dataset: Dataset) -> list[dict]:
    """Documents as every system shows them: the file name cag.build gives them, normalized text."""
    return [{"name": f"{i:03d}-{_slug(d['name'])}.md", "text": knowledge.normalize(d["text"])}
            for i, d in enumerate(dataset.documents)]


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip("-")[:60] or "doc"
