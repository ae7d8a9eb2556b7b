"""Answer many questions on one shared prefix together, without copying the prefix per question.

Decoding on a CPU (and at small batch on a GPU) is bound by reading the weights once per step; one
step for 8 questions costs about what one step for 1 costs. The catch is attention: a normal batched
cache would hold the prefix once per row. Here the prefix stays a single [1, kv_heads, P, dim] tensor
and attention is split in two: every row's queries against the shared prefix (all rows folded into one
matmul, so nothing is broadcast or copied), and each row against its own question/answer suffix; the
two softmax parts are merged exactly with their log-sum-exp. The result is mathematically the same
attention, computed in a different order, so answers can differ from one-at-a-time answers in the last
bits; bench/batch.py measures how often they are token-identical.
"""

from __future__ import annotations

import contextvars
import threading
from dataclasses import dataclass
from typing import Sequence

import torch

from . import fastdecode, kvcompat
from .kvcompat import KV

_IMPL = "cag_shared_prefix"
_STATE: contextvars.ContextVar["_Batch | None"] = contextvars.ContextVar("cag_batch", default=None)
_INSTALL_LOCK = threading.Lock()


@dataclass
class _Batch:
    prefix: KV  # per layer [1, kv_heads, P, dim]
    k: list[torch.Tensor]  # per layer suffix keys [B, kv_heads, capacity, dim]
    v: list[torch.Tensor]
    rel: torch.Tensor  # [B, s] position of each query token within its row's suffix


def _attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """Shared-prefix attention while a batch is running; plain sdpa otherwise (same numerics as before)."""
    state = _STATE.get()
    if state is None:
        return kvcompat.sdpa_attention(module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs)
    layer = module.layer_idx
    b, hq, s, d = query.shape
    pk, pv = state.prefix[layer]
    hkv = pk.shape[1]
    g = hq // hkv
    scale = scaling if scaling is not None else d ** -0.5
    # write this step's keys/values into each row's suffix at its own positions
    rows = torch.arange(b, device=query.device)[:, None].expand(b, s)
    sk, sv = state.k[layer], state.v[layer]
    sk[rows, :, state.rel] = key.transpose(1, 2)
    sv[rows, :, state.rel] = value.transpose(1, 2)
    q = query.float().view(b, hkv, g, s, d)
    # 1) against the shared prefix: rows folded into the query dimension, so the prefix is read once
    qp = q.permute(1, 0, 2, 3, 4).reshape(1, hkv, b * g * s, d)
    o1, lse1 = _prefix_attention(qp, pk.float(), pv.float(), scale)  # [1, hkv, b*g*s, d], [1, hkv, b*g*s]
    o1 = o1.view(hkv, b, g, s, d).permute(1, 0, 2, 3, 4)
    lse1 = lse1.view(hkv, b, g, s, 1).permute(1, 0, 2, 3, 4)
    # 2) against each row's own suffix, causal by relative position
    t = int(state.rel.max()) + 1
    keys, vals = sk[:, :, :t].float(), sv[:, :, :t].float()  # [b, hkv, t, d]
    s2 = torch.matmul(q.reshape(b, hkv, g * s, d), keys.transpose(-1, -2)).view(b, hkv, g, s, t) * scale
    allowed = torch.arange(t, device=query.device)[None, None, :] <= state.rel[:, :, None]  # [b, s, t]
    s2 = s2.masked_fill(~allowed[:, None, None], float("-inf"))
    m2 = s2.amax(-1, keepdim=True)
    e2 = torch.exp(s2 - m2)
    l2 = e2.sum(-1, keepdim=True)
    o2 = torch.matmul(e2.view(b, hkv, g * s, t), vals).view(b, hkv, g, s, d)
    # 3) exact merge of the two softmax parts (o1 is normalized: its weight is exp(lse1))
    m = torch.maximum(lse1, m2)
    w1, w2 = torch.exp(lse1 - m), torch.exp(m2 - m)
    out = (o1 * w1 + o2 * w2) / (w1 + l2 * w2)
    out = out.reshape(b, hq, s, d).to(query.dtype)
    return out.transpose(1, 2).contiguous(), None


