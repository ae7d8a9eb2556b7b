"""GGUF models through llama.cpp (llama-cpp-python): `load("model.gguf")`, `load("ollama:NAME[:TAG]")`."""

from __future__ import annotations

from pathlib import Path

from ... import settings
from ...errors import ModelError
from ...log import Log, stderr
from ..cores import Cores
from ..files import file_sha256
from ..missing import no_model_at, not_a_model
from ..options import GGUF_KV_TYPES, kv_type_problem
from . import lib
from .engine import DEFAULT_CONTEXT, LlamaEngine, default_threads
from .ollama import check_blob
from .ollama import resolve as resolve_ollama

__all__ = ["LlamaEngine", "fingerprint", "load", "resolve"]




def resolve(spec: str) -> Path:
    """The GGUF file a model name stands for: a path to a .gguf file, or ollama:NAME[:TAG] in the local
    Ollama store ($OLLAMA_MODELS, else ~/.ollama/models)."""
    if spec.startswith("ollama:"):
        return resolve_ollama(spec.removeprefix("ollama:"))
    path = Path(spec).expanduser()
    if not path.is_file():
        raise not_a_model(path) if path.exists() else no_model_at(path)
    with open(path, "rb") as f:
        if f.read(4) != b"GGUF":
            raise not_a_model(path)
    return path.resolve()


def fingerprint(spec: str, path: Path) -> str:
    """The sha256 of the GGUF file `path` that `spec` resolved to: what ties a cache to its model. Memoized
    (cag.engines.files), so a large file is hashed once, not at every load; for an Ollama model the same
    hash checks the blob against its name (check_blob), so a damaged blob is never used."""
    sha = file_sha256(path)
    if spec.startswith("ollama:"):
        check_blob(spec.removeprefix("ollama:"), path, sha)
    return sha


def load(spec: str, *, threads: int | None = None, kv_type: str | None = None, context: int | None = None,
         log: Log = stderr) -> LlamaEngine:
    """Load a GGUF model for cag: memory-mapped, quantized as it is, with a KV cache of `kv_type`
    (GGUF_KV_TYPES: "f16", the default, "bf16" or "q8_0") and `context` positions per answer (default: the
    model's, at most 8192)."""
    kv_type = kv_type or GGUF_KV_TYPES[0]
    problem = kv_type_problem(kv_type)
    if problem:
        raise ModelError(f"the KV type {problem}")
    chosen = threads or settings.current().threads
    threads = chosen or default_threads()
    if threads < 1:
        raise ModelError(f"threads must be at least 1 (got {threads})")
    path = resolve(spec)
    lib.api()  # the one-line install message before any work, when llama-cpp-python is missing
    sha = fingerprint(spec, path)
    model = lib.Model(path)
    trained = model.n_ctx_train if model.n_ctx_train > 0 else DEFAULT_CONTEXT
    if context is not None and not 16 <= context <= trained:
        model.close()
        raise ModelError(f"context {context} is outside what this model supports (16 to {trained} positions)")
    engine = LlamaEngine(spec, path, model, sha, threads, kv_type, context or min(trained, DEFAULT_CONTEXT))
    engine.cores = None if chosen else Cores(threads)  # a count the user gave is kept as given
    return engine
