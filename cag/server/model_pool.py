"""What a server keeps loaded, under one byte budget: models, and the knowledge bases loaded on them.

Each knowledge base is answered by the model it was built with. A model loads on first use and stays while
there is room; `model_bytes` (CAG_MODEL_BYTES) bounds what the models hold together: each model's weights
plus the prefix of every knowledge base loaded on it (on llama.cpp a context of the whole window, hundreds of
MB; on transformers the KV tensors). Room is made before anything loads, not after: first models that no
loaded knowledge base uses, then the least recently used knowledge bases that no answer is running on, each
freed at once (a llama.cpp context or model is closed, not left to the garbage collector). When the answers
running now leave no room, the load waits for them to end, and new answers wait behind it: a server whose
knowledge bases need more than the budget answers one model at a time instead of exceeding it. A model or
knowledge base larger than the whole budget still loads, alone.

Answers lease the knowledge base they run on (`lease` / `release`); nothing leased, and no model under a
leased knowledge base, is ever freed. A model that cannot be loaded (a missing or changed file, llama.cpp
not installed) is a 503 with code `model_unavailable` for the knowledge bases that need it only.

A model also goes when it has been idle (no answer running on any of its knowledge bases) for longer than its
keep-alive: the keep-alive of the last request that used it, else the server's `keep_alive` (as Ollama does:
0 unloads it as soon as its answer ends, a negative one never). It goes through the same path as the budget's
evictions, with its knowledge bases, and never while an answer runs on it; a thread started with the app
(`start_expiry`) looks twice a second, so an idle server gives its memory back without a request arriving.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import dataclasses
import gc
import logging
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Callable

from .. import engines
from ..engines.base import Engine
from ..engines.options import EngineOptions
from ..errors import CagError
from ..registry import model_label
from .config import ServerConfig
from .http_errors import ApiError


class ModelUnavailable(CagError):
    """A model that cannot be loaded here (a missing or changed file, llama.cpp not installed)."""

log = logging.getLogger("cag.server")
Key = tuple
WAIT_S = 600.0  # the longest a load waits for running answers to make room


def key_of(options: EngineOptions) -> Key:
    """What makes two loads the same engine: the model (a GGUF file by its content, however it is named; the
    default model under its one name) and the engine options a knowledge base was built with."""
    return (engines.model_key(options.model or engines.DEFAULT_MODEL), *sorted(options.recorded().items()))


@dataclass(eq=False)
class LoadedKB:
    """A knowledge base loaded on one of the server's models."""

    kb: object  # api.KnowledgeBase or kb.shards.ShardedKnowledgeBase
    stamp: tuple[int, int]  # (cache file mtime_ns, events generation) when loaded: a rebuild, invalidation or
    # delete by the CLI or another replica changes it
    key: Key = ()  # the model it is loaded on
    users: int = 0  # answers (and lookups) holding it now: it is freed only at zero
    retired: bool = field(default=False, repr=False)  # replaced or forgotten: freed when its last user leaves

    @property
    def content_hash(self) -> str:
        return self.kb.manifest.get("knowledge", {}).get("sha256", "") + self.kb.manifest.get("created", "")