def _prefix_attention(q, k, v, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax attention of q [1, h, n, d] over k/v [1, h, P, d]: normalized output and log-sum-exp.

    On the CPU, torch's flash kernel returns both and streams the prefix once; elsewhere (and in a test
    that forces it) plain matmuls do the same arithmetic.
    """
    if q.device.type == "cpu" and _CPU_FLASH:
        return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, False, scale=scale)
    scores = torch.matmul(q, k.transpose(-1, -2)) * scale
    lse = torch.logsumexp(scores, dim=-1)
    return torch.matmul(torch.exp(scores - lse[..., None]), v), lse


_CPU_FLASH = hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu")


def _install(model) -> None:
    with _INSTALL_LOCK:
        if getattr(model.config, "_attn_implementation", None) != _IMPL:
            kvcompat.register_attention(_IMPL, _attention)
            kvcompat.set_attention(model, _IMPL)


@torch.inference_mode()
def generate_batch(model, prefix: KV, questions: Sequence[Sequence[int]], max_new_tokens: int = 256,
                   stop_ids: Sequence[int] = (), pad_id: int = 0) -> list[list[int]]:
    """Greedy answers for several questions that all continue the same cached prefix."""
    if not questions or any(len(q) == 0 for q in questions):
        raise ValueError("every question needs at least one token")
    _install(model)
    device = prefix[0][0].device
    b, p = len(questions), prefix[0][0].shape[-2]
    lengths = torch.tensor([len(q) for q in questions], device=device)
    width = int(lengths.max())
    capacity = width + max_new_tokens + 1
    ids = torch.full((b, width), pad_id, dtype=torch.long, device=device)
    for i, q in enumerate(questions):
        ids[i, : len(q)] = torch.tensor(list(q), device=device)
    state = _Batch(
        prefix=prefix,
        k=[k.new_zeros((b, k.shape[1], capacity, k.shape[-1])) for k, _ in prefix],
        v=[v.new_zeros((b, v.shape[1], capacity, v.shape[-1])) for _, v in prefix],
        rel=torch.arange(width, device=device)[None, :].expand(b, width).contiguous(),
    )
    stops = set(stop_ids)
    out: list[list[int]] = [[] for _ in range(b)]
    done = [False] * b
    token = _batched_step(model, ids, state, p, gather=lengths - 1)
    lengths = lengths.clone()
    for _ in range(max_new_tokens):
        for i, tok in enumerate(token.tolist()):
            if not done[i]:
                if tok in stops:
                    done[i] = True
                else:
                    out[i].append(tok)
        if all(done):
            break
        state.rel = lengths[:, None].clone()
        lengths += 1
        token = _batched_step(model, token[:, None], state, p, gather=None)
    return out


def _batched_step(model, ids: torch.Tensor, state: _Batch, p: int, gather: torch.Tensor | None) -> torch.Tensor:
    """Next token per row: from its last position (decoding) or from position `gather[row]` (the questions)."""
    keep = None if gather is None else torch.unique(gather)  # sorted; logits only where some row needs them
    positions = state.rel + p
    reset = _STATE.set(state)
    try:
        if gather is None and fastdecode.supported(model):  # one token per row: the lean step (checked)
            return torch.argmax(fastdecode.batch_step(
                model, ids, positions,
                attention=lambda attn, q, k, v: _attention(attn, q, k, v, None, scaling=attn.scaling)[0],
                reference=lambda: kvcompat.forward_positions(model, ids, position_ids=positions)[:, -1]), dim=-1)
        logits = kvcompat.forward_positions(model, ids, position_ids=positions, keep=keep)
    finally:
        _STATE.reset(reset)
    if gather is None:
        last = logits[:, -1]
    else:
        last = logits[torch.arange(ids.shape[0], device=ids.device), torch.searchsorted(keep, gather)]
    return torch.argmax(last, dim=-1)
