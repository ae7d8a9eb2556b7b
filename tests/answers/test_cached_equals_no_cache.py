"""A cached answer equals the no-cache reference bit for bit: the reference recomputes the prefix in the
pieces the cache was computed in (the manifest's prefill_bounds), then the question, so both run the very
same forwards. Checked on the first generated token's logits and on every token id, in float32 and
bfloat16, for a cache restored from disk, after an incremental update, and for a cache written before
manifests recorded their pieces."""

from __future__ import annotations

import json

import pytest
import torch
from storeutil import make_docs

import cag
import torch_direct as eu

from cag.engines.torch import models
from cag.engines.torch.workspace import Workspace
from cag.kb import incremental
from cag.cache import kvfile, stores

QUESTIONS = ["Who founded the company?", "How much is the Heron lantern?", "What colour is it?"]
CHUNK = 24


@pytest.fixture(scope="module", params=["float32", "bfloat16"])
def lm(request, sharp_model_dir):
    return models.load(str(sharp_model_dir), device="cpu", dtype=request.param)


class FirstLogits:
    """Records every top-level forward's input ids and last-position logits while installed."""

    def __init__(self, model):
        self.calls: list[tuple[list[int], torch.Tensor]] = []
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        self.calls.append((ids[0].tolist(), output.logits[0, -1].detach().clone()))

    def of(self, new_ids: list[int]) -> torch.Tensor:
        """The logits of the first forward that ended with `new_ids` (the question): the first generated token's."""
        return next(logits for ids, logits in self.calls if ids[-len(new_ids):] == new_ids)

    def close(self):
        self.handle.remove()


def cached_and_reference(kb, question: str):
    """(token ids, first-token logits) of the cached answer and of the no-cache reference."""
    out = []
    for use_cache in (True, False):
        rec = FirstLogits(kb.lm.model)
        try:
            answer = kb.ask(question, max_new_tokens=8, use_cache=use_cache)
        finally:
            rec.close()
        out.append((answer.token_ids, rec.of(kb.fit(question, max_new_tokens=8).new_ids)))
    return out


def assert_bit_identical(kb):
    for q in QUESTIONS:
        (ids, logits), (ref_ids, ref_logits) = cached_and_reference(kb, q)
        assert ids == ref_ids, q
        assert logits.dtype == kb.lm.torch_dtype and torch.equal(logits, ref_logits), q


def test_a_cache_restored_from_disk_answers_bit_identically_to_the_reference(cag_home, lm, tmp_path):
    docs = make_docs(tmp_path / "docs")
    built = cag.build([docs], name="kb", lm=lm, chunk_size=CHUNK, log=lambda m: None)
    bounds = built.manifest["prefill_bounds"]
    assert bounds == incremental.chunk_ends(0, built.tokens, CHUNK) and len(bounds) > 3
    kb = cag.load("kb", lm=lm, store=stores.configure(memory_bytes=0))
    assert kb.cache_source == "disk" and kb.prefill_bounds() == bounds
    assert_bit_identical(kb)
    answer = kb.ask(QUESTIONS[0], max_new_tokens=4, use_cache=False)
    assert answer.cached_tokens == 0 and answer.question_tokens == answer.prompt_tokens  # nothing came from the cache


def test_an_incrementally_extended_cache_answers_bit_identically_to_the_reference(cag_home, lm, tmp_path):
    docs = make_docs(tmp_path / "docs")
    old = cag.build([docs], name="kb", lm=lm, chunk_size=CHUNK, log=lambda m: None)
    (docs / "c.txt").write_text("The Wren lamp is green, costs 64 crowns and burns for nine hours.")
    inc = cag.build([docs], name="kb", lm=lm, chunk_size=CHUNK, log=lambda m: None)
    s = inc.build_stats
    assert 0 < s.reused < old.tokens and s.reused in old.manifest["prefill_bounds"]  # whole old pieces only
    bounds = inc.manifest["prefill_bounds"]
    assert bounds[:bounds.index(s.reused) + 1] == [b for b in old.manifest["prefill_bounds"] if b <= s.reused]
    kb = cag.load("kb", lm=lm, store=stores.configure(memory_bytes=0))
    assert kb.cache_source == "disk" and kb.prefill_bounds() == bounds
    assert_bit_identical(kb)


def test_reuse_stops_at_the_piece_holding_the_first_change(tiny_lm):
    """Old pieces end at 10, 20, 25; the first change at 23 reuses the pieces up to 20, then chunks of 10."""
    old_ids, new_ids = list(range(3, 28)), list(range(3, 26)) + [99] * 14
    old = eu.pieces(tiny_lm, old_ids, [10, 20, 25])
    ext = incremental.extend(tiny_lm, Workspace(old), old_ids, new_ids, chunk_size=10, old_bounds=[10, 20, 25])
    assert (ext.reused, ext.prefilled, ext.changed_at, ext.bounds) == (20, 17, 23, [10, 20, 30, 37])
    fresh = eu.pieces(tiny_lm, new_ids, ext.bounds)
    assert all(torch.equal(a, b) for (k1, v1), (k2, v2) in zip(ext.prefix.layers, fresh) for a, b in ((k1, k2), (v1, v2)))
    assert "recomputed from token 20" in ext.describe(len(old_ids)) and "changed at token 23" in ext.describe(25)
    same = incremental.extend(tiny_lm, Workspace(old), old_ids, old_ids + [5, 6], chunk_size=10, old_bounds=[10, 20, 25])
    assert (same.reused, same.bounds) == (25, [10, 20, 25, 27])


def test_a_cache_without_recorded_pieces_is_recomputed_in_chunks_of_the_kb_chunk_size(cag_home, lm, tmp_path):
    """Caches written before manifests held prefill_bounds: the reference uses kb.json's chunk_size (else 512)."""
    docs = make_docs(tmp_path / "docs")
    cag.build([docs], name="kb", lm=lm, chunk_size=CHUNK, log=lambda m: None)
    folder = cag_home / "kbs" / "kb"
    old = kvfile.load(folder / "cache.safetensors")
    identity = {k: old.manifest[k] for k in kvfile.IDENTITY}
    kvfile.save(folder / "cache.safetensors", old.layers, old.prefix_ids, identity)  # no prefill_bounds
    kb = cag.load("kb", lm=lm, store=stores.configure(memory_bytes=0))
    assert "prefill_bounds" not in kb.manifest and kb.chunk_size == CHUNK
    assert kb.prefill_bounds() == incremental.chunk_ends(0, kb.tokens, CHUNK)
    assert_bit_identical(kb)
    meta = json.loads((folder / "kb.json").read_text())
    del meta["chunk_size"]  # built before kb.json kept the chunk size: the default chunk
    (folder / "kb.json").write_text(json.dumps(meta))
    kb = cag.load("kb", lm=lm, store=stores.configure(memory_bytes=0))
    assert kb.prefill_bounds() == incremental.chunk_ends(0, kb.tokens, incremental.DEFAULT_CHUNK)
