"""The C decoding step (cag/engines/torch/native/step.c through cag.engines.torch.nativestep).

It adds float32 numbers in its own order, so it is held to fastdecode.TOLERANCE against transformers'
forward rather than bit for bit; what must hold exactly: the same bits whatever the thread count and
whatever other rows share the call, the same step for every generated token of every mode (cached
answers equal no-cache answers), nothing of a previous answer left in the reused buffers reaches the
next one, and it steps aside where it cannot run.
"""

from __future__ import annotations

import random

import pytest
import torch

from conftest import require_native

from cag.engines.torch import batch, fastdecode, kvcompat, models, nativestep
import torch_direct as eu
from cag.engines.torch.workspace import Workspace


def _fresh(path, **kw):
    return models.load(str(path), device="cpu", dtype="float32", **kw)


@pytest.fixture(params=["tiny", "sharp", "q4"])
def model_dir(request, tiny_model_dir, sharp_model_dir):
    require_native()
    if request.param == "q4":
        return request.getfixturevalue("q4_model_dir")
    return {"tiny": tiny_model_dir, "sharp": sharp_model_dir}[request.param]


def _row(ws: Workspace, model, room: int = 32) -> batch.Row:
    return batch.Row(ws, ws.length, ws.take(room, model.config.num_hidden_layers))


def _decode_both_ways(model, plan, prompt: list[int], steps: int):
    """Greedy through transformers' forward over a DynamicCache of the prompt, and the C step on a row over
    the same prompt KV (the shared prefix), fed the same tokens: (logits pairs, transformers' KV, the row)."""
    layers = eu.prefill(model, prompt)
    cache = kvcompat.from_layers(layers)  # concatenates onto the prefix tensors, never writes them
    ws = Workspace(layers)
    row = _row(ws, model, steps + 1)
    pairs, token = [], prompt[0]
    with torch.inference_mode():
        for _ in range(steps):
            want = kvcompat.forward(model, torch.tensor([[token]]), cache)
            got = plan.run([row], [token])
            row.length += 1
            pairs.append((want.clone(), got.clone()))
            token = int(torch.argmax(want))
    return pairs, kvcompat.to_layers(cache), row


def _prompt(model, n: int, seed: int = 0) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, model.config.vocab_size) for _ in range(n)]


@pytest.mark.parametrize("simd", ["auto", "avx2", "portable"])
def test_c_step_agrees_with_transformers_within_tolerance(model_dir, simd):
    lm = _fresh(model_dir)
    plan = nativestep.Plan(lm.model, require_native(simd))  # the best set, AVX2 (x86) and portable C
    pairs, full, row = _decode_both_ways(lm.model, plan, _prompt(lm.model, 300), steps=12)  # 3 attention chunks
    for want, got in pairs:
        assert fastdecode.close(got, want, fastdecode.TOLERANCE / 10)  # a wide margin under the check's bound
        assert int(torch.argmax(got)) == int(torch.argmax(want))
    for (k0, v0), k1, v1 in zip(full, row.buffer.k, row.buffer.v):
        assert k0.shape == (1, lm.config.num_key_value_heads, 312, k0.shape[-1])
        mine = (k1[:, :, :12], v1[:, :, :12])  # the answer's own positions, after the 300 shared ones
        assert fastdecode.close(mine[0], k0[:, :, 300:], fastdecode.TOLERANCE / 10)
        assert fastdecode.close(mine[1], v0[:, :, 300:], fastdecode.TOLERANCE / 10)


def test_the_check_catches_small_mistakes(q4_model_dir):
    require_native()
    lm = _fresh(q4_model_dir)
    prompt = _prompt(lm.model, 200)
    right = nativestep.plan(lm.state)
    pairs, _, _ = _decode_both_ways(lm.model, right, prompt, steps=2)
    assert all(fastdecode.close(got, want) for want, got in pairs)
    for field, factor in (("scale", 1.01), ("eps", 100.0)):  # a 1 % hotter softmax; a wrong norm epsilon
        wrong = nativestep.Plan(lm.model, right.kernels)
        setattr(wrong.model, field, getattr(wrong.model, field) * factor)
        pairs, _, _ = _decode_both_ways(lm.model, wrong, prompt, steps=2)
        assert not any(fastdecode.close(got, want) for want, got in pairs), field


