"""The C decoding step (cag/native/step.c) for a float32 Llama model on the CPU: what it needs from the model.

Why a C step: one token through 30 small layers costs as much in Python calls as in arithmetic, and
attention over a long cached prefix wants one pass over the keys/values shared by its query heads.
step.c runs the whole token (all layers, final norm, LM head) in one call over the model's own weight
memory (float32 rows, or the Q4_1/Q8_0 blocks of cag.packed) and the cache's preallocated buffers.

This module only describes the model to the C code (pointers into tensors the model keeps alive) and
calls it; cag.fastdecode decides when to use it and checks it against transformers on first use.
"""

from __future__ import annotations

import ctypes

import torch

from . import kvcompat, native, packed, settings

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

    def run(self, token: int, cache) -> torch.Tensor:
        """Logits [1, vocab] for `token` after what the buffer cache holds; the cache grows by one.

        The cache must be one step.c can write into (`writable`)."""
        view = _view(cache, self)
        if view is None:
            raise ValueError("not a float32 buffer cache with room for one more position")
        if not 0 <= token < self.embed.shape[0]:
            raise IndexError(f"token id {token} is outside the embedding table")
        kp, vp, capacity, length = view
        cos, sin = self.rope(length)
        row = self.head_dim * 4
        logits = torch.empty(1, self.vocab)
        embedding = self.embed.data_ptr() + token * self.hidden * 4
        if self.kernels.step(ctypes.byref(self.model), kp, vp, capacity, embedding, length,
                             cos.data_ptr() + length * row, sin.data_ptr() + length * row, logits.data_ptr()) != 0:
            raise MemoryError("cag_step could not allocate its scratch memory")
        kvcompat.advance(cache, 1)
        return logits


class _Unsupported(Exception):
    pass


def writable(cache, plan: Plan) -> bool:
    """Whether `cache` is a buffer cache in the layout step.c writes (float32, room for one more position)."""
    return _view(cache, plan) is not None


def _view(cache, plan: Plan):
    """Pointer arrays for the cache's buffers (memoized on the cache: its buffers never move), or None."""
    found = kvcompat.buffers(cache)
    if found is None:
        return None
    bufs, length, capacity = found
    if length >= capacity:
        return None  # full: let transformers' path raise its error
    memo = getattr(cache, "_cag_native_view", None)
    if memo is None or memo[0] is not bufs[0][0]:
        shape = (1, plan.kv_heads, capacity, plan.head_dim)
        if len(bufs) != plan.model.n_layers or not all(
                t.shape == shape and t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
                for pair in bufs for t in pair):
            return None
        kp = (ctypes.c_void_p * len(bufs))(*[k.data_ptr() for k, _ in bufs])
        vp = (ctypes.c_void_p * len(bufs))(*[v.data_ptr() for _, v in bufs])
        memo = (bufs[0][0], kp, vp)
        cache._cag_native_view = memo
    return memo[1], memo[2], capacity, length


def plan(model) -> Plan | None:
    """The model's Plan, built once; None when step.c cannot run this model (decided once per model)."""
    found = model.__dict__.get("_cag_native_plan", False)
    if found is False:
        found = None
        if settings.current().native_step and _eligible(model):
            kernels = native.load()
            if kernels is not None:
                try:
                    found = Plan(model, kernels)
                except _Unsupported:
                    found = None
        model._cag_native_plan = found
    return found


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
