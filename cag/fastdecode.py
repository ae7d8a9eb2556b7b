"""One decoding step for Llama-family models without transformers' per-call machinery.

Why: decoding SmolLM2 on a CPU spends as long in Python (module hooks, mask building, output objects,
three projections where one would do) as in the matmuls. Two steps replace transformers' forward here:

- The C step (cag.nativestep, cag/native/step.c): the whole token in one call, for float32 models on
  the CPU decoding into a preallocated buffer cache (every mode of cag.engine does). It adds in its own
  order, so it is checked against transformers within TOLERANCE (see _checked_native); since every
  generated token of every mode goes through it, cached and no-cache answers run the same arithmetic.
- The lean Python step: the model's own modules (norms, rotary embedding, projections, MLP pieces) in
  transformers' order, with q/k/v and gate/up fused into one call each when packed (cag.packed computes
  every output row independently, so the fused call returns exactly the same numbers). Bit for bit with
  transformers; it serves everything the C step does not (bf16, GPUs, other caches) and cag.batch.

Either is an optimisation, never a second opinion: the first step of each kind (native, single, batch)
on each model is also run through transformers' own forward and compared, or that kind is switched off
for the model (with a warning): a failed C step hands over to the lean step, a failed lean step to
transformers. CAG_FAST_DECODE=0 turns both off; CAG_NATIVE_STEP=0 only the C step.
"""

from __future__ import annotations

import contextvars
import sys
import threading

import torch
import torch.nn.functional as F

from . import kvcompat, nativestep, packed, settings

_ATTENTION = {"sdpa", "cag_shared_prefix"}  # the latter is plain sdpa outside a cag.batch run
_LOCK = threading.Lock()


def supported(model) -> bool:
    """A causal Llama whose layers this step reproduces, and not switched off (decided once per model)."""
    ok = getattr(model, "_cag_fast_ok", None)
    if ok is None:
        ok = (settings.current().fast_decode
              and getattr(model.config, "model_type", None) == "llama"
              and getattr(model.config, "_attn_implementation", None) in _ATTENTION
              and not getattr(model.config, "pretraining_tp", 1) > 1
              and hasattr(model, "model") and hasattr(model, "lm_head"))
        model._cag_fast_ok = ok
    return ok


def verdict(model, kind: str) -> bool | None:
    """Whether the fast `kind` step ("single" or "batch") matched transformers on this model; None: not run yet."""
    return getattr(model, "_cag_fast_verdicts", {}).get(kind)


@torch.inference_mode()
def step(model, token: int, cache) -> torch.Tensor:
    """Logits [1, vocab] for `token` placed after everything `cache` holds; the cache grows by one."""
    length = kvcompat.seq_length(cache)
    ids = _ids(model, [[token]])
    if supported(model) and verdict(model, "native") is not False:
        plan = nativestep.plan(model)
        if plan is not None and nativestep.writable(cache, plan):
            return _checked_native(model, plan, token, ids, cache, length)
    positions = torch.tensor([[length]], device=ids.device)

    def attend(i, attn, q, k, v):
        keys, values = kvcompat.layer_update(cache, i, k, v)
        extra = {"enable_gqa": True} if attn.num_key_value_groups > 1 else {}
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=None, dropout_p=0.0, scale=attn.scaling,
                                           is_causal=False, **extra)
        return o.reshape(1, -1, 1, values.shape[-1]).transpose(1, 2).contiguous()

    return _checked(model, "single", reference=lambda: kvcompat.forward(model, ids, cache),
                    fast=lambda fusions: _forward(model, ids, positions, fusions, attend),
                    reset=lambda: kvcompat.crop(cache, length))


def _checked_native(model, plan, token: int, ids: torch.Tensor, cache, length: int) -> torch.Tensor:
    """The C step; on the model's first one, also transformers' forward, compared within TOLERANCE.

    The C step adds its float32 sums in another order than transformers (and has its own exp), so the
    bits differ; what is checked is that logits and the new keys/values agree to within TOLERANCE of
    their largest magnitude (float32 rounding over a whole model is ~1e-6 of it; a real mistake such as a
    wrong position or weight is orders of magnitude more). Every generated token of every mode (cached
    or not) goes through this same step, so cached and no-cache answers still run the same arithmetic.
    """
    def rows():
        return [(k[:, :, length].clone(), v[:, :, length].clone()) for k, v in kvcompat.buffers(cache)[0]]

    def reference():
        logits = kvcompat.forward(model, ids, cache)
        return logits, rows()

    def fast(_fusions):
        logits = plan.run(token, cache)
        return logits if _checking.get() is None else (logits, rows())

    def same(got, expected):
        pairs = [(got[0], expected[0])] + [pair for a, b in zip(got[1], expected[1]) for pair in zip(a, b)]
        return all(close(x, y) for x, y in pairs)

    def unwrap(result):
        return result[0] if isinstance(result, tuple) else result

    return unwrap(_checked(model, "native", reference=reference, fast=fast,
                           reset=lambda: kvcompat.crop(cache, length), same=same))


