"""Incremental prefill: reuse a previous cache for the leading tokens that did not change.

Appending a document changes only the end of the prefix (the new text and the template's closing
tokens), so the old KV is valid up to the longest common prefix of old and new token ids: those
positions are reused as slices (no recompute) and only the rest runs through the model, chunked,
on top of them. Editing earlier content moves the first difference earlier, so more is recomputed
(everything when the very first tokens differ). The keys and values of a position depend only on
the tokens up to it, so the result is the same cache a full prefill makes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from . import engine, kvcompat
from .kvcompat import KV
from .prompt import common_prefix_len


@dataclass
class Extended:
    layers: KV
    reused: int  # leading positions taken from the previous cache
    prefilled: int  # positions computed now

    def describe(self, previous_tokens: int) -> str:
        if previous_tokens == 0:
            return f"full prefill of {self.prefilled} tokens (no earlier cache)"
        if self.reused == 0:
            return f"full prefill of {self.prefilled} tokens (the earlier cache differs from the first token)"
        if self.reused == previous_tokens:
            return f"incremental: reused all {self.reused} earlier tokens, prefilled {self.prefilled} new ones"
        return (f"recomputed from token {self.reused}: earlier content changed there "
                f"(reused {self.reused} of {previous_tokens} tokens, prefilled {self.prefilled})")


@torch.inference_mode()
def extend(model, old_layers: KV | None, old_ids: Sequence[int], new_ids: Sequence[int],
           chunk_size: int = engine.DEFAULT_CHUNK, progress: Callable[[int], None] | None = None) -> Extended:
    """The KV of `new_ids`, computing only what the previous cache (`old_layers` of `old_ids`) lacks."""
    keep = common_prefix_len(old_ids, new_ids) if old_layers else 0
    if keep == 0:
        return Extended(engine.prefill(model, new_ids, chunk_size=chunk_size, progress=progress), 0, len(new_ids))
    if progress:
        progress(keep)
    if keep == len(new_ids):
        return Extended([(k[:, :, :keep], v[:, :, :keep]) for k, v in old_layers], keep, 0)
    device = next(model.parameters()).device
    cache = kvcompat.from_layers([(k.to(device), v.to(device)) for k, v in old_layers], length=keep)
    rest = list(new_ids[keep:])
    for start in range(0, len(rest), chunk_size):
        chunk = rest[start:start + chunk_size]
        kvcompat.forward(model, torch.tensor([chunk], dtype=torch.long, device=device), cache)
        if progress:
            progress(len(chunk))
    return Extended(kvcompat.to_layers(cache), keep, len(rest))
