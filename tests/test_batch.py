"""Batched answers on one shared prefix: same attention as the concatenated cache, same answers."""

import random

import pytest
import torch

from cag import batch, engine


class _Module:
    def __init__(self, layer_idx=0):
        self.layer_idx = layer_idx
        self.is_causal = True
        self.training = False


@pytest.mark.parametrize("cpu_flash", [True, False], ids=["cpu-flash-lse", "matmul (the GPU path)"])
def test_split_prefix_attention_equals_attention_over_the_concatenation(cpu_flash, monkeypatch):
    monkeypatch.setattr(batch, "_CPU_FLASH", cpu_flash)
    torch.manual_seed(0)
    b, hq, hkv, p, d = 3, 6, 2, 37, 16
    pk, pv = torch.randn(1, hkv, p, d), torch.randn(1, hkv, p, d)
    lengths = [5, 2, 7]  # each row's suffix so far (its question tokens and answer tokens)
    cap = 12
    sk, sv = torch.zeros(b, hkv, cap, d), torch.zeros(b, hkv, cap, d)
    suffix = [(torch.randn(hkv, n, d), torch.randn(hkv, n, d)) for n in lengths]
    for i, (k, v) in enumerate(suffix):
        sk[i, :, : lengths[i] - 1], sv[i, :, : lengths[i] - 1] = k[:, :-1], v[:, :-1]
    # one decode step: each row's query token is its last suffix token
    q = torch.randn(b, hq, 1, d)
    key = torch.stack([k[:, -1:] for k, _ in suffix])
    val = torch.stack([v[:, -1:] for _, v in suffix])
    state = batch._Batch(prefix=[(pk, pv)], k=[sk], v=[sv], rel=torch.tensor([[n - 1] for n in lengths]))
    token = batch._STATE.set(state)
    try:
        out, _ = batch._attention(_Module(), q, key, val, None, scaling=d ** -0.5)
    finally:
        batch._STATE.reset(token)
    for i, n in enumerate(lengths):
        keys = torch.cat([pk[0], suffix[i][0]], dim=1).repeat_interleave(hq // hkv, dim=0)
        vals = torch.cat([pv[0], suffix[i][1]], dim=1).repeat_interleave(hq // hkv, dim=0)
        ref = torch.nn.functional.scaled_dot_product_attention(q[i], keys, vals)  # [hq, 1, d]
        torch.testing.assert_close(out[i].transpose(0, 1), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cpu_flash", [True, False], ids=["cpu-flash-lse", "matmul (the GPU path)"])
def test_batched_answers_equal_one_at_a_time_answers(tiny_lm, cpu_flash, monkeypatch):
    monkeypatch.setattr(batch, "_CPU_FLASH", cpu_flash)
    rng = random.Random(5)
    vocab = len(tiny_lm.tokenizer)
    prefix = [rng.randrange(vocab) for _ in range(150)]
    layers = engine.prefill(tiny_lm.model, prefix)
    before = [(k.clone(), k.data_ptr()) for k, _ in layers]
    questions = [[rng.randrange(vocab) for _ in range(rng.randint(1, 15))] for _ in range(6)]
    stop = [3]
    got = batch.generate_batch(tiny_lm.model, layers, questions, max_new_tokens=12, stop_ids=stop)
    for q, answer in zip(questions, got):
        assert answer == list(engine.generate(tiny_lm.model, q, prefix=layers, reuse=150, max_new_tokens=12,
                                              stop_ids=stop))
    assert all(torch.equal(k, k0) and k.data_ptr() == ptr for (k, _), (k0, ptr) in zip(layers, before))
    # single-question generation still works (and matches) after the batch attention was installed
    assert list(engine.generate(tiny_lm.model, questions[0], prefix=layers, reuse=150, max_new_tokens=12,
                                stop_ids=stop)) == got[0]


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
