"""Answers in a batch: a random prefix on a shared workspace for them to decode on, and a batch made to
happen (the first answer waits until the others reached the scheduler, so that a step runs them together
however the threads that ask are scheduled)."""

from __future__ import annotations

import random
import threading

import torch_direct as eu

from cag.engines.torch.workspace import Workspace
from cag.scheduler import Scheduler


def random_prefix(lm, tokens: int = 300, seed: int = 1):
    """`tokens` random ids and a Workspace holding their prefill: a knowledge base without documents."""
    rng = random.Random(seed)
    vocab = lm.model.config.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(tokens)]
    return prefix, Workspace(eu.prefill(lm, prefix))


def until(check, seconds: float, what: str) -> None:
    """Wait for `check()` (state another thread changes), failing after `seconds` with `what`."""
    pause = threading.Event()
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        pause.wait(0.01)
    assert check(), f"not within {seconds} s: {what}"


def first_waits_for_the_rest(sched: Scheduler, answers: int) -> None:
    """The first answer's question prefill waits until the other answers are queued, so the first step runs
    max_batch rows however the threads that ask are scheduled (later rows join as rows end)."""
    real_start, first = sched.decoder.start, []

    def start(job):
        if not first:
            first.append(job)
            until(lambda: len(sched._waiting) == answers - 1, 60, f"all {answers} answers reached the scheduler")
        return real_start(job)

    sched.decoder.start = start
