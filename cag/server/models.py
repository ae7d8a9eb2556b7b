"""The models a server keeps loaded: each knowledge base is answered by the model it was built with.

Like Ollama's keep-alive, a model loads on first use and stays loaded while there is room: engines are
kept least recently used first out under a byte budget (model_bytes / CAG_MODEL_BYTES). An engine that
is dropped here stays alive for the answers still running on it (they hold it) and is freed after them.
A model that cannot be loaded (a missing file, llama.cpp not installed) is a clear error with a code,
for the knowledge bases that need it only.
"""

from __future__ import annotations

import logging
import threading
from collections import OrderedDict
from typing import Callable

from .. import api, engines
from ..engines.base import Engine
from ..errors import CagError
from ..registry import model_label
from .config import ServerConfig
from .errors import ApiError

log = logging.getLogger("cag.server")
Key = tuple


def key_of(model: str | None, options: dict) -> Key:
    """What makes two loads the same engine: the model name (the default model under its one name) and
    the engine options a knowledge base was built with."""
    return (model or engines.DEFAULT_MODEL, *sorted((k, v) for k, v in options.items() if v is not None))


class Models:
    def __init__(self, config: ServerConfig, budget: int, loaded: Engine | None = None,
                 on_drop: Callable[[Engine], None] = lambda engine: None):
        self.config, self.budget, self.on_drop = config, budget, on_drop
        self._engines: OrderedDict[Key, Engine] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[Key, threading.Lock] = {}
        options = self.config.model_options()
        mine = ("kv_type", "context") if engines.kind_of(self.config.model) == "llamacpp" else ("dtype",)
        self._default = (self.config.model, {k: options[k] for k in mine})
        if loaded is not None:  # the server's own model, loaded already (`cag serve --model`, create_app(lm=))
            self._default = (self.config.model or loaded.name, loaded.options())
            self._engines[key_of(*self._default)] = loaded

    def default(self) -> Engine:
        """The server's own model (--model / config model): what knowledge bases created over HTTP use."""
        return self._load(*self._default)

    def for_kb(self, name: str, meta: dict) -> Engine:
        """The engine a knowledge base was built with (kb.json's model and engine options)."""
        try:
            return self._load(meta.get("model"), api.engine_options(meta))
        except CagError as err:
            model = model_label(meta.get("model") or engines.DEFAULT_MODEL)
            raise ApiError(503, f"knowledge base {name!r} is answered by the model {model}, which cannot be loaded "
                                f"on this server: {err}", "server_error", "model_unavailable") from None

    def loaded(self) -> list[Engine]:
        with self._lock:
            return list(self._engines.values())

    def _load(self, model: str | None, options: dict) -> Engine:
        key = key_of(model, options)
        with self._lock:
            if key in self._engines:
                return self._touch(key)
            gate = self._loading.setdefault(key, threading.Lock())
        with gate:  # one load per model at a time; others wait for it
            with self._lock:
                if key in self._engines:
                    return self._touch(key)
            engine = engines.load(model, device=self.config.device, threads=self.config.threads, log=log.info,
                                  **{k: v for k, v in options.items() if v is not None})
            log.info("loaded model %s (%s, %.0f MB)", model_label(engine.name), engine.kind, engine.nbytes / 1e6)
            with self._lock:
                self._engines[key] = engine
                self._make_room(keep=key)
                self._loading.pop(key, None)
            return engine

    def _touch(self, key: Key) -> Engine:
        self._engines.move_to_end(key)
        return self._engines[key]

    def _make_room(self, keep: Key) -> None:
        """Drop least recently used engines (never `keep`) until the loaded ones fit the budget."""
        while sum(e.nbytes for e in self._engines.values()) > self.budget and len(self._engines) > 1:
            key = next(k for k in self._engines if k != keep)
            engine = self._engines.pop(key)
            log.info("unloaded model %s to stay within %.0f MB of models", model_label(engine.name), self.budget / 1e6)
            self.on_drop(engine)
