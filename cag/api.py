"""The public Python API: build a knowledge base once, load it anywhere, ask it questions.

    kb = cag.build(["docs/"], name="handbook")
    print(kb.ask("How many vacation days do I get?").answer)
"""

from __future__ import annotations

import contextlib
import dataclasses
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator, Sequence

from . import decode, drafts, engines, paths
from .cache import events, kvfile, policies, stores
from .cache.policies import Policy
from .cache.stores import Entry, Record, TieredStore
from .engines.base import Engine, Job, Prefix
from .engines.options import EngineOptions
from .errors import (
    CacheMismatchError,
    CagError,
    ContextLengthError,
    KnowledgeError,
    KnowledgeTooLargeError,
    ModelChangedError,
    ModelMissingError,
    NotFoundError,
    StaleKnowledgeError,
)
from .kb import grounding, incremental, knowledge, passages
from .kb.grounding import DEFAULT_SOURCES, Citer
from .kb.prompt import DEFAULT_INSTRUCTION, PromptBuilder, Split, Turn
from .results import Answer, BuildStats
from .sampling import Sampling
from .scheduler import Batching, Scheduler
from .settings import current as current_settings
from .stoptext import StopText

DEFAULT_RESERVE = 512  # context tokens kept free for the question and the answer
from .log import Log, stderr




