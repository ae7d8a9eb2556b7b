"""Answers as rows on one shared prefix, whatever the engine: one answer inline, or several decoded together.

Every answer is a Job on a Decoder (cag.engines.base): start() runs its question and gives its first
token, step() one more token for every listed job, finish() hands its row back. The same calls serve an
answer decoded alone in its caller's thread (`tokens`), a fixed set decoded together (`together`) and the
continuous batching of cag.scheduler, so an answer is computed the same way on every path.
"""

from __future__ import annotations

from typing import Iterator

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


def together(decoder: Decoder, jobs: list[Job]) -> list[list[int]]:
    """Every job's tokens, decoded together one step for all (throughput: all arrive when the longest ends)."""
    out: list[list[int]] = [[] for _ in jobs]
    try:
        for i, job in enumerate(jobs):
            token = decoder.start(job)
            if token is not None:
                out[i].append(token)
        while active := [i for i, j in enumerate(jobs) if not j.done]:
            for i, token in zip(active, decoder.step([jobs[i] for i in active])):
                if token is not None:
                    out[i].append(token)
    finally:
        for job in jobs:
            decoder.finish(job)
    return out
