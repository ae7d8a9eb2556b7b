"""The public Python API: build a knowledge base once, load it anywhere, ask it questions.

    kb = cag.build(["docs/"], name="handbook")
    print(kb.ask("How many vacation days do I get?").answer)
"""

from __future__ import annotations

import contextlib
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from .engines.torch import engine, models
from .cache import events, kvfile, kvquant, policies, stores
from .kb import incremental, knowledge
from . import paths
from .engines.torch.engine import Sampling
from .errors import (CagError, ContextLengthError, KnowledgeError, KnowledgeTooLargeError, NotFoundError,
                     StaleKnowledgeError)
from .cache.policies import Policy
from .results import Answer, BuildStats
from .cache.stores import Entry, Record, TieredStore
from .engines.torch.kvcompat import KV
from .kb.prompt import DEFAULT_INSTRUCTION, PromptBuilder, Split, Turn
from .stoptext import StopText

DEFAULT_RESERVE = 512  # context tokens kept free for the question and the answer
from .cache.stores.disk import CACHE_FILE, KB_FILE, SNAPSHOT_FILE  # noqa: E402,F401 - re-exported names

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class KnowledgeBase:
    """A named knowledge base with its model, prompt and (in memory) prefix KV cache."""

    name: str
    lm: models.LoadedModel
    docs: list[knowledge.Document]
    sources: list[str]
    builder: PromptBuilder
    workspace: engine.Workspace
    prefix_ids: list[int]
    manifest: dict
    cache_source: str
    build_stats: BuildStats | None = None
    chunk_size: int = engine.DEFAULT_CHUNK  # the build's prefill chunk (pieces of caches that do not record theirs)
    _stops: list[int] = field(default_factory=list, repr=False)
    _store: TieredStore | None = field(default=None, repr=False)
    _generation: int = field(default=-1, repr=False)  # events.generation(name) when loaded; -1: never reloads

    @property
    def layers(self) -> KV:
        """The prefix's per-layer (key, value) tensors."""
        return self.workspace.prefix

    @property
    def tokens(self) -> int:
        return len(self.prefix_ids)

    def ask(self, question: str, *, history: Sequence[Turn] = (), use_cache: bool = True,
            max_new_tokens: int = 256, sampling: Sampling = Sampling(),
            on_text: Callable[[str], None] | None = None, stop: Sequence[str] = ()) -> Answer:
        """Answer from the cached prefix (or, with use_cache=False, from the full prompt: the reference).

        The reference computes the whole prompt from its tokens, the prefix in the pieces the cache was
        computed in (prefill_bounds) and then the question, so that it runs the very same forwards as the
        cached path and a cached answer equals it bit for bit, bf16 on a GPU included.
        `stop` strings end the answer before the first of them (it is not part of the answer, and
        `on_text` never receives text that a stop string later cuts off). A prompt that would not fit
        the context window with `max_new_tokens` to spare is refused (ContextLengthError) before any work.
        """
        self._refresh_if_invalidated()
        start = time.perf_counter()
        split = self.fit(question, history, max_new_tokens)
        prefix = self.workspace if use_cache else self._recomputed_prefix()
        stream = engine.TextStream(self.lm.tokenizer)
        cut = StopText(stop)
        ttft = None
        tokens = engine.generate(self.lm.model, split.new_ids, prefix=prefix, reuse=split.reuse,
                                 max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=self._stops)
        with contextlib.closing(tokens):  # a stop string ends it early: give the workspace back at once
            for token in tokens:
                if ttft is None:
                    ttft = time.perf_counter() - start
                safe = cut.push(stream.push(token))
                if on_text and safe:
                    on_text(safe)
                if cut.stopped:
                    break
        tail = cut.push(stream.flush()) + cut.flush()
        if on_text and tail:
            on_text(tail)
        total = time.perf_counter() - start
        stopped = cut.stopped or len(stream.ids) < max_new_tokens
        return Answer(
            question=question.strip(), answer=cut.text.strip(), token_ids=stream.ids,
            ttft_s=ttft if ttft is not None else total, total_s=total,
            prompt_tokens=len(split.ids), cached_tokens=split.reuse if use_cache else 0,
            question_tokens=len(split.new_ids) if use_cache else len(split.ids),
            new_tokens=len(stream.ids), boundary_ok=split.boundary_ok,
            mode="cache" if use_cache else "no-cache", cache_source=self.cache_source,
            finish_reason="stop" if stopped else "length",
        )

    def prefill_bounds(self) -> list[int]:
        """Where each piece the cached prefix was computed in ends: from the cache's manifest; for caches
        written before manifests recorded them, chunks of the build's chunk size (kb.json's chunk_size,
        else 512), which is how full builds computed them (an incremental build of such a cache may have
        used other pieces: its reference can then differ from the cached answer in the last bits)."""
        return list(self.manifest.get("prefill_bounds") or engine.chunk_ends(0, self.tokens, self.chunk_size))

    def _recomputed_prefix(self) -> engine.Workspace:
        """The prefix's KV computed afresh from its tokens, in the cache's pieces: the reference's prefix.
        Stored as the cache stores it (an int8 cache: through the same int8 round trip), so the reference
        differs from the cached answer in nothing but where the prefix's KV came from."""
        layers = engine.prefill_pieces(self.lm.model, self.prefix_ids, self.prefill_bounds())
        if self.manifest.get("kv_quant"):
            layers = [(kvquant.roundtrip(k), kvquant.roundtrip(v)) for k, v in layers]
        return engine.Workspace(layers)

    def fit(self, question: str, history: Sequence[Turn] = (), max_new_tokens: int = 256) -> Split:
        """The question's token plan, or ContextLengthError when knowledge + question + history +
        `max_new_tokens` would run past the model's context window (positions past it give garbage)."""
        if max_new_tokens < 1:
            raise CagError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        split = self.builder.split(question, history, prefix_ids=self.prefix_ids)
        if len(split.ids) + max_new_tokens > self.lm.context_window:
            raise ContextLengthError(split.reuse, len(split.ids) - split.reuse, max_new_tokens, self.lm.context_window)
        return split

    def trim_history(self, question: str, history: Sequence[Turn], max_new_tokens: int = 256) -> list[Turn]:
        """The most recent turns of `history` that fit the context window with this question and answer
        budget (oldest dropped first); raises ContextLengthError when even the question alone does not fit."""
        kept = list(history)
        while True:
            try:
                self.fit(question, kept, max_new_tokens)
                return kept
            except ContextLengthError:
                if not kept:
                    raise
                kept.pop(0)

    def ask_many(self, questions: Sequence[str], *, max_new_tokens: int = 256) -> list[Answer]:
        """Greedy answers to several questions decoded together on the one shared prefix (cag.batch).

        Throughput, not latency: every answer arrives when the longest is done. Each answer is the one
        `ask` gives (every row is computed as it would be alone).
        """
        from .engines.torch import batch

        self._refresh_if_invalidated()
        start = time.perf_counter()
        splits = [self.fit(q, max_new_tokens=max_new_tokens) for q in questions]
        outs = batch.generate_batch(self.lm.model, self.workspace, [sp.new_ids for sp in splits],
                                    max_new_tokens=max_new_tokens, stop_ids=self._stops,
                                    reuse=[sp.reuse for sp in splits])
        total = time.perf_counter() - start
        return [Answer(
            question=q.strip(), answer=engine.detokenize(self.lm.tokenizer, ids).strip(), token_ids=ids,
            ttft_s=total, total_s=total, prompt_tokens=len(sp.ids), cached_tokens=sp.reuse,
            question_tokens=len(sp.new_ids), new_tokens=len(ids), boundary_ok=sp.boundary_ok, mode="cache-batch",
            cache_source=self.cache_source, finish_reason="length" if len(ids) >= max_new_tokens else "stop")
            for q, sp, ids in zip(questions, splits, outs)]

    def __post_init__(self) -> None:
        self._stops = engine.stop_ids(self.lm.tokenizer, self.lm.model)

    def _refresh_if_invalidated(self) -> None:
        """After an invalidation event or a version publish, reload (or rebuild) before answering again."""
        if self._generation >= 0 and self._generation != events.generation(self.name):
            fresh = load(self.name, lm=self.lm, store=self._store)
            for f in ("docs", "sources", "builder", "workspace", "prefix_ids", "manifest", "cache_source",
                      "build_stats", "chunk_size", "_generation"):
                setattr(self, f, getattr(fresh, f))


