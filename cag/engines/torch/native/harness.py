"""The C decoding step driven directly over plain tensors, for the kernels' tests and benchmarks.

Why: cag normally reaches cag_step through its workspace and batch machinery (cag.engines.torch.batch,
workspace, nativestep.Plan.run). Checking one kernel set against another, or against transformers, and
timing each set, needs the step alone: a prefix's keys/values as transformers computed them, a buffer per
row, and the thread count chosen per call. Nothing in cag's answering path uses this module.
"""

from __future__ import annotations

import ctypes

import torch

from .. import kvcompat
from . import Row, Shared


def prefill(model, ids: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The prompt's per-layer keys/values [1, kv_heads, len(ids), head_dim], by transformers' own forward."""
    with torch.inference_mode():
        cache = kvcompat.empty_cache()
        kvcompat.forward(model, torch.tensor([ids]), cache)
    return [(k.contiguous().clone(), v.contiguous().clone()) for k, v in kvcompat.to_layers(cache)]


class Decoding:
    """Rows decoding through cag_step: a Plan's model (cag.engines.torch.nativestep), a shared prefix's
    keys/values (never written) and `room` positions of each row's own."""

    def __init__(self, plan, prefix: list[tuple[torch.Tensor, torch.Tensor]], rows: int, room: int):
        self.plan, self.room = plan, room
        self.prefix = [(k.contiguous(), v.contiguous()) for k, v in prefix]
        self.shared_length = self.prefix[0][0].shape[2]
        self._shared_pointers = [(ctypes.c_void_p * len(self.prefix))(*[t.data_ptr() for t in ts])
                                 for ts in zip(*self.prefix)]
        self.shared = Shared(k=ctypes.cast(self._shared_pointers[0], ctypes.c_void_p),
                             v=ctypes.cast(self._shared_pointers[1], ctypes.c_void_p), stride=self.shared_length)
        shape = (plan.kv_heads, room, plan.head_dim)
        self.own = [([torch.zeros(shape) for _ in self.prefix], [torch.zeros(shape) for _ in self.prefix])
                    for _ in range(rows)]
        self._own_pointers = [[(ctypes.c_void_p * len(kv))(*[t.data_ptr() for t in kv]) for kv in row]
                              for row in self.own]
        self.lengths = [0] * rows

    def step(self, tokens: list[int], rows: list[int] | None = None, threads: int | None = None) -> torch.Tensor:
        """Logits [len(rows), vocab] for one token per row (rows: indices, default the first len(tokens)), on
        torch's thread count or `threads`. Each row's token goes to its next own position."""
        rows = list(range(len(tokens))) if rows is None else rows
        if any(self.lengths[r] >= self.room for r in rows):
            raise ValueError("a row has no room left for another token")
        plan = self.plan
        cos, sin = plan.rope(self.shared_length + max(self.lengths[r] for r in rows))
        c_rows = (Row * len(rows))()
        for c, r, token in zip(c_rows, rows, tokens):
            pos = self.shared_length + self.lengths[r]
            c.embedding, c.cos, c.sin = plan.embed[token].data_ptr(), cos[pos].data_ptr(), sin[pos].data_ptr()
            c.pos, c.shared, c.cap = pos, self.shared_length, self.room
            c.k, c.v = (ctypes.cast(p, ctypes.c_void_p) for p in self._own_pointers[r])
        logits = torch.empty(len(rows), plan.vocab)
        args = (ctypes.byref(plan.model), ctypes.byref(self.shared), c_rows, len(rows), logits.data_ptr())
        self.team = plan.kernels.step(*args) if threads is None else plan.kernels.lib.cag_step(*args, threads)
        if self.team < 0:
            raise MemoryError("cag_step could not allocate its scratch memory")
        for r in rows:
            self.lengths[r] += 1
        return logits

    def keys(self, row: int) -> list[torch.Tensor]:
        """The keys the step wrote for a row so far, per layer [kv_heads, length, head_dim]."""
        return [k[:, :self.lengths[row]] for k in self.own[row][0]]