@dataclass
class KnowledgeBase:
    """A named knowledge base with its engine, prompt and (in memory) prefix."""

    name: str
    lm: Engine
    docs: list[knowledge.Document]
    sources: list[str]
    builder: PromptBuilder
    prefix: Prefix
    prefix_ids: list[int]
    manifest: dict
    cache_source: str
    build_stats: BuildStats | None = None
    chunk_size: int = incremental.DEFAULT_CHUNK  # the build's prefill chunk (pieces of caches that do not record theirs)
    citer: Citer | None = None  # sources and support from the knowledge base's passage index (made from docs if None)
    _store: TieredStore | None = field(default=None, repr=False)
    _generation: int = field(default=-1, repr=False)  # events.generation(name) when loaded; -1: never reloads
    _scheduler: Scheduler | None = field(default=None, repr=False)
    _drafts: tuple[list[int], drafts.Index] | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def layers(self) -> Sequence[tuple]:
        """The prefix's per-layer (key, value) tensors (Prefix.layers; [] where an engine state has none)."""
        return self.prefix.layers or []

    @property
    def tokens(self) -> int:
        return len(self.prefix_ids)

    @property
    def nbytes(self) -> int:
        """Memory the loaded prefix holds (Prefix.nbytes): what a server's memory budget counts for it."""
        return self.prefix.nbytes

    def __post_init__(self) -> None:
        if self.citer is None:
            self.citer = Citer(passages.PassageIndex.build(self.docs, knowledge.content_hash(self.docs)))

    def release(self) -> None:
        """Let go of the prefix now rather than whenever it is collected (a llama.cpp context is hundreds of
        MB): a server unloading an idle knowledge base to stay within its budget. It answers nothing after."""
        with self._lock:
            self._scheduler = None
        self.prefix.release()

    def ask(self, question: str, *, history: Sequence[Turn] = (), use_cache: bool = True,
            max_new_tokens: int = 256, sampling: Sampling = Sampling(),
            on_text: Callable[[str], None] | None = None, stop: Sequence[str] = (),
            batching: Batching | None = None, system: str | None = None, sources: int = DEFAULT_SOURCES,
            unsupported: str = "flag", citer: Citer | None = None, draft: int | None = None) -> Answer:
        """Answer from the cached prefix (or, with use_cache=False, from the full prompt: the reference).

        The reference computes the whole prompt from its tokens, the prefix in the pieces the cache was
        computed in (prefill_bounds) and then the question, so that it runs the very same forwards as the
        cached path and a cached answer equals it bit for bit, bf16 on a GPU included.
        `stop` strings end the answer before the first of them (it is not part of the answer, and
        `on_text` never receives text that a stop string later cuts off); they are matched on the answer as
        it is returned, from its first visible character. The prompt layout's own endings
        (PromptBuilder.endings) end it the same way, on every path. A prompt that would not fit
        the context window with `max_new_tokens` to spare is refused (ContextLengthError) before any work.
        With `batching`, the answer joins the others in progress on this knowledge base (cag.scheduler:
        continuous batching, the same tokens); without it, it decodes in the calling thread.
        `system` is a system message for this answer (tone, language, format): it goes after the cached
        knowledge (kb.prompt), so the cache still serves the prefix and the answer still equals the reference.
        The answer comes with up to `sources` passages of the knowledge base it rests on and whether they
        support it (cag.kb.grounding, computed from the finished text: the tokens never depend on it).
        unsupported="refuse" replaces an unsupported answer with grounding.REFUSAL (the model's text stays
        in Answer.generated); then `on_text` receives the answer only once it is judged.
        `draft`: the most draft tokens from the knowledge an answer verifies in one step (cag.drafts; 0: none;
        None: CAG_DRAFT, else 12). The tokens are the same with or without drafts; only the time differs.
        """
        grounding.check_options(sources, unsupported)
        self._refresh_if_invalidated()
        start = time.perf_counter()
        deliver, on_text = on_text, on_text if unsupported == "flag" else None  # refuse: sent once judged
        split = self.fit(question, history, max_new_tokens, system=system)
        reading = self._reading(stop)
        stream, cut = reading.stream, reading.cut
        ttft = None
        job = self._job(split, max_new_tokens, sampling, draft)
        with self._answering(job, use_cache, batching) as tokens:
            for token in tokens:
                if ttft is None:
                    ttft = time.perf_counter() - start
                safe = reading.push(token)
                if on_text and safe:
                    on_text(safe)
                if cut.stopped:
                    break
        tail = reading.finish()
        if on_text and tail:
            on_text(tail)
        judged = (citer or self.citer).judge(question, cut.text.strip(), sources, unsupported)
        if deliver and not on_text and judged["answer"]:
            deliver(judged["answer"])
        total = time.perf_counter() - start
        stopped = cut.stopped or len(stream.ids) < max_new_tokens
        return Answer(
            question=question.strip(), token_ids=stream.ids,
            ttft_s=ttft if ttft is not None else total, total_s=total,
            prompt_tokens=len(split.ids), cached_tokens=split.reuse if use_cache else 0,
            question_tokens=len(split.new_ids) if use_cache else len(split.ids),
            new_tokens=len(stream.ids), boundary_ok=split.boundary_ok,
            mode="cache" if use_cache else "no-cache", cache_source=self.cache_source,
            finish_reason="stop" if stopped else "length", drafted=job.drafted, accepted=job.accepted, **judged,
        )

    def _job(self, split: Split, max_new_tokens: int, sampling: Sampling, draft: int | None) -> Job:
        """The answer's job, with a drafter looking up its tokens in the knowledge unless drafts are off."""
        job = Job(list(split.new_ids), split.reuse, max_new_tokens, sampling, frozenset(self.lm.stop_ids))
        most = current_settings().draft if draft is None else draft
        if most > 0:
            job.drafter = drafts.Drafter(self.draft_index(), split.new_ids, most)
        return job

    def draft_index(self) -> drafts.Index:
        """Where runs of the knowledge base's tokens occur (made on first use, kept with the knowledge base)."""
        with self._lock:
            if self._drafts is None or self._drafts[0] is not self.prefix_ids:  # (made again after a reload)
                self._drafts = (self.prefix_ids, drafts.Index(self.prefix_ids))
            return self._drafts[1]

    @contextlib.contextmanager
    def _answering(self, job: Job, use_cache: bool, batching: Batching | None) -> Iterator[Iterator[int]]:
        """The answer's tokens: from this knowledge base's scheduler, or decoded inline on the cached prefix
        or on the reference's recomputed one (released afterwards). Closing them early (a stop string)
        gives the row back at once."""
        prefix = self.prefix if use_cache else self._recomputed_prefix()
        try:
            if use_cache and batching is not None:
                tokens = self.scheduler().answer(job, batching)
            else:
                tokens = decode.tokens(self.lm.decoder(prefix), job)
            with contextlib.closing(tokens):
                yield tokens
        finally:
            if prefix is not self.prefix:
                prefix.release()

    def scheduler(self) -> Scheduler:
        """The thread that decodes this knowledge base's answers together (made on first use)."""
        with self._lock:
            if self._scheduler is None:
                self._scheduler = Scheduler(self.lm.decoder(self.prefix))
            return self._scheduler

    def prefill_bounds(self) -> list[int]:
        """Where each piece the cached prefix was computed in ends: from the cache's manifest; for caches
        written before manifests recorded them, chunks of the build's chunk size (kb.json's chunk_size,
        else 512), which is how full builds computed them (an incremental build of such a cache may have
        used other pieces: its reference can then differ from the cached answer in the last bits)."""
        return list(self.manifest.get("prefill_bounds") or incremental.chunk_ends(0, self.tokens, self.chunk_size))

    def _recomputed_prefix(self) -> Prefix:
        """The prefix computed afresh from its tokens, in the cache's pieces: the reference's prefix. Kept as
        the cache stores it (an int8 cache: through the same int8 round trip), so the reference differs
        from the cached answer in nothing but where the prefix came from."""
        return self.lm.prefill(self.prefix_ids, self.prefill_bounds(), kv_quant=self.manifest.get("kv_quant"))

    def fit(self, question: str, history: Sequence[Turn] = (), max_new_tokens: int = 256,
            system: str | None = None) -> Split:
        """The question's token plan, or ContextLengthError when knowledge + system message + history +
        question + `max_new_tokens` would run past the model's context window (positions past it give garbage)."""
        if max_new_tokens < 1:
            raise CagError(f"max_new_tokens must be at least 1 (got {max_new_tokens})")
        split = self.builder.split(question, history, prefix_ids=self.prefix_ids, system=system)
        if len(split.ids) + max_new_tokens > self.lm.context_window:
            raise ContextLengthError(split.reuse, len(split.ids) - split.reuse, max_new_tokens, self.lm.context_window)
        return split

    def trim_history(self, question: str, history: Sequence[Turn], max_new_tokens: int = 256,
                     system: str | None = None) -> list[Turn]:
        """The most recent turns of `history` that fit the context window with this question and answer
        budget (oldest dropped first); raises ContextLengthError when even the question alone does not fit."""
        kept = list(history)
        while True:
            try:
                self.fit(question, kept, max_new_tokens, system=system)
                return kept
            except ContextLengthError:
                if not kept:
                    raise
                kept.pop(0)

    def ask_many(self, questions: Sequence[str], *, max_new_tokens: int = 256, sources: int = DEFAULT_SOURCES,
                 unsupported: str = "flag", citer: Citer | None = None, draft: int | None = None) -> list[Answer]:
        """Greedy answers to several questions decoded together on the one shared prefix (cag.decode).

        Throughput, not latency: every answer arrives when the longest is done. Each answer is the one
        `ask` gives (every row is computed as it would be alone).
        """
        grounding.check_options(sources, unsupported)
        self._refresh_if_invalidated()
        start = time.perf_counter()
        splits = [self.fit(q, max_new_tokens=max_new_tokens) for q in questions]
        jobs = [self._job(sp, max_new_tokens, Sampling(), draft) for sp in splits]
        readings = [self._reading() for _ in jobs]
        decode.together(self.lm.decoder(self.prefix), jobs, lambda i, token: _ends(readings[i], token))
        for reading in readings:
            reading.finish()
        outs = [(r.cut.text, r.stream.ids, r.cut.stopped) for r in readings]
        judged = [(citer or self.citer).judge(q, text.strip(), sources, unsupported)
                  for q, (text, _, _) in zip(questions, outs)]
        total = time.perf_counter() - start
        return [Answer(
            question=q.strip(), token_ids=ids,
            ttft_s=total, total_s=total, prompt_tokens=len(sp.ids), cached_tokens=sp.reuse,
            question_tokens=len(sp.new_ids), new_tokens=len(ids), boundary_ok=sp.boundary_ok, mode="cache-batch",
            cache_source=self.cache_source, finish_reason="stop" if stopped or len(ids) < max_new_tokens else "length",
            drafted=job.drafted, accepted=job.accepted, **j)
            for q, sp, (_, ids, stopped), j, job in zip(questions, splits, outs, judged, jobs)]

    def _reading(self, stop: Sequence[str] = ()) -> "_Reading":
        """How every path reads an answer's tokens: the caller's stop strings and the layout's endings
        (PromptBuilder.endings), the same for cached and reference answers, alone or batched."""
        return _Reading(self.lm.codec.stream(), StopText(stop, self.builder.endings))

    def _refresh_if_invalidated(self) -> None:
        """After an invalidation event or a version publish, reload (or rebuild) before answering again."""
        if self._generation >= 0 and self._generation != events.generation(self.name):
            fresh = load(self.name, lm=self.lm, store=self._store)
            with self._lock:
                for f in ("docs", "sources", "builder", "prefix", "prefix_ids", "manifest", "cache_source",
                          "build_stats", "chunk_size", "citer", "_generation"):
                    setattr(self, f, getattr(fresh, f))
                self._scheduler = None  # the next batched answer starts one on the new prefix