# -- building ---------------------------------------------------------------------------------------

def build(sources: Iterable[str | Path], name: str | None = None, *, model: str | None = None,
          device: str | None = None, dtype: str | None = None, instruction: str = DEFAULT_INSTRUCTION,
          reserve: int = DEFAULT_RESERVE, chunk_size: int = engine.DEFAULT_CHUNK,
          lm: models.LoadedModel | Callable[[], models.LoadedModel] | None = None, log: Log = _stderr,
          progress: Callable[[int, int], None] | None = None, ttl_s: float | None = None,
          version: int | None = None, incremental_update: bool = True, shard: bool = False,
          store: TieredStore | None = None, kv_quant: str | None = None, owner: str | None = None) -> KnowledgeBase:
    """Read the sources, prefill them (only what changed since the last build) and write the cache through.

    ttl_s and version are the knowledge base's invalidation policy (see cag.policies); the cache goes
    to every persistent tier configured (CAG_HOME/kbs/NAME on disk, Redis with CAG_REDIS_URL).
    With shard=True, knowledge too large for one context is split into shards (a ShardedKnowledgeBase).
    kv_quant="int8" stores the KV lossily at a quarter of fp32 / half of bf16 (answers may change wording).
    owner is the tenant the knowledge base belongs to (the server sets it; it travels with the cache to
    every tier and replica); a rebuild without one keeps the owner it had.
    """
    sources = [str(Path(s).expanduser().resolve()) for s in sources]
    if not sources:
        raise KnowledgeError("give at least one file or folder to build from")
    name = name or Path(sources[0]).stem
    paths.writable(paths.kb_dir(name))  # refuse a bad name or a read-only CAG_HOME before any work
    docs = knowledge.load(sources, log=log)
    lm = lm() if callable(lm) else lm or models.load(model, device=device, dtype=dtype, log=log)
    settings = {"name": name, "sources": sources, "model": model or lm.name,
                "dtype": kvfile.dtype_name(lm.dtype), "instruction": instruction, "reserve": reserve,
                "chunk_size": chunk_size}
    if kv_quant:
        settings["kv_quant"] = kv_quant
    store = store or stores.default()
    if owner is None:
        owner = getattr(store.record(name), "owner", None)
    try:
        return _build(settings, docs, lm, Policy(ttl_s, version), store, chunk_size, progress, log, incremental_update,
                      owner=owner)
    except KnowledgeTooLargeError:
        if not shard:
            raise
    return _build_shards(settings, docs, lm, Policy(ttl_s, version), store, chunk_size, progress, log, owner)


