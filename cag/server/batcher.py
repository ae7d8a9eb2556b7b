"""Micro-batching: greedy, non-streaming, history-free requests on one knowledge base that arrive within a
short window are answered together by `KnowledgeBase.ask_many` (one decode step for all of them).

Off unless `batch_window_ms` > 0: the batched path computes attention in a different order (exactly merged,
but not bit-for-bit the same), so answers can differ from one-at-a-time answers in rare near-ties
(bench/batch.py measures how often). A request alone in its window takes the ordinary path.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

from .. import engine
from ..api import Answer, KnowledgeBase


@dataclass
class _Job:
    question: str
    max_tokens: int
    done: threading.Event = field(default_factory=threading.Event)
    answer: Answer | None = None
    error: BaseException | None = None


class Batcher:
    def __init__(self, window_ms: float, max_batch: int):
        self.window_s, self.max_batch = window_ms / 1000, max(1, max_batch)
        self._lock = threading.Lock()
        self._queues: dict[int, list[_Job]] = {}

    def ask(self, kb: KnowledgeBase, question: str, max_tokens: int) -> Answer:
        """Join (or lead) the batch forming for this knowledge base; block until this question's answer."""
        job = _Job(question, max_tokens)
        key = id(kb)
        with self._lock:
            queue = self._queues.setdefault(key, [])
            queue.append(job)
            leader = len(queue) == 1
        if not leader:
            job.done.wait()
            if job.error is not None:
                raise job.error
            return job.answer
        deadline = time.perf_counter() + self.window_s
        while time.perf_counter() < deadline:
            with self._lock:
                if len(self._queues[key]) >= self.max_batch:
                    break
            time.sleep(0.001)
        with self._lock:
            jobs = self._queues.pop(key)
        try:
            if len(jobs) == 1:
                job.answer = kb.ask(question, max_new_tokens=max_tokens)
            else:
                longest = max(j.max_tokens for j in jobs)
                for j, a in zip(jobs, kb.ask_many([j.question for j in jobs], max_new_tokens=longest)):
                    j.answer = _truncate(kb, a, j.max_tokens)  # greedy: a prefix of the longer answer
        except BaseException as err:  # noqa: BLE001 - every waiter gets the same failure
            for j in jobs:
                j.error = err
        for j in jobs:
            j.done.set()
        if job.error is not None:
            raise job.error
        return job.answer


def _truncate(kb: KnowledgeBase, a: Answer, n: int) -> Answer:
    if a.new_tokens <= n:
        return a
    ids = a.token_ids[:n]
    text = engine.detokenize(kb.lm.tokenizer, ids).strip()
    return Answer(**{**a.to_dict(), "token_ids": ids, "answer": text, "new_tokens": n, "finish_reason": "length"})
