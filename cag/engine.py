"""The model side of CAG: prefill a prefix once, then answer by running only new tokens on top of it.

One generation loop serves both modes. With a prefix, the question's tokens run after the cached
positions; without one (`--no-cache`, the reference), the whole prompt runs from scratch. Same code,
same dtype, same decoding: the only difference is where the prefix's keys and values come from.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch

from . import fastdecode, kvcompat
from .kvcompat import KV

DEFAULT_CHUNK = 512


@dataclass(frozen=True)
class Sampling:
    """Greedy unless a temperature is given; a seed makes sampling repeatable."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature <= 0.0


def _ids(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([list(ids)], dtype=torch.long, device=device)


@torch.inference_mode()
def prefill(model, ids: Sequence[int], chunk_size: int = DEFAULT_CHUNK,
            progress: Callable[[int], None] | None = None) -> KV:
    """Run `ids` through the model in chunks (bounded activation memory) and return the per-layer KV."""
    return prefill_pieces(model, ids, chunk_ends(0, len(ids), chunk_size), progress)


def chunk_ends(start: int, end: int, chunk_size: int) -> list[int]:
    """Where each piece of a prefill of positions [start, end) in chunks of `chunk_size` ends."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1 (got {chunk_size})")
    return [*range(start + chunk_size, end, chunk_size), end] if end > start else []


@torch.inference_mode()
def prefill_pieces(model, ids: Sequence[int], ends: Sequence[int], progress: Callable[[int], None] | None = None,
                   past: KV | None = None) -> KV:
    """The KV of `ids`, computed one forward per piece, piece i ending at position ends[i].

    `past` is the KV of the first positions, taken as is; the pieces start after it. Why pieces matter:
    kernels round differently for different shapes (bf16 on a GPU above all), so a prefix's KV is
    reproducible bit for bit only when it is computed in the same pieces again. A cache records its
    pieces (the manifest's prefill_bounds) and the no-cache reference recomputes in them.
    """
    device = next(model.parameters()).device
    start = past[0][0].shape[-2] if past else 0
    cache = kvcompat.from_layers([(k.to(device), v.to(device)) for k, v in past]) if past else kvcompat.empty_cache()
    for end in ends:
        if not start < end <= len(ids):
            raise ValueError(f"prefill pieces must rise within the {len(ids)} ids (piece {start}..{end})")
        kvcompat.forward(model, _ids(ids[start:end], device), cache)
        if progress:
            progress(end - start)
        start = end
    return kvcompat.to_layers(cache)


class Workspace:
    """The prefix's KV inside preallocated buffers, with room after it for one answer at a time.

    An answer writes its tokens after the prefix and is dropped by forgetting a length: nothing is
    concatenated or copied per question, and the prefix region is never written. One answer at a time
    holds the workspace (a lock); a concurrent one falls back to the shared, concatenating path over
    the same prefix tensors, which is just as correct, only slower.
    """

    def __init__(self, layers: KV, room: int = 1024):
        self.length = layers[0][0].shape[-2]
        self._place(layers, self.length + room)
        self.lock = threading.Lock()

    @property
    def prefix(self) -> KV:
        return [(k[:, :, : self.length], v[:, :, : self.length]) for k, v in self.buffers]

    def reserve(self, capacity: int) -> None:
        """Grow the buffers (copying the prefix once) when an answer needs more room than they have."""
        if capacity > self.capacity:
            self._place(self.prefix, capacity + 256)

    def _place(self, layers: KV, capacity: int) -> None:
        self.capacity = capacity
        self.buffers = [(_with_room(k, capacity), _with_room(v, capacity)) for k, v in layers]


def _with_room(t: torch.Tensor, capacity: int) -> torch.Tensor:
    out = t.new_empty((*t.shape[:2], capacity, t.shape[-1]))
    out[:, :, : t.shape[-2]].copy_(t)
    return out


def generate(model, new_ids: Sequence[int], prefix: "KV | Workspace | None" = None, reuse: int = 0,
             max_new_tokens: int = 256, sampling: Sampling = Sampling(),
             stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield generated token ids. `reuse` leading positions of `prefix` stand in for the prompt's first tokens.

    The prefix's positions are only ever read: after the call (finished, failed or abandoned mid-stream)
    the prefix is exactly what it was.
    """
    if not new_ids:
        raise ValueError("generate needs at least one new token to compute the next-token logits")
    need = reuse + len(new_ids) + max_new_tokens
    if isinstance(prefix, Workspace):
        if reuse == prefix.length and prefix.lock.acquire(blocking=False):
            try:
                prefix.reserve(need)
                cache = kvcompat.buffer_cache(prefix.capacity, prefix.buffers, reuse)
                yield from _decode(model, new_ids, cache, max_new_tokens, sampling, stop_ids)
            finally:
                prefix.lock.release()
            return
        prefix = prefix.prefix
    if prefix is not None and reuse > 0:
        # A private copy of the prefix in buffers with room (one copy per answer, where a concatenating
        # cache would copy every token), so this path decodes with the same step as the others.
        own = Workspace([(k[:, :, :reuse], v[:, :, :reuse]) for k, v in prefix], room=need - reuse)
        cache = kvcompat.buffer_cache(own.capacity, own.buffers, reuse)
    else:
        cache = kvcompat.buffer_cache(need)  # the reference: everything from scratch
    yield from _decode(model, new_ids, cache, max_new_tokens, sampling, stop_ids)


@torch.inference_mode()
def _decode(model, new_ids, cache, max_new_tokens, sampling, stop_ids) -> Iterator[int]:
    device = next(model.parameters()).device
    generator = None
    if not sampling.greedy and sampling.seed is not None:
        generator = torch.Generator(device=device).manual_seed(sampling.seed)
    stops = set(stop_ids)
    logits = kvcompat.forward(model, _ids(new_ids, device), cache)
    fast = fastdecode.supported(model)
    for i in range(max_new_tokens):
        token = _pick(logits[0], sampling, generator)
        if token in stops:
            return
        yield token
        if i + 1 == max_new_tokens:
            return  # no step for a token nobody will read
        if fast:
            logits = fastdecode.step(model, token, cache)
        else:
            logits = kvcompat.forward(model, _ids([token], device), cache)


def _pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    if sampling.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p  # always keeps the top token
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))