@dataclass
class _Reading:
    """An answer's text as its tokens come: detokenized, then cut where a stop string or the layout ends it."""

    stream: object  # the engine codec's TextStream
    cut: StopText

    def push(self, token: int) -> str:
        """The text now certain to be part of the answer."""
        return self.cut.push(self.stream.push(token))

    def finish(self) -> str:
        """At the end of the tokens: what was held back and is part of the answer."""
        return self.cut.push(self.stream.flush()) + self.cut.flush()


def _ends(reading: _Reading, token: int) -> bool:
    """Reads `token` into the answer; whether its text now shows where the answer ends."""
    reading.push(token)
    return reading.cut.stopped


# -- building ---------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BuildOptions:
    """How a knowledge base is built: its model (`engine`), prompt, prefill and invalidation policy.

    `instruction` and `reserve` shape the prompt (context tokens kept free for question and answer);
    `chunk_size` bounds a prefill piece; `ttl_s` and `version` are the invalidation policy (see
    cag.cache.policies); `incremental_update` reuses what an earlier cache still covers; `shard` splits
    knowledge too large for one context into shards (a ShardedKnowledgeBase); `kv_quant="int8"` stores the
    KV lossily at a quarter of fp32 / half of bf16 (answers may change wording)."""

    engine: EngineOptions = EngineOptions()
    instruction: str = DEFAULT_INSTRUCTION
    reserve: int = DEFAULT_RESERVE
    chunk_size: int = incremental.DEFAULT_CHUNK
    ttl_s: float | None = None
    version: int | None = None
    incremental_update: bool = True
    shard: bool = False
    kv_quant: str | None = None

    @classmethod
    def of(cls, options: "BuildOptions | None" = None, **fields) -> "BuildOptions":
        """`options` (or the defaults) with `fields` set: build options by name, engine options (model,
        device, dtype, kv_type, context, threads) by theirs. A name that is neither is a TypeError."""
        options = options or cls()
        own = {f.name for f in dataclasses.fields(cls)} - {"engine"}
        engine = {k: v for k, v in fields.items() if k not in own}
        EngineOptions.of(**engine)  # a name that is no option is refused, not ignored
        return dataclasses.replace(options, engine=dataclasses.replace(options.engine, **engine),
                                   **{k: v for k, v in fields.items() if k in own})


