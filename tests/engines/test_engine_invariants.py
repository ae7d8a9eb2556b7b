"""Engine invariants on a tiny random-weight model: cached == full recompute, no contamination, no copies."""

import random

import pytest
import torch

import torch_direct as eu

from cag.engines.torch import codec, kvcompat
from cag.engines.torch.codec import TextStream
from cag.engines.torch.workspace import Workspace
from cag.sampling import Sampling


def _full_logits(model, ids):
    with torch.inference_mode():
        return kvcompat.forward(model, torch.tensor([ids]), kvcompat.empty_cache())


def test_cached_logits_match_full_recompute_for_random_prefixes(tiny_lm):
    rng = random.Random(1)
    vocab = len(tiny_lm.tokenizer)
    for trial in range(40):
        prefix = [rng.randrange(vocab) for _ in range(rng.randint(1, 300))]
        question = [rng.randrange(vocab) for _ in range(rng.randint(1, 40))]
        layers = eu.prefill(tiny_lm, prefix, chunk_size=rng.choice([1, 7, 64, 512]))
        with torch.inference_mode():
            cached = kvcompat.forward(tiny_lm.model, torch.tensor([question]), kvcompat.from_layers(layers))
        full = _full_logits(tiny_lm.model, prefix + question)
        torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-4, msg=f"trial {trial}")


def test_generate_from_prefix_equals_generate_from_scratch(tiny_lm):
    rng = random.Random(2)
    vocab = len(tiny_lm.tokenizer)
    for _ in range(10):
        prefix = [rng.randrange(vocab) for _ in range(rng.randint(50, 400))]
        question = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
        layers = eu.prefill(tiny_lm, prefix, chunk_size=128)
        cached = list(eu.generate(tiny_lm, question, prefix=layers, reuse=len(prefix), max_new_tokens=24))
        scratch = list(eu.generate(tiny_lm, prefix + question, max_new_tokens=24))
        assert cached == scratch
        assert len(cached) == 24


def test_prefix_is_never_written_and_never_copied(tiny_lm):
    prefix = list(range(3, 200))
    layers = eu.prefill(tiny_lm, prefix)
    before = [(k.clone(), v.clone()) for k, v in layers]
    ptrs = [(k.data_ptr(), v.data_ptr()) for k, v in layers]
    cache = kvcompat.from_layers(layers)
    assert [(layer_k.data_ptr(), layer_v.data_ptr()) for layer_k, layer_v in kvcompat.to_layers(cache)] == ptrs
    for q in ([5, 6, 7], [9], list(range(10, 50))):
        list(eu.generate(tiny_lm, q, prefix=layers, reuse=len(prefix), max_new_tokens=10))
    # an abandoned stream (consumer stops early) must not leave anything behind either
    stream = eu.generate(tiny_lm, [11, 12], prefix=layers, reuse=len(prefix), max_new_tokens=50)
    next(stream)
    stream.close()
    for (k, v), (k0, v0), (pk, pv) in zip(layers, before, ptrs):
        assert k.shape[-2] == len(prefix) and (k.data_ptr(), v.data_ptr()) == (pk, pv)
        assert torch.equal(k, k0) and torch.equal(v, v0)


def test_twenty_sequential_questions_show_no_contamination(tiny_lm):
    rng = random.Random(3)
    vocab = len(tiny_lm.tokenizer)
    prefix = [rng.randrange(vocab) for _ in range(250)]
    layers = eu.prefill(tiny_lm, prefix)
    questions = [[rng.randrange(vocab) for _ in range(rng.randint(2, 15))] for _ in range(20)]
    sequential = [list(eu.generate(tiny_lm, q, prefix=layers, reuse=len(prefix), max_new_tokens=12))
                  for q in questions]
    for q, got in zip(questions, sequential):
        fresh = list(eu.generate(tiny_lm, prefix + q, max_new_tokens=12))
        assert got == fresh


def test_partial_reuse_matches_scratch(tiny_lm):
    """The boundary-mismatch path: reuse only the first `reuse` cached positions, compute the rest."""
    prefix = list(range(5, 120))
    layers = eu.prefill(tiny_lm, prefix)
    full = prefix[:-3] + [77, 78, 79, 80]
    got = list(eu.generate(tiny_lm, full[len(prefix) - 3:], prefix=layers, reuse=len(prefix) - 3,
                               max_new_tokens=16))
    assert got == list(eu.generate(tiny_lm, full, max_new_tokens=16))


def test_sampling_is_seeded_and_differs_from_greedy(tiny_lm):
    prompt = list(range(5, 60))
    hot = Sampling(temperature=1.5, top_p=0.95, seed=7)
    a = list(eu.generate(tiny_lm, prompt, max_new_tokens=30, sampling=hot))
    b = list(eu.generate(tiny_lm, prompt, max_new_tokens=30, sampling=hot))
    c = list(eu.generate(tiny_lm, prompt, max_new_tokens=30, sampling=Sampling(temperature=1.5, seed=8)))
    greedy = list(eu.generate(tiny_lm, prompt, max_new_tokens=30))
    assert a == b
    assert a != c or a != greedy


def test_generation_stops_at_end_of_turn(tiny_lm):
    prompt = list(range(5, 40))
    free = list(eu.generate(tiny_lm, prompt, max_new_tokens=10))
    stopped = list(eu.generate(tiny_lm, prompt, max_new_tokens=10, stop_ids=[free[3]]))
    assert stopped == free[:free.index(free[3])]


