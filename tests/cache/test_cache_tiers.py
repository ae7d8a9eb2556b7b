"""Cache tiers in one process on the tiny model: LRU budgets, promotion, write-through, TTL, versions, events."""

from __future__ import annotations

import time

import pytest
import torch
from storeutil import make_docs, tiny_entry

import cag
from cag.cache import kvfile, stores
from cag.cache.stores import BudgetError, DiskStore, HostStore, MemoryStore, TieredStore


@pytest.fixture
def docs(tmp_path):
    return make_docs(tmp_path / "docs")


def test_memory_tier_evicts_least_recently_used_within_its_budget():
    mem = MemoryStore(budget_bytes=128 * 30)
    for name in "abc":
        mem.put(tiny_entry(name, 10))
    assert mem.get("a", kvfile.Expect(), "cpu") is not None  # a is now the most recently used
    mem.put(tiny_entry("d", 10))
    assert not mem.has("b") and all(mem.has(n) for n in "acd") and mem.used <= mem.budget
    assert mem.get("a", kvfile.Expect(knowledge="other"), "cpu") is None  # made for other knowledge
    with pytest.raises(BudgetError, match="needs 5120 bytes but the memory tier's budget is 3840 bytes; raise CAG_MEMORY_BYTES"):
        mem.put(tiny_entry("huge", 40))


def test_eviction_hands_the_only_copy_down_instead_of_losing_it():
    mem, host = MemoryStore(128 * 10), HostStore(128 * 100)
    tiers = TieredStore([mem, host])
    mem.put(tiny_entry("a", 10))
    mem.put(tiny_entry("b", 10))  # evicts a, which no other tier holds
    assert host.has("a") and not mem.has("a")
    got, source = tiers.get("a", kvfile.Expect(), "cpu")
    assert source == "host" and mem.has("a") and host.has("b")  # promoted back; b went down in its turn


def test_put_writes_through_to_persistent_tiers_only(cag_home):
    mem = MemoryStore(1 << 20)
    tiers = TieredStore([mem, DiskStore()])
    manifest = tiers.put(tiny_entry("k", 4))
    assert not mem.has("k") and DiskStore().has("k") and manifest["tokens"] == 4


def test_load_promotes_a_disk_hit_into_memory_and_counts_hits(cag_home, tiny_lm, docs):
    store = stores.configure(memory_bytes=1 << 30)
    kb = cag.build([docs], name="kb", lm=tiny_lm, store=store)
    assert kb.cache_source == "built" and not store.tier("memory").has("kb")
    first = cag.load("kb", lm=tiny_lm, store=store)
    second = cag.load("kb", lm=tiny_lm, store=store)
    assert (first.cache_source, second.cache_source) == ("disk", "memory")
    kept = store.tier("memory").entries["kb"].layers[0][0]
    assert kept.data_ptr() == second.layers[0][0].data_ptr()  # one copy of the KV, not two
    q = "Who founded it?"
    assert first.ask(q, max_new_tokens=8).token_ids == second.ask(q, max_new_tokens=8).token_ids \
        == kb.ask(q, max_new_tokens=8, use_cache=False).token_ids
    row = {r["name"]: r for r in cag.list_kbs(store)}["kb"]
    assert row["tiers"] == ["memory", "disk"] and row["hits"] == 2 and row["tokens"] == kb.tokens
    assert row["documents"] == 2 and row["status"] == "cached (not verified)" and row["age_s"] >= 0