def build(sources: Iterable[str | Path], name: str | None = None, *, options: BuildOptions | None = None,
          lm: Engine | Callable[[], Engine] | None = None, store: TieredStore | None = None,
          owner: str | None = None, log: Log = stderr, progress: Callable[[int, int], None] | None = None,
          **fields) -> KnowledgeBase:
    """Read the sources, prefill them (only what changed since the last build) and write the cache through.

    `options` (BuildOptions) says how, or its fields and EngineOptions' by name (`model=`, `reserve=`,
    `kv_quant=` ...). `lm` is an engine already loaded (cag.engines.load), or a function that loads it
    once the sources are read. The cache goes to every persistent tier configured (CAG_HOME/kbs/NAME on
    disk, Redis with CAG_REDIS_URL). `owner` is the tenant the knowledge base belongs to (the server sets
    it; it travels with the cache to every tier and replica); a rebuild without one keeps the owner it had.
    `progress(done, total)` is called when a prefill starts, before its first piece (done: the positions
    reused from the earlier cache), and after each piece, so that a display can time the prefill itself.
    """
    options = BuildOptions.of(options, **fields)
    sources = [str(Path(s).expanduser().resolve()) for s in sources]
    if not sources:
        raise KnowledgeError("give at least one file or folder to build from")
    name = name or Path(sources[0]).stem
    paths.writable(paths.kb_dir(name), log)  # refuse a bad name or a read-only CAG_HOME before any work
    docs = knowledge.load(sources, log=log)
    lm = lm() if callable(lm) else lm or engines.load(options.engine, log=log)
    problem = lm.kv_quant_problem(options.kv_quant) if options.kv_quant else None
    if problem:
        raise CagError(problem)
    settings = {"name": name, "sources": sources, "model": options.engine.model or lm.name, "engine": lm.kind,
                **lm.options(), "instruction": options.instruction, "reserve": options.reserve,
                "chunk_size": options.chunk_size}
    if options.kv_quant:
        settings["kv_quant"] = options.kv_quant
    store = store or stores.default()
    if owner is None:
        owner = getattr(store.record(name), "owner", None)
    policy = Policy(options.ttl_s, options.version)
    try:
        return _build(settings, docs, lm, policy, store, options.chunk_size, progress, log,
                      options.incremental_update, owner=owner)
    except KnowledgeTooLargeError:
        if not options.shard:
            raise
    return _build_shards(settings, docs, lm, policy, store, options.chunk_size, progress, log, owner)


