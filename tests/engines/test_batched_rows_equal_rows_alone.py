"""Answers on one shared prefix: each row computes exactly the same bits alone or in any batch.

A row's attention is the shared prefix (read in place) plus its own positions; batched answers must
equal one-at-a-time answers bit for bit on the CPU (logits, not only token ids), whatever the batch
size, the question lengths, the order of rows, and rows joining and leaving mid-run.
"""

from __future__ import annotations

import random

import pytest
import torch

import torch_direct as eu
from conftest import require_native

from cag.engines.torch import batch, fastdecode, models
from cag.engines.torch.workspace import Workspace
from batchutil import random_prefix


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


@pytest.mark.parametrize("size", [1, 2, 5, 8])
def test_batched_logits_equal_one_at_a_time_logits_bit_for_bit(path_lm, size):
    prefix, ws = random_prefix(path_lm)
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
    prefix, ws = random_prefix(path_lm, seed=2)
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
    prefix, ws = random_prefix(path_lm, tokens=150, seed=5)
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
