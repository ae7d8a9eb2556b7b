"""Incremental update: appending a document prefills only the new tokens, and answers match a full rebuild."""

from __future__ import annotations

from storeutil import make_docs

import cag
from cag.cache import stores

QUESTIONS = ["Who founded the company?", "How much is the Heron?", "What is the Wren?"]


def build(docs, tiny_lm, store, **kw):
    """Small prefill chunks: reuse stops at the start of the chunk holding the first change (cag.kb.incremental),
    so with the default 512 these ~200-token knowledge bases would be recomputed whole."""
    logs = []
    kb = cag.build([docs], name="kb", lm=tiny_lm, store=store, log=logs.append, chunk_size=8, **kw)
    return kb, logs


def test_appending_a_document_prefills_only_the_new_tokens(cag_home, tiny_lm, tmp_path):
    docs, store = make_docs(tmp_path / "docs"), stores.configure(memory_bytes=1 << 30)
    old, _ = build(docs, tiny_lm, store)
    (docs / "c.txt").write_text("The Wren lamp is green, costs 64 crowns and burns for nine hours.")
    inc, logs = build(docs, tiny_lm, store)
    full, _ = build(docs, tiny_lm, store, incremental_update=False)
    s = inc.build_stats
    assert inc.prefix_ids == full.prefix_ids and s.reused + s.prefilled == len(inc.prefix_ids)
    assert s.reused > 0.8 * old.tokens and s.prefilled < len(inc.prefix_ids) - old.tokens + 16
    print(f"\nincremental: {old.tokens} old tokens, {len(inc.prefix_ids)} new prefix, reused {s.reused}, prefilled {s.prefilled}")
    assert any("incremental" in m or "recomputed" in m for m in logs)
    assert full.build_stats.prefilled == len(full.prefix_ids) and full.build_stats.reused == 0
    for (k1, v1), (k2, v2) in zip(inc.layers, full.layers):
        assert torch_close(k1, k2) and torch_close(v1, v2)
    for q in QUESTIONS:
        assert inc.ask(q, max_new_tokens=16).token_ids == full.ask(q, max_new_tokens=16).token_ids \
            == full.ask(q, max_new_tokens=16, use_cache=False).token_ids
    again = cag.load("kb", lm=tiny_lm, store=store)
    assert again.cache_source == "disk" and again.prefix_ids == inc.prefix_ids


def test_editing_earlier_content_recomputes_from_the_first_changed_token(cag_home, tiny_lm, tmp_path):
    docs, store = make_docs(tmp_path / "docs"), stores.configure(memory_bytes=1 << 30)
    old, _ = build(docs, tiny_lm, store)
    (docs / "a.md").write_text("# Lanterns\nThe Heron lantern costs 150 crowns and is blue.")
    edited, logs = build(docs, tiny_lm, store)
    s = edited.build_stats
    assert 0 < s.reused < old.tokens and "recomputed from token" in s.how and any("recomputed" in m for m in logs)
    full, _ = build(docs, tiny_lm, store, incremental_update=False)
    for q in QUESTIONS:
        assert edited.ask(q, max_new_tokens=16).token_ids == full.ask(q, max_new_tokens=16).token_ids


def torch_close(a, b) -> bool:
    import torch

    return a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-4)
