"""One decoding step for Llama-family models without transformers' per-call machinery.

Why: decoding SmolLM2 on a CPU spends as long in Python (module hooks, mask building, output objects,
three projections where one would do) as in the matmuls. This step calls the model's own modules
(norms, rotary embedding, projections, MLP pieces) in transformers' order, and fuses the q/k/v and
gate/up projections into one call each when they are packed (cag.packed computes every output row
independently, so the fused call returns exactly the same numbers).

It is an optimisation, never a second opinion: the first step on each model is also run through
transformers' own forward and the logits must match bit for bit, or this path is switched off for
that model (with a warning) and every step goes through transformers. CAG_FAST_DECODE=0 turns it off.
"""

from __future__ import annotations

import os
import sys
import threading

import torch
import torch.nn.functional as F

from . import kvcompat, packed

_ATTENTION = {"sdpa", "cag_shared_prefix"}  # the latter is plain sdpa outside a cag.batch run
_LOCK = threading.Lock()


def supported(model) -> bool:
    """A causal Llama whose layers this step reproduces, and not switched off."""
    verdict = getattr(model, "_cag_fast_decode", None)  # False: off; "pending": check on first step; list: checked
    if verdict is not None:
        return verdict is not False
    ok = (os.environ.get("CAG_FAST_DECODE", "1") != "0"
          and getattr(model.config, "model_type", None) == "llama"
          and getattr(model.config, "_attn_implementation", None) in _ATTENTION
          and not getattr(model.config, "pretraining_tp", 1) > 1
          and hasattr(model, "model") and hasattr(model, "lm_head"))
    model._cag_fast_decode = "pending" if ok else False
    return ok


@torch.inference_mode()
def step(model, token: int, cache) -> torch.Tensor:
    """Logits [1, vocab] for `token` placed after everything `cache` holds; the cache grows by one."""
    verdict = model._cag_fast_decode if supported(model) else False
    if isinstance(verdict, list):
        return _step(model, token, cache, verdict)
    if verdict == "pending":
        with _LOCK:
            if model._cag_fast_decode == "pending":
                return _checked_step(model, token, cache)
        return step(model, token, cache)  # another thread just decided
    return kvcompat.forward(model, _ids(model, token), cache)


def _ids(model, token: int) -> torch.Tensor:
    return torch.tensor([[token]], device=model.model.embed_tokens.weight.device)


def _checked_step(model, token: int, cache) -> torch.Tensor:
    """First use on a model: run transformers' forward and this step on the same position, compare bits."""
    length = kvcompat.seq_length(cache)
    reference = kvcompat.forward(model, _ids(model, token), cache)
    kvcompat.crop(cache, length)
    fusions = _fusions(model)
    fast = _step(model, token, cache, fusions)
    if torch.equal(fast, reference):
        model._cag_fast_decode = fusions
        return fast
    model._cag_fast_decode = False
    print("cag: fast decode step disagrees with transformers' forward for this model; using transformers",
          file=sys.stderr)
    kvcompat.crop(cache, length)
    return kvcompat.forward(model, _ids(model, token), cache)


def _fusions(model) -> list:
    """Per layer: one packed q/k/v projection and one packed gate/up projection, where the layers allow."""
    out = []
    for layer in model.model.layers:
        a, m = layer.self_attn, layer.mlp
        out.append((packed.fuse([a.q_proj, a.k_proj, a.v_proj]), packed.fuse([m.gate_proj, m.up_proj])))
    return out


def _step(model, token: int, cache, fusions: list) -> torch.Tensor:
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    base = model.model
    position = kvcompat.seq_length(cache)
    h = base.embed_tokens(_ids(model, token))
    cos, sin = base.rotary_emb(h, torch.tensor([[position]], device=h.device))
    for i, layer in enumerate(base.layers):
        attn, mlp = layer.self_attn, layer.mlp
        qkv, gate_up = fusions[i]
        x = layer.input_layernorm(h)
        if qkv is not None:
            q, k, v = qkv(x).split([attn.q_proj.out_features, attn.k_proj.out_features, attn.v_proj.out_features], -1)
        else:
            q, k, v = attn.q_proj(x), attn.k_proj(x), attn.v_proj(x)
        shape = (1, 1, -1, attn.head_dim)
        q, k = apply_rotary_pos_emb(q.view(shape).transpose(1, 2), k.view(shape).transpose(1, 2), cos, sin)
        keys, values = kvcompat.layer_update(cache, i, k, v.view(shape).transpose(1, 2))
        extra = {"enable_gqa": True} if attn.num_key_value_groups > 1 else {}
        o = F.scaled_dot_product_attention(q, keys, values, attn_mask=None, dropout_p=0.0, scale=attn.scaling,
                                           is_causal=False, **extra)
        o = o.reshape(1, -1, 1, values.shape[-1]).transpose(1, 2).contiguous()
        h = h + attn.o_proj(o.reshape(1, 1, -1).contiguous())
        x = layer.post_attention_layernorm(h)
        if gate_up is not None:
            g, u = gate_up(x).split([mlp.gate_proj.out_features, mlp.up_proj.out_features], -1)
        else:
            g, u = mlp.gate_proj(x), mlp.up_proj(x)
        h = h + mlp.down_proj(mlp.act_fn(g) * u)
    return model.lm_head(base.norm(h))[:, -1, :]