class ModelPool:
    """The models and loaded knowledge bases of one server, under one byte budget (see the module)."""

    def __init__(self, config: ServerConfig, budget: int, loaded: Engine | None = None):
        self.config, self.budget = config, budget
        _few_arenas()
        self._cond = threading.Condition()
        self._gate = threading.Lock()  # one load or build at a time: each makes room for itself in turn
        self._engines: OrderedDict[Key, Engine] = OrderedDict()
        self._kbs: OrderedDict[str, LoadedKB] = OrderedDict()  # by folder, least recently used first
        self._retired: list[LoadedKB] = []  # replaced while answers ran on them
        self._reserved = 0  # bytes promised to the load in progress
        self._waiting = 0  # loads waiting for answers to end: new leases wait behind them
        self._weights: dict[Key, int] = {}  # what each model's weights took when it was last loaded
        self._used_at: dict[Key, float] = {}  # when each model was last leased or let go (time.monotonic)
        self._keep: dict[Key, float] = {}  # each model's keep-alive in seconds: the last request's, else the server's
        self._reaper: threading.Thread | None = None
        self._stop = threading.Event()
        self._default = self.config.engine_options(self.config.model)
        if loaded is not None:  # the server's own model, loaded already (`cag serve --model`, create_app(lm=))
            self._default = EngineOptions.of(model=self.config.model or loaded.name, **loaded.options())
            self._engines[key_of(self._default)] = loaded
            self._used_at[key_of(self._default)] = time.monotonic()

    # -- what is loaded --------------------------------------------------------------------------------
    def loaded(self) -> list[Engine]:
        with self._cond:
            return list(self._engines.values())

    def usage(self) -> list[dict]:
        """Each loaded model: its weights, its loaded knowledge bases' prefixes and their sum (`/metrics`), how
        long it has been idle (0 while an answer runs on it), its keep-alive and the seconds left of it (None:
        kept for ever), and the folders of the knowledge bases loaded on it with each one's bytes."""
        with self._cond:
            rows, now = [], time.monotonic()
            for key, engine in self._engines.items():
                kbs = [e for e in self._all() if e.key == key]
                prefixes = sum(e.kb.nbytes for e in kbs)
                busy = any(e.users > 0 for e in kbs)
                idle = 0.0 if busy else max(0.0, now - self._used_at.get(key, now))
                keep = self._keep_for(key)
                rows.append({"model": model_label(engine.name), "engine": engine.kind, "weights": engine.nbytes,
                             "prefixes": prefixes, "bytes": engine.nbytes + prefixes, "knowledge_bases": len(kbs),
                             "busy": busy, "idle_s": idle, "keep_alive_s": None if keep == float("inf") else keep,
                             "expires_in_s": None if keep == float("inf") else max(0.0, keep - idle),
                             "folders": {f: e.kb.nbytes for f, e in self._kbs.items() if e.key == key}})
            return rows

    def _all(self) -> list[LoadedKB]:
        return [*self._kbs.values(), *self._retired]

    def _used(self) -> int:
        return sum(e.nbytes for e in self._engines.values()) + sum(e.kb.nbytes for e in self._all()) + self._reserved

    # -- leases --------------------------------------------------------------------------------------
    def lease(self, folder: str, stamp: tuple[int, int]) -> LoadedKB | None:
        """The loaded knowledge base of `folder`, held until `release`, if it is loaded and current."""
        with self._cond:
            self._cond.wait_for(lambda: not self._waiting, timeout=WAIT_S)
            entry = self._kbs.get(folder)
            if entry is None or entry.stamp != stamp:
                return None
            entry.users += 1
            self._kbs.move_to_end(folder)
            self._used_at[entry.key] = time.monotonic()
            return entry

    def release(self, entry: LoadedKB) -> None:
        with self._cond:
            entry.users -= 1
            self._used_at[entry.key] = time.monotonic()
            if entry.retired and entry.users <= 0 and entry in self._retired:
                self._retired.remove(entry)
                self._free(entry)
            self._expire()  # a keep-alive of 0 unloads the model as its last answer ends
            self._cond.notify_all()

    def forget(self, folder: str) -> None:
        """`folder` was deleted or changed: let its knowledge base go (once no answer runs on it)."""
        with self._cond:
            self._retire(self._kbs.pop(folder, None))

    def peek(self, folder: str) -> LoadedKB | None:
        return self._kbs.get(folder)

    # -- loading -------------------------------------------------------------------------------------
    def load(self, folder: str, stamp: Callable[[], tuple[int, int]], options: EngineOptions,
             tokens: Callable[[Engine], int], open_kb: Callable[[Engine], object], reuse: bool = True) -> LoadedKB:
        """The knowledge base of `folder` on its model, loaded with room made for both, and leased.
        `tokens(engine)` is about how long its prefix is; `open_kb(engine)` loads (or builds) it; `reuse`:
        a current one already loaded will do (a build wants a new one). ModelUnavailable when the model
        cannot be loaded."""
        with self._gate:
            entry = self.lease(folder, stamp()) if reuse else None
            if entry is not None:  # loaded by the request this one waited behind
                return entry
            key = key_of(options)
            engine = self._engine(key, options)
            with self._cond:
                self._used_at[key] = time.monotonic()
            need = engine.prefix_nbytes(tokens(engine))
            self._make_room(need, keep=key)
            try:
                kb = open_kb(engine)
            finally:
                with self._cond:
                    self._reserved -= need
            with self._cond:
                entry = LoadedKB(kb, stamp(), key, users=1)
                self._retire(self._kbs.pop(folder, None))
                self._kbs[folder] = entry
                while self._used() > self.budget and self._evict_one(key):
                    pass  # the prefix may hold more than was estimated
            return entry

    def default_model(self) -> EngineOptions:
        """The server's own model (--model / config model) and its options: what knowledge bases created
        over HTTP are built with."""
        return self._default

    def _engine(self, key: Key, options: EngineOptions) -> Engine:
        """The model of `key`, loaded (after making room for its weights) if it is not; called under the gate."""
        with self._cond:
            if key in self._engines:
                self._engines.move_to_end(key)
                return self._engines[key]
        need = self._weights.get(key) or engines.file_bytes(options.model)
        self._make_room(need, keep=key)
        try:
            engine = engines.load(dataclasses.replace(options, device=self.config.device,
                                                      threads=self.config.threads), log=log.info)
        except CagError as err:
            raise ModelUnavailable(str(err)) from None
        finally:
            with self._cond:
                self._reserved -= need
        log.info("loaded model %s (%s, %.0f MB)", model_label(engine.name), engine.kind, engine.nbytes / 1e6)
        with self._cond:
            self._weights[key] = engine.nbytes
            self._engines[key] = engine
        return engine

    # -- keep-alive ----------------------------------------------------------------------------------------
    def keep(self, entry: LoadedKB, seconds: float | None) -> None:
        """How long the model under `entry` stays loaded once idle, from now on (a request's keep_alive; None:
        the server's default). Infinity keeps it for ever; 0 unloads it when its answers end."""
        with self._cond:
            self._keep[entry.key] = self.config.keep_alive_s if seconds is None else seconds

    def expire(self) -> None:
        """Unload every model idle past its keep-alive (what the expiry thread runs)."""
        with self._cond:
            self._expire()

    def start_expiry(self, every: float = 0.5) -> None:
        """Check for expired models every `every` seconds in a thread of this object's own, until stop_expiry.
        Tied to the app's lifetime (its lifespan), so a model handed to an app is never closed after it ended."""
        if self._reaper is not None:
            return
        self._stop.clear()
        self._reaper = threading.Thread(target=self._reap, args=(every,), name="cag-keep-alive", daemon=True)
        self._reaper.start()

    def stop_expiry(self) -> None:
        self._stop.set()
        if self._reaper is not None:
            self._reaper.join(10)
            self._reaper = None

    def _reap(self, every: float) -> None:
        while not self._stop.wait(every):
            try:
                self.expire()
            except Exception:  # noqa: BLE001 - a failed unload is logged; the next round tries again
                log.exception("unloading idle models failed")

    def _keep_for(self, key: Key) -> float:
        return self._keep.get(key, self.config.keep_alive_s)

    def _expire(self) -> None:
        """Unload the models idle past their keep-alive; under the condition. Skipped while a load or build is
        in progress (it holds the gate and may be using a model that nothing has leased yet): the next look
        catches up."""
        if not self._gate.acquire(blocking=False):
            return
        try:
            now = time.monotonic()
            busy = {e.key for e in self._all() if e.users > 0}
            for key in [k for k in self._engines if k not in busy]:
                if now - self._used_at.get(key, now) >= self._keep_for(key):
                    self._unload(key)
        finally:
            self._gate.release()

    def _unload(self, key: Key) -> None:
        """Free a model nothing runs on and the knowledge bases loaded on it (as the budget's evictions do)."""
        for folder in [f for f, e in self._kbs.items() if e.key == key]:
            self._free(self._kbs.pop(folder))
        engine = self._engines.pop(key)
        log.info("unloaded model %s: idle past its keep-alive of %gs", model_label(engine.name), self._keep_for(key))
        self._keep.pop(key, None)
        self._used_at.pop(key, None)
        engine.close()
        gc.collect()  # a transformers model's modules refer to each other: free them now, not later
        _give_back()
        self._cond.notify_all()

    # -- room --------------------------------------------------------------------------------------------
    def _make_room(self, need: int, keep: Key) -> None:
        """Free what is idle until `need` more bytes fit the budget, waiting for running answers when that is
        not enough; then reserve them. Alone (nothing running) a load goes ahead even over the budget."""
        with self._cond:
            deadline = time.monotonic() + WAIT_S
            while self._used() + need > self.budget:
                if self._evict_one(keep):
                    continue  # freed one idle thing: look again
                if not any(e.users > 0 for e in self._all()):
                    log.warning("%.0f MB more do not fit the %.0f MB budget of models with nothing idle left to "
                                "free: loading it alone", need / 1e6, self.budget / 1e6)
                    break
                self._waiting += 1
                try:
                    left = deadline - time.monotonic()
                    if left <= 0 or not self._cond.wait(left):
                        raise ApiError(503, "no room in this server's memory budget for the model of this knowledge "
                                            "base while others answer; try again shortly", "server_error",
                                       "server_busy")
                finally:
                    self._waiting -= 1
                    self._cond.notify_all()
            self._reserved += need

    def _evict_one(self, keep: Key) -> bool:
        """Free one idle thing: a model no loaded knowledge base uses, else the least recently used idle
        knowledge base. False when everything loaded is in use."""
        used_keys = {e.key for e in self._all()} | {keep}
        idle_model = next((k for k in self._engines if k not in used_keys), None)
        if idle_model is not None:
            engine = self._engines.pop(idle_model)
            log.info("unloaded model %s to stay within %.0f MB of models", model_label(engine.name), self.budget / 1e6)
            engine.close()
            gc.collect()  # a transformers model's modules refer to each other: free them now, not later
            _give_back()
            return True
        folder = next((f for f, e in self._kbs.items() if e.users <= 0), None)
        if folder is None:
            return False
        log.info("unloaded knowledge base %s to stay within %.0f MB of models", folder, self.budget / 1e6)
        self._free(self._kbs.pop(folder))
        _give_back()
        return True

    def _retire(self, entry: LoadedKB | None) -> None:
        if entry is None:
            return
        entry.retired = True
        if entry.users <= 0:
            self._free(entry)
        else:
            self._retired.append(entry)

    @staticmethod
    def _free(entry: LoadedKB) -> None:
        entry.kb.release()


ARENAS = 2  # glibc malloc arenas a server keeps (its default is 8 per core)


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c"))
    except (OSError, TypeError):
        return None


def _few_arenas() -> None:
    """Keep glibc to ARENAS malloc arenas. By default each thread that allocates gets an arena of its own (up
    to 8 per core) and freed blocks stay in the arena that held them: worker threads loading and freeing
    llama.cpp contexts in turn left ~100 MB more resident than the model budget allows. Must run before the
    process has made many threads (the limit is fixed when glibc first needs it)."""
    libc = _libc()
    try:
        libc.mallopt(-8, ARENAS)  # M_ARENA_MAX
    except AttributeError:  # not glibc
        pass


def _give_back() -> None:
    """Return freed heap pages to the system (glibc keeps freed blocks under its mmap threshold, some MB, in
    the heap): what was let go leaves the process's resident memory, not just its allocator's books."""
    try:
        _libc().malloc_trim(0)
    except AttributeError:  # not glibc
        pass