TOLERANCE = 1e-4


def close(got: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE) -> bool:
    """Equal up to `tolerance` times the larger of 1 and expected's largest magnitude (and same shape)."""
    if got.shape != expected.shape or not torch.isfinite(got).all():
        return False
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    return float((got - expected).abs().max()) <= tolerance * scale if got.numel() else True


@torch.inference_mode()
def batch_step(model, ids: torch.Tensor, positions: torch.Tensor, attention, reference) -> torch.Tensor:
    """Logits [B, vocab] for one new token per row (ids, positions: [B, 1]) of a cag.batch run.

    `attention(module, q, k, v)` is the batch's shared-prefix attention (it writes each row's keys and
    values at fixed positions, so running a step twice is harmless); `reference()` is the same step
    through transformers' forward, used for the first-use check.
    """
    return _checked(model, "batch", reference=reference,
                    fast=lambda fusions: _forward(model, ids, positions, fusions,
                                                  lambda i, attn, q, k, v: attention(attn, q, k, v)),
                    reset=lambda: None)


def _ids(model, ids) -> torch.Tensor:
    return torch.tensor(ids, device=model.model.embed_tokens.weight.device)


def _checked(model, kind: str, reference, fast, reset, same=torch.equal) -> torch.Tensor:
    """fast(fusions) once checked; on a model's first `kind` step, also reference() and compare (`same`)."""
    ok = verdict(model, kind) if supported(model) else False
    if ok:
        return fast(_fusions(model))
    if ok is None:
        with _LOCK:
            if verdict(model, kind) is None:
                expected = reference()
                reset()
                token = _checking.set(kind)
                try:
                    got = fast(_fusions(model))
                finally:
                    _checking.reset(token)
                agree = bool(same(got, expected))
                model.__dict__.setdefault("_cag_fast_verdicts", {})[kind] = agree
                if agree:
                    return got
                print(f"cag: fast {kind} decode step disagrees with transformers' forward for this model; "
                      f"using {'the lean Python step' if kind == 'native' else 'transformers'}", file=sys.stderr)
                reset()
        return _checked(model, kind, reference, fast, reset, same)  # decided now (here or by another thread)
    return reference()


_checking: contextvars.ContextVar[str | None] = contextvars.ContextVar("cag_fast_checking", default=None)


def _fusions(model) -> list:
    """Per layer: one packed q/k/v projection and one packed gate/up projection, where the layers allow."""
    fusions = getattr(model, "_cag_fusions", None)
    if fusions is None:
        fusions = [(packed.fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                    packed.fuse([layer.mlp.gate_proj, layer.mlp.up_proj])) for layer in model.model.layers]
        model._cag_fusions = fusions
    return fusions


def _forward(model, ids: torch.Tensor, positions: torch.Tensor, fusions: list, attend) -> torch.Tensor:
    """The model on one token per row, in transformers' order of operations; attend() does the attention."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    base = model.model
    rows = ids.shape[0]
    h = base.embed_tokens(ids)
    cos, sin = base.rotary_emb(h, positions)
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = fusions[i]
        x = layer.input_layernorm(h)
        if qkv is not None:
            q, k, v = qkv(x).split([attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features], -1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        shape = (rows, 1, -1, attn.head_dim)
        q, k = apply_rotary_pos_emb(q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), cos, sin)
        o = attend(i, attn, q, k, v.view(shape).transpose(1, 2))  # [rows, 1, heads, head_dim]
        h = h + attn.o_proj(o.reshape(rows, 1, -1).contiguous())
        x = layer.post_attention_layernorm(h)
        if gate_up is not None:
            g, u = gate_up(x).split([mlp.gate_proj.out_features, mlp.up_proj.out_features], -1)
        else:
            g, u = mlp.gate_proj(x), mlp.up_proj(x)
        h = h + mlp.down_proj(mlp.act_fn(g) * u)
    return model.lm_head(base.norm(h))[:, -1, :]
