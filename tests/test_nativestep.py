"""The C decoding step (cag/native/step.c through cag.nativestep).

It adds float32 numbers in its own order, so it is held to fastdecode.TOLERANCE against transformers'
forward rather than bit for bit; what must hold exactly: the same bits whatever the thread count, the
same step for every generated token of every mode (cached answers equal no-cache answers), nothing of a
previous answer left in the reused buffers reaches the next one, and it steps aside where it cannot run.
"""

from __future__ import annotations

import random

import pytest
import torch

from cag import engine, fastdecode, kvcompat, models, nativestep
from conftest import require_native


def _fresh(path, **kw):
    return models.load(str(path), device="cpu", dtype="float32", **kw)


@pytest.fixture(params=["tiny", "sharp", "q4"])
def model_dir(request, tiny_model_dir, sharp_model_dir):
    require_native()
    if request.param == "q4":
        return request.getfixturevalue("q4_model_dir")
    return {"tiny": tiny_model_dir, "sharp": sharp_model_dir}[request.param]


def _decode_both_ways(model, plan, prompt: list[int], steps: int):
    """Greedy through transformers' forward, and the C step on a twin cache fed the same tokens."""
    caches = [kvcompat.buffer_cache(len(prompt) + steps + 1) for _ in range(2)]
    pairs = []
    with torch.inference_mode():
        logits = [kvcompat.forward(model, torch.tensor([prompt]), c) for c in caches]
        for _ in range(steps):
            token = int(torch.argmax(logits[0]))
            logits = [kvcompat.forward(model, torch.tensor([[token]]), caches[0]), plan.run(token, caches[1])]
            pairs.append((logits[0].clone(), logits[1].clone()))
    return pairs, caches


def _prompt(model, n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, model.config.vocab_size) for _ in range(n)]


@pytest.mark.parametrize("portable", [False, True], ids=["native-simd", "portable-c"])
def test_c_step_agrees_with_transformers_within_tolerance(model_dir, portable):
    lm = _fresh(model_dir)
    plan = nativestep.Plan(lm.model, require_native(portable=portable))
    pairs, caches = _decode_both_ways(lm.model, plan, _prompt(lm.model, 300), steps=12)  # 3 attention chunks
    for want, got in pairs:
        assert fastdecode.close(got, want, fastdecode.TOLERANCE / 10)  # a wide margin under the check's bound
        assert int(torch.argmax(got)) == int(torch.argmax(want))
    for (k0, v0), (k1, v1) in zip(kvcompat.to_layers(caches[0]), kvcompat.to_layers(caches[1])):
        assert k0.shape == k1.shape == (1, lm.config.num_key_value_heads, 312, k0.shape[-1])
        assert torch.equal(k0[:, :, :300], k1[:, :, :300])  # the prompt's positions are transformers' own
        assert fastdecode.close(k1, k0, fastdecode.TOLERANCE / 10) and fastdecode.close(v1, v0, fastdecode.TOLERANCE / 10)


def test_the_check_catches_small_mistakes(q4_model_dir):
    require_native()
    lm = _fresh(q4_model_dir)
    prompt = _prompt(lm.model, 200)
    right = nativestep.plan(lm.model)
    pairs, _ = _decode_both_ways(lm.model, right, prompt, steps=2)
    assert all(fastdecode.close(got, want) for want, got in pairs)
    for field, factor in (("scale", 1.01), ("eps", 100.0)):  # a 1 % hotter softmax; a wrong norm epsilon
        wrong = nativestep.Plan(lm.model, right.kernels)
        setattr(wrong.model, field, getattr(wrong.model, field) * factor)
        pairs, _ = _decode_both_ways(lm.model, wrong, prompt, steps=2)
        assert not any(fastdecode.close(got, want) for want, got in pairs), field


def test_c_step_gives_the_same_bits_whatever_the_thread_count(q4_model_dir):
    require_native()
    lm = _fresh(q4_model_dir)
    plan = nativestep.plan(lm.model)
    ws = engine.Workspace(engine.prefill(lm.model, _prompt(lm.model, 260)), room=8)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            cache = kvcompat.buffer_cache(ws.capacity, [(k.clone(), v.clone()) for k, v in ws.buffers], ws.length)
            with torch.inference_mode():
                runs.append([plan.run(token, cache) for token in (11, 12, 13, 14)])
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