def test_expired_cache_is_rebuilt_not_served(cag_home, tiny_lm, docs, monkeypatch):
    # the TTL's clock (cag.cache.policies) is the wall clock plus what the test says has passed: an hour's
    # TTL never runs out while the test works, however slow the machine, and two hours later it has
    from types import SimpleNamespace

    from cag.cache import policies

    later = {"s": 0.0}
    monkeypatch.setattr(policies, "time", SimpleNamespace(time=lambda: time.time() + later["s"]))
    store = stores.configure(memory_bytes=1 << 30)
    cag.build([docs], name="kb", lm=tiny_lm, store=store, ttl_s=3600)
    assert cag.load("kb", lm=tiny_lm, store=store).cache_source == "disk"
    later["s"] = 7200
    logs = []
    again = cag.load("kb", lm=tiny_lm, store=store, log=logs.append)
    assert again.cache_source == "built" and any("expired" in m for m in logs)
    later["s"] = 0.0  # just after that rebuild
    assert cag.load("kb", lm=tiny_lm, store=store).cache_source == "disk"  # the rebuilt one is fresh
    later["s"] = 7200
    with pytest.raises(cag.CagError, match="no servable cache"):
        cag.load("kb", lm=tiny_lm, store=store, rebuild=False)


def test_publishing_a_version_refuses_the_older_one(cag_home, tiny_lm, docs):
    store = stores.configure(memory_bytes=1 << 30)
    cag.build([docs], name="kb", lm=tiny_lm, store=store, version=1)
    loaded = cag.load("kb", lm=tiny_lm, store=store)
    assert loaded.cache_source == "disk"
    cag.publish("kb", 2, store=store)
    fresh = cag.load("kb", lm=tiny_lm, store=store)
    assert fresh.cache_source == "built" and store.tier("disk").get("kb", kvfile.Expect(), "cpu").meta["policy"]["version"] == 2
    loaded.ask("Who?", max_new_tokens=2)  # a KB loaded before the publish reloads before answering
    assert loaded.cache_source in ("disk", "memory") and loaded.manifest["created"] == fresh.manifest["created"]


def test_invalidate_drops_every_tier_and_loaded_kbs_reload(cag_home, tiny_lm, docs):
    store = stores.configure(memory_bytes=1 << 30)
    cag.build([docs], name="kb", lm=tiny_lm, store=store)
    kb = cag.load("kb", lm=tiny_lm, store=store)
    cag.load("kb", lm=tiny_lm, store=store)
    assert sorted(cag.invalidate("kb", store=store)) == ["disk", "memory"]
    assert {r["name"]: r for r in cag.list_kbs(store)}["kb"]["status"].startswith("not cached")
    a = kb.ask("Who?", max_new_tokens=4)
    assert a.cache_source == "built"  # rebuilt from the knowledge files, not served from the dropped cache


def test_delete_removes_the_kb_from_every_tier(cag_home, tiny_lm, docs):
    store = stores.configure(memory_bytes=1 << 30)
    cag.build([docs], name="kb", lm=tiny_lm, store=store)
    cag.load("kb", lm=tiny_lm, store=store)
    cag.delete("kb", store=store)
    assert not store.tier("memory").has("kb") and cag.list_kbs(store) == []


def test_budget_values_parse_and_bad_ones_say_what_to_set():
    assert stores.parse_bytes("512M", "X") == 512 << 20 and stores.parse_bytes("1073741824", "X") == 1 << 30
    with pytest.raises(cag.CagError, match="CAG_MEMORY_BYTES must be a byte count"):
        stores.parse_bytes("lots", "CAG_MEMORY_BYTES")


def test_copying_a_quantized_cache_between_tiers_keeps_it_loadable(cag_home, tiny_lm, docs, tmp_path, monkeypatch):
    kb = cag.build([docs], name="kb", lm=tiny_lm, store=stores.configure(memory_bytes=0))
    path = cag_home / "kbs" / "kb" / "cache.safetensors"
    identity = {k: kb.manifest[k] for k in ("model", "tokenizer", "template", "knowledge")}
    kvfile.save(path, kb.layers, kb.prefix_ids, identity, kv_quant="int8")
    entry = DiskStore().get("kb", kvfile.Expect(), "cpu")
    monkeypatch.setenv("CAG_HOME", str(tmp_path / "elsewhere"))
    DiskStore().put(entry)  # what promotion from Redis to disk does
    again = DiskStore().get("kb", kvfile.Expect(), "cpu")
    assert again.manifest["kv_quant"] == "int8" and again.prefix_ids == kb.prefix_ids
    assert all(torch.equal(k1, k2) for (k1, _), (k2, _) in zip(entry.layers, again.layers))