def stop_ids(tokenizer, model) -> list[int]:
    """End-of-turn and end-of-sequence ids from the tokenizer and the generation config."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(getattr(model, "generation_config", None), "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    vocab = tokenizer.get_vocab()
    for marker in ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|endoftext|>", "</s>"):
        if marker in vocab:
            ids.add(vocab[marker])
    return sorted(ids)


class TextStream:
    """Token ids -> text deltas, incrementally: each token costs the same however long the answer is.

    tokenizers' DecodeStream keeps only the few ids a character may still need, so a multi-byte character
    split over tokens is held back until it is complete (decoding the whole answer at every token, as before,
    made streaming quadratic in the answer's length). The deltas concatenated are `text()`: what a client
    streams is exactly the final answer.
    """

    def __init__(self, tokenizer):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.ids: list[int] = []
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._pieces: list[str] = []
        self._sent = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        piece = self._decoder.step(self.backend, token)
        if not piece:
            return ""
        self._pieces.append(piece)
        self._sent += len(piece)
        return piece

    def flush(self) -> str:
        """At the end: what is still held back (an incomplete character, as a full decode renders it), so
        that the deltas add up to text() and to decoding all ids at once."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        tail = full[self._sent:] if full.startswith(self.text()) else ""
        if tail:
            self._pieces.append(tail)
            self._sent += len(tail)
        return tail

    def text(self) -> str:
        return "".join(self._pieces)


def detokenize(tokenizer, ids: Sequence[int]) -> str:
    """The text of `ids` exactly as a TextStream streams it (answers read the same streamed or not)."""
    stream = TextStream(tokenizer)
    for token in ids:
        stream.push(token)
    stream.flush()
    return stream.text()