def _build_shards(settings: dict, docs, lm: Engine, policy: Policy, store: TieredStore, chunk_size: int, progress,
                  log: Log, owner: str | None = None):
    from .kb import shards

    name = settings["name"]
    groups = shards.plan(docs, lm.codec, settings["instruction"], lm.context_window - settings["reserve"],
                         lm.context_window, settings["reserve"])
    built = []
    for i, group in enumerate(groups):
        sub = {**settings, "name": shards.shard_name(name, i), "documents": [d.name for d in group], "parent": name}
        built.append(_build(sub, group, lm, policy, store, chunk_size, progress, log, owner=owner))
        log(f"{name}: shard {i} holds {len(group)} documents, {built[-1].tokens} tokens")
    store.put_record(Record(name, {**settings, "shards": [kb.name for kb in built], "built_at": time.time()}, owner),
                     knowledge.to_json(docs))
    return shards.ShardedKnowledgeBase.of(name, built)


def _build(settings: dict, docs, lm: Engine, policy: Policy, store: TieredStore, chunk_size: int, progress,
           log: Log, incremental_update: bool = True, previous: Entry | None = None,
           owner: str | None = None) -> KnowledgeBase:
    name = settings["name"]
    builder = PromptBuilder(lm.codec, docs, settings["instruction"])
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
    old = _restored(lm, previous) if incremental_update and previous else None
    old_ids = previous.prefix_ids if old is not None else []
    old_bounds = previous.manifest.get("prefill_bounds") if old is not None else None
    try:
        ext = incremental.extend(lm, old, old_ids, prefix_ids, chunk_size, step, old_bounds, settings.get("kv_quant"))
    finally:
        if old is not None:
            old.release()
    seconds = time.perf_counter() - start
    how = ext.describe(len(old_ids))
    if old is not None:
        log(f"{name}: {how}")
    meta = {**settings, "model_fingerprint": lm.identity()["fingerprint"], "policy": policy.to_json(),
            "built_at": time.time()}
    identity = {**_identity(lm, builder, docs, name), "prefill_bounds": ext.bounds}
    index = passages.PassageIndex.build(docs, identity["knowledge"]["sha256"])
    identity["passages"] = index.to_json()
    if settings.get("kv_quant"):  # the prefix was kept as the tiers will hold it: "built" and "disk" answers agree
        identity["kv_quant"] = settings["kv_quant"]
    payload = lm.export(ext.prefix)
    entry = Entry.of(name, payload, prefix_ids, identity, meta, knowledge.to_json(docs), owner=owner)
    store.drop(name, where=lambda tier: not tier.persistent)  # memory tiers may hold the previous cache
    manifest = store.put(entry)
    disk = store.local_file(name)
    size = disk.stat().st_size if disk is not None and disk.is_file() else entry.nbytes
    stats = BuildStats(len(prefix_ids), seconds, size, ext.reused, ext.prefilled, how)
    return KnowledgeBase(name, lm, docs, settings["sources"], builder, ext.prefix, prefix_ids,
                         manifest, "built", stats, chunk_size=chunk_size, citer=Citer(index), _store=store,
                         _generation=events.generation(name))


