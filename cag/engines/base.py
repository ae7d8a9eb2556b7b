"""The engine seam: everything the cache layer needs from the code that runs a model, and nothing more.

Above this seam (cag.api, cag.cache, cag.kb, cag.scheduler, the server, eval) nothing knows whether a
model is a transformers module or a llama.cpp context; below it an engine knows no files, stores or
HTTP. An engine does five jobs:

- text: the chat template and tokenization (`codec`), with user text never parsed for special tokens;
- prefill: a prefix computed in recorded pieces (`prefill`), optionally on top of an earlier prefix;
- export/import: the prefix state as the tensors that go into a cache file, and back (`export`,
  `restore`), refusing state that does not fit this model;
- decoding: one batched step for rows that share a prefix (`decoder`: start/step/finish);
- logits out: each row's next-token logits, picked by cag.sampling the same way on every engine.

Engines: cag.engines.torch (Hugging Face folders through transformers; the reference) and
cag.engines.llamacpp (GGUF files and Ollama models through llama.cpp).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, Protocol, Sequence

from ..sampling import Sampling

if TYPE_CHECKING:  # the seam itself needs no torch: cag.kb imports it for the Codec
    import torch

Progress = Callable[[int], None]


@dataclass
class Payload:
    """A prefix as a cache file holds it: per-layer keys/values (torch engine) or an engine's opaque state
    bytes (llama.cpp's per-sequence state, as a uint8 tensor)."""

    layers: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    state: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        n = sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)
        return n + (self.state.numel() if self.state is not None else 0)


class Prefix(abc.ABC):
    """A knowledge base's prefix on an engine: `length` positions answers decode on top of, never written."""

    length: int

    @property
    def nbytes(self) -> int:
        """Memory the prefix holds while it is loaded (its KV tensors, or a llama.cpp context's buffers): what
        a server's memory budget counts for a loaded knowledge base."""
        return 0

    @abc.abstractmethod
    def release(self) -> None:
        """Let go of what the prefix holds outside Python's memory management (llama.cpp contexts)."""


class TextStream(Protocol):
    """Token ids in, text deltas out, incrementally; the deltas concatenated equal decoding all ids."""

    ids: list[int]

    def push(self, token: int) -> str: ...

    def flush(self) -> str: ...

    def text(self) -> str: ...


class Codec(abc.ABC):
    """A model's text side as cag.kb.prompt needs it: the chat template, and tokenization in which only the
    template's own text may hold control tokens (user text is tokenized with special-token parsing off)."""

    @property
    @abc.abstractmethod
    def chat_template(self) -> str | None:
        """The chat template, or None for a model without one (the plain Question/Answer layout)."""

    @abc.abstractmethod
    def render(self, messages: list[dict]) -> str:
        """The template applied to `messages`, ending with the assistant's generation prompt."""

    @property
    @abc.abstractmethod
    def special(self) -> dict[str, int]:
        """Control tokens the template's text may contain, by their text: the tokenizer splits text there."""

    @abc.abstractmethod
    def encode(self, text: str, add_special: bool = False) -> list[int]:
        """Ids of `text` with special-token parsing off; `add_special` adds the model's BOS/EOS as the
        tokenizer would for a whole prompt (the plain layout)."""

    @abc.abstractmethod
    def longest_token(self) -> int:
        """Characters in the longest token: a text of N characters is at least N / this many tokens."""

    @abc.abstractmethod
    def fingerprint(self) -> str:
        """sha256 of everything that decides ids: vocabulary, merges, normalizer, special tokens."""

    @abc.abstractmethod
    def stream(self) -> TextStream:
        """A new incremental detokenizer."""

    def decode(self, ids: Sequence[int]) -> str:
        """The text of `ids` exactly as a stream of them reads (answers read the same streamed or not)."""
        stream = self.stream()
        for token in ids:
            stream.push(token)
        stream.flush()
        return stream.text()


@dataclass
class Job:
    """One answer: its new tokens on top of `reuse` prefix positions, how to pick, and how far it is.

    `slot` is the engine's place for the row (a row buffer, a llama.cpp sequence); the decoder sets it in
    start() and clears it in finish()."""

    new_ids: list[int]
    reuse: int
    max_new_tokens: int = 256
    sampling: Sampling = Sampling()
    stops: frozenset[int] = frozenset()
    slot: object = None
    generator: torch.Generator | None = None
    produced: int = 0
    last: int | None = None
    done: bool = False

    def pick(self, logits: torch.Tensor) -> int | None:
        """The next token from this row's logits, or None when it is a stop token (the answer is over)."""
        from ..sampling import pick

        token = pick(logits, self.sampling, self.generator)
        if token in self.stops:
            self.done = True
            return None
        self.produced += 1
        self.last = token
        self.done = self.produced >= self.max_new_tokens
        return token