def test_c_step_gives_the_same_bits_whatever_the_thread_count_and_company(q4_model_dir):
    require_native()
    lm = _fresh(q4_model_dir)
    plan = nativestep.plan(lm.state)
    ws = Workspace(eu.prefill(lm, _prompt(lm.model, 260)))
    tokens = (11, 12, 13, 14)
    before = torch.get_num_threads()
    runs = []
    try:
        for threads, company in ((1, 0), (2, 0), (3, 0), (2, 4), (1, 7)):
            torch.set_num_threads(threads)
            rows = [_row(ws, lm.model) for _ in range(1 + company)]
            with torch.inference_mode():
                out = []
                for token in tokens:  # row 0 decodes `tokens`; the others decode other tokens beside it
                    out.append(plan.run(rows, [token] + [100 + i for i in range(company)])[0].clone())
                    for r in rows:
                        r.length += 1
            runs.append(out)
            for r in rows:
                ws.give(r.buffer)
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(runs[0], run))


def test_every_mode_decodes_with_the_c_step_and_answers_agree(sharp_model_dir, monkeypatch):
    require_native()
    lm = _fresh(sharp_model_dir)
    calls = []
    real_run = nativestep.Plan.run
    monkeypatch.setattr(nativestep.Plan, "run",
                        lambda self, rows, tokens: calls.append(len(rows)) or real_run(self, rows, tokens))
    prefix = _prompt(lm.model, 180, seed=1)
    layers = eu.prefill(lm, prefix)
    ws = Workspace(layers)
    distinct = set()
    for q in ([7, 8, 9], [100, 3, 44, 12, 9], [5]):
        calls.clear()
        modes = {"workspace": list(eu.generate(lm, q, ws, reuse=len(prefix), max_new_tokens=16)),
                 "shared prefix": list(eu.generate(lm, q, layers, reuse=len(prefix), max_new_tokens=16)),
                 "no cache": list(eu.generate(lm, prefix + q, max_new_tokens=16))}
        assert calls == [1] * (3 * 15)  # every generated token but the first (the prompt's) in every mode
        answers = list(modes.values())
        assert answers[0] == answers[1] == answers[2], modes
        distinct.add(tuple(answers[0]))
    busy = eu.generate(lm, [7, 8, 9], ws, reuse=len(prefix), max_new_tokens=16)
    first = next(busy)  # holds a row of the workspace while another answer runs beside it
    assert list(eu.generate(lm, [5], ws, reuse=len(prefix), max_new_tokens=16)) == list(
        eu.generate(lm, prefix + [5], max_new_tokens=16))
    assert [first] + list(busy) == list(eu.generate(lm, prefix + [7, 8, 9], max_new_tokens=16))
    assert fastdecode.verdict(lm.state, "native") is True and fastdecode.verdict(lm.state, "lean") is None
    assert len(distinct) == 3  # the answers depend on the question, so equality means something


def test_a_disagreeing_c_step_hands_over_to_the_lean_step(sharp_model_dir, monkeypatch, capsys):
    require_native()
    lm = _fresh(sharp_model_dir)
    real_run = nativestep.Plan.run
    monkeypatch.setattr(nativestep.Plan, "run", lambda self, rows, tokens: real_run(self, rows, tokens) * 1.01)
    prefix, q = _prompt(lm.model, 120, seed=3), [9, 10, 11]
    got = list(eu.generate(lm, prefix + q, max_new_tokens=12))
    assert fastdecode.verdict(lm.state, "native") is False and "disagrees" in capsys.readouterr().err
    assert fastdecode.verdict(lm.state, "lean") is True  # the lean step took over, and was checked too
    monkeypatch.setenv("CAG_NATIVE_STEP", "0")
    lean = _fresh(sharp_model_dir)
    assert got == list(eu.generate(lean, prefix + q, max_new_tokens=12))


def test_where_the_c_step_does_not_apply(tiny_model_dir, q4_model_dir, monkeypatch):
    require_native()
    bf16 = models.load(str(tiny_model_dir), device="cpu", dtype="bfloat16")
    assert nativestep.plan(bf16.state) is None
    assert list(eu.generate(bf16, list(range(5, 40)), max_new_tokens=4))
    lm = _fresh(q4_model_dir)
    plan = nativestep.plan(lm.state)
    ws = Workspace(eu.prefill(lm, list(range(5, 60))))
    row = _row(ws, lm.model, room=1)
    assert plan.fits([row])
    row.length = row.buffer.capacity
    assert not plan.fits([row])  # no room left for the token
    with pytest.raises(IndexError):
        plan.run([_row(ws, lm.model)], [10 ** 6])
    other = Workspace(eu.prefill(lm, list(range(5, 20))))
    assert not plan.fits([_row(ws, lm.model), _row(other, lm.model)])  # one prefix per call
    monkeypatch.setenv("CAG_NATIVE_STEP", "0")
    assert nativestep.plan(_fresh(q4_model_dir).state) is None
