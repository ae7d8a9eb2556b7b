"""The KV buffers answers decode in: a knowledge base's prefix, shared and read-only, and each answer's own.

Why two segments: a prefix can be gigabytes on a GPU, and no answer ever writes into it, so copying it per
answer (or per concurrent answer) would cost memory and time for nothing. Each answer reads the prefix in
place and writes its own positions (question, history, answer so far) into a private RowBuffer taken from
the workspace's small pool and given back afterwards, so a busy server allocates little per question.
"""

from __future__ import annotations

import threading

import torch

from ..base import Prefix
from .kvcompat import KV

KEEP_FREE = 8  # row buffers a workspace keeps for reuse between answers
_ALIGN = 64  # row buffer capacities are multiples of this, so buffers fit more answers when reused


class RowBuffer:
    """One answer's own keys and values: per layer [1, kv_heads, capacity, head_dim].

    Shaped, typed and placed like the prefix's layers; with an empty prefix, each layer's buffers are
    allocated on its first write, like the keys written (so no description of the model is needed). A
    buffer taken from the pool holds whatever the previous answer left: only positions an answer wrote
    itself are ever read.
    """

    def __init__(self, capacity: int, layers: int, like: KV = ()):
        self.capacity = capacity
        self.k: list[torch.Tensor | None] = [None] * layers
        self.v: list[torch.Tensor | None] = [None] * layers
        for i, (k, v) in enumerate(like):
            self.k[i], self.v[i] = _room(k, capacity), _room(v, capacity)

    def write(self, layer: int, at: int, key: torch.Tensor, value: torch.Tensor) -> None:
        """Store key/value [kv_heads, s, head_dim] at own positions at..at+s-1 of `layer`."""
        end = at + key.shape[-2]
        if end > self.capacity:
            raise ValueError(f"an answer's KV buffer of {self.capacity} positions is full")
        if self.k[layer] is None:
            self.k[layer], self.v[layer] = _room(key[None], self.capacity), _room(value[None], self.capacity)
        self.k[layer][0, :, at:end].copy_(key)
        self.v[layer][0, :, at:end].copy_(value)

    def own(self, layer: int, length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The first `length` own positions of `layer` (views, no copy)."""
        return self.k[layer][:, :, :length], self.v[layer][:, :, :length]


class Workspace(Prefix):
    """A prefix's per-layer KV ([1, kv_heads, P, head_dim] each, held as given: never copied, never written)
    and a pool of RowBuffers for the answers decoded on top of it.

    `room` is the smallest capacity a new RowBuffer gets (question + answer positions); an answer that
    needs more gets a bigger one. Workspace([]) is an empty prefix (the no-cache reference from scratch).
    """

    def __init__(self, layers: KV, room: int = 1024):
        self.layers: KV = [(_readable(k), _readable(v)) for k, v in layers]
        self.length = self.layers[0][0].shape[-2] if self.layers else 0
        self.room = max(1, room)
        self._free: list[RowBuffer] = []
        self._lock = threading.Lock()

    @property
    def prefix(self) -> KV:
        return self.layers

    @property
    def nbytes(self) -> int:
        return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in self.layers)

    def release(self) -> None:
        """Nothing to do: the tensors are Python-managed memory."""

    def take(self, positions: int, layers: int) -> RowBuffer:
        """A RowBuffer with room for `positions` own positions: the smallest free one that fits, or a new one."""
        with self._lock:
            fitting = [b for b in self._free if b.capacity >= positions and len(b.k) == layers]
            if fitting:
                found = min(fitting, key=lambda b: b.capacity)
                self._free.remove(found)
                return found
        capacity = -(-max(positions, self.room) // _ALIGN) * _ALIGN
        return RowBuffer(capacity, layers, self.layers if len(self.layers) == layers else ())

    def give(self, buffer: RowBuffer) -> None:
        """Back to the pool (the largest KEEP_FREE are kept)."""
        with self._lock:
            self._free.append(buffer)
            self._free.sort(key=lambda b: -b.capacity)
            del self._free[KEEP_FREE:]


def _room(like: torch.Tensor, capacity: int) -> torch.Tensor:
    """An uninitialized [1, kv_heads, capacity, head_dim] buffer of like's dtype and device."""
    return like.new_empty((1, like.shape[1], capacity, like.shape[-1]))


def _readable(t: torch.Tensor) -> torch.Tensor:
    """The tensor itself when its positions are rows of head_dim contiguous values (any head stride), which
    is what the attention kernels and the C step read; otherwise a contiguous copy (once per workspace)."""
    if t.dim() != 4 or t.shape[0] != 1:
        raise ValueError(f"prefix KV must be [1, kv_heads, positions, head_dim], not {list(t.shape)}")
    if t.stride(-1) == 1 and t.stride(-2) == t.shape[-1]:
        return t
    return t.contiguous()
