"""cag.engines.torch.fastdecode: the decoding steps must agree with transformers' forward, or switch themselves off.

Two steps: the lean Python step (bit for bit with transformers' forward over the same rows and attention)
and the C step (cag/engines/torch/native/step.c, float32 in its own order: within fastdecode.TOLERANCE, and the same step
for every generated token of every mode; tests/engines/test_c_step.py).
"""

from __future__ import annotations

import pytest
import torch

import torch_direct as eu
from conftest import require_native

from cag.engines.torch import batch, fastdecode, models, packed
from cag.engines.torch.workspace import Workspace


def _fresh(path: str, **kw):
    return models.load(path, device="cpu", dtype="float32", **kw)


@pytest.fixture
def lean_only(monkeypatch):
    """Models loaded under this fixture decode with the lean Python step (no C step)."""
    monkeypatch.setenv("CAG_NATIVE_STEP", "0")


def _step_logits(lm, prefix_layers, prompt: list[int], rows: int, steps: int) -> list[torch.Tensor]:
    """Logits of `rows` greedy rows (each its own question) over `steps` batched steps (cag.engines.torch.batch)."""
    ws = Workspace(prefix_layers)
    state = eu.state_of(lm)
    live = [batch.Row(ws, ws.length, ws.take(len(prompt) + steps + 1, state.layers)) for _ in range(rows)]
    last = [int(torch.argmax(batch.prefill(state, r, prompt[i:] + [i]))) for i, r in enumerate(live)]
    out = []
    for _ in range(steps):
        logits = batch.step(state, live, last)
        out.append(logits.clone())
        last = [int(t) for t in torch.argmax(logits, dim=-1)]
    return out


@pytest.mark.parametrize("which", ["tiny", "sharp", "q4"])
def test_lean_step_equals_transformers_bit_for_bit(which, tiny_model_dir, sharp_model_dir, request, lean_only,
                                                   monkeypatch):
    if which == "q4":
        require_native()
    path = {"tiny": tiny_model_dir, "sharp": sharp_model_dir}.get(which) or request.getfixturevalue("q4_model_dir")
    lm = _fresh(str(path))
    assert fastdecode.supported(lm.state)
    prefix = eu.prefill(lm, list(range(5, 45)))
    rows = 3 if which == "q4" else 1  # packed matmuls compute rows alone: the lean step runs them together
    fast = _step_logits(lm, prefix, [7, 8, 9], rows, steps=12)
    monkeypatch.setenv("CAG_FAST_DECODE", "0")
    slow = _fresh(str(path))  # transformers' own forward for every step (same attention, same rows)
    assert not fastdecode.supported(slow.state)
    assert all(torch.equal(a, b) for a, b in zip(fast, _step_logits(slow, prefix, [7, 8, 9], rows, steps=12)))
    assert fastdecode.verdict(lm.state, "lean") is True
    fused = fastdecode._fusions(lm.state)
    assert len(fused) == lm.config.num_hidden_layers
    assert all(f is not None for pair in fused for f in pair) == (which == "q4")  # packed layers are fused


def test_answers_with_and_without_the_fast_step_are_identical(sharp_model_dir, monkeypatch):
    fast = _fresh(str(sharp_model_dir))
    assert fastdecode.supported(fast.state)  # decided once per model, on first use
    monkeypatch.setenv("CAG_FAST_DECODE", "0")
    slow = _fresh(str(sharp_model_dir))
    assert not fastdecode.supported(slow.state) and fastdecode.supported(fast.state)
    prefix = list(range(3, 200))
    kv = eu.prefill(slow, prefix)
    for q in ([7, 8, 9], [100, 3, 44, 12, 9]):
        answers = [list(eu.generate(lm, q, Workspace(kv), reuse=len(prefix), max_new_tokens=20))
                   for lm in (fast, slow)]
        assert answers[0] == answers[1] and len(answers[0]) > 0


def test_a_disagreeing_step_switches_itself_off(tiny_model_dir, monkeypatch, capsys, lean_only):
    lm = _fresh(str(tiny_model_dir))
    real_forward = fastdecode._forward
    monkeypatch.setattr(fastdecode, "_forward", lambda *a: real_forward(*a) + 1e-3)  # a subtly wrong fast path
    prompt = list(range(5, 30))
    reference_lm = _fresh(str(tiny_model_dir))
    reference_lm.state.fast_ok = False  # transformers' forward for every step
    expected = list(eu.generate(reference_lm, prompt, max_new_tokens=8))
    got = list(eu.generate(lm, prompt, max_new_tokens=8))
    assert got == expected
    assert fastdecode.verdict(lm.state, "lean") is False
    assert "disagrees" in capsys.readouterr().err


def test_other_architectures_use_transformers_forward():
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, vocab_size=100, n_positions=64)).eval()
    state = eu.state_of(model)
    assert not fastdecode.supported(state)
    assert len(list(eu.generate(state, [1, 2, 3], max_new_tokens=3))) == 3


def test_fused_projections_share_memory_with_the_layers(q4_model_dir):
    require_native()
    lm = _fresh(str(q4_model_dir))
    attn = lm.model.model.layers[0].self_attn
    fused = packed.fuse([attn.q_proj, attn.k_proj, attn.v_proj])
    assert fused is packed.fuse([attn.q_proj, attn.k_proj, attn.v_proj])  # fused once
    assert attn.q_proj.blocks.data_ptr() == fused.blocks.data_ptr()
    assert attn.k_proj.blocks.data_ptr() == fused.blocks.data_ptr() + attn.q_proj.blocks.numel()
    x = torch.randn(1, 1, attn.q_proj.in_features)
    with torch.inference_mode():
        assert torch.equal(fused(x), torch.cat([attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)], -1))