def _restored(lm: Engine, entry: Entry) -> Prefix | None:
    """A previous cache as a prefix to build on; None when it cannot be this model's (then it is rebuilt)."""
    try:
        return lm.restore(entry.payload, entry.prefix_ids, entry.manifest)
    except CagError:
        return None


def _previous(name: str, lm: Engine, builder: PromptBuilder, store: TieredStore, settings: dict) -> Entry | None:
    """The last cache of `name` made with this model, tokenizer and template, whatever its knowledge."""
    try:
        hit = store.get(name, _expect(lm, builder, None, settings), lm.device)
    except CagError:
        return None  # a broken or foreign cache is simply not reused
    return hit[0] if hit else None


def _identity(lm: Engine, builder: PromptBuilder, docs, name: str) -> dict:
    """What a cache is made for. The knowledge base's name goes with the knowledge, so that a cache file
    copied over another knowledge base's is told apart from knowledge files that changed."""
    return {
        "engine": lm.kind,
        "dtype": lm.storage["dtype"],
        "model": lm.identity(),
        "tokenizer": {"fingerprint": lm.codec.fingerprint()},
        "template": {"fingerprint": builder.fingerprint()},
        "knowledge": {"sha256": knowledge.content_hash(docs), "documents": len(docs), "name": name},
    }


def _expect(lm: Engine, builder: PromptBuilder, knowledge_sha: str | None, settings: dict) -> kvfile.Expect:
    model = lm.identity()
    return kvfile.Expect(model=model["fingerprint"], tokenizer=lm.codec.fingerprint(),
                         template=builder.fingerprint(), knowledge=knowledge_sha, dtype=lm.checked_dtype,
                         kv=settings.get("kv_quant") or lm.storage["kv"], engine=lm.kind,
                         runtime=model.get("runtime"), context=model.get("context"))


# -- loading ----------------------------------------------------------------------------------------

def read_meta(name: str, store: TieredStore | None = None) -> dict:
    return _record(name, store or stores.default()).meta


def _record(name: str, store: TieredStore) -> Record:
    found = store.record(name)
    if found is None:
        raise NotFoundError(f"no knowledge base named {name!r} in {paths.kbs_dir()}; build it with `cag build`")
    return found


