"""Answers as rows on one shared prefix, whatever the engine: one answer inline, or several decoded together.

Every answer is a Job on a Decoder (cag.engines.base): start() runs its question and gives its first
token, step() one more token for every listed job, finish() hands its row back. The same calls serve an
answer decoded alone in its caller's thread (`tokens`), a fixed set decoded together (`together`) and the
continuous batching of cag.scheduler, so an answer is computed the same way on every path.
"""

from __future__ import annotations

from typing import Callable, Iterator

from .engines.base import Decoder, Job


def tokens(decoder: Decoder, job: Job) -> Iterator[int]:
    """Yield `job`'s tokens as they are decoded in this thread; closing the generator ends the answer
    (its row goes back at once, and no step is run for a token nobody will read)."""
    try:
        token = decoder.start(job)
        while token is not None:
            yield token
            if job.done:
                return
            token = decoder.step([job])[0]
    finally:
        decoder.finish(job)


def together(decoder: Decoder, jobs: list[Job], ended: Callable[[int, int], bool] | None = None) -> list[list[int]]:
    """Every job's tokens, decoded together one step for all (throughput: all arrive when the longest ends).
    `ended(i, token)` says that job i's answer is over after `token` (its text now shows a stop string):
    that row takes no more steps, as an answer decoded alone stops there."""
    out: list[list[int]] = [[] for _ in jobs]

    def take(i: int, token: int | None) -> None:
        if token is not None:
            out[i].append(token)
            if ended is not None and ended(i, token):  # every token is read, the last one too
                jobs[i].done = True

    try:
        for i, job in enumerate(jobs):
            take(i, decoder.start(job))
        while active := [i for i, j in enumerate(jobs) if not j.done]:
            for i, token in zip(active, decoder.step([jobs[i] for i in active])):
                take(i, token)
    finally:
        for job in jobs:
            decoder.finish(job)
    return out
