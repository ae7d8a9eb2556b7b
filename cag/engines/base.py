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
import statistics
import threading
import time
from collections import deque
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
    # Per-layer (key, value) tensors that a memory tier may point at instead of holding a second copy; a
    # prefix held as an engine's opaque state (a llama.cpp context) has none.
    layers: Sequence[tuple[torch.Tensor, torch.Tensor]] = ()

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
    start() and clears it in finish(). `drafter` (cag.drafts) proposes tokens a step verifies all at once;
    tokens a step verified beyond the one it returns wait in `pending` for the next steps."""

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
    drafter: Drafter | None = None
    pending: list[int | None] = field(default_factory=list)
    drafted: int = 0  # draft tokens verified
    accepted: int = 0  # of those, the ones the model chose too

    def choose(self, logits: torch.Tensor) -> int | None:
        """The token these logits give (None: a stop token), drawing from the row's generator; no state
        changes but the generator's, so a verified draft can be chosen ahead of being taken."""
        from ..sampling import pick

        token = pick(logits, self.sampling, self.generator)
        return None if token in self.stops else token

    def take(self, token: int | None) -> int | None:
        """`token` becomes the answer's next (None: the answer is over)."""
        if token is None:
            self.done = True
            return None
        self.produced += 1
        self.last = token
        self.done = self.produced >= self.max_new_tokens
        if self.drafter is not None:
            self.drafter.push(token)
        return token

    def pick(self, logits: torch.Tensor) -> int | None:
        """The next token from this row's logits, or None when it is a stop token (the answer is over)."""
        return self.take(self.choose(logits))

    def verified(self, draft: Sequence[int], logits: Sequence[torch.Tensor]) -> int:
        """Choose along logits[i] (after the draft's first i tokens) while the draft holds; queue the
        tokens chosen in `pending` and return how many draft tokens were right. Each token is chosen from
        the logits the answer would have had without the draft, so the answer is the same."""
        chosen: list[int | None] = []
        for i, row in enumerate(logits):
            token = self.choose(row)
            chosen.append(token)
            if token is None or self.produced + len(chosen) >= self.max_new_tokens:
                break
            if i >= len(draft) or token != draft[i]:
                break
        right = min(len(chosen) - 1, len(draft))
        self.drafted += len(draft)
        self.accepted += right
        if self.drafter is not None:
            self.drafter.verified(len(draft), right)
        self.pending.extend(chosen)
        return right


class Drafter(Protocol):
    """Proposes the tokens an answer will likely go on with (cag.drafts: looked up in the knowledge)."""

    def propose(self, limit: int) -> list[int]: ...

    def rate(self) -> float: ...

    def push(self, token: int) -> None: ...

    def verified(self, proposed: int, right: int) -> None: ...


MAX_DRAFT = 15  # draft tokens one row verifies in a step at most, on any engine


class StepCosts:
    """Seconds a decoder's forward of n tokens takes: the median of its last KEEP, so a forward slowed by
    other work on the machine moves it little. The first forward of each size is not counted (llama.cpp
    plans a new shape's graph then). A size not measured yet is guessed from the
    nearest measured one, RISE of its time per token added: low enough that a first draft gets tried, and so
    measured; and every EXPLORE-th step tries drafts whatever they seem to cost, so a size measured while
    the machine was busy is measured again."""

    RISE = 0.25
    EXPLORE = 64
    KEEP = 15

    def __init__(self):
        self.samples: dict[int, deque[float]] = {}
        self.seconds: dict[int, float] = {}
        self.seen: set[int] = set()
        self.steps = 0
        self.lock = threading.Lock()  # decoders of one model on several threads note into one

    def note(self, tokens: int, seconds: float) -> None:
        with self.lock:
            self.steps += 1
            if tokens not in self.seen:
                self.seen.add(tokens)
                return
            kept = self.samples.setdefault(tokens, deque(maxlen=self.KEEP))
            kept.append(seconds)
            self.seconds[tokens] = statistics.median(kept)

    def exploring(self) -> bool:
        return self.steps % self.EXPLORE == self.EXPLORE - 1

    def of(self, tokens: int) -> float:
        with self.lock:
            if tokens in self.seconds:
                return self.seconds[tokens]
            if not self.seconds:
                return 1.0
            near = min(self.seconds, key=lambda n: (abs(n - tokens), n))
            return self.seconds[near] * max(0.1, 1 + self.RISE * (tokens - near))