def test_crop_goes_back_to_a_length(tiny_lm):
    layers = eu.prefill(tiny_lm, list(range(5, 50)))
    cache = kvcompat.from_layers(layers)
    with torch.inference_mode():
        kvcompat.forward(tiny_lm.model, torch.tensor([[1, 2, 3]]), cache)
    assert kvcompat.seq_length(cache) == 48
    kvcompat.crop(cache, 45)
    assert kvcompat.seq_length(cache) == 45
    for (k, _), (k0, _) in zip(kvcompat.to_layers(cache), layers):
        assert torch.equal(k, k0)


def test_generate_needs_a_token(tiny_lm):
    with pytest.raises(ValueError):
        list(eu.generate(tiny_lm, [], max_new_tokens=3))


def test_workspace_answers_equal_shared_prefix_and_scratch_answers(tiny_lm):
    rng = random.Random(4)
    vocab = len(tiny_lm.tokenizer)
    prefix = [rng.randrange(vocab) for _ in range(300)]
    layers = eu.prefill(tiny_lm, prefix)
    ws = Workspace(layers, room=8)  # too little room: answers get buffers as big as they need
    assert [k.data_ptr() for k, _ in ws.prefix] == [k.data_ptr() for k, _ in layers]  # held, not copied
    before = [(k.clone(), v.clone()) for k, v in ws.prefix]
    for _ in range(6):
        q = [rng.randrange(vocab) for _ in range(rng.randint(1, 20))]
        via_ws = list(eu.generate(tiny_lm, q, prefix=ws, reuse=300, max_new_tokens=16))
        via_shared = list(eu.generate(tiny_lm, q, prefix=layers, reuse=300, max_new_tokens=16))
        scratch = list(eu.generate(tiny_lm, prefix + q, max_new_tokens=16))
        assert via_ws == via_shared == scratch
    assert ws._free and all(b.capacity < 300 for b in ws._free)  # an answer's own positions only, never the prefix
    for (k, v), (k0, v0) in zip(ws.prefix, before):
        assert torch.equal(k, k0) and torch.equal(v, v0)


def test_concurrent_answers_on_one_workspace_share_its_prefix(tiny_lm):
    prefix = list(range(5, 205))
    ws = Workspace(eu.prefill(tiny_lm, prefix))
    first = eu.generate(tiny_lm, [7, 8], prefix=ws, reuse=200, max_new_tokens=12)
    a0 = next(first)  # holds a row buffer mid-answer
    second = list(eu.generate(tiny_lm, [9, 10], prefix=ws, reuse=200, max_new_tokens=12))
    rest = [a0] + list(first)
    assert len(ws._free) == 2  # each answer had a buffer of its own; both went back to the pool
    assert rest == list(eu.generate(tiny_lm, prefix + [7, 8], max_new_tokens=12))
    assert second == list(eu.generate(tiny_lm, prefix + [9, 10], max_new_tokens=12))


def test_partial_reuse_on_a_workspace_never_writes_into_the_prefix(tiny_lm):
    prefix = list(range(5, 120))
    ws = Workspace(eu.prefill(tiny_lm, prefix))
    before = [k.clone() for k, _ in ws.prefix]
    full = prefix[:-3] + [77, 78, 79]
    got = list(eu.generate(tiny_lm, full[112:], prefix=ws, reuse=112, max_new_tokens=10))
    assert got == list(eu.generate(tiny_lm, full, max_new_tokens=10))
    assert all(torch.equal(k, k0) for (k, _), k0 in zip(ws.prefix, before))


def test_text_stream_holds_back_split_characters_and_flushes_the_rest(tiny_lm):
    tok = tiny_lm.tokenizer
    first, second = tok.convert_tokens_to_ids(["Ã", "©"])  # the two bytes of "é" in byte-level BPE
    hello = tok("Hello", add_special_tokens=False)["input_ids"]
    stream = TextStream(tok)
    deltas = [stream.push(t) for t in hello] + [stream.push(first)]
    assert deltas[-1] == ""  # half a character is never sent
    deltas.append(stream.push(second))
    assert "".join(deltas) == "Helloé"
    stream.push(first)  # ends on half a character: flush sends what decode gives, so deltas add up
    deltas.append(stream.flush())
    assert "".join(deltas) == stream.text()


def test_text_stream_is_incremental_and_exact_for_multibyte_text(tiny_lm):
    """Deltas add up to decoding all ids at once, for text full of multi-byte characters, however it is
    cut; each push decodes only the few ids a character still needs (no re-decoding of the whole answer)."""
    tok = tiny_lm.tokenizer
    text = "Größe: 148 crowns 🏮 — “naïve” café 中文 ok"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for cut in range(1, len(ids) + 1):  # every length: many end inside a character
        stream = TextStream(tok)
        deltas = [stream.push(t) for t in ids[:cut]] + [stream.flush()]
        assert "".join(deltas) == stream.text() == tok.decode(ids[:cut]), cut
        assert "\ufffd" not in "".join(deltas[:-1])  # a half character is never streamed
    assert codec.decode(tok, ids) == text
    calls = []
    stream = TextStream(tok)
    original = tok.decode
    tok.decode = lambda *a, **k: calls.append(1) or original(*a, **k)
    try:
        for t in ids * 20:
            stream.push(t)
    finally:
        del tok.decode
    assert calls == []  # pushing never decodes the answer so far
