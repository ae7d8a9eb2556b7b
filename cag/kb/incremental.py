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

import torch

from ..engines.torch import engine
from ..engines.torch.kvcompat import KV
from .prompt import common_prefix_len


@dataclass
class Extended:
    layers: KV
    reused: int  # leading positions taken from the previous cache
    prefilled: int  # positions computed now
    bounds: list[int] = field(default_factory=list)  # where each piece the KV was computed in ends
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


@torch.inference_mode()
def extend(model, old_layers: KV | None, old_ids: Sequence[int], new_ids: Sequence[int],
           chunk_size: int = engine.DEFAULT_CHUNK, progress: Callable[[int], None] | None = None,
           old_bounds: Sequence[int] | None = None) -> Extended:
    """The KV of `new_ids`, computing only what the previous cache (`old_layers` of `old_ids`, computed in
    pieces ending at `old_bounds`; default: chunks of `chunk_size`) lacks. Reuse stops at the start of
    the piece holding the first change, so the result is made of whole pieces (module docstring)."""
    changed_at = common_prefix_len(old_ids, new_ids) if old_layers else 0
    if old_bounds is None:
        old_bounds = engine.chunk_ends(0, len(old_ids), chunk_size)
    start = max((b for b in old_bounds if b <= changed_at), default=0)
    kept = [b for b in old_bounds if b <= start]
    if progress and start:
        progress(start)
    if start == len(new_ids):
        return Extended([(k[:, :, :start], v[:, :, :start]) for k, v in old_layers], start, 0, kept, changed_at)
    past = [(k[:, :, :start], v[:, :, :start]) for k, v in old_layers] if start else None
    ends = engine.chunk_ends(start, len(new_ids), chunk_size)
    layers = engine.prefill_pieces(model, new_ids, ends, progress, past=past)
    return Extended(layers, start, len(new_ids) - start, kept + ends, changed_at)
