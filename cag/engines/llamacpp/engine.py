"""The llama.cpp engine: GGUF models (and Ollama's, which are GGUF blobs) behind the engine seam.

A prefix is sequence 0 of a llama.cpp context of its own; its state (llama_state_seq_get_data: the KV
cells of every layer) is what the cache file holds. Answers are further sequences of the same context:
each starts by sharing the prefix's cells (llama_memory_seq_cp: no copy), writes only its own
positions, and is decoded together with the others, one llama_decode per step.

Why an answer is the same bits alone or batched (tested): llama.cpp's CPU attention computes each query
row on its own over the cells its sequence sees, in cell order, except in two shortcuts it takes when keys
and values are both f16 (or f32), which depend on the company a row keeps: a single query token splits
the cells over the threads, and 64 or more tokens are computed in tiles. With such a KV type every
decode call here has at least two tokens (a padding token in a spare sequence when a step has one row)
and at most QUESTION_PIECE of a question (bf16 and q8_0 need neither: the padding row costs a small
model ~15-25 % of a step, but their prefill lacks the tiled path). And no cell is freed while any answer runs
(finished answers give theirs back when the last one ends), so cells are always taken in order and every
row sees its cells in the order of its positions; so the cells of draft tokens the model did not choose
(cag.drafts: a step runs a row's last token and its draft, each token a row of the decode) go to a spare
sequence rather than back, and a row's next token takes a new cell after them. Weights are not repacked
(those kernels compute one token and several differently). The no-cache reference runs the same code on a
prefix recomputed in the same pieces, in a fresh context.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ...errors import CacheFileError, ContextLengthError
from ..base import Decoder, Engine, Job, Payload, Prefix, Progress
from ..cores import Cores
from . import lib
from .codec import LlamaCodec

SEQUENCES = 67  # per context: the prefix, a padding sequence, the drafts' leftovers and up to 64 answers at once
PAD_SEQ = 1
SPENT_SEQ = 2  # holds the cells of draft tokens the model did not choose until every running answer ends
SPARE = 64  # cells a row takes beyond its answer's for the draft tokens the model refuses
QUESTION_PIECE = 48  # question tokens per decode call (under llama.cpp's 64-row attention tiles)
DEFAULT_CONTEXT = 8192  # positions per answer when the model allows as many and none is asked for
PREFILL_BATCH = 512


class LlamaEngine(Engine):
    kind = "llamacpp"

    def __init__(self, name: str, path: Path, model: lib.Model, fingerprint: str, threads: int, kv_type: str,
                 context: int):
        self.name, self.path, self.lm = name, path, model
        self.model_fingerprint = fingerprint
        self.threads, self.kv_type = threads, kv_type
        self.cores: Cores | None = None  # set: the thread count was not given, each step takes the idle cores
        self.context_window = context
        self.codec = LlamaCodec(model)
        self.stop_ids = sorted(self.codec.stop_ids)
        self.runtime = lib.build_id()
        self._context_nbytes = 0  # what one of this engine's contexts holds, once one was made (all are alike)

    # -- identity ------------------------------------------------------------------------------------------
    def identity(self) -> dict:
        return {"name": self.name, "path": str(self.path), "fingerprint": self.model_fingerprint, "engine": self.kind,
                "runtime": self.runtime, "context": self.context_window}

    @property
    def storage(self) -> dict:
        return {"dtype": self.kv_type, "kv": self.kv_type}

    def options(self) -> dict:
        return {"kv_type": self.kv_type, "context": self.context_window}

    @property
    def checked_dtype(self) -> None:
        return None  # llama.cpp's state has no dtype of its own: its KV type says it all

    def kv_quant_problem(self, kv_quant: str) -> str:
        return (f"kv_quant (--kv-int8) applies to the transformers engine; with a GGUF model choose the KV cache "
                f"type with --kv-type (this one is {self.kv_type})")

    @property
    def nbytes(self) -> int:
        return self.lm.nbytes

    def prefix_nbytes(self, tokens: int) -> int:
        """Every prefix has a context of the whole window, whatever its length."""
        return self._context_nbytes or self.lm.kv_bytes(self.context_window + 1, self.kv_type)

    # -- the prefix ----------------------------------------------------------------------------------------
    def _context(self) -> lib.Context:
        # one cell more than the window: the padding token of a step never takes an answer's room
        ctx = lib.Context(self.lm, self.context_window + 1, self.threads, self.kv_type, SEQUENCES, PREFILL_BATCH,
                          self.cores)
        self._context_nbytes = ctx.nbytes
        return ctx

    def prefill(self, ids: Sequence[int], ends: Sequence[int], base: "LlamaPrefix | None" = None, keep: int = 0,
                progress: Progress | None = None, kv_quant: str | None = None) -> "LlamaPrefix":
        if kv_quant:
            raise ValueError("llama.cpp keeps its KV as --kv-type says; kv_quant is the transformers engine's")
        if len(ids) > self.context_window:
            raise ContextLengthError(len(ids), 0, 0, self.context_window)
        ctx = self._context()
        try:
            start = 0
            if base is not None and keep:
                if not ctx.set_state(base.state_bytes(), 0):
                    raise CacheFileError("llama.cpp refused the earlier prefix's state")
                ctx.remove(0, keep, -1)
                start = keep
            for end in ends:
                if not start < end <= len(ids):
                    raise ValueError(f"prefill pieces must rise within the {len(ids)} ids (piece {start}..{end})")
                for s in range(start, end, PREFILL_BATCH):  # a piece longer than a batch: the same split every time
                    e = min(s + PREFILL_BATCH, end)
                    ctx.decode(list(ids[s:e]), list(range(s, e)), [0] * (e - s), [False] * (e - s))
                if progress:
                    progress(end - start)
                start = end
            if start != len(ids):
                raise ValueError(f"prefill pieces end at {start}, not at the last of the {len(ids)} ids")
        except BaseException:
            ctx.close()
            raise
        return LlamaPrefix(self, ctx, len(ids))

    def export(self, prefix: "LlamaPrefix") -> Payload:
        data = bytearray(prefix.state_bytes())
        return Payload(state=torch.frombuffer(data, dtype=torch.uint8) if data else torch.empty(0, dtype=torch.uint8))

    def restore(self, payload: Payload, ids: Sequence[int], manifest: dict) -> "LlamaPrefix":
        state = payload.state
        if state is None or payload.layers:
            raise CacheFileError("the cache holds per-layer tensors, not llama.cpp state: it was made by the "
                                 "transformers engine; rebuild it with this model")
        if len(ids) > self.context_window:
            raise CacheFileError(f"the cache holds {len(ids)} tokens, more than this context of {self.context_window}")
        ctx = self._context()
        data = state.contiguous().numpy().tobytes()
        if not ctx.set_state(data, 0) or ctx.last_position(0) != len(ids) - 1:
            ctx.close()
            raise CacheFileError(f"llama.cpp refused the cache's state ({len(data)} bytes for {len(ids)} tokens): "
                                 "it was made for another model, KV type or build; rebuild it")
        return LlamaPrefix(self, ctx, len(ids), data)

    # -- answers -------------------------------------------------------------------------------------------
    def decoder(self, prefix: "LlamaPrefix") -> "LlamaDecoder":
        return prefix.decoder

    def close(self) -> None:
        self.lm.close()


class LlamaPrefix(Prefix):
    """Sequence 0 of a context of its own, and the one decoder every answer on it goes through."""

    def __init__(self, engine: LlamaEngine, ctx: lib.Context, length: int, state: bytes | None = None):
        self.engine, self.ctx, self.length = engine, ctx, length
        self._state = state
        self.decoder = LlamaDecoder(ctx, length, engine.kv_type)

    @property
    def nbytes(self) -> int:
        return self.ctx.nbytes if self.ctx.ptr else 0

    def state_bytes(self) -> bytes:
        """llama.cpp's state of the prefix's sequence (what a cache file holds), read once."""
        with self.decoder.lock:
            if self._state is None:
                self._state = self.ctx.state(0)
            return self._state

    def release(self) -> None:
        with self.decoder.lock:
            self.ctx.close()  # (a prefix dropped without release() is closed when its context is collected)


class _Row:
    def __init__(self, seq: int, position: int, cells: int):
        self.seq, self.position, self.cells = seq, position, cells
        self.spent = 0  # cells of refused draft tokens (held by SPENT_SEQ)


class LlamaDecoder(Decoder):
    """Rows (sequences 2..) on one prefix of `length` positions, sequence 0 of `ctx`. Thread-safe: inline
    answers on several threads and a scheduler thread may share it; each call holds the context for its
    duration. It holds the context, not the prefix: no reference cycle, so a prefix nobody holds is freed at once."""

    def __init__(self, ctx: lib.Context, length: int, kv_type: str):
        self.ctx, self.length = ctx, length
        shortcuts = kv_type in lib.SHORTCUT_KV  # llama.cpp's company-dependent attention paths
        self.pad, self.piece = shortcuts, QUESTION_PIECE if shortcuts else PREFILL_BATCH
        self.lock = threading.RLock()
        self.room = threading.Condition(self.lock)
        self.free = list(range(SEQUENCES - 1, SPENT_SEQ, -1))  # sequence ids for rows, popped from the end
        self.active = 0  # rows running
        self.finished: list[int] = []  # sequences of ended rows, whose cells go back when no row runs
        self.reserved = 0  # cells promised to running rows and held by ended ones

    def admits(self, job: Job) -> bool:
        with self.lock:
            if self._need(job) > self._capacity():
                return True  # it can never fit: start() says so at once
            return bool(self.free) and self._room_left() >= self._need(job)

    def _need(self, job: Job) -> int:
        return len(job.new_ids) + job.max_new_tokens

    def _capacity(self) -> int:
        """Cells for answers beside the prefix: all but one, kept for the padding token."""
        return self.ctx.cells - self.length - 1

    def _room_left(self) -> int:
        return self._capacity() - self.reserved

    def start(self, job: Job) -> int | None:
        if not job.new_ids:
            raise ValueError("an answer needs at least one new token to compute the next-token logits")
        if not 0 <= job.reuse <= self.length:
            raise ValueError(f"reuse {job.reuse} is outside the prefix of {self.length} positions")
        need = self._need(job)
        if need > self._capacity():
            raise ContextLengthError(job.reuse, len(job.new_ids), job.max_new_tokens, self.ctx.cells)
        with self.room:
            if not self.room.wait_for(lambda: self.free and self._room_left() >= need, timeout=600):
                raise TimeoutError("no room in the knowledge base's KV cache for another answer in 10 minutes")
            # spare: cells for refused drafts (a row that used them up decodes on without drafts), few enough
            # that rows arriving later still find room
            spare = min(self._room_left() - need, SPARE) if job.drafter is not None else 0
            row = _Row(self.free.pop(), job.reuse, need + spare)
            self.reserved += row.cells
            self.active += 1
            job.slot = row
            job.generator = job.sampling.generator(torch.device("cpu"))
            try:
                self.ctx.copy(0, row.seq, job.reuse)
                logits = None
                for s in range(0, len(job.new_ids), self.piece):
                    piece = job.new_ids[s:s + self.piece]
                    last = s + len(piece) >= len(job.new_ids)
                    logits = self._run([(t, row.position + i, row.seq, last and i == len(piece) - 1)
                                        for i, t in enumerate(piece)])
                    row.position += len(piece)
            except BaseException:
                self.finish(job)
                raise
        return job.pick(torch.from_numpy(logits[0]))

    def forward(self, jobs: list[Job], drafts: list[list[int]]) -> list[torch.Tensor]:
        items = [(t, j.slot.position + i, j.slot.seq, True) for j, d in zip(jobs, drafts)
                 for i, t in enumerate([j.last, *d])]
        with self.lock:
            logits = [self._run(items[s:s + self.piece]) for s in range(0, len(items), self.piece)]
            for j, d in zip(jobs, drafts):
                j.slot.position += 1 + len(d)
        rows = torch.from_numpy(logits[0] if len(logits) == 1 else np.concatenate(logits))
        return list(torch.split(rows, [1 + len(d) for d in drafts]))

    def draft_room(self, job: Job) -> int:
        """Cells the row can spend on drafts: those it took beyond its answer's need, less those spent."""
        row = job.slot
        return max(0, row.cells - self._need(job) - row.spent)

    def drop(self, job: Job, count: int) -> None:
        """The refused draft's cells go to SPENT_SEQ rather than back: a freed cell would be taken by a later
        token out of position order (see the module's docstring)."""
        row = job.slot
        with self.lock:
            start = row.position - count
            self.ctx.copy(row.seq, SPENT_SEQ, row.position, start)
            self.ctx.remove(row.seq, start, -1)
            row.position, row.spent = start, row.spent + count

    def finish(self, job: Job) -> None:
        with self.room:
            row = job.slot
            if row is None:
                return
            job.slot = None
            self.active -= 1
            self.finished.append(row.seq)
            self.reserved -= row.cells - (row.position - job.reuse) - row.spent  # what it did not use is free again
            if self.active == 0:  # the last running answer ended: every ended one's cells go back now
                for seq in self.finished:
                    self.ctx.remove(seq)
                    self.free.append(seq)
                self.ctx.remove(SPENT_SEQ)
                self.finished.clear()
                self.reserved = 0
                self.room.notify_all()

    def _run(self, items: list[tuple[int, int, int, bool]]):
        """One llama_decode of these (token, position, sequence, wants logits); padded to two tokens where
        the KV type would otherwise send a lone token down llama.cpp's thread-split attention."""
        pad = self.pad and len(items) < 2
        if pad:
            items = items + [(0, 0, PAD_SEQ, False)]
        tokens, positions, seqs, outputs = (list(x) for x in zip(*items))
        try:
            return self.ctx.decode(tokens, positions, seqs, outputs)
        finally:
            if pad:  # the last cell taken: freeing it keeps cells in order
                self.ctx.remove(PAD_SEQ)


def default_threads() -> int:
    return max(1, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1))
