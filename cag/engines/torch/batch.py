"""Answers on one shared prefix, each row computed the same way whatever company it keeps.

Every answer is a row: the knowledge base's prefix (one read-only tensor per layer, never copied per row or
per request) plus the row's own positions (its question and answer so far) in a private RowBuffer. A row's
attention is the prefix segment plus its own segment; a single answer is a batch of one, and answers
decoded together (cag.scheduler, KnowledgeBase.ask_many) run the very same computation per row:

- question prefill: one forward per row, of that row's tokens only (so it cannot depend on other rows);
  attention = the prefix part and the own part, each with its log-sum-exp, merged in that order;
- decoding: on the CPU in float32, the C step (cag/native/step.c) for all rows in one call: every
  (weight row, answer) dot product and every fixed 128-key chunk of absolute positions (across both
  segments) is computed per answer by the same code, each prefix chunk read once for all answers, so an
  answer's logits are the same bits alone or in any batch (tested); a row's draft (cag.drafts) is verified
  in the same call, each draft token one more row on the answer's own buffer (`verify`). Elsewhere the
  lean Python step or transformers' forward with this module's attention; on the CPU each row's attention
  runs on its own, and matmuls run batched only where they compute each row as alone (cag packs, bf16;
  float32 BLAS does not: its one-row and many-row kernels add in different orders, so such a batch runs
  row by row). On a
  GPU the prefix part of all rows is one kernel call (the prefix read once per step) and whether a row's
  bits depend on the batch is up to the kernels cuBLAS and flash attention choose per shape (bench/gpu.py
  measures it).
"""

from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from .. import base
from ..base import Job
from . import fastdecode, kvcompat, nativestep, packed
from .state import ModelState
from .workspace import RowBuffer, Workspace

_IMPL = "cag_rows"
_INSTALL_LOCK = threading.Lock()


@dataclass
class Row:
    """One answer's place: `shared` positions of the workspace's prefix, then its own positions."""

    workspace: Workspace
    shared: int
    buffer: RowBuffer
    length: int = 0  # own positions written

    @property
    def position(self) -> int:
        """The absolute position of the next token."""
        return self.shared + self.length


@dataclass
class _Running:
    rows: list[Row]
    fold: bool  # the prefix part of all rows in one call (GPUs)


_STATE: contextvars.ContextVar[_Running | None] = contextvars.ContextVar("cag_rows", default=None)


# -- attention over the two segments -------------------------------------------------------------------

def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """The rows' attention while cag.batch runs a forward; plain sdpa otherwise (building a prefix).

    A sliding-window layer (Gemma 2/3's local layers: `sliding_window` W) lets the query at absolute
    position p see only positions p-W+1..p, as transformers' sliding mask does; the prefix part and the own
    part each read only the positions some query of the row may see."""
    state = _STATE.get()
    if state is None:
        return kvcompat.sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout,
                                       **kwargs)
    for name in ("softcap", "s_aux"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"attention with {name} is not supported yet")
    window = kwargs.get("sliding_window")
    if window is not None and not (isinstance(window, int) and window > 0):
        raise NotImplementedError(f"attention with a sliding window of {window!r} is not supported")
    layer = module.layer_idx
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    for i, row in enumerate(state.rows):
        row.buffer.write(layer, row.length, key[i], value[i])
    out = torch.empty_like(query)
    s = query.shape[2]
    prefix = {}
    for group in _groups(state.rows, state.fold and window is None):  # a window depends on each row's position
        prefix.update(_prefix_part(query, group, state.rows, layer, scale, window))
    for i, row in enumerate(state.rows):
        own = _own_part(query[i:i + 1], row, layer, s, scale, window)
        out[i] = _merge(prefix.get(i), own).to(query.dtype)[0]
    return out.transpose(1, 2).contiguous(), None


def _groups(rows: list[Row], fold: bool) -> list[list[int]]:
    """Rows whose prefix part runs as one call: all rows reading the same prefix length when folding, else each alone."""
    if not fold:
        return [[i] for i, r in enumerate(rows) if r.shared > 0]
    by_length: dict[int, list[int]] = {}
    for i, r in enumerate(rows):
        if r.shared > 0:
            by_length.setdefault(r.shared, []).append(i)
    return list(by_length.values())