class Decoder(abc.ABC):
    """Rows on one prefix, decoded together one step at a time (cag.scheduler drives one per knowledge base).

    Every row is computed as it would be alone: a row's logits do not depend on the other rows (on the
    torch engine bit for bit on the CPU; tested on every engine through the answers). A step feeds each row
    its last token and, where the engine has room (`draft_room`), the row's drafted tokens after it: their
    logits come out the same bits as one step each would give them, so a right draft saves steps and a
    wrong one changes nothing. A step returns one token per row; the other tokens a draft earned are handed
    out by the next steps without computing anything."""

    def admits(self, job: Job) -> bool:
        """Whether `job` can start now without waiting for rows in progress to end (room for its positions)."""
        return True

    @abc.abstractmethod
    def start(self, job: Job) -> int | None:
        """Give `job` its row, run its question and return its first token (None: it ended at once)."""

    def step(self, jobs: list[Job]) -> list[int | None]:
        """One more token for every listed job (each has started and is not done)."""
        out: list[int | None] = [None] * len(jobs)
        run = []
        for i, job in enumerate(jobs):
            if job.pending:
                out[i] = job.take(job.pending.pop(0))
            else:
                run.append(i)
        if run:
            rows = [jobs[i] for i in run]
            drafts = self._drafts(rows)
            start = time.perf_counter()
            logits = self.forward(rows, drafts)
            self.costs.note(len(rows) + sum(map(len, drafts)), time.perf_counter() - start)
            for i, job, draft, row_logits in zip(run, rows, drafts, logits):
                right = job.verified(draft, row_logits)
                if right < len(draft):
                    self.drop(job, len(draft) - right)
                out[i] = job.take(job.pending.pop(0))
        return out

    @property
    def costs(self) -> StepCosts:
        """What this decoder's forwards take by size (made on first use: engines' __init__ need not call up)."""
        found = self.__dict__.get("_costs")
        if found is None:
            found = self.__dict__["_costs"] = StepCosts()
        return found

    def _drafts(self, jobs: list[Job]) -> list[list[int]]:
        """Each job's draft, cut to the tokens worth verifying: a draft token right with probability p saves
        p times the rows' share of a step, and costs the step's growth by one token, both as this decoder
        measured them. So drafts run where an extra token is cheap (a small model on a CPU, one answer) and
        not where it is dear (a full batch, a large vocabulary's output layer)."""
        wanted = [self._draft(job) for job in jobs]
        if not any(wanted):
            return wanted
        tokens = len(jobs)
        share = self.costs.of(tokens) / tokens
        values = sorted(((job.drafter.rate() ** (j + 1), i) for i, (job, draft) in enumerate(zip(jobs, wanted))
                         for j in range(len(draft))), reverse=True)
        keep = [0] * len(jobs)
        for value, i in values:
            if value * share <= self.costs.of(tokens + 1) - self.costs.of(tokens) and not self.costs.exploring():
                break
            keep[i] += 1
            tokens += 1
        return [draft[:n] for draft, n in zip(wanted, keep)]

    def _draft(self, job: Job) -> list[int]:
        if job.drafter is None:
            return []
        limit = min(MAX_DRAFT, self.draft_room(job), job.max_new_tokens - job.produced - 1)
        return job.drafter.propose(limit)[:limit] if limit > 0 else []

    def draft_room(self, job: Job) -> int:
        """Draft tokens the job's row can verify in its next step (0: the engine cannot verify drafts now)."""
        return 0

    @abc.abstractmethod
    def forward(self, jobs: list[Job], drafts: list[list[int]]) -> list[Sequence[torch.Tensor]]:
        """Run every job's last token and then its draft at the row's next positions; per job, the logits
        after each of them (1 + len(draft) rows, each the bits one step at a time would give)."""

    def drop(self, job: Job, count: int) -> None:
        """Forget the row's last `count` positions (draft tokens the model did not choose)."""
        raise NotImplementedError

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
    def checked_dtype(self) -> str | None:
        """The dtype a cache's manifest must name to be this engine's (None: the KV type says it all)."""
        return self.storage["dtype"]

    def kv_quant_problem(self, kv_quant: str) -> str | None:
        """Why this engine cannot keep its prefix as the lossy `kv_quant` storage gives it back (prefill's
        `kv_quant`); None when it can. Asked before a build does any work."""
        return f"this engine keeps no {kv_quant!r} copy of its KV cache"

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
