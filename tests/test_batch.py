"""Answers on one shared prefix: each row computes exactly the same bits alone or in any batch.

A row's attention is the shared prefix (read in place) plus its own positions; batched answers must
equal one-at-a-time answers bit for bit on the CPU (logits, not only token ids), whatever the batch
size, the question lengths, the order of rows, and rows joining and leaving mid-run.
"""

from __future__ import annotations

import random
import threading

import pytest
import torch

import torch_direct as eu
from conftest import require_native

from cag.engines.base import Job
from cag.engines.torch import batch, fastdecode, models
from cag.engines.torch.workspace import Workspace
from cag.sampling import Sampling
from cag.scheduler import Batching, Scheduler


class _Module:
    def __init__(self, layer_idx=0):
        self.layer_idx = layer_idx
        self.is_causal = True
        self.training = False


@pytest.mark.parametrize("kernel", ["cpu-flash", "matmul"], ids=["cpu-flash-lse", "matmul (no lse kernel)"])
@pytest.mark.parametrize("width", [1, 5], ids=["decode", "question prefill"])
def test_segment_attention_equals_attention_over_the_concatenation(kernel, width, monkeypatch):
    monkeypatch.setattr(batch, "_kernel", lambda q: kernel)
    torch.manual_seed(0)
    b, hq, hkv, p, d = 3, 6, 2, 37, 16
    ws = Workspace([(torch.randn(1, hkv, p, d), torch.randn(1, hkv, p, d))])
    own = [0, 4, 7] if width == 1 else [0, 0, 0]  # each row's own positions so far
    shared = [p, 20, p]  # the second row reads only part of the prefix (a token-seam mismatch)
    rows = [batch.Row(ws, s, ws.take(16, 1), n) for s, n in zip(shared, own)]
    earlier = [(torch.randn(hkv, n, d), torch.randn(hkv, n, d)) for n in own]
    for row, (k, v) in zip(rows, earlier):
        if row.length:
            row.buffer.write(0, 0, k, v)
    q, key, val = torch.randn(b, hq, width, d), torch.randn(b, hkv, width, d), torch.randn(b, hkv, width, d)
    with batch._rows_running(rows, fold=False):
        out, _ = batch._attention(_Module(), q, key, val, None, scaling=d ** -0.5)
    pk, pv = ws.layers[0]
    for i, row in enumerate(rows):
        keys = torch.cat([pk[0, :, : row.shared], earlier[i][0], key[i]], dim=1).repeat_interleave(hq // hkv, dim=0)
        vals = torch.cat([pv[0, :, : row.shared], earlier[i][1], val[i]], dim=1).repeat_interleave(hq // hkv, dim=0)
        total = keys.shape[1]
        allowed = torch.arange(total)[None, :] <= torch.arange(total - width, total)[:, None]
        ref = torch.nn.functional.scaled_dot_product_attention(q[i], keys, vals, attn_mask=allowed)  # [hq, s, d]
        torch.testing.assert_close(out[i].transpose(0, 1), ref, rtol=1e-5, atol=1e-5)


def _decode(lm, ws, plan, shuffle: random.Random | None = None) -> list[list[torch.Tensor]]:
    """Logits of each planned row: (question ids, reuse, steps, join at step). A row joins at its step (its
    question prefill), then gets one token per step, and leaves after `steps` tokens."""
    layers = lm.config.num_hidden_layers
    logits: list[list[torch.Tensor]] = [[] for _ in plan]
    rows, last, t = {}, {}, 0
    while t <= max(at for *_, at in plan) or rows:
        for i, (ids, reuse, steps, at) in enumerate(plan):
            if at == t:
                rows[i] = batch.Row(ws, reuse, ws.take(len(ids) + steps + 1, layers))
                logits[i].append(batch.prefill(lm.state, rows[i], ids).clone())
                last[i] = int(torch.argmax(logits[i][-1]))
        for i in [i for i in rows if len(logits[i]) > plan[i][2]]:
            ws.give(rows.pop(i).buffer)
        order = sorted(rows)
        if shuffle:
            shuffle.shuffle(order)
        if order:
            for i, out in zip(order, batch.step(lm.state, [rows[i] for i in order], [last[i] for i in order])):
                logits[i].append(out.clone())
                last[i] = int(torch.argmax(out))
        t += 1
    return logits


def _alone(lm, ws, plan):
    return [_decode(lm, ws, [(ids, reuse, steps, 0)])[0] for ids, reuse, steps, _ in plan]


def _same_bits(got, want) -> bool:
    return all(len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b)) for a, b in zip(got, want))


@pytest.fixture(params=["c-step-float32", "lean-float32", "torch-bf16"])
def path_lm(request, sharp_model_dir, monkeypatch):
    """The sharp tiny model on each decoding path the CPU has."""
    if request.param == "c-step-float32":
        require_native()
        lm = models.load(str(sharp_model_dir), device="cpu", dtype="float32")
    elif request.param == "lean-float32":  # float32 BLAS: batched matmuls would not be row-independent
        monkeypatch.setenv("CAG_NATIVE_STEP", "0")
        lm = models.load(str(sharp_model_dir), device="cpu", dtype="float32")
    else:
        lm = models.load(str(sharp_model_dir), device="cpu", dtype="bfloat16")
    lm.path_kind = request.param
    return lm


def _kb(lm, tokens: int = 300, seed: int = 1):
    rng = random.Random(seed)
    vocab = lm.model.config.vocab_size
    prefix = [rng.randrange(3, vocab) for _ in range(tokens)]
    return prefix, Workspace(eu.prefill(lm, prefix))


