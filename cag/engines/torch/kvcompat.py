"""Every call into transformers' KV-cache API lives here, because that API moves between releases.

- 5.x renamed the forward keyword `past_key_values=` to `cache=` (the old name is deprecated).
- 4.5x keeps a DynamicCache's tensors in `layers[i].keys/values`; older releases in `key_cache/value_cache`.
- `DynamicCache.crop` took a target length before 5.18 and only a negative count from 5.18 on.

cag keeps the prefix as plain per-layer (key, value) tensors of shape [batch, kv_heads, seq, head_dim].
Building (or extending) a prefix runs transformers' forward over a DynamicCache; answers use no
transformers cache at all: cag.batch's attention (registered here) reads the prefix in place and writes
each answer's own keys/values into that answer's buffer, so the prefix is never written or copied.
"""

from __future__ import annotations

import inspect
from functools import lru_cache

import torch
from transformers import DynamicCache

KV = list[tuple[torch.Tensor, torch.Tensor]]
_HAS_LAYERS = hasattr(DynamicCache(), "layers")  # 4.56+: per-layer objects; older: key_cache/value_cache lists


@lru_cache(maxsize=None)
def _cache_keyword(forward) -> str:
    params = inspect.signature(forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def forward(model, input_ids: torch.Tensor, cache: DynamicCache, last_only: bool = True) -> torch.Tensor:
    """Run the model on `input_ids` after whatever `cache` holds; returns logits (last position by default)."""
    kwargs = {_cache_keyword(type(model).forward): cache, "use_cache": True}
    if last_only and "logits_to_keep" in inspect.signature(type(model).forward).parameters:
        kwargs["logits_to_keep"] = 1
    out = model(input_ids=input_ids, **kwargs)
    return out.logits[:, -1, :] if last_only else out.logits


def empty_cache() -> DynamicCache:
    return DynamicCache()


def seq_length(cache: DynamicCache) -> int:
    return int(cache.get_seq_length())


def to_layers(cache: DynamicCache) -> KV:
    """The per-layer (key, value) tensors a cache holds, without copying."""
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            if type(layer).__name__ != "DynamicLayer":
                raise NotImplementedError(
                    f"cache layer type {type(layer).__name__} (e.g. sliding-window attention) is not supported yet"
                )
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.56


def from_layers(layers: KV) -> DynamicCache:
    """A new DynamicCache over the given tensors, no copy."""
    cache = DynamicCache()
    if _HAS_LAYERS:
        from transformers.cache_utils import DynamicLayer

        cache.layers = []
        for k, v in layers:
            layer = DynamicLayer()
            layer.lazy_initialization(k, v)  # sets device/dtype the way this release wants them
            layer.keys, layer.values = k, v
            cache.layers.append(layer)
        return cache
    for k, v in layers:  # transformers < 4.56
        cache.key_cache.append(k)
        cache.value_cache.append(v)
    return cache


def crop(cache: DynamicCache, length: int) -> None:
    """Cut a cache back to `length` positions (negative counts work on every release)."""
    remove = seq_length(cache) - length
    if remove > 0:
        cache.crop(-remove)


# -- attention plumbing for cag.batch (also version-sensitive, so it lives here too) --------------------

def sdpa_attention(module, query, key, value, attention_mask, **kwargs):
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)


def register_attention(name: str, fn) -> None:
    """Register `fn` as an attention implementation that builds its masks the way sdpa does."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(name, fn)
    AttentionMaskInterface.register(name, sdpa_mask)


def set_attention(model, name: str) -> None:
    if hasattr(model, "set_attn_implementation"):
        model.set_attn_implementation(name)
    else:
        model.config._attn_implementation = name


def forward_positions(model, input_ids: torch.Tensor, position_ids: torch.Tensor, keep: int | None = None) -> torch.Tensor:
    """A forward pass with explicit positions and no transformers cache (the caller keeps the KV).

    Logits for every position, or for the last `keep` only (the LM head is the biggest matmul: no need to
    run it where nobody reads the logits).
    """
    kwargs = {}
    if keep is not None and "logits_to_keep" in inspect.signature(type(model).forward).parameters:
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs).logits
    if keep is not None and not kwargs:
        logits = logits[:, -keep:]
    return logits