def load(name: str, *, engine: EngineOptions | None = None, rebuild: bool = True, lm: Engine | None = None,
         log: Log = stderr, progress: Callable[[int, int], None] | None = None, store: TieredStore | None = None,
         **engine_fields) -> KnowledgeBase:
    """The knowledge base from the fastest tier holding a servable cache; rebuilt when its knowledge
    changed (or refused, rebuild=False), when it expired, was invalidated, or is of another version.
    Without `lm`, the model it was built with is loaded with the engine options kb.json keeps, `engine`'s
    (or EngineOptions' fields by name: `dtype=`, `threads=` ...) set over them."""
    store = store or stores.default()
    record = _record(name, store)
    meta = record.meta
    lm = lm or load_engine(meta, engine or EngineOptions.of(**engine_fields), log=log)
    if meta.get("shards"):
        from .kb.shards import ShardedKnowledgeBase

        return ShardedKnowledgeBase.of(name, [load(s, rebuild=rebuild, lm=lm, log=log, progress=progress, store=store)
                                              for s in meta["shards"]])
    docs = _knowledge_now(name, meta, store, log)
    builder = PromptBuilder(lm.codec, docs, meta["instruction"])
    sha = knowledge.content_hash(docs)
    generation = events.generation(name)
    published = store.published(name)
    _same_model(name, meta, lm)
    hit = _get(store, name, _expect(lm, builder, None, meta), lm, published)
    policy = Policy.from_meta(meta)
    if hit is not None and hit[0].manifest.get("knowledge", {}).get("sha256") == sha:
        entry, source = hit
        builder._prefix_ids = entry.prefix_ids  # verified against the template + knowledge hashes
        citer = Citer(passages.load(entry.manifest, docs, sha))  # checked before the prefix costs anything
        prefix = lm.restore(entry.payload, entry.prefix_ids, entry.manifest)
        if prefix.layers:
            store.share(name, prefix.layers)  # its prefix region is never written: safe to share
        return KnowledgeBase(name, lm, docs, meta["sources"], builder, prefix, entry.prefix_ids, entry.manifest,
                             source, chunk_size=_chunk_size(meta), citer=citer, _store=store, _generation=generation)
    if hit is not None:
        why = _stale(name, hit[0].manifest)
        if not rebuild:
            raise _not_rebuilt(why)
        log(f"{why[:1].upper()}{why[1:]}: rebuilding.")
    else:
        why = _unservable(name, published)
        if not rebuild:
            raise _not_rebuilt(why)
        log(f"{why}: rebuilding.")
    settings = {k: v for k, v in meta.items() if k not in ("policy", "built_at")}
    return _build({**settings, "name": name}, docs, lm, Policy(policy.ttl_s, published), store,
                  _chunk_size(meta), progress, log, previous=hit[0] if hit else None, owner=record.owner)


def _same_model(name: str, meta: dict, lm: Engine) -> None:
    """Refuse a model other than the one `name` was built with (kb.json's fingerprint; one built before it
    was kept there is checked against its cache only): with no servable cache, load would otherwise rebuild
    it silently with whatever model now sits at that path, and answer from another model."""
    built, now = meta.get("model_fingerprint"), lm.identity()["fingerprint"]
    if built is not None and built != now:
        raise ModelChangedError(name, _model_where(lm), now, built)


def _get(store: TieredStore, name: str, expect: kvfile.Expect, lm: Engine,
         published: int | None) -> tuple[Entry, str] | None:
    """The servable cache of `name`, if any; a cache made with another model is a ModelChangedError that
    names the model file, so the user learns which file changed, not only that a cache does not match."""
    try:
        return store.get(name, expect, lm.device, valid=lambda entry, tier: policies.servable(entry, published))
    except CacheMismatchError as err:
        if err.field != "model":
            raise
        raise ModelChangedError(name, _model_where(lm), err.expected, err.found) from None


def _model_where(lm: Engine) -> str:
    """The model as the user named it, with the file it resolved to when that says more (an Ollama blob)."""
    path = str(lm.identity().get("path") or "")
    return lm.name if not path or path == lm.name else f"{lm.name} ({path})"