def _prefix_part(query: torch.Tensor, group: list[int], rows: list[Row], layer: int, scale: float,
                 window: int | None = None) -> dict:
    """{row: (output, lse)} of the group's queries against the prefix; query heads that share a KV head are
    folded into its query dimension (with the group's rows), so the prefix is read once and never expanded.
    With a sliding `window` the group is one row, and only the prefix positions its queries may see are read."""
    pk, pv = rows[group[0]].workspace.layers[layer]
    length = rows[group[0]].shared
    b, (_, hq, s, d), hkv = len(group), query.shape, pk.shape[1]
    g = hq // hkv
    start, allowed = 0, None
    if window is not None:
        first = rows[group[0]].position  # the absolute position of the row's first query
        start = max(0, first - window + 1)
        if start >= length:
            return {}  # no query of the row sees any prefix position
        if first + s - 1 - window + 1 > start:  # later queries see fewer: mask per query
            keys = torch.arange(start, length, device=query.device)
            last_hidden = first + torch.arange(s, device=query.device) - window  # position j sees keys > this
            allowed = (keys[None, :] > last_hidden[:, None]).repeat(g, 1)  # [g*s, keys], heads folded as below
    pk, pv = pk[:, :, start:length], pv[:, :, start:length]
    q = query[group] if b < query.shape[0] else query
    q = q.reshape(b, hkv, g * s, d).transpose(0, 1).reshape(1, hkv, b * g * s, d)
    if allowed is None:
        o, lse = _attend(q, pk, pv, scale, causal=False)
    else:
        o, lse = _attend_matmul(q, pk, pv, scale, allowed)
        o = torch.where(torch.isneginf(lse)[..., None], 0.0, o)  # a query that sees none of the prefix: weight 0
    o = o.view(hkv, b, g * s, d).transpose(0, 1).reshape(b, hq, s, d)
    lse = lse.view(hkv, b, g * s).transpose(0, 1).reshape(b, hq, s)
    return {i: (o[j:j + 1], lse[j:j + 1]) for j, i in enumerate(group)}


