"""The public Python API: build a knowledge base once, load it anywhere, ask it questions.

    kb = cag.build(["docs/"], name="handbook")
    print(kb.ask("How many vacation days do I get?").answer)
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Sequence

from . import atomic, engine, knowledge, kvfile, models, paths
from .engine import Sampling
from .errors import CacheFileError, KnowledgeError, KnowledgeTooLargeError, NotFoundError, StaleKnowledgeError
from .kvcompat import KV
from .prompt import DEFAULT_INSTRUCTION, PromptBuilder, Turn

DEFAULT_RESERVE = 512  # context tokens kept free for the question and the answer
CACHE_FILE, KB_FILE, SNAPSHOT_FILE = "cache.safetensors", "kb.json", "knowledge.json"

Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


@dataclass
class BuildStats:
    tokens: int
    seconds: float
    file_bytes: int

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Answer:
    question: str
    answer: str
    token_ids: list[int]
    ttft_s: float  # time to first generated token, tokenization included
    total_s: float
    prompt_tokens: int  # tokens of the full prompt the model conditions on
    cached_tokens: int  # of those, taken from the cache
    question_tokens: int  # of those, computed for this question
    new_tokens: int  # generated tokens
    boundary_ok: bool  # full-prompt tokens started with the whole cached prefix
    mode: str  # "cache" or "no-cache"
    cache_source: str  # "built" or "disk" (where this process got the prefix from)

    def to_dict(self) -> dict:
        return asdict(self)


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
    _stops: list[int] = field(default_factory=list, repr=False)

    @property
    def layers(self) -> KV:
        """The prefix's per-layer (key, value) tensors."""
        return self.workspace.prefix

    @property
    def tokens(self) -> int:
        return len(self.prefix_ids)

    def ask(self, question: str, *, history: Sequence[Turn] = (), use_cache: bool = True,
            max_new_tokens: int = 256, sampling: Sampling = Sampling(),
            on_text: Callable[[str], None] | None = None) -> Answer:
        """Answer from the cached prefix (or, with use_cache=False, from the full prompt: the reference)."""
        start = time.perf_counter()
        split = self.builder.split(question, history, prefix_ids=self.prefix_ids)
        if use_cache:
            new_ids, reuse, prefix = split.new_ids, split.reuse, self.workspace
        else:
            new_ids, reuse, prefix = split.ids, 0, None
        stream = engine.TextStream(self.lm.tokenizer)
        ttft = None
        for token in engine.generate(self.lm.model, new_ids, prefix=prefix, reuse=reuse,
                                     max_new_tokens=max_new_tokens, sampling=sampling, stop_ids=self._stops):
            if ttft is None:
                ttft = time.perf_counter() - start
            delta = stream.push(token)
            if on_text and delta:
                on_text(delta)
        total = time.perf_counter() - start
        return Answer(
            question=question.strip(), answer=stream.text().strip(), token_ids=stream.ids,
            ttft_s=ttft if ttft is not None else total, total_s=total,
            prompt_tokens=len(split.ids), cached_tokens=reuse, question_tokens=len(new_ids),
            new_tokens=len(stream.ids), boundary_ok=split.boundary_ok,
            mode="cache" if use_cache else "no-cache", cache_source=self.cache_source,
        )

    def __post_init__(self) -> None:
        self._stops = engine.stop_ids(self.lm.tokenizer, self.lm.model)


# -- building ---------------------------------------------------------------------------------------

def build(sources: Iterable[str | Path], name: str | None = None, *, model: str | None = None,
          device: str | None = None, dtype: str | None = None, instruction: str = DEFAULT_INSTRUCTION,
          reserve: int = DEFAULT_RESERVE, chunk_size: int = engine.DEFAULT_CHUNK,
          lm: models.LoadedModel | None = None, log: Log = _stderr,
          progress: Callable[[int, int], None] | None = None) -> KnowledgeBase:
    """Read the sources, prefill them once and store the cache under CAG_HOME/kbs/NAME."""
    sources = [str(Path(s).expanduser().resolve()) for s in sources]
    if not sources:
        raise KnowledgeError("give at least one file or folder to build from")
    name = name or Path(sources[0]).stem
    folder = paths.kb_dir(name)
    docs = knowledge.load(sources)
    lm = lm or models.load(model, device=device, dtype=dtype, log=log)
    return _build(name, folder, sources, docs, lm, model, instruction, reserve, chunk_size, progress)


def _build(name, folder: Path, sources, docs, lm, model_name, instruction, reserve, chunk_size, progress) -> KnowledgeBase:
    builder = PromptBuilder(lm.tokenizer, docs, instruction)
    prefix_ids = builder.prefix_ids()
    fits = lm.context_window - reserve
    if len(prefix_ids) > fits:
        raise KnowledgeTooLargeError(len(prefix_ids), max(fits, 0), lm.context_window, reserve)
    start = time.perf_counter()
    done = 0

    def step(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, len(prefix_ids))

    layers = engine.prefill(lm.model, prefix_ids, chunk_size=chunk_size, progress=step)
    seconds = time.perf_counter() - start
    meta = {
        "name": name, "sources": sources, "model": model_name or models.DEFAULT_MODEL,
        "dtype": kvfile.dtype_name(lm.dtype), "instruction": instruction, "reserve": reserve,
    }
    atomic.write_text(folder / SNAPSHOT_FILE, json.dumps(knowledge.to_json(docs), ensure_ascii=False))
    atomic.write_text(folder / KB_FILE, json.dumps(meta, indent=2))
    manifest = kvfile.save(folder / CACHE_FILE, layers, prefix_ids, _identity(lm, builder, docs))
    stats = BuildStats(len(prefix_ids), seconds, (folder / CACHE_FILE).stat().st_size)
    return KnowledgeBase(name, lm, docs, sources, builder, engine.Workspace(layers), prefix_ids, manifest, "built", stats)


