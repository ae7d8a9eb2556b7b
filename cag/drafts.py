"""Drafts from the knowledge: the tokens an answer will likely go on with, looked up in what it was given.

Why: an answer from a knowledge base mostly repeats its words (names, figures, whole phrases), and the
knowledge's tokens are already at hand. So before a step, an answer's latest tokens are looked up in its
own tokens (question, history, answer so far) and in the knowledge base's, and the tokens that followed
them there are the draft. The engine verifies a row's last token and its draft in one step (their logits
are the bits one step each would give: cag.engines.base.Decoder), the answer keeps the draft tokens the
model chose too, and the first it did not choose is replaced by the model's own. A right draft saves
steps; a wrong one costs a little arithmetic and changes nothing in the answer.

How long a draft is adapts to the answer: it grows by a token while drafts are taken whole and shrinks to
what was taken when they are not, and no draft is tried where nothing matches. The decoder then keeps only
the draft tokens worth verifying (cag.engines.base.Decoder._drafts): the answer's share of right drafts so
far against what one more token costs a step, as measured while it runs. On a CPU the first extra token
of a small model's step is cheap (its weights are read and decoded once for both: +25-30 % of a step),
each further one costs about half a step, and a 262k-token vocabulary's output layer makes any extra
token nearly a whole step (bench/drafts.py).
"""

from __future__ import annotations

from typing import Sequence

LONGEST = 3  # tokens of the answer's end looked up: the longest match decides
SHORTEST = 2  # fewer matching tokens say too little about what follows
AGREE = 0.5  # at least this share of a run's occurrences go on with the same token
FIRST = 1  # draft tokens tried first
GROW = 1  # added to the next draft after one taken whole


class Index:
    """Each run of SHORTEST..LONGEST tokens of a knowledge base's tokens, with the token that most often
    follows it there (a majority vote over its occurrences, then counted), and where it first does; made once
    per knowledge base (0.6 s per 100k tokens on a 2-core EPYC)."""

    def __init__(self, ids: Sequence[int]):
        self.ids = list(ids)
        votes: dict[tuple[int, ...], list[int]] = {}  # run -> [candidate next token, its lead]
        for key, nxt, _ in self._runs():
            vote = votes.get(key)
            if vote is None:
                votes[key] = [nxt, 1]
            elif vote[0] == nxt:
                vote[1] += 1
            elif vote[1] == 0:
                vote[0], vote[1] = nxt, 1
            else:
                vote[1] -= 1
        self.runs: dict[tuple[int, ...], list[int]] = {}  # run -> [position of its next token, agreeing, all]
        for key, nxt, end in self._runs():
            run = self.runs.setdefault(key, [-1, 0, 0])
            run[2] += 1
            if nxt == votes[key][0]:
                run[1] += 1
                if run[0] < 0:
                    run[0] = end

    def _runs(self):
        for n in range(SHORTEST, LONGEST + 1):
            for end in range(n, len(self.ids)):  # a run at the very end has nothing after it
                yield tuple(self.ids[end - n:end]), self.ids[end], end

    def after(self, tail: tuple[int, ...]) -> int | None:
        """Where the knowledge goes on after `tail` (the position of the token that most often follows it),
        or None when it does not occur, or its occurrences go on too differently to be worth a draft."""
        run = self.runs.get(tail)
        if run is None or run[1] < run[2] * AGREE:
            return None
        return run[0]


class Drafter:
    """One answer's drafts (cag.engines.base.Drafter): its own tokens (question, then the answer as it
    grows) looked up first, the knowledge base's after them; a draft that was taken whole continues where
    it came from."""

    def __init__(self, index: Index, own: Sequence[int], most: int):
        self.index, self.own = index, list(own)
        self.most = max(0, most)
        self.size = min(FIRST, self.most)
        self.tried = self.right = 0  # draft tokens verified, and taken
        self.source: list[int] | None = None  # where the last draft came from, and where it left off
        self.at = 0

    def push(self, token: int) -> None:
        self.own.append(token)
        if self.source is not None:  # still on the same text: follow it; else look it up again
            if self.at < len(self.source) and self.source[self.at] == token:
                self.at += 1
            else:
                self.source = None

    def propose(self, limit: int) -> list[int]:
        limit = min(limit, self.size)
        if limit <= 0:
            return []
        if self.source is None or self.at >= len(self.source):
            self.source, self.at = self._lookup()
        if self.source is None:
            return []
        return self.source[self.at:self.at + limit]

    def rate(self) -> float:
        """The share of this answer's draft tokens the model took so far (1/2 before any): how likely the next
        one is right, which the decoder weighs against what verifying it costs."""
        return (self.right + 1) / (self.tried + 2)

    def verified(self, proposed: int, right: int) -> None:
        """Grow the next draft after one taken whole, shrink it to what was taken otherwise (at least 1)."""
        self.tried, self.right = self.tried + proposed, self.right + right
        if proposed and right == proposed:
            self.size = min(self.most, self.size + GROW)
        elif proposed:
            self.size = max(1, right + 1)

    def _lookup(self) -> tuple[list[int] | None, int]:
        own = self.own
        for n in range(LONGEST, SHORTEST - 1, -1):
            if len(own) < n:
                continue
            tail = own[-n:]
            for end in range(len(own) - 1, n - 1, -1):  # the latest earlier occurrence in its own tokens
                if own[end - n:end] == tail:
                    return own, end
            found = self.index.after(tuple(tail))
            if found is not None:
                return self.index.ids, found
        return None, 0
