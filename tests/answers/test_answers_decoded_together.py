"""Answers decoded together equal each answer alone: `ask_many`, and the scheduler's continuous batching
(answers arriving together, a batch window, an answer abandoned mid-run)."""

from __future__ import annotations

import random
import threading

import pytest

import torch_direct as eu

from cag.engines.base import Job
from cag.sampling import Sampling
from cag.scheduler import Batching, Scheduler
from batchutil import first_waits_for_the_rest, random_prefix, until


def test_ask_many_equals_ask_one_by_one(cag_home, sharp_lm, tmp_path):
    import cag

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.md").write_text("The Heron lantern costs 148 crowns and is blue. Quillfeather was founded in 1987.")
    kb = cag.build([docs], name="many", lm=sharp_lm, log=lambda _m: None)
    questions = ["Who founded it?", "How much is the Heron?", "What colour is the Heron lantern?", "When?"]
    many = kb.ask_many(questions, max_new_tokens=10)
    for q, a in zip(questions, many):
        one = kb.ask(q, max_new_tokens=10)
        assert a.token_ids == one.token_ids and a.cached_tokens == kb.tokens and a.mode == "cache-batch"
    assert len({tuple(a.token_ids) for a in many}) > 1  # the model's answers depend on the question


def _batched(sched: Scheduler, q, reuse: int, n: int, sampling: Sampling = Sampling(), **batching):
    """An answer handed to the scheduler (continuous batching), as KnowledgeBase.ask(batching=...) does."""
    return sched.answer(Job(list(q), reuse, n, sampling), Batching(**batching))


WINDOW_S = 120.0  # a batch window no test waits out: max_batch arrivals end it (bounds a hang if they never come)


def test_scheduler_decodes_concurrent_answers_together_each_as_alone(sharp_lm):
    prefix, ws = random_prefix(sharp_lm, seed=8)
    sched = Scheduler(eu.decoder(sharp_lm, ws))
    rng = random.Random(9)
    vocab = sharp_lm.model.config.vocab_size
    jobs = [([rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))], rng.randint(4, 24),
             Sampling(temperature=0.9, seed=i) if i % 3 == 0 else Sampling()) for i in range(9)]
    got: dict[int, list[int]] = {}
    start = threading.Barrier(len(jobs))
    first_waits_for_the_rest(sched, len(jobs))

    def ask(i: int) -> None:
        q, n, sampling = jobs[i]
        start.wait()
        got[i] = list(_batched(sched, q, len(prefix), n, sampling, max_batch=4))

    threads = [threading.Thread(target=ask, args=(i,)) for i in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert sched.rows_stepped > sched.steps  # steps did run several rows at once
    assert sched.rows_stepped <= 4 * sched.steps  # never more than max_batch
    for i, (q, n, sampling) in enumerate(jobs):
        alone = list(eu.generate(sharp_lm, q, ws, reuse=len(prefix), max_new_tokens=n, sampling=sampling))
        assert got[i] == alone, i
    assert len({tuple(a) for a in got.values()}) > 5


@pytest.mark.parametrize("window_s", [0, WINDOW_S])
def test_a_batch_window_lets_answers_arriving_close_together_start_together(sharp_lm, window_s):
    prefix, ws = random_prefix(sharp_lm, seed=12)
    sched = Scheduler(eu.decoder(sharp_lm, ws))
    n = 16

    def answer(i: int):
        return _batched(sched, [5 + i, 6], len(prefix), n, max_batch=2, window_s=window_s)

    if window_s:  # the first waits for company: the second comes once the first is queued, and joins it
        got: dict[int, list[int]] = {}
        first = threading.Thread(target=lambda: got.__setitem__(0, list(answer(0))))
        first.start()
        until(lambda: sched._thread is not None, 60, "the first answer reached the scheduler")
        got[1] = list(answer(1))
        first.join(120)
        assert (sched.steps, sched.rows_stepped) == (n - 1, 2 * (n - 1))  # every step ran both
        got = [got[0], got[1]]
    else:  # no wait: the first starts at once; the second comes once the first has run a step alone
        one, two = answer(0), answer(1)
        head = [next(one), next(one)]  # its first token (question prefill), then one decoding step
        second = [next(two)]  # joins the running batch, if the first is not over yet
        got = [head + list(one), second + list(two)]
        assert sched.steps > n - 1 and sched.rows_stepped == 2 * (n - 1)
    for i in (0, 1):
        assert got[i] == list(eu.generate(sharp_lm, [5 + i, 6], ws, reuse=len(prefix), max_new_tokens=n))


def test_an_answer_abandoned_mid_run_leaves_the_batch_and_frees_its_buffer(sharp_lm):
    prefix, ws = random_prefix(sharp_lm, seed=10)
    sched = Scheduler(eu.decoder(sharp_lm, ws))
    # The tiny model would finish the 200 tokens long before the test abandons them; so while it is alone in
    # the batch, the long answer waits for company or for its consumer to go: it is provably still running
    # when abandoned, however fast the machine.
    closed, step, long = threading.Event(), sched.decoder.step, []

    def paced(jobs):
        if [j.max_new_tokens for j in jobs] == [200] and jobs[0].produced >= 3:  # past the 3 tokens read first
            long[:] = jobs
            until(lambda: closed.is_set() or sched._waiting, 60, "company or the consumer leaving")
        return step(jobs)

    sched.decoder.step = paced
    stream = _batched(sched, [5, 6, 7], len(prefix), 200)
    first = [next(stream) for _ in range(3)]
    other = list(_batched(sched, [8, 9], len(prefix), 6))
    stream.close()  # the consumer goes away: the row leaves at the scheduler's next step
    closed.set()
    again = list(_batched(sched, [8, 9], len(prefix), 6))
    assert long and long[0].produced < 200  # it was abandoned mid-run, not after it ended
    assert first == list(eu.generate(sharp_lm, [5, 6, 7], ws, reuse=len(prefix), max_new_tokens=3))
    assert other == again
    # both buffers back in the pool, none held by the abandoned answer (the scheduler gives the last one back
    # just after its consumer got the end: wait for it)
    until(lambda: len(ws._free) == 2, 60, "both row buffers back in the pool")