def _identity(lm: models.LoadedModel, builder: PromptBuilder, docs) -> dict:
    return {
        "model": {"name": lm.name, "path": str(lm.path), "fingerprint": lm.model_fingerprint},
        "tokenizer": {"fingerprint": lm.tokenizer_fingerprint},
        "template": {"fingerprint": builder.fingerprint()},
        "knowledge": {"sha256": knowledge.content_hash(docs), "documents": len(docs)},
    }


# -- loading ----------------------------------------------------------------------------------------

def read_meta(name: str) -> dict:
    path = paths.kb_dir(name) / KB_FILE
    if not path.is_file():
        raise NotFoundError(f"no knowledge base named {name!r} in {paths.kbs_dir()}; build it with `cag build`")
    return json.loads(path.read_text())


def load(name: str, *, device: str | None = None, dtype: str | None = None, rebuild: bool = True,
         lm: models.LoadedModel | None = None, log: Log = _stderr,
         progress: Callable[[int, int], None] | None = None) -> KnowledgeBase:
    """Load a built knowledge base; rebuild it if its knowledge files changed (or refuse, rebuild=False)."""
    meta = read_meta(name)
    folder = paths.kb_dir(name)
    lm = lm or models.load(meta["model"], device=device, dtype=dtype or meta.get("dtype"), log=log)
    docs = _current_docs(folder, meta, log)
    manifest = kvfile.read_manifest(folder / CACHE_FILE)
    if manifest.get("knowledge", {}).get("sha256") != knowledge.content_hash(docs):
        if not rebuild:
            raise StaleKnowledgeError(
                f"the knowledge files of {name!r} changed since its cache was built; "
                "run `cag build` again or drop --no-rebuild"
            )
        log(f"The knowledge files of {name!r} changed since the cache was built: rebuilding.")
        return _build(name, folder, meta["sources"], docs, lm, meta["model"], meta["instruction"],
                      meta["reserve"], engine.DEFAULT_CHUNK, progress)
    builder = PromptBuilder(lm.tokenizer, docs, meta["instruction"])
    expect = kvfile.Expect(
        model=lm.model_fingerprint, tokenizer=lm.tokenizer_fingerprint, template=builder.fingerprint(),
        knowledge=knowledge.content_hash(docs), dtype=kvfile.dtype_name(lm.dtype),
    )
    loaded = kvfile.load(folder / CACHE_FILE, expect, device=lm.device)
    builder._prefix_ids = loaded.prefix_ids  # verified against the template + knowledge hashes above
    return KnowledgeBase(name, lm, docs, meta["sources"], builder, engine.Workspace(loaded.layers),
                         loaded.prefix_ids, loaded.manifest, "disk")


def _current_docs(folder: Path, meta: dict, log: Log) -> list[knowledge.Document]:
    """Today's knowledge files; the snapshot taken at build time if they are gone (so a cache still answers)."""
    missing = [s for s in meta["sources"] if not Path(s).exists()]
    if not missing:
        return knowledge.load(meta["sources"])
    log(f"Knowledge source not found: {missing[0]}; answering from the copy saved at build time.")
    try:
        return knowledge.from_json(json.loads((folder / SNAPSHOT_FILE).read_text()))
    except (OSError, ValueError, KeyError):
        raise KnowledgeError(f"knowledge path not found: {missing[0]} (and no saved copy to fall back on)") from None


# -- housekeeping -----------------------------------------------------------------------------------

def list_kbs() -> list[dict]:
    """One row per knowledge base: name, model, tokens, documents, bytes, created (from headers only)."""
    rows = []
    root = paths.kbs_dir()
    for folder in sorted(root.iterdir()) if root.is_dir() else []:
        if not (folder / KB_FILE).is_file():
            continue
        row = {"name": folder.name, "model": json.loads((folder / KB_FILE).read_text()).get("model")}
        try:
            m = kvfile.read_manifest(folder / CACHE_FILE)
            row.update(tokens=m.get("tokens"), documents=m.get("knowledge", {}).get("documents"),
                       bytes=(folder / CACHE_FILE).stat().st_size, created=m.get("created"), status="ok")
        except CacheFileError as err:
            row.update(status=f"broken: {err}")
        rows.append(row)
    return rows


def delete(name: str) -> None:
    folder = paths.kb_dir(name)
    if not (folder / KB_FILE).is_file():
        raise NotFoundError(f"no knowledge base named {name!r} in {paths.kbs_dir()}")
    shutil.rmtree(folder)
