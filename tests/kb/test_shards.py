"""Knowledge larger than the context: shards on document boundaries, BM25 routing, answers name their shard."""

from __future__ import annotations

import json

import pytest

import cag
from cag.kb import knowledge
from cag.cache import stores
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
    assert rows["big"]["status"].startswith("sharded") and rows["big.shard0"]["status"] == "cached (not verified)"


def test_sharded_knowledge_is_listed_with_real_numbers_and_removed_whole(cag_home, tiny_lm):
    from cag import paths

    store = stores.configure(memory_bytes=1 << 30)
    kb = cag.build([SAMPLE_DOCS], name="big", lm=tiny_lm, store=store, shard=True, reserve=256)
    rows = {r["name"]: r for r in cag.list_kbs(store)}
    parent, children = rows["big"], [rows[s.name] for s in kb.shards]
    assert parent["tokens"] == kb.tokens == sum(r["tokens"] for r in children)
    assert parent["bytes"] == sum(r["bytes"] for r in children) > 0
    assert parent["created"] == max(r["created"] for r in children) and parent["status"] == f"sharded: {len(children)} shards"
    assert all(r["parent"] == "big" for r in children) and parent["parent"] is None
    with pytest.raises(cag.CagError, match="one shard of the knowledge base 'big'.*cag rm big"):
        cag.delete(kb.shards[0].name, store)
    assert paths.kb_dir(kb.shards[0].name).exists()
    cag.delete("big", store)
    assert cag.list_kbs(store) == [] and not any(paths.kb_dir(s.name).exists() for s in kb.shards)


def test_the_server_answers_from_a_sharded_knowledge_base(cag_home, tiny_lm):
    import httpx

    from cag.server import ServerConfig, create_app
    from serverutil import serving

    kb = cag.build([SAMPLE_DOCS], name="big", lm=tiny_lm, shard=True, reserve=256, log=lambda _m: None)
    q = "Who founded the company?"
    want = kb.ask(q, max_new_tokens=6)
    config = ServerConfig(response_cache=False)
    with serving(create_app(config, tiny_lm)) as url:
        models = httpx.get(url + "/v1/models").json()["data"]
        assert [m["id"] for m in models] == ["big"]  # shards are not listed on their own
        assert models[0]["tokens"] == kb.tokens and models[0]["created"] > 0
        assert httpx.get(url + "/v1/models/big").json()["id"] == "big"
        body = {"model": "big", "max_tokens": 6, "messages": [{"role": "user", "content": q}]}
        with httpx.Client(timeout=120) as client:  # whole and streamed: both reach a shard
            r = client.post(url + "/v1/chat/completions", json=body)
            assert r.status_code == 200, r.text
            assert r.json()["choices"][0]["message"]["content"] == want.answer
            s = client.post(url + "/v1/chat/completions", json={**body, "stream": True})
            assert s.status_code == 200 and "[DONE]" in s.text and '"error"' not in s.text
        assert httpx.get(url + "/v1/kbs/big").json()["tokens"] == kb.tokens