def _build_shards(settings: dict, docs, lm, policy: Policy, store: TieredStore, chunk_size: int, progress, log: Log,
                  owner: str | None = None):
    from .kb import shards

    name = settings["name"]
    groups = shards.plan(docs, lm.tokenizer, settings["instruction"], lm.context_window - settings["reserve"],
                         lm.context_window, settings["reserve"])
    built = []
    for i, group in enumerate(groups):
        sub = {**settings, "name": shards.shard_name(name, i), "documents": [d.name for d in group], "parent": name}
        built.append(_build(sub, group, lm, policy, store, chunk_size, progress, log, owner=owner))
        log(f"{name}: shard {i} holds {len(group)} documents, {built[-1].tokens} tokens")
    store.put_record(Record(name, {**settings, "shards": [kb.name for kb in built], "built_at": time.time()}, owner),
                     knowledge.to_json(docs))
    return shards.ShardedKnowledgeBase.of(name, built)


def _build(settings: dict, docs, lm, policy: Policy, store: TieredStore, chunk_size: int, progress,
           log: Log, incremental_update: bool = True, previous: Entry | None = None,
           owner: str | None = None) -> KnowledgeBase:
    name = settings["name"]
    builder = PromptBuilder(lm.tokenizer, docs, settings["instruction"])
    fits = lm.context_window - settings["reserve"]
    over = builder.exceeds(max(fits, 0))
    if over is not None:
        raise KnowledgeTooLargeError(over, max(fits, 0), lm.context_window, settings["reserve"], at_least=True)
    prefix_ids = builder.prefix_ids()
    if len(prefix_ids) > fits:
        raise KnowledgeTooLargeError(len(prefix_ids), max(fits, 0), lm.context_window, settings["reserve"])
    if policy.version is None:  # a build is the published version unless it says otherwise
        policy = Policy(policy.ttl_s, store.published(name))
    if incremental_update and previous is None:
        previous = _previous(name, lm, builder, store, settings)
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, len(prefix_ids))

    start = time.perf_counter()
    old_layers, old_ids = (previous.layers, previous.prefix_ids) if incremental_update and previous else (None, [])
    old_bounds = previous.manifest.get("prefill_bounds") if old_layers is not None else None
    ext = incremental.extend(lm.model, old_layers, old_ids, prefix_ids, chunk_size, step, old_bounds)
    seconds = time.perf_counter() - start
    how = ext.describe(len(old_ids))
    if old_layers is not None:
        log(f"{name}: {how}")
    meta = {**settings, "policy": policy.to_json(), "built_at": time.time()}
    identity, layers = {**_identity(lm, builder, docs), "prefill_bounds": ext.bounds}, ext.layers
    if settings.get("kv_quant"):  # answer from what the tiers will hold, so "built" and "disk" answers agree
        identity["kv_quant"] = settings["kv_quant"]
        layers = [(kvquant.roundtrip(k), kvquant.roundtrip(v)) for k, v in layers]
    entry = Entry(name, layers, prefix_ids, identity, meta, knowledge.to_json(docs), owner=owner)
    store.drop(name, where=lambda tier: not tier.persistent)  # memory tiers may hold the previous cache
    manifest = store.put(entry)
    disk = paths.kb_dir(name) / CACHE_FILE
    size = disk.stat().st_size if disk.is_file() else entry.nbytes
    stats = BuildStats(len(prefix_ids), seconds, size, ext.reused, ext.prefilled, how)
    return KnowledgeBase(name, lm, docs, settings["sources"], builder, engine.Workspace(layers), prefix_ids,
                         manifest, "built", stats, chunk_size=chunk_size, _store=store,
                         _generation=events.generation(name))


