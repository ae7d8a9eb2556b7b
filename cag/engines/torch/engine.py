"""The model side of CAG: prefill a prefix once, then answer by running only new tokens on top of it.

One generation path serves every mode. With a prefix, the question's tokens run after the cached
positions; without one, the whole prompt runs from scratch. Same code, same dtype, same decoding: the
only difference is where the prefix's keys and values come from. An answer is one row of cag.batch,
alone or decoded together with others (cag.scheduler): the same computation per row either way.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence

import torch

from . import batch, kvcompat
from ... import scheduler
from .kvcompat import KV
from ...sampling import Sampling
from .workspace import Workspace

__all__ = ["DEFAULT_CHUNK", "Sampling", "TextStream", "Workspace", "detokenize", "generate", "prefill", "stop_ids"]

DEFAULT_CHUNK = 512


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


def generate(model, new_ids: Sequence[int], prefix: "KV | Workspace | None" = None, reuse: int = 0,
             max_new_tokens: int = 256, sampling: Sampling = Sampling(),
             stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """Yield generated token ids. `reuse` leading positions of `prefix` stand in for the prompt's first tokens.

    The answer is one row of cag.batch: the prefix is read in place (never copied, never written) and the
    answer's own positions go to a buffer of its own, so after the call (finished, failed or abandoned
    mid-stream) the prefix is exactly what it was. Inside `cag.scheduler.together()` an answer on a
    Workspace joins the rows that workspace's scheduler is decoding; its tokens are the same bits either way.
    """
    if not new_ids:
        raise ValueError("generate needs at least one new token to compute the next-token logits")
    if max_new_tokens < 1:
        return
    workspace = prefix if isinstance(prefix, Workspace) else Workspace(prefix or [])
    job = batch.Job(list(new_ids), reuse, max_new_tokens, sampling, frozenset(stop_ids))
    limit = scheduler.limit()
    if limit is not None and isinstance(prefix, Workspace):
        yield from scheduler.of(model, workspace).answer(job, limit)
        return
    decoder = batch.Decoder(model, workspace)
    try:
        token = decoder.start(job)
        while token is not None:
            yield token
            if job.done:
                return  # no step for a token nobody will read
            token = decoder.step([job])[0]
    finally:
        decoder.finish(job)


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
