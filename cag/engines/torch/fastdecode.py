"""One decoding step for Llama-family models without transformers' per-call machinery.

Why: decoding SmolLM2 on a CPU spends as long in Python (module hooks, mask building, output objects,
three projections where one would do) as in the matmuls. Two steps replace transformers' forward here:

- The C step (cag.nativestep, cag/native/step.c): the whole token of every row in one call, for float32
  models on the CPU. It adds in its own order, so it is checked against transformers within TOLERANCE
  (see native); since every generated token of every mode goes through it, cached and no-cache answers
  run the same arithmetic.
- The lean Python step: the model's own modules (norms, rotary embedding, projections, MLP pieces) in
  transformers' order, with q/k/v and gate/up fused into one call each when packed (cag.packed computes
  every output row independently, so the fused call returns exactly the same numbers). Bit for bit with
  transformers; it serves everything the C step does not (bf16, GPUs).

Both run the rows of cag.batch (its attention reads the shared prefix and each row's own positions).
Either is an optimisation, never a second opinion: the first step of each kind (native, lean)
on each model is also run through transformers' own forward and compared, or that kind is switched off
for the model (with a warning): a failed C step hands over to the lean step, a failed lean step to
transformers. CAG_FAST_DECODE=0 turns both off; CAG_NATIVE_STEP=0 only the C step.
"""

from __future__ import annotations

import sys

import torch

from ... import settings
from . import packed
from .state import ModelState

_ATTENTION = {"sdpa", "cag_rows"}  # the latter is plain sdpa outside a cag.engines.torch.batch forward


def supported(state: ModelState) -> bool:
    """A causal Llama whose layers this step reproduces, and not switched off (decided once per model)."""
    if state.fast_ok is None:
        model = state.model
        state.fast_ok = bool(settings.current().fast_decode
                             and getattr(model.config, "model_type", None) == "llama"
                             and getattr(model.config, "_attn_implementation", None) in _ATTENTION
                             and not getattr(model.config, "pretraining_tp", 1) > 1
                             and hasattr(model, "model") and hasattr(model, "lm_head"))
    return state.fast_ok


def verdict(state: ModelState, kind: str) -> bool | None:
    """Whether the fast `kind` step ("native" or "lean") matched transformers on this model; None: not run yet."""
    return state.verdicts.get(kind)


def native(state: ModelState, run, reference, new_kv) -> torch.Tensor:
    """The C step (`run()`: logits [rows, vocab]); on the model's first one, also `reference()` (transformers'
    forward over the same rows), compared within TOLERANCE: logits and the keys/values written (`new_kv()`).

    The C step adds its float32 sums in another order than transformers (and has its own exp), so the
    bits differ; what is checked is that they agree to within TOLERANCE of their largest magnitude (float32
    rounding over a whole model is ~1e-6 of it; a real mistake such as a wrong position or weight is orders
    of magnitude more). Every generated token of every mode (cached or not, alone or batched) goes through
    this same step, so cached and no-cache answers still run the same arithmetic. Both write the new
    keys/values at the same fixed positions, so running one after the other leaves the C step's.
    """
    def same(got, expected):  # the fast step's keys/values are read only here, when it is checked
        pairs = [(got[0], expected[0])] + list(zip(got[1](), expected[1]))
        return all(close(x, y) for x, y in pairs)

    # the reference's keys/values are taken at once: the fast step then writes the same positions
    return _checked(state, "native", reference=lambda: (reference(), new_kv()), fast=lambda: (run(), new_kv),
                    same=same)[0]


TOLERANCE = 1e-4


def close(got: torch.Tensor, expected: torch.Tensor, tolerance: float = TOLERANCE) -> bool:
    """Equal up to `tolerance` times the larger of 1 and expected's largest magnitude (and same shape)."""
    if got.shape != expected.shape or not torch.isfinite(got).all():
        return False
    scale = max(1.0, float(expected.abs().max())) if expected.numel() else 1.0
    return float((got - expected).abs().max()) <= tolerance * scale if got.numel() else True


def checked_lean(state: ModelState, lean, reference) -> torch.Tensor:
    """lean() (the lean Python step over some rows), checked bit for bit against reference() (transformers'
    forward over the same rows, same attention) on the model's first one; reference() if it ever disagreed."""
    return _checked(state, "lean", reference=reference, fast=lean)


@torch.inference_mode()
def lean(state: ModelState, ids: torch.Tensor, positions: torch.Tensor, attention) -> torch.Tensor:
    """Logits [rows, vocab] for one new token per row (ids, positions: [rows, 1]) through the model's own
    modules; `attention(module, q, k, v)` is cag.engines.torch.batch's (it writes each row's keys/values at
    fixed positions, so running a step twice is harmless)."""
    return _forward(state.model, ids, positions, _fusions(state), lambda i, attn, q, k, v: attention(attn, q, k, v))


def _checked(state: ModelState, kind: str, reference, fast, same=torch.equal):
    """fast() once checked; on a model's first `kind` step, also reference() and compare (`same`)."""
    ok = verdict(state, kind) if supported(state) else False
    if ok:
        return fast()
    if ok is None:
        with state.lock:
            if verdict(state, kind) is None:
                expected = reference()
                got = fast()
                agree = bool(same(got, expected))
                state.verdicts[kind] = agree
                if agree:
                    return got
                print(f"cag: fast {kind} decode step disagrees with transformers' forward for this model; "
                      f"using {'the lean Python step' if kind == 'native' else 'transformers'}", file=sys.stderr)
        return _checked(state, kind, reference, fast, same)  # decided now (here or by another thread)
    return reference()


def _fusions(state: ModelState) -> list:
    """Per layer: one packed q/k/v projection and one packed gate/up projection, where the layers allow."""
    if state.fusions is None:
        layers = state.model.model.layers
        state.fusions = [(packed.fuse([layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj]),
                          packed.fuse([layer.mlp.gate_proj, layer.mlp.up_proj])) for layer in layers]
    return state.fusions


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
