"""The C decoding step (cag/native/step.c) for a float32 Llama model on the CPU: what it needs from the model.

Why a C step: one token through 30 small layers costs as much in Python calls as in arithmetic, and
attention over a long cached prefix wants one pass over the keys/values shared by its query heads.
step.c runs the whole token of every row (all layers, final norm, LM head) in one call over the model's
own weight memory (float32 rows, or the Q4_1/Q8_0 blocks of cag.packed), the shared prefix's KV and each
row's own buffers (cag.batch.Row, cag.workspace.RowBuffer).

This module only describes the model to the C code (pointers into tensors the model keeps alive) and
calls it; cag.fastdecode decides when to use it and checks it against transformers on first use.
"""

from __future__ import annotations

import ctypes
import weakref

import torch

from ... import settings
from . import native, packed
from .state import UNDECIDED, ModelState

_STATIC_ROPE = {"default", "linear", "llama3", "yarn"}  # inv_freq fixed at load time: a table is exact
MAX_HEAD_DIM = 512  # step.c's rotary scratch


class Plan:
    """A model as step.c sees it. Holds references to every tensor whose memory it points into."""

    def __init__(self, model, kernels: native.Kernels):
        base, cfg = model.model, model.config
        self.kernels = kernels
        self.keep: list[torch.Tensor] = []
        layers = base.layers
        first = layers[0].self_attn
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = first.head_dim
        self.hidden = cfg.hidden_size
        self.embed = self._tensor(base.embed_tokens.weight)
        self.vocab = model.lm_head.out_features
        self.rotary = base.rotary_emb
        self.layers = (native.Layer * len(layers))()
        for i, layer in enumerate(layers):
            attn, mlp = layer.self_attn, layer.mlp
            c = self.layers[i]
            c.in_norm = self._tensor(layer.input_layernorm.weight).data_ptr()
            c.post_norm = self._tensor(layer.post_attention_layernorm.weight).data_ptr()
            for name, linear in (("q", attn.q_proj), ("k", attn.k_proj), ("v", attn.v_proj), ("o", attn.o_proj),
                                 ("gate", mlp.gate_proj), ("up", mlp.up_proj), ("down", mlp.down_proj)):
                setattr(c, name, self._mat(linear))
        self.model = native.Model(
            n_layers=len(layers), hidden=self.hidden, inter=cfg.intermediate_size, heads=self.heads,
            kv_heads=self.kv_heads, head_dim=self.head_dim, vocab=self.vocab,
            eps=layers[0].input_layernorm.variance_epsilon, scale=first.scaling, layers=self.layers,
            final_norm=self._tensor(base.norm.weight).data_ptr(), lm_head=self._mat(model.lm_head))
        self._rope = (torch.empty(0), torch.empty(0))
        # pointer arrays of the buffers step.c reads, per workspace / row buffer (their tensors never move)
        self._described: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    def _tensor(self, t: torch.Tensor) -> torch.Tensor:
        t = t.detach()
        if t.dtype != torch.float32 or not t.is_contiguous():
            raise _Unsupported("a weight that is not contiguous float32")
        self.keep.append(t)
        return t

    def _mat(self, linear) -> native.Mat:
        if getattr(linear, "bias", None) is not None:
            raise _Unsupported("a projection with a bias")
        if isinstance(linear, packed.PackedLinear):
            blocks = linear.blocks
            if not blocks.is_contiguous():
                raise _Unsupported("packed blocks that are not contiguous")
            self.keep.append(blocks)
            kind = native.MAT_Q41 if linear.kind == "q4_1" else native.MAT_Q80
            return native.Mat(kind=kind, rows=linear.out_features, cols=linear.in_features, data=blocks.data_ptr())
        if type(linear) is not torch.nn.Linear:
            raise _Unsupported(f"a {type(linear).__name__} projection")
        w = self._tensor(linear.weight)
        return native.Mat(kind=native.MAT_F32, rows=w.shape[0], cols=w.shape[1], data=w.data_ptr())

    def rope(self, position: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The rotary cos/sin table [positions, head_dim] covering `position`, computed by the model's own
        rotary embedding (extended in powers of two as positions grow; callers keep the pair they got)."""
        table = self._rope
        if position >= table[0].shape[0]:
            size = max(256, 1 << position.bit_length())
            with torch.inference_mode():
                cos, sin = self.rotary(torch.zeros(1, 1, self.hidden), torch.arange(size)[None])
            table = self._rope = (cos[0].contiguous(), sin[0].contiguous())
        return table

    def fits(self, rows) -> bool:
        """Whether step.c can run these cag.batch rows: float32 CPU buffers in its layout, room for the token."""
        if not rows:
            return False
        workspace = rows[0].workspace
        if any(r.workspace is not workspace for r in rows) or self._shared(workspace) is None:
            return False
        return all(self._own(r.buffer) is not None and r.length < r.buffer.capacity for r in rows)

    def run(self, rows, tokens) -> torch.Tensor:
        """Logits [rows, vocab] for one token per row (cag.batch Rows, all on one workspace; `fits` must hold).

        Writes each token's keys/values at its row's next own position; the caller counts them."""
        count = len(rows)
        table = self.rope(max(r.position for r in rows))
        cos, sin = table
        row_bytes = self.head_dim * 4
        c_rows = (native.Row * count)()
        for c, r, token in zip(c_rows, rows, tokens):
            if not 0 <= token < self.embed.shape[0]:
                raise IndexError(f"token id {token} is outside the embedding table")
            k, v = self._own(r.buffer)
            c.embedding = self.embed.data_ptr() + token * self.hidden * 4
            c.cos, c.sin = cos.data_ptr() + r.position * row_bytes, sin.data_ptr() + r.position * row_bytes
            c.pos, c.shared, c.k, c.v, c.cap = r.position, r.shared, k, v, r.buffer.capacity
        logits = torch.empty(count, self.vocab)
        if self.kernels.step(ctypes.byref(self.model), ctypes.byref(self._shared(rows[0].workspace)), c_rows, count,
                             logits.data_ptr()) < 0:
            raise MemoryError("cag_step could not allocate its scratch memory")
        return logits

    def _shared(self, workspace) -> native.Shared | None:
        """The prefix as step.c reads it (memoized on the workspace: its tensors never move), or None."""
        memo = self._described.get(workspace)
        if memo is None:
            memo = self._described[workspace] = self._describe(workspace.layers)
        return memo[0]

    def _describe(self, layers) -> tuple:
        """(Shared or None, the pointer arrays it points to)."""
        if not layers:
            return native.Shared(k=None, v=None, stride=0), None
        stride = layers[0][0].stride(1)
        if len(layers) != self.model.n_layers or not all(
                t.dtype == torch.float32 and t.device.type == "cpu" and t.shape[1] == self.kv_heads
                and t.shape[-1] == self.head_dim and t.stride(-1) == 1 and t.stride(-2) == self.head_dim
                and t.stride(1) == stride for pair in layers for t in pair):
            return None, None
        arrays = [(ctypes.c_void_p * len(layers))(*[t.data_ptr() for t in ts]) for ts in zip(*layers)]
        return native.Shared(k=ctypes.cast(arrays[0], ctypes.c_void_p), v=ctypes.cast(arrays[1], ctypes.c_void_p),
                             stride=stride // self.head_dim), arrays

    def _own(self, buffer):
        """A RowBuffer's per-layer pointer arrays (memoized once all its layers exist: they never move), or
        None where step.c cannot write them (not float32 on the CPU, layers not allocated yet)."""
        memo = self._described.get(buffer)
        if memo is not None:
            return memo[0]
        shape = (1, self.kv_heads, buffer.capacity, self.head_dim)
        if len(buffer.k) != self.model.n_layers or not all(
                t is not None and t.shape == shape and t.dtype == torch.float32 and t.device.type == "cpu"
                and t.is_contiguous() for pair in zip(buffer.k, buffer.v) for t in pair):
            return None
        arrays = [(ctypes.c_void_p * len(ts))(*[t.data_ptr() for t in ts]) for ts in (buffer.k, buffer.v)]
        pointers = (ctypes.cast(arrays[0], ctypes.c_void_p), ctypes.cast(arrays[1], ctypes.c_void_p))
        self._described[buffer] = (pointers, arrays)
        return pointers


class _Unsupported(Exception):
    pass


def plan(state: ModelState) -> Plan | None:
    """The model's Plan, built once; None when step.c cannot run this model (decided once per model)."""
    if state.native_plan is UNDECIDED:
        with state.lock:
            if state.native_plan is UNDECIDED:
                state.native_plan = _plan(state.model)
    return state.native_plan


def _plan(model) -> Plan | None:
    if not (settings.current().native_step and _eligible(model)):
        return None
    kernels = native.load()
    if kernels is None:
        return None
    try:
        return Plan(model, kernels)
    except _Unsupported:
        return None


def _eligible(model) -> bool:
    cfg = model.config
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu":
        return False
    if not all(p.dtype == torch.float32 for p in model.parameters()):
        return False
    rope = (getattr(cfg, "rope_parameters", None) or getattr(cfg, "rope_scaling", None) or {}).get("rope_type", "default")
    head_dim = getattr(model.model.layers[0].self_attn, "head_dim", 0) if len(model.model.layers) else 0
    return (getattr(cfg, "hidden_act", None) == "silu" and not getattr(cfg, "attention_bias", False)
            and not getattr(cfg, "mlp_bias", False) and rope in _STATIC_ROPE
            and 0 < head_dim <= MAX_HEAD_DIM and head_dim % 2 == 0
            and cfg.num_attention_heads % cfg.num_key_value_heads == 0)