def _previous(name: str, lm, builder: PromptBuilder, store: TieredStore, settings: dict) -> Entry | None:
    """The last cache of `name` made with this model, tokenizer and template, whatever its knowledge."""
    try:
        hit = store.get(name, _expect(lm, builder, None, settings), lm.device)
    except CagError:
        return None  # a broken or foreign cache is simply not reused
    return hit[0] if hit else None


def _identity(lm: models.LoadedModel, builder: PromptBuilder, docs) -> dict:
    return {
        "model": {"name": lm.name, "path": str(lm.path), "fingerprint": lm.model_fingerprint},
        "tokenizer": {"fingerprint": lm.tokenizer_fingerprint},
        "template": {"fingerprint": builder.fingerprint()},
        "knowledge": {"sha256": knowledge.content_hash(docs), "documents": len(docs)},
    }


def _expect(lm: models.LoadedModel, builder: PromptBuilder, knowledge_sha: str | None, settings: dict) -> kvfile.Expect:
    dtype = kvfile.dtype_name(lm.dtype)
    return kvfile.Expect(model=lm.model_fingerprint, tokenizer=lm.tokenizer_fingerprint,
                         template=builder.fingerprint(), knowledge=knowledge_sha, dtype=dtype,
                         kv=settings.get("kv_quant") or dtype)


# -- loading ----------------------------------------------------------------------------------------

def read_meta(name: str, store: TieredStore | None = None) -> dict:
    return _record(name, store or stores.default()).meta


def _record(name: str, store: TieredStore) -> Record:
    found = store.record(name)
    if found is None:
        raise NotFoundError(f"no knowledge base named {name!r} in {paths.kbs_dir()}; build it with `cag build`")
    return found


