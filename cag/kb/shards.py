"""Knowledge too large for one context: shards on document boundaries, each with its own cache.

A question goes to the one shard whose text scores best for it under BM25 (bm25s), and is answered
from that shard's cache exactly as a single knowledge base would answer it. The answer names the shard.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from typing import Sequence

import bm25s

from ..errors import KnowledgeError
from ..results import BuildStats
from .grounding import Citer
from .knowledge import Document
from .passages import PassageIndex
from .prompt import PromptBuilder


def plan(docs: Sequence[Document], tokenizer, instruction: str, fits: int, context: int, reserve: int) -> list[list[Document]]:
    """Greedy groups of consecutive documents whose prompt prefix fits; a single document too big is refused."""
    groups: list[list[Document]] = []
    current: list[Document] = []
    for doc in docs:
        if _tokens(current + [doc], tokenizer, instruction) <= fits:
            current.append(doc)
            continue
        alone = _tokens([doc], tokenizer, instruction)
        if alone > fits:
            raise KnowledgeError(
                f"document {doc.name!r} alone is {alone} tokens, but a shard holds at most {fits} (context window "
                f"{context} minus {reserve} reserved); shards split only between documents: split this file, "
                "lower --reserve or use a model with a longer context"
            )
        groups.append(current)
        current = [doc]
    return [g for g in groups + [current] if g]


def shard_name(name: str, i: int) -> str:
    return f"{name}.shard{i}"


def _tokens(docs: list[Document], tokenizer, instruction: str) -> int:
    return len(PromptBuilder(tokenizer, docs, instruction).prefix_ids())


class Router:
    """BM25 over each shard's text; picks the shard a question is most about."""

    def __init__(self, texts: Sequence[str]):
        self.retriever = bm25s.BM25()
        self.retriever.index(bm25s.tokenize(list(texts), stopwords="en", show_progress=False), show_progress=False)

    def scores(self, question: str) -> list[float]:
        words = bm25s.tokenize([question], stopwords="en", return_ids=False, show_progress=False)[0]
        words = [w for w in words if w in self.retriever.vocab_dict]
        if not words:
            return [0.0] * self.retriever.scores["num_docs"]
        return [float(s) for s in self.retriever.get_scores(words)]

    def best(self, question: str) -> int:
        scores = self.scores(question)
        return max(range(len(scores)), key=lambda i: (scores[i], -i))


@dataclass
class ShardedKnowledgeBase:
    """Several knowledge bases behind one name; `ask` routes each question to one of them."""

    name: str
    shards: list  # list[api.KnowledgeBase]
    router: Router
    _citer: tuple | None = field(default=None, repr=False)  # (the shards' citers it was made from, the merged one)

    @classmethod
    def of(cls, name: str, shards: list) -> "ShardedKnowledgeBase":
        return cls(name, shards, Router(["\n\n".join(f"{d.name}\n{d.text}" for d in kb.docs) for kb in shards]))

    @property
    def lm(self):
        return self.shards[0].lm

    @property
    def docs(self) -> list[Document]:
        return [d for kb in self.shards for d in kb.docs]

    @property
    def tokens(self) -> int:
        return sum(kb.tokens for kb in self.shards)

    @property
    def cache_source(self) -> str:
        return ",".join(sorted({kb.cache_source for kb in self.shards}))

    @property
    def build_stats(self):
        return self.shards[0].build_stats and _sum_stats([kb.build_stats for kb in self.shards])

    @property
    def builder(self):
        """For counting tokens of user text (the same in every shard: one model, one template)."""
        return self.shards[0].builder

    @property
    def manifest(self) -> dict:
        """What identifies this knowledge base's content: every shard's knowledge hash and build time."""
        parts = [kb.manifest for kb in self.shards]
        joined = "".join(m.get("knowledge", {}).get("sha256", "") + m.get("created", "") for m in parts)
        return {"knowledge": {"sha256": hashlib.sha256(joined.encode()).hexdigest(),
                              "documents": sum(m.get("knowledge", {}).get("documents", 0) for m in parts)},
                "created": max((m.get("created", "") for m in parts), default=""),
                "tokens": self.tokens, "shards": [kb.name for kb in self.shards]}

    @property
    def nbytes(self) -> int:
        return sum(kb.nbytes for kb in self.shards)

    def release(self) -> None:
        for kb in self.shards:
            kb.release()

    def route(self, question: str):
        return self.shards[self.router.best(question)]

    @property
    def citer(self) -> Citer:
        """Sources from every shard's passages: an answer cites across the whole knowledge base (made again
        when a shard reloaded with another index)."""
        parts = tuple(kb.citer for kb in self.shards)
        if self._citer is None or self._citer[0] != parts:
            self._citer = (parts, Citer(PassageIndex.merge([c.index for c in parts])))
        return self._citer[1]

    def ask(self, question: str, **kwargs):
        """Answer from the best shard's cache, with sources from all of them; Answer.shard says which one."""
        kb = self.route(question)
        answer = kb.ask(question, citer=self.citer, **kwargs)
        answer.shard = kb.name
        return answer

    def fit(self, question: str, history=(), max_new_tokens: int = 256, system: str | None = None):
        return self.route(question).fit(question, history, max_new_tokens, system=system)

    def trim_history(self, question: str, history, max_new_tokens: int = 256, system: str | None = None):
        return self.route(question).trim_history(question, history, max_new_tokens, system=system)

    def ask_many(self, questions: Sequence[str], **kwargs) -> list:
        """Each shard decodes its own questions together; answers come back in the order asked."""
        groups: dict[int, list[int]] = {}
        for i, q in enumerate(questions):
            groups.setdefault(self.router.best(q), []).append(i)
        answers: list = [None] * len(questions)
        for shard, members in groups.items():
            kb = self.shards[shard]
            for i, answer in zip(members, kb.ask_many([questions[i] for i in members], citer=self.citer, **kwargs)):
                answer.shard = kb.name
                answers[i] = answer
        return answers


def _sum_stats(stats: list):
    if any(s is None for s in stats):
        return None
    return BuildStats(sum(s.tokens for s in stats), sum(s.seconds for s in stats), sum(s.file_bytes for s in stats),
                      sum(s.reused for s in stats), sum(s.prefilled or 0 for s in stats), f"{len(stats)} shards")