@pytest.mark.parametrize("size", [1, 2, 5, 8])
def test_batched_logits_equal_one_at_a_time_logits_bit_for_bit(path_lm, size):
    prefix, ws = _kb(path_lm)
    rng = random.Random(size)
    vocab = path_lm.model.config.vocab_size
    plan = [([rng.randrange(3, vocab) for _ in range(rng.randint(1, 15))], len(prefix), 10, 0) for _ in range(size)]
    together = _decode(path_lm, ws, plan, shuffle=random.Random(7))
    alone = _alone(path_lm, ws, plan)
    assert _same_bits(together, alone)
    assert all(torch.isfinite(x.float()).all() for row in together for x in row)
    kind = {"c-step-float32": "native", "lean-float32": "lean", "torch-bf16": "lean"}[path_lm.path_kind]
    assert fastdecode.verdict(path_lm.state, kind) is True  # that path ran (and was checked)
    if size > 1:
        assert len({int(torch.argmax(row[3])) for row in together}) > 1  # rows differ, so equality means something


def test_rows_joining_and_leaving_mid_run_keep_their_bits(path_lm):
    prefix, ws = _kb(path_lm, seed=2)
    rng = random.Random(3)
    vocab = path_lm.model.config.vocab_size
    # (question, reuse, tokens, join at step): some leave early, some join late, one reuses part of the prefix
    plan = [([rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))], reuse, steps, at)
            for reuse, steps, at in ((300, 12, 0), (300, 3, 0), (300, 9, 2), (280, 6, 4), (300, 1, 5), (300, 8, 9))]
    together = _decode(path_lm, ws, plan, shuffle=random.Random(4))
    assert [len(x) for x in together] == [13, 4, 10, 7, 2, 9]
    assert _same_bits(together, _alone(path_lm, ws, plan))


def test_twenty_sequential_questions_on_reused_buffers_never_leak(path_lm):
    """Whatever an answer leaves in a pooled buffer is never read by the next one: every free buffer is
    filled with NaN between questions, so a read of a position the answer did not write shows."""
    prefix, ws = _kb(path_lm, tokens=150, seed=5)
    rng = random.Random(6)
    vocab = path_lm.model.config.vocab_size

    def poison():
        for buffer in ws._free:
            for t in buffer.k + buffer.v:
                t.fill_(float("nan"))

    ws.give(ws.take(64, path_lm.config.num_hidden_layers))
    jobs = [([rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))], rng.randint(2, 30)) for _ in range(20)]
    answers = []
    for q, n in jobs:
        poison()
        answers.append(list(eu.generate(path_lm, q, ws, reuse=len(prefix), max_new_tokens=n)))
    assert len(ws._free) == 1  # one buffer, reused by every question
    for (q, n), answer in zip(jobs, answers):
        fresh = Workspace(ws.prefix)  # a new pool: nothing was ever written in it
        assert answer == list(eu.generate(path_lm, q, fresh, reuse=len(prefix), max_new_tokens=n))
    assert len({tuple(a) for a in answers}) > 10


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


def _until(check, seconds: float, what: str) -> None:
    """Wait for `check()` (state another thread changes), failing after `seconds` with `what`."""
    pause = threading.Event()
    for _ in range(int(seconds / 0.01)):
        if check():
            return
        pause.wait(0.01)
    assert check(), f"not within {seconds} s: {what}"


def _first_waits_for_the_rest(sched: Scheduler, answers: int) -> None:
    """The first answer's question prefill waits until the other answers are queued, so the first step runs
    max_batch rows however the threads that ask are scheduled (later rows join as rows end)."""
    real_start, first = sched.decoder.start, []

    def start(job):
        if not first:
            first.append(job)
            _until(lambda: len(sched._waiting) == answers - 1, 60, f"all {answers} answers reached the scheduler")
        return real_start(job)

    sched.decoder.start = start


def test_scheduler_decodes_concurrent_answers_together_each_as_alone(sharp_lm):
    prefix, ws = _kb(sharp_lm, seed=8)
    sched = Scheduler(eu.decoder(sharp_lm, ws))
    rng = random.Random(9)
    vocab = sharp_lm.model.config.vocab_size
    jobs = [([rng.randrange(3, vocab) for _ in range(rng.randint(1, 12))], rng.randint(4, 24),
             Sampling(temperature=0.9, seed=i) if i % 3 == 0 else Sampling()) for i in range(9)]
    got: dict[int, list[int]] = {}
    start = threading.Barrier(len(jobs))
    _first_waits_for_the_rest(sched, len(jobs))

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
    prefix, ws = _kb(sharp_lm, seed=12)
    sched = Scheduler(eu.decoder(sharp_lm, ws))
    n = 16

    def answer(i: int):
        return _batched(sched, [5 + i, 6], len(prefix), n, max_batch=2, window_s=window_s)

    if window_s:  # the first waits for company: the second comes once the first is queued, and joins it
        got: dict[int, list[int]] = {}
        first = threading.Thread(target=lambda: got.__setitem__(0, list(answer(0))))
        first.start()
        _until(lambda: sched._thread is not None, 60, "the first answer reached the scheduler")
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
    prefix, ws = _kb(sharp_lm, seed=10)
    sched = Scheduler(eu.decoder(sharp_lm, ws))
    # The tiny model would finish the 200 tokens long before the test abandons them; so while it is alone in
    # the batch, the long answer waits for company or for its consumer to go: it is provably still running
    # when abandoned, however fast the machine.
    closed, step, long = threading.Event(), sched.decoder.step, []

    def paced(jobs):
        if [j.max_new_tokens for j in jobs] == [200] and jobs[0].produced >= 3:  # past the 3 tokens read first
            long[:] = jobs
            _until(lambda: closed.is_set() or sched._waiting, 60, "company or the consumer leaving")
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
    _until(lambda: len(ws._free) == 2, 60, "both row buffers back in the pool")
