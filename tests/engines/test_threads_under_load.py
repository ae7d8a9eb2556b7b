"""Threads that hold up under load: a model whose thread count was not given takes, at each step, the cores
other work leaves idle (cag.engines.cores); a count the user gave is kept; and answers are the same bits
whatever the count (each output row is computed whole by one thread).

The load is busy-loop processes started and stopped here, one per core this process may run on."""

from __future__ import annotations

import multiprocessing
import os
import time
from contextlib import contextmanager

from conftest import SAMPLE_DOCS

import cag
from cag import engines
from cag.engines.cores import EVERY_S, Cores

QUESTIONS = ["How many vacation days do I get?", "Who is the CEO?"]


def _spin() -> None:
    while True:
        pass


@contextmanager
def busy_cores():
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in os.sched_getaffinity(0)]
    for p in spinners:
        p.start()
    time.sleep(2 * EVERY_S)
    try:
        yield
    finally:
        for p in spinners:
            p.terminate()
            p.join(10)


def _settled(cores: Cores) -> int:
    """The advice once it has looked at the cores over a whole interval."""
    for _ in range(3):
        time.sleep(EVERY_S * 1.2)
        cores.threads()
    return cores.threads()


def test_every_core_busy_leaves_one_thread():
    most = max(2, len(os.sched_getaffinity(0)))
    cores = Cores(most)
    with busy_cores():
        assert _settled(cores) == 1
    work = time.process_time() + 3 * EVERY_S  # this process's own work is not other work
    while time.process_time() < work:
        cores.threads()
    assert cores.threads() >= 1


def test_a_given_count_is_kept(smollm2_gguf, monkeypatch):
    monkeypatch.delenv("CAG_THREADS", raising=False)
    given = engines.load(str(smollm2_gguf), threads=2, log=lambda _m: None)
    default = engines.load(str(smollm2_gguf), log=lambda _m: None)
    try:
        assert given.cores is None and isinstance(default.cores, Cores)
    finally:
        given.close()
        default.close()


class Fixed:
    """A thread count that does not look at the cores: the fixed counts the adaptive one is compared with."""

    def __init__(self, n: int):
        self.n = n

    def threads(self) -> int:
        return self.n


def _answers(kb) -> list[str]:
    return [kb.ask(q, max_new_tokens=16, sources=0).answer for q in QUESTIONS]


def test_gguf_answers_are_the_same_for_every_thread_count_and_under_load(smollm2_gguf, gguf_engines, cag_home):
    kb = cag.build([SAMPLE_DOCS], name="threads", model=str(smollm2_gguf), lm=gguf_engines(smollm2_gguf),
                   log=lambda _m: None)
    ctx = kb.prefix.ctx
    got = {}
    for n in (2, 1):
        ctx.cores = Fixed(n)
        got[n] = _answers(kb)
    ctx.cores = Cores(2)
    try:
        with busy_cores():
            got["loaded"] = _answers(kb)
            assert ctx.threads == 1  # the adaptive count did step down
    finally:
        ctx.cores = None
    assert got[2] == got[1] == got["loaded"]


def test_torch_answers_are_the_same_for_every_thread_count_and_under_load(real_lm, real_home, monkeypatch):
    import torch

    monkeypatch.setenv("CAG_HOME", str(real_home))
    kb = cag.build([SAMPLE_DOCS], name="threads", lm=real_lm, log=lambda _m: None)
    before, got = torch.get_num_threads(), {}
    try:
        for n in (2, 1):
            real_lm.state.cores = Fixed(n)
            got[n] = _answers(kb)
        real_lm.state.cores = Cores(2)
        with busy_cores():
            got["loaded"] = _answers(kb)
            assert torch.get_num_threads() == 1  # the adaptive count did step down
    finally:
        real_lm.state.cores = None
        torch.set_num_threads(before)
    assert got[2] == got[1] == got["loaded"]
