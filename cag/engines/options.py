"""How to load a model: one `EngineOptions`, made once from flags, environment and config and passed whole.

Why one object: the CLI, the Python API and the server each used to carry the model's name and its load
options as loose parameters and merge them with what a knowledge base recorded, each in its own way. The
merge and the rule of which option applies to which engine live here, once.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..errors import CagError

GGUF_KV_TYPES = ("f16", "bf16", "q8_0")  # a GGUF model's KV cache types; the first is the default
RECORDED = ("dtype", "kv_type", "context")  # kept in kb.json: what loads the same engine again
_OWN = {"torch": ("device", "dtype"), "llamacpp": ("kv_type", "context")}  # the rest (threads) is both's
_FLAGS = {"dtype": "--dtype", "kv_type": "--kv-type", "context": "--context"}


def kv_type_problem(kv_type: str | None) -> str | None:
    """What is wrong with `kv_type` as a GGUF model's KV cache type (None: nothing, or none was given), for
    the CLI, the server config and the engine to refuse it alike."""
    if kv_type is None or kv_type in GGUF_KV_TYPES:
        return None
    return f"must be {', '.join(GGUF_KV_TYPES[:-1])} or {GGUF_KV_TYPES[-1]} (got {kv_type!r})"


def kind_of(spec: str | None) -> str:
    """Which engine runs the model named `spec`: "llamacpp" or "torch". A GGUF file is known by its suffix or,
    without one (an Ollama blob, a renamed download), by its first bytes."""
    if spec and (spec.startswith("ollama:") or Path(spec).suffix.lower() == ".gguf" or _gguf_bytes(spec)):
        return "llamacpp"
    return "torch"


def _gguf_bytes(spec: str) -> bool:
    try:
        with open(Path(spec).expanduser(), "rb") as f:
            return f.read(4) == b"GGUF"
    except OSError:  # not a file (a folder, a hub id, nothing)
        return False


@dataclass(frozen=True)
class EngineOptions:
    """The model and how to load it. `model`: None (the default model), a Hugging Face folder or hub id
    (transformers), a `.gguf` file or `ollama:NAME[:TAG]` (llama.cpp). `device` and `dtype` apply to
    transformers, `kv_type` ("f16", "bf16", "q8_0") and `context` to llama.cpp, `threads` to both (None:
    CAG_THREADS, else the engine's own choice)."""

    model: str | None = None
    device: str | None = None
    dtype: str | None = None
    kv_type: str | None = None
    context: int | None = None
    threads: int | None = None

    @classmethod
    def of(cls, **fields) -> "EngineOptions":
        """From keyword arguments, refusing a name that is no option (a misspelt one would be ignored)."""
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(fields) - known)
        if unknown:
            raise TypeError(f"unknown engine option {unknown[0]!r} (options: {', '.join(sorted(known))})")
        return cls(**fields)

    @property
    def kind(self) -> str:
        return kind_of(self.model)

    def checked(self) -> "EngineOptions":
        """These options, or a CagError naming the first one that does not apply to the model's engine or
        has no allowed value: refused before any work, not ignored."""
        gguf = self.kind == "llamacpp"
        for name, flag in _FLAGS.items():
            if getattr(self, name) is not None and name not in _OWN[self.kind]:
                raise CagError(f"{flag} does not apply to {'GGUF models' if gguf else 'Hugging Face models'} "
                               f"({'use --kv-type and --context' if gguf else '--kv-type and --context are for GGUF models'})")
        problem = kv_type_problem(self.kv_type)
        if problem:
            raise CagError(f"--kv-type {problem}")
        return self

    def applying(self) -> "EngineOptions":
        """These options without the engine-specific ones that do not apply to the model's engine (a
        server's config names options for every model it may load)."""
        other = {"torch": "llamacpp", "llamacpp": "torch"}[self.kind]
        return dataclasses.replace(self, **{name: None for name in _OWN[other]})

    def recorded(self) -> dict:
        """What kb.json keeps of these options, to load the same engine again."""
        return {k: v for k in RECORDED if (v := getattr(self, k)) is not None}

    def over(self, meta: dict) -> "EngineOptions":
        """The options a knowledge base was built with (its kb.json `meta`: model and recorded options),
        with the ones set here winning (a dtype asked for now, the threads of this run)."""
        built = {k: meta[k] for k in RECORDED if meta.get(k) is not None}
        given = {f.name: v for f in dataclasses.fields(self) if (v := getattr(self, f.name)) is not None}
        return EngineOptions(**{"model": meta.get("model"), **built, **given})
