"""Knowledge larger than the context: shards on document boundaries, BM25 routing, answers name their shard."""

from __future__ import annotations

import json

import pytest

import cag
from cag import knowledge, stores
from conftest import SAMPLE_DOCS, SAMPLE_QUESTIONS


def test_oversize_knowledge_builds_into_shards_that_answer(cag_home, tiny_lm):
    store = stores.configure(memory_bytes=1 << 30)
    kb = cag.build([SAMPLE_DOCS], name="big", lm=tiny_lm, store=store, shard=True, reserve=256)
    fits = tiny_lm.context_window - 256
    assert len(kb.shards) >= 2 and all(0 < s.tokens <= fits for s in kb.shards)
    assert kb.tokens > fits  # it really did not fit one context
    assert [d.name for d in kb.docs] == [d.name for d in knowledge.load([SAMPLE_DOCS])]
    questions = [json.loads(line) for line in SAMPLE_QUESTIONS.read_text().splitlines() if line.strip()]
    routed = answerable = 0
    for item in questions:
        holders = [s.name for s in kb.shards if any(item["a"] in d.text for d in s.docs)]
        if len(holders) != 1:
            continue
        answerable += 1
        a = kb.ask(item["q"], max_new_tokens=6)
        shard = next(s for s in kb.shards if s.name == a.shard)
        assert a.cached_tokens == shard.tokens and a.token_ids == shard.ask(item["q"], max_new_tokens=6, use_cache=False).token_ids
        routed += a.shard == holders[0]
    print(f"\nshards: {len(kb.shards)}, BM25 routed {routed}/{answerable} questions to the shard holding the answer")
    assert answerable >= 10 and routed >= 0.8 * answerable
    again = cag.load("big", lm=tiny_lm, store=store)
    assert again.cache_source == "disk" and [s.name for s in again.shards] == [s.name for s in kb.shards]
    q = questions[0]["q"]
    assert again.ask(q, max_new_tokens=6).token_ids == kb.ask(q, max_new_tokens=6).token_ids
    rows = {r["name"]: r for r in cag.list_kbs(store)}
    with pytest.raises(cag.CagError, match="alone is .* tokens, but a shard holds at most"):
        cag.build([SAMPLE_DOCS], name="big2", lm=tiny_lm, store=store, shard=True, reserve=600)
    assert rows["big"]["status"].startswith("sharded") and rows["big.shard0"]["status"] == "ok"