def test_every_mode_decodes_with_the_c_step_and_answers_agree(sharp_model_dir, monkeypatch):
    require_native()
    lm = _fresh(sharp_model_dir)
    calls = []
    real_run = nativestep.Plan.run
    monkeypatch.setattr(nativestep.Plan, "run", lambda self, token, cache: calls.append(token) or real_run(self, token, cache))
    prefix = _prompt(lm.model, 180, seed=1)
    layers = engine.prefill(lm.model, prefix)
    ws = engine.Workspace(layers)
    distinct = set()
    for q in ([7, 8, 9], [100, 3, 44, 12, 9], [5]):
        calls.clear()
        modes = {"workspace": list(engine.generate(lm.model, q, ws, reuse=len(prefix), max_new_tokens=16)),
                 "shared prefix": list(engine.generate(lm.model, q, layers, reuse=len(prefix), max_new_tokens=16)),
                 "no cache": list(engine.generate(lm.model, prefix + q, max_new_tokens=16))}
        assert len(calls) == 3 * 15  # every generated token but the first (the prompt's) in every mode
        answers = list(modes.values())
        assert answers[0] == answers[1] == answers[2], modes
        distinct.add(tuple(answers[0]))
    busy = engine.generate(lm.model, [7, 8, 9], ws, reuse=len(prefix), max_new_tokens=16)
    first = next(busy)  # holds the workspace: the next answer takes the private-copy path
    assert list(engine.generate(lm.model, [5], ws, reuse=len(prefix), max_new_tokens=16)) == list(
        engine.generate(lm.model, prefix + [5], max_new_tokens=16))
    assert [first] + list(busy) == list(engine.generate(lm.model, prefix + [7, 8, 9], max_new_tokens=16))
    assert fastdecode.verdict(lm.model, "native") is True and fastdecode.verdict(lm.model, "single") is None
    assert len(distinct) == 3  # the answers depend on the question, so equality means something


def test_reused_workspace_never_leaks_one_answer_into_the_next(sharp_model_dir):
    require_native()
    lm = _fresh(sharp_model_dir)
    rng = random.Random(5)
    prefix = _prompt(lm.model, 150, seed=2)
    ws = engine.Workspace(engine.prefill(lm.model, prefix), room=8)
    for k, v in ws.buffers:  # whatever lies after the prefix must never be read
        k[:, :, ws.length:] = float("nan")
        v[:, :, ws.length:] = float("nan")
    jobs = [([rng.randrange(3, 500) for _ in range(rng.randint(1, 12))], rng.randint(2, 30)) for _ in range(20)]
    answers = [list(engine.generate(lm.model, q, ws, reuse=len(prefix), max_new_tokens=n)) for q, n in jobs]
    fresh = _fresh(sharp_model_dir)  # a new model object (its own C-step plan) and a new workspace per question
    for (q, n), answer in zip(jobs, answers):
        alone = engine.Workspace(engine.prefill(fresh.model, prefix))
        assert answer == list(engine.generate(fresh.model, q, alone, reuse=len(prefix), max_new_tokens=n))
    assert len({tuple(a) for a in answers}) > 10
    assert fastdecode.verdict(lm.model, "native") is fastdecode.verdict(fresh.model, "native") is True  # C step ran


def test_a_disagreeing_c_step_hands_over_to_the_lean_step(sharp_model_dir, monkeypatch, capsys):
    require_native()
    lm = _fresh(sharp_model_dir)
    real_run = nativestep.Plan.run
    monkeypatch.setattr(nativestep.Plan, "run", lambda self, token, cache: real_run(self, token, cache) * 1.01)
    prefix, q = _prompt(lm.model, 120, seed=3), [9, 10, 11]
    got = list(engine.generate(lm.model, prefix + q, max_new_tokens=12))
    assert fastdecode.verdict(lm.model, "native") is False and "disagrees" in capsys.readouterr().err
    assert fastdecode.verdict(lm.model, "single") is True  # the lean step took over, and was checked too
    monkeypatch.setenv("CAG_NATIVE_STEP", "0")
    lean = _fresh(sharp_model_dir)
    assert got == list(engine.generate(lean.model, prefix + q, max_new_tokens=12))


def test_where_the_c_step_does_not_apply(tiny_model_dir, q4_model_dir, monkeypatch):
    require_native()
    bf16 = models.load(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert nativestep.plan(bf16.model) is None
    assert list(engine.generate(bf16.model, list(range(5, 40)), max_new_tokens=4))
    lm = _fresh(q4_model_dir)
    layers = engine.prefill(lm.model, list(range(5, 60)))
    concatenating = kvcompat.from_layers(layers)
    assert not nativestep.writable(concatenating, nativestep.plan(lm.model))
    tight = engine.Workspace(layers, room=1)
    full = kvcompat.buffer_cache(tight.capacity, tight.buffers, tight.capacity)
    assert not nativestep.writable(full, nativestep.plan(lm.model))  # no room left: transformers raises
    with torch.inference_mode():
        fastdecode.step(lm.model, 7, concatenating)  # the lean step serves other caches
    assert fastdecode.verdict(lm.model, "single") is True and kvcompat.seq_length(concatenating) == 56
    ws = engine.Workspace(layers)
    with pytest.raises(IndexError):
        nativestep.plan(lm.model).run(10 ** 6, kvcompat.buffer_cache(ws.capacity, ws.buffers, ws.length))
    monkeypatch.setenv("CAG_NATIVE_STEP", "0")
    assert nativestep.plan(_fresh(q4_model_dir).model) is None