def load(name: str, *, device: str | None = None, dtype: str | None = None, rebuild: bool = True,
         lm: models.LoadedModel | None = None, log: Log = _stderr,
         progress: Callable[[int, int], None] | None = None, store: TieredStore | None = None) -> KnowledgeBase:
    """The knowledge base from the fastest tier holding a servable cache; rebuilt when its knowledge
    changed (or refused, rebuild=False), when it expired, was invalidated, or is of another version."""
    store = store or stores.default()
    record = _record(name, store)
    meta = record.meta
    lm = lm or models.load(meta["model"], device=device, dtype=dtype or meta.get("dtype"), log=log)
    if meta.get("shards"):
        from .kb.shards import ShardedKnowledgeBase

        return ShardedKnowledgeBase.of(name, [load(s, rebuild=rebuild, lm=lm, log=log, progress=progress, store=store)
                                              for s in meta["shards"]])
    docs = _current_docs(meta, lambda: store.snapshot(name), log)
    if "documents" in meta:  # one shard of a larger knowledge base: only its own documents
        mine = set(meta["documents"])
        docs = [d for d in docs if d.name in mine]
    builder = PromptBuilder(lm.tokenizer, docs, meta["instruction"])
    sha = knowledge.content_hash(docs)
    generation = events.generation(name)
    published = store.published(name)
    hit = store.get(name, _expect(lm, builder, None, meta), lm.device,
                    valid=lambda entry, tier: policies.servable(entry, published))
    policy = Policy.from_meta(meta)
    if hit is not None and hit[0].manifest.get("knowledge", {}).get("sha256") == sha:
        entry, source = hit
        builder._prefix_ids = entry.prefix_ids  # verified against the template + knowledge hashes
        workspace = engine.Workspace(entry.layers)
        store.share(name, workspace.prefix)  # its prefix region is never written: safe to share
        return KnowledgeBase(name, lm, docs, meta["sources"], builder, workspace, entry.prefix_ids, entry.manifest,
                             source, chunk_size=_chunk_size(meta), _store=store, _generation=generation)
    if hit is not None:
        why = f"the knowledge files of {name!r} changed since its cache was built"
        if not rebuild:
            raise StaleKnowledgeError(f"{why}; run `cag build` again or drop --no-rebuild")
        log(f"The knowledge files of {name!r} changed since the cache was built: rebuilding.")
    else:
        why = f"no servable cache of {name!r} (expired, invalidated, or not version {published})" \
            if published is not None else f"no servable cache of {name!r} (expired or invalidated)"
        if not rebuild:
            raise StaleKnowledgeError(f"{why}; run `cag build` again or drop --no-rebuild")
        log(f"{why}: rebuilding.")
    settings = {k: v for k, v in meta.items() if k not in ("policy", "built_at")}
    return _build({**settings, "name": name}, docs, lm, Policy(policy.ttl_s, published), store,
                  _chunk_size(meta), progress, log, previous=hit[0] if hit else None, owner=record.owner)


def _chunk_size(meta: dict) -> int:
    """The prefill chunk a knowledge base was built with (kb.json; 512 for those built before it was kept)."""
    value = meta.get("chunk_size")
    return value if type(value) is int and value > 0 else engine.DEFAULT_CHUNK


def _current_docs(meta: dict, snapshot: Callable[[], list[dict] | None], log: Log) -> list[knowledge.Document]:
    """Today's knowledge files; the snapshot taken at build time if they are gone (so a cache still answers)."""
    missing = [s for s in meta["sources"] if not Path(s).exists()]
    if not missing:
        return knowledge.load(meta["sources"])  # unsupported files were reported by the build
    log(f"Knowledge source not found: {missing[0]}; answering from the copy saved at build time.")
    snapshot = snapshot()
    if not snapshot:
        raise KnowledgeError(f"knowledge path not found: {missing[0]} (and no saved copy to fall back on)")
    return knowledge.from_json(snapshot)


# -- lifecycle --------------------------------------------------------------------------------------

def invalidate(name: str, store: TieredStore | None = None) -> list[str]:
    """Drop `name`'s cache in every tier and every process (Redis pub/sub); the next use rebuilds it."""
    return (store or stores.default()).invalidate(name)


def publish(name: str, version: int, store: TieredStore | None = None) -> None:
    """Make `version` the only servable one everywhere; replicas refuse caches of any other version."""
    (store or stores.default()).publish(name, version)


def record(name: str, store: TieredStore | None = None) -> Record | None:
    """Settings and owner of `name` (None if there is no such knowledge base, or it was deleted)."""
    return (store or stores.default()).record(name)


def list_kbs(store: TieredStore | None = None) -> list[dict]:
    """One row per knowledge base: name, owner, model, tokens, documents, bytes, created, status, tiers, hits, age_s."""
    from . import registry

    return registry.rows(store or stores.default())


def delete(name: str, store: TieredStore | None = None) -> None:
    """Remove `name` from every tier and every replica (refused while Redis, when configured, is down)."""
    from . import registry

    registry.delete(name, store or stores.default())
