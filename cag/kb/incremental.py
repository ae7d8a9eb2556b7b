"""Incremental prefill: reuse a previous cache for the leading tokens that did not change.

Appending a document changes only the end of the prefix (the new text and the template's closing
tokens), so the old KV is valid up to the longest common prefix of old and new token ids: those
positions are reused as slices (no recompute) and only the rest runs through the model, chunked,
on top of them. Editing earlier content moves the first difference earlier, so more is recomputed
(everything when the very first tokens differ). The keys and values of a position depend only on
the tokens up to it, so the result is the same cache a full prefill makes.

Bit for bit, though, a position's keys and values also depend on the shape of the forward that computed
them (kernels round differently per shape). So reuse stops at the start of the prefill piece that holds
the first changed token, and the pieces of the result (kept old ones, then new chunks from there) are
returned as `bounds`: recomputing the prefix from scratch in those pieces gives the same bits, which is
what the no-cache reference does. That costs at most one chunk more than reusing up to the change itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Sequence

from ..engines.base import Engine, Prefix
from .prompt import common_prefix_len

DEFAULT_CHUNK = 512  # tokens per prefill piece: bounded activation memory, and the pieces caches record


def chunk_ends(start: int, end: int, chunk_size: int) -> list[int]:
    """Where each piece of a prefill of positions [start, end) in chunks of `chunk_size` ends."""
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1 (got {chunk_size})")
    return [*range(start + chunk_size, end, chunk_size), end] if end > start else []


@dataclass
class Extended:
    prefix: Prefix
    reused: int  # leading positions taken from the previous cache
    prefilled: int  # positions computed now
    bounds: list[int] = field(default_factory=list)  # where each piece the prefix was computed in ends
    changed_at: int | None = None  # the first position whose token differs from the previous cache's

    def describe(self, previous_tokens: int) -> str:
        if previous_tokens == 0:
            return f"full prefill of {self.prefilled} tokens (no earlier cache)"
        if not self.changed_at:
            return f"full prefill of {self.prefilled} tokens (the earlier cache differs from the first token)"
        if self.reused == previous_tokens:
            return f"incremental: reused all {self.reused} earlier tokens, prefilled {self.prefilled} new ones"
        return (f"recomputed from token {self.reused}: earlier content changed at token {self.changed_at}, in the "
                f"prefill piece that starts there (reused {self.reused} of {previous_tokens} tokens, "
                f"prefilled {self.prefilled})")


def extend(lm: Engine, old: Prefix | None, old_ids: Sequence[int], new_ids: Sequence[int],
           chunk_size: int = DEFAULT_CHUNK, progress: Callable[[int], None] | None = None,
           old_bounds: Sequence[int] | None = None, kv_quant: str | None = None) -> Extended:
    """The prefix of `new_ids`, computing only what the previous one (`old`, of `old_ids`, computed in
    pieces ending at `old_bounds`; default: chunks of `chunk_size`) lacks. Reuse stops at the start of
    the piece holding the first change, so the result is made of whole pieces (module docstring).

    `progress(n)` is called once before any piece runs, with the positions taken from `old` (0 when none),
    then after each piece with the positions it computed: a progress display can time the prefill itself,
    apart from what came before it."""
    changed_at = common_prefix_len(old_ids, new_ids) if old is not None else 0
    if old_bounds is None:
        old_bounds = chunk_ends(0, len(old_ids), chunk_size)
    start = max((b for b in old_bounds if b <= changed_at), default=0)
    kept = [b for b in old_bounds if b <= start]
    if progress:  # the prefill starts: before its first piece, with the positions reused (0 without any)
        progress(start)
    ends = chunk_ends(start, len(new_ids), chunk_size)
    prefix = lm.prefill(new_ids, ends, base=old if start else None, keep=start, progress=progress, kv_quant=kv_quant)
    return Extended(prefix, start, len(new_ids) - start, kept + ends, changed_at)