def _own_part(query: torch.Tensor, row: Row, layer: int, s: int, scale: float,
              window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """One row's queries [1, hq, s, d] against its own positions, causally (query j sits at own position
    length+j); with a sliding `window`, query j sees own positions length+j-window+1..length+j only."""
    keys, values = row.buffer.own(layer, row.length + s)
    hq, hkv = query.shape[1], keys.shape[1]
    g = hq // hkv
    start = max(0, row.length - window + 1) if window is not None else 0
    if s == 1:  # one query per head sees every own position (from `start`): fold the heads, no copy
        keys, values = keys[:, :, start:], values[:, :, start:]
        o, lse = _attend(query.reshape(1, hkv, g, query.shape[-1]), keys, values, scale, causal=False)
        return o.reshape(1, hq, 1, -1), lse.reshape(1, hq, 1)
    if g > 1:
        keys, values = keys.repeat_interleave(g, dim=1), values.repeat_interleave(g, dim=1)  # own positions only
    if window is not None and row.length + s - window > 0:  # the window cuts some query's view: mask it
        keys, values = keys[:, :, start:], values[:, :, start:]
        at = start + torch.arange(keys.shape[2], device=query.device)
        mine = row.length + torch.arange(s, device=query.device)
        allowed = (at[None, :] <= mine[:, None]) & (at[None, :] > mine[:, None] - window)
        return _attend_matmul(query, keys, values, scale, allowed)
    if row.length == 0:
        return _attend(query, keys, values, scale, causal=True)
    rel = torch.arange(row.length + s, device=query.device)
    allowed = rel[None, :] <= (row.length + torch.arange(s, device=query.device))[:, None]
    return _attend_matmul(query, keys, values, scale, allowed)


def _merge(prefix: tuple | None, own: tuple) -> torch.Tensor:
    """softmax over both segments from each part's normalized output and log-sum-exp, in a fixed order."""
    o2, lse2 = own
    if prefix is None:
        return o2.float()
    o1, lse1 = prefix
    m = torch.maximum(lse1, lse2)
    w1, w2 = torch.exp(lse1 - m)[..., None], torch.exp(lse2 - m)[..., None]
    return (o1.float() * w1 + o2.float() * w2) / (w1 + w2)


def _attend(q, k, v, scale: float, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [1, h, n, d] over k/v [1, h, m, d]: normalized output and log-sum-exp [1, h, n].

    Kernels that stream the keys and return the log-sum-exp: torch's flash kernel on the CPU, flash
    (bf16/fp16) or memory-efficient attention (float32) on CUDA; plain matmuls elsewhere.
    """
    kind = _kernel(q)
    if kind == "cpu-flash":
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal, scale=scale)[:2]
    if kind == "cuda-flash":
        out = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, causal, False, scale=scale)
        return out[0], out[1]
    if kind == "cuda-efficient":
        out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, causal, scale=scale)
        return out[0], out[1][..., : q.shape[-2]]
    allowed = None
    if causal:
        n, m = q.shape[-2], k.shape[-2]
        allowed = torch.arange(m, device=q.device)[None, :] <= torch.arange(n, device=q.device)[:, None] + (m - n)
    return _attend_matmul(q, k, v, scale, allowed)


def _attend_matmul(q, k, v, scale: float, allowed: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The same attention with plain matmuls (scores in float32, keys and values read in their own dtype)."""
    scores = torch.matmul(q, k.transpose(-1, -2)).float() * scale
    if allowed is not None:
        scores = scores.masked_fill(~allowed, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - lse[..., None]).to(v.dtype)
    return torch.matmul(weights, v), lse


_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _kernel(q: torch.Tensor) -> str:
    if q.device.type == "cpu":
        return "cpu-flash" if _CPU_FLASH else "matmul"
    if q.device.type == "cuda":
        if q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256 and q.shape[-1] % 8 == 0:
            return "cuda-flash"
        return "cuda-efficient"
    return "matmul"


def _install(state: ModelState) -> None:
    """This module's attention as the model's (plain sdpa outside a rows forward, so prefills are unchanged);
    and the threads this step takes."""
    state.threads_now()
    if getattr(state.model.config, "_attn_implementation", None) == _IMPL:
        return
    with _INSTALL_LOCK:
        if getattr(state.model.config, "_attn_implementation", None) != _IMPL:
            kvcompat.register_attention(_IMPL, _attention)
            kvcompat.set_attention(state.model, _IMPL)


class _rows_running:
    """Context: a forward of these rows (their attention reads their segments and writes their new KV)."""

    def __init__(self, rows: list[Row], fold: bool):
        self.state = _Running(rows, fold)

    def __enter__(self):
        self.token = _STATE.set(self.state)

    def __exit__(self, *exc):
        _STATE.reset(self.token)


# -- one row's question, all rows' next token -----------------------------------------------------------

@torch.inference_mode()
def prefill(state: ModelState, row: Row, ids: Sequence[int]) -> torch.Tensor:
    """Logits [vocab] after the row's new tokens `ids` (its question), placed at its next positions."""
    _install(state)
    tokens = torch.tensor([list(ids)], dtype=torch.long, device=state.device)
    positions = torch.arange(row.position, row.position + len(ids), device=state.device)[None]
    with _rows_running([row], fold=False):
        logits = kvcompat.forward_positions(state.model, tokens, positions, keep=1)[:, -1]
    row.length += len(ids)
    return logits[0]


@torch.inference_mode()
def step(state: ModelState, rows: list[Row], tokens: Sequence[int]) -> torch.Tensor:
    """Logits [rows, vocab] for one new token per row; each row's are the bits it would get alone (CPU)."""
    _install(state)
    try:
        if fastdecode.supported(state):
            plan = nativestep.plan(state)
            if plan is not None and fastdecode.verdict(state, "native") is not False and plan.fits(rows):
                return fastdecode.native(state, lambda: plan.run(rows, tokens),
                                         lambda: _reference(state, rows, tokens), lambda: _new_kv(rows))
        limit = _together(state)
        if len(rows) <= limit:
            return _step_torch(state, rows, tokens)
        return torch.cat([_step_torch(state, rows[i:i + limit], tokens[i:i + limit])
                          for i in range(0, len(rows), limit)])
    finally:
        for r in rows:
            r.length += 1


@torch.inference_mode()
def verify(state: ModelState, rows: list[Row], tokens: list[list[int]]) -> list[torch.Tensor]:
    """Logits [len(tokens[i]), vocab] per row for its tokens at its next positions, in one C step: token j
    of a row is a row of the step at position +j on the same buffer (the step writes every row's keys and
    values before any attention reads them), so each gets the bits a step of its own would give."""
    _install(state)
    plan = nativestep.plan(state)
    flat = [Row(r.workspace, r.shared, r.buffer, r.length + j) for r, ts in zip(rows, tokens) for j in range(len(ts))]
    if plan is None or not plan.fits(flat):
        raise RuntimeError("drafts need the C step and room in the row's buffer (Decoder.draft_room)")
    logits = plan.run(flat, [t for ts in tokens for t in ts])
    for r, ts in zip(rows, tokens):
        r.length += len(ts)
    return list(torch.split(logits, [len(ts) for ts in tokens]))


def _inputs(state: ModelState, rows: list[Row], tokens: Sequence[int]) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """One step's token ids [rows, 1], positions [rows, 1] and whether the prefix part is one call (GPUs)."""
    ids = torch.tensor([[t] for t in tokens], dtype=torch.long, device=state.device)
    positions = torch.tensor([[r.position] for r in rows], device=state.device)
    return ids, positions, state.device.type == "cuda"


def _reference(state: ModelState, rows: list[Row], tokens: Sequence[int]) -> torch.Tensor:
    """transformers' forward over the same rows: what the fast steps are checked against."""
    ids, positions, fold = _inputs(state, rows, tokens)
    with _rows_running(rows, fold):
        return kvcompat.forward_positions(state.model, ids, positions, keep=1)[:, -1]


def _step_torch(state: ModelState, rows: list[Row], tokens: Sequence[int]) -> torch.Tensor:
    if not fastdecode.supported(state):
        return _reference(state, rows, tokens)
    ids, positions, fold = _inputs(state, rows, tokens)

    def attention(attn, q, k, v):
        return _attention(attn, q, k, v, None, scaling=attn.scaling)[0]

    def lean():
        with _rows_running(rows, fold):
            return fastdecode.lean(state, ids, positions, attention)

    return fastdecode.checked_lean(state, lean, lambda: _reference(state, rows, tokens))


def _new_kv(rows: list[Row]) -> list[torch.Tensor]:
    """Every row's key and value at its current position in every layer (what a step just wrote)."""
    out = []
    for r in rows:
        for k, v in zip(r.buffer.k, r.buffer.v):
            out += [k[0, :, r.length].clone(), v[0, :, r.length].clone()]
    return out


def _together(state: ModelState) -> int:
    """How many rows torch may compute in one call with every row's bits as when computed alone."""
    if state.rows_together is None:
        model, found = state.model, 1
        if state.device.type == "cuda":
            found = 1 << 30  # up to the kernels cuBLAS picks per shape (measured by bench/gpu.py)
        elif state.dtype != torch.float32:
            found = packed.ROW_LIMIT  # oneDNN's bf16/fp16 matmuls compute rows alone (tested)
        elif all(isinstance(m, packed.PackedLinear) for m in model.modules()
                 if isinstance(m, torch.nn.Linear) or isinstance(m, packed.PackedLinear)):
            found = packed.ROW_LIMIT  # cag's packed kernels compute each row on its own (beyond: float32 BLAS)
        state.rows_together = found
    return state.rows_together


# -- answers ------------------------------------------------------------------------------------------

class Decoder(base.Decoder):
    """Rows on one workspace, decoded together one token per step.

    start() gives a job its row (a RowBuffer from the workspace's pool) and runs its question prefill for
    its first token; step() gives every listed job its next token; finish() hands the buffer back.
    """

    def __init__(self, state: ModelState, workspace: Workspace):
        self.state, self.workspace = state, workspace

    @property
    def costs(self) -> base.StepCosts:
        return self.state.step_costs

    def start(self, job: Job) -> int | None:
        if not job.new_ids:
            raise ValueError("an answer needs at least one new token to compute the next-token logits")
        if not 0 <= job.reuse <= self.workspace.length:
            raise ValueError(f"reuse {job.reuse} is outside the prefix of {self.workspace.length} positions")
        buffer = self.workspace.take(len(job.new_ids) + job.max_new_tokens, self.state.layers)
        job.slot = Row(self.workspace, job.reuse, buffer)
        job.generator = job.sampling.generator(self.state.device)
        return job.pick(prefill(self.state, job.slot, job.new_ids))

    def forward(self, jobs: list[Job], drafts: list[list[int]]) -> list[torch.Tensor]:
        rows = [j.slot for j in jobs]
        if any(drafts):
            return verify(self.state, rows, [[j.last, *d] for j, d in zip(jobs, drafts)])
        return list(step(self.state, rows, [j.last for j in jobs])[:, None])

    def draft_room(self, job: Job) -> int:
        """Drafts go through the C step only (the one whose rows share a buffer), once it was checked."""
        row = job.slot
        if fastdecode.verdict(self.state, "native") is not True or nativestep.plan(self.state) is None:
            return 0
        return max(0, row.buffer.capacity - row.length - 1)

    def drop(self, job: Job, count: int) -> None:
        job.slot.length -= count  # those positions are written again before anything reads them

    def finish(self, job: Job) -> None:
        if job.slot is not None:
            self.workspace.give(job.slot.buffer)
            job.slot = None