def check_servable(name: str, store: TieredStore | None = None) -> None:
    """Raise StaleKnowledgeError where `load(name, rebuild=False)` would have to rebuild, as far as that can
    be told without the model: no tier holds a cache, it expired, another version is published, or the
    knowledge files changed since the local cache file was made (one held only in Redis is compared when
    it is loaded). So a refusal comes before a model takes seconds or minutes to load, not after."""
    store = store or stores.default()
    meta = _record(name, store).meta
    if meta.get("shards"):
        for shard in meta["shards"]:
            check_servable(shard, store)
        return
    published = store.published(name)
    if not store.info(name) or policies.expired(meta) or published not in (None, Policy.from_meta(meta).version):
        raise _not_rebuilt(_unservable(name, published))
    try:
        made = store.local_manifest(name)
    except CagError:
        return  # a damaged file: loading it says what is wrong
    made_from = made.get("knowledge", {}).get("sha256")
    if made_from is not None and made_from != knowledge.content_hash(_knowledge_now(name, meta, store, lambda _m: None)):
        raise _not_rebuilt(_stale(name, made))


def _knowledge_now(name: str, meta: dict, store: TieredStore, log: Log) -> list[knowledge.Document]:
    """The documents of `name` as they are now (one shard of a larger knowledge base: only its own)."""
    docs = _current_docs(meta, lambda: store.snapshot(name), log)
    if "documents" in meta:
        mine = set(meta["documents"])
        docs = [d for d in docs if d.name in mine]
    return docs


def _stale(name: str, manifest: dict) -> str:
    """Why a cache of `name` made from other knowledge than its files hold now cannot serve: it was made for
    another knowledge base (copied over this one's, as the name its manifest records says), or the files
    changed since. Caches made before manifests recorded the name can only be told the latter way."""
    made_for = manifest.get("knowledge", {}).get("name")
    if isinstance(made_for, str) and made_for != name:
        return f"the cache file of {name!r} was made for the knowledge base {made_for!r}"
    return f"the knowledge files of {name!r} changed since its cache was built"


def _unservable(name: str, published: int | None) -> str:
    return f"no servable cache of {name!r} (expired, invalidated, or not version {published})" \
        if published is not None else f"no servable cache of {name!r} (expired or invalidated)"


def _not_rebuilt(why: str) -> StaleKnowledgeError:
    return StaleKnowledgeError(f"{why}; run `cag build` again or drop --no-rebuild")


def _chunk_size(meta: dict) -> int:
    """The prefill chunk a knowledge base was built with (kb.json; 512 for those built before it was kept)."""
    value = meta.get("chunk_size")
    return value if type(value) is int and value > 0 else incremental.DEFAULT_CHUNK


def load_engine(meta: dict, given: EngineOptions = EngineOptions(), log: Log = stderr) -> Engine:
    """The engine a knowledge base was built with (kb.json's `meta`): its model with its options, the ones
    `given` sets winning (a dtype asked for now, this run's threads)."""
    try:
        return engines.load(given.over(meta), log=log)
    except ModelMissingError as err:
        raise ModelMissingError(_moved_model(str(err), meta)) from None


def _moved_model(err: str, meta: dict) -> str:
    """What to do when a knowledge base's model is not where it was built with: put it back, or name where it
    is now (the same file, by its hash, reuses the whole cache), or build anew with another model."""
    import shlex

    name = meta.get("name")
    sources = " ".join(shlex.quote(str(s)) for s in (meta.get("sources") or ["SOURCES"])[:3])
    return (f"{err}{' ' if err.endswith('?') else '. '}The knowledge base {name!r} was built with that model: put it back, or, if it moved, build "
            f"again naming where it is now (`cag build {sources} --name {name} --model NEWPATH`): the same model "
            "file reuses the whole cache, another model builds it anew")


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


def list_kbs(store: TieredStore | None = None, verify: bool = False) -> list[dict]:
    """One row per knowledge base: name, tenant, model, tokens, documents, bytes, created, status, tiers, hits,
    age_s (cag.registry.rows). With `verify`, every local cache file is read and checked as a load checks it."""
    from . import registry

    return registry.rows(store or stores.default(), verify=verify)


def delete(name: str, store: TieredStore | None = None) -> None:
    """Remove `name` from every tier and every replica (refused while Redis, when configured, is down)."""
    from . import registry

    registry.delete(name, store or stores.default())
