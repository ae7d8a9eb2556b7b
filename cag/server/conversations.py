"""Server-side conversations: earlier turns kept by conversation id, trimmed to a token budget.

The turns go after the cached knowledge prefix (cag's `history`), so the knowledge is never prefilled
again. When they outgrow the budget, the most recent turn is always kept (follow-ups like "and why?"
need it) and the rest are ranked by word overlap with the new question; the chosen turns keep their
original order.
"""

from __future__ import annotations

import re
import threading
from collections import OrderedDict
from typing import Callable, Sequence

from ..kb.prompt import Turn

MAX_TURNS = 200  # per conversation; older ones are forgotten
MAX_CONVERSATIONS = 10_000


def _words(text: str) -> set[str]:
    return set(re.findall(r"\w+", text.lower()))


def select(turns: Sequence[Turn], question: str, budget: int, count: Callable[[str], int]) -> list[Turn]:
    """The turns to send: all of them if they fit, else the latest plus the most relevant ones that fit."""
    sizes = [count(t.question) + count(t.answer) for t in turns]
    if sum(sizes) <= budget:
        return list(turns)
    q = _words(question)

    def relevance(i: int) -> float:
        w = _words(turns[i].question + " " + turns[i].answer)
        return len(q & w) / (len(q | w) or 1)

    chosen, used = set(), 0
    order = [len(turns) - 1] + sorted(range(len(turns) - 1), key=lambda i: (-relevance(i), -i))
    for i in order:
        if used + sizes[i] <= budget:
            chosen.add(i)
            used += sizes[i]
    return [turns[i] for i in sorted(chosen)]


class Conversations:
    def __init__(self):
        self._lock = threading.Lock()
        self._turns: OrderedDict[tuple, list[Turn]] = OrderedDict()

    def get(self, key: tuple) -> list[Turn]:
        with self._lock:
            return list(self._turns.get(key, ()))

    def add(self, key: tuple, turn: Turn) -> None:
        with self._lock:
            turns = self._turns.setdefault(key, [])
            turns.append(turn)
            del turns[: max(0, len(turns) - MAX_TURNS)]
            self._turns.move_to_end(key)
            while len(self._turns) > MAX_CONVERSATIONS:
                self._turns.popitem(last=False)

    def drop_kb(self, tenant: str, folder: str) -> None:
        with self._lock:
            for key in [k for k in self._turns if k[:2] == (tenant, folder)]:
                del self._turns[key]