class Decoder(abc.ABC):
    """Rows on one prefix, decoded together one token per step (cag.scheduler drives one per knowledge base).

    Every row is computed as it would be alone: a row's logits do not depend on the other rows (on the
    torch engine bit for bit on the CPU; tested on every engine through the answers)."""

    def admits(self, job: Job) -> bool:
        """Whether `job` can start now without waiting for rows in progress to end (room for its positions)."""
        return True

    @abc.abstractmethod
    def start(self, job: Job) -> int | None:
        """Give `job` its row, run its question and return its first token (None: it ended at once)."""

    @abc.abstractmethod
    def step(self, jobs: list[Job]) -> list[int | None]:
        """One more token for every listed job (each has started and is not done)."""

    @abc.abstractmethod
    def finish(self, job: Job) -> None:
        """Give the job's row back (idempotent); the prefix is untouched."""


class Engine(abc.ABC):
    """A loaded model behind the seam. Its per-model state (fast-path verdicts, plans, contexts) lives in it."""

    kind: str  # "torch" or "llamacpp": recorded in every cache's manifest
    name: str  # what the user asked for (default alias, folder, hub id, GGUF path, ollama:NAME)
    context_window: int  # positions one answer may use: knowledge + history + question + answer
    codec: Codec
    stop_ids: list[int]

    # -- identity: what a cache made with this engine must match -----------------------------------------
    @abc.abstractmethod
    def identity(self) -> dict:
        """The manifest's "model" section: name, path, fingerprint, engine and the engine's own facts."""

    @property
    @abc.abstractmethod
    def storage(self) -> dict:
        """What the prefix state is stored as: {"dtype": ..., "kv": ...} ("kv": the KV storage type)."""

    @abc.abstractmethod
    def options(self) -> dict:
        """The load options that give this engine again (kept in kb.json): {"dtype": ...} for transformers,
        {"kv_type": ..., "context": ...} for llama.cpp."""

    @property
    def dtype(self) -> str:
        return self.storage["dtype"]

    @property
    def device(self) -> "torch.device | str":
        """Where payload tensors go when a cache is restored (the CPU unless the engine runs on a GPU)."""
        return "cpu"

    @property
    def nbytes(self) -> int:
        """Memory the loaded model's weights hold (prefixes count their own: Prefix.nbytes)."""
        return 0

    def prefix_nbytes(self, tokens: int) -> int:
        """About what a prefix of `tokens` positions will hold once loaded (Prefix.nbytes), before it is: a
        server makes room for a knowledge base before loading it, not after."""
        return 0

    # -- the prefix ----------------------------------------------------------------------------------------
    @abc.abstractmethod
    def prefill(self, ids: Sequence[int], ends: Sequence[int], base: Prefix | None = None, keep: int = 0,
                progress: Progress | None = None, kv_quant: str | None = None) -> Prefix:
        """The prefix of `ids`, its first `keep` positions taken from `base` (which must hold ids[:keep]),
        the rest computed one forward per piece, piece i ending at ends[i]. Why pieces: kernels round
        differently for different shapes, so a prefix is reproducible bit for bit only when computed in the
        same pieces again (the manifest's prefill_bounds; the no-cache reference recomputes in them).
        `kv_quant` ("int8"): the prefix is kept as that lossy storage gives it back, so answers from a fresh
        build and from the stored file agree."""

    @abc.abstractmethod
    def export(self, prefix: Prefix) -> Payload:
        """The prefix as tensors for the cache file (on the CPU or the prefix's device)."""

    @abc.abstractmethod
    def restore(self, payload: Payload, ids: Sequence[int], manifest: dict) -> Prefix:
        """A prefix from a verified cache's tensors; CacheFileError when they cannot be this model's
        (layer count, heads, head size, dtype, state size, non-finite values), naming what differs."""

    # -- answers -------------------------------------------------------------------------------------------
    @abc.abstractmethod
    def decoder(self, prefix: Prefix) -> Decoder:
        """A decoder for rows on `prefix` (one per prefix and scheduler; cheap to make)."""

    def close(self) -> None:
        """Free what the engine holds outside Python (llama.cpp model and contexts)."""
