"""Every call into transformers' KV-cache API lives here, because that API moves between releases.

- 5.x renamed the forward keyword `past_key_values=` to `cache=` (the old name is deprecated).
- 4.5x keeps a DynamicCache's tensors in `layers[i].keys/values`; older releases in `key_cache/value_cache`.
- `DynamicCache.crop` took a target length before 5.18 and only a negative count from 5.18 on.

cag keeps the prefix as plain per-layer (key, value) tensors of shape [batch, kv_heads, seq, head_dim]
and wraps them in a fresh DynamicCache for each question. DynamicCache only ever *concatenates* onto
those tensors, never writes into them, so the prefix is shared by every question (and every concurrent
request) without a copy and is back to exactly the prefix after each one by construction.
"""

from __future__ import annotations

import inspect
from functools import lru_cache, partial

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


def layer_update(cache: DynamicCache, layer: int, key: torch.Tensor, value: torch.Tensor) -> KV:
    """Append one layer's new keys/values (in place for buffer caches); returns all of that layer's so far."""
    return cache.update(key, value, layer)


def empty_cache() -> DynamicCache:
    return DynamicCache()


def seq_length(cache: DynamicCache) -> int:
    return int(cache.get_seq_length())


def to_layers(cache: DynamicCache) -> KV:
    """The per-layer (key, value) tensors a cache holds, without copying."""
    if hasattr(cache, "layers"):
        for layer in cache.layers:
            if type(layer).__name__ not in ("DynamicLayer", "BufferLayer"):
                raise NotImplementedError(
                    f"cache layer type {type(layer).__name__} (e.g. sliding-window attention) is not supported yet"
                )
        return [(layer.keys, layer.values) for layer in cache.layers]
    return list(zip(cache.key_cache, cache.value_cache))  # transformers < 4.56


def from_layers(layers: KV, length: int | None = None) -> DynamicCache:
    """A new DynamicCache over the given tensors (optionally only their first `length` positions), no copy."""
    if length is not None:
        layers = [(k[:, :, :length], v[:, :, :length]) for k, v in layers]
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


def _buffer_layer_class():
    """A DynamicLayer over a preallocated buffer: update() writes in place after the valid positions.

    DynamicLayer concatenates on every step (copying the whole history each token); this writes one
    position and returns a view. Defined lazily so importing cag never depends on DynamicLayer existing.
    """
    from transformers.cache_utils import DynamicLayer

    class BufferLayer(DynamicLayer):
        def __init__(self, capacity: int, k_buf: torch.Tensor | None = None, v_buf: torch.Tensor | None = None,
                     length: int = 0):
            self.k_buf = self.v_buf = None
            super().__init__()
            self.capacity, self.length = capacity, length
            if k_buf is not None:
                self.lazy_initialization(k_buf, v_buf)
                self.k_buf, self.v_buf = k_buf, v_buf

        # keys/values are views of the valid positions, made when read: advancing the length is free.
        @property
        def keys(self):
            return self._keys if self.k_buf is None else self.k_buf[:, :, : self.length]

        @keys.setter
        def keys(self, value):
            self._set("_keys", value)

        @property
        def values(self):
            return self._values if self.v_buf is None else self.v_buf[:, :, : self.length]

        @values.setter
        def values(self, value):
            self._set("_values", value)

        def _set(self, name: str, value) -> None:
            if self.k_buf is None:  # before the buffers exist (DynamicLayer's own initialization)
                object.__setattr__(self, name, value)
            elif value is None:  # DynamicLayer.reset(): drop the contents
                self.length = 0
            else:
                raise NotImplementedError("a BufferLayer is written through update() only")

        def update(self, key_states, value_states, *args, **kwargs):
            if self.k_buf is None:
                self.lazy_initialization(key_states, value_states)
                shape = (*key_states.shape[:2], self.capacity, key_states.shape[-1])
                self.k_buf = key_states.new_empty(shape)
                self.v_buf = value_states.new_empty((*value_states.shape[:2], self.capacity, value_states.shape[-1]))
            end = self.length + key_states.shape[-2]
            if end > self.capacity:
                raise ValueError(f"KV buffer of {self.capacity} positions is full")
            self.k_buf[:, :, self.length:end].copy_(key_states)
            self.v_buf[:, :, self.length:end].copy_(value_states)
            self.length = end
            return self.keys, self.values

        def get_seq_length(self) -> int:
            return self.length

        def crop(self, tokens_to_remove: int) -> None:
            self.length = max(0, self.length - abs(tokens_to_remove))

    return BufferLayer


_BUFFER_LAYER = None


def buffer_cache(capacity: int, buffers: KV | None = None, length: int = 0) -> DynamicCache:
    """A cache that writes into preallocated buffers (given, or allocated on first use) after `length` positions."""
    global _BUFFER_LAYER
    if not _HAS_LAYERS:  # transformers < 4.56: no layer objects to swap in
        return from_layers(buffers, length) if buffers is not None else empty_cache()
    if _BUFFER_LAYER is None:
        _BUFFER_LAYER = _buffer_layer_class()
    cache = DynamicCache()
    if buffers is None:  # allocated by each layer on its first update
        cache.layer_class_to_replicate = partial(_BUFFER_LAYER, capacity)
        cache.layers = []
    else:
        cache.layers = [_BUFFER_LAYER(capacity, k, v, length) for k, v in buffers]
    return cache


def buffers(cache: DynamicCache) -> tuple[KV, int, int] | None:
    """A buffer cache's preallocated per-layer (key, value) buffers, its length and capacity; else None.

    For code that writes the next position itself (cag.fastdecode's native step) and then calls advance().
    """
    layers = getattr(cache, "layers", None)
    if not layers or _BUFFER_LAYER is None or not all(type(layer) is _BUFFER_LAYER and layer.k_buf is not None
                                                      for layer in layers):
        return None
    lengths = {layer.length for layer in layers}
    if len(lengths) != 1:
        return None
    return [(layer.k_buf, layer.v_buf) for layer in layers], lengths.pop(), layers[0].capacity


def advance(cache: DynamicCache, count: int = 1) -> None:
    """Count `count` more positions of a buffer cache as written (their keys/values are in its buffers)."""
    for layer in cache.layers:
        if layer.length + count > layer.capacity:
            raise ValueError(f"KV buffer of {layer.capacity} positions is full")
        layer.length += count


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


def forward_positions(model, input_ids: torch.Tensor, position_ids: torch.Tensor,
                      keep: torch.Tensor | None = None) -> torch.Tensor:
    """A forward pass with explicit positions and no transformers cache (the caller keeps the KV).

    Logits for every position, or only for the sequence indices in `keep` (sorted, 1-D) where the model
    takes `logits_to_keep` as a tensor: the LM head is the biggest matmul, no need to run it on padding.
    """
    kwargs = {}
    if keep is not None and "logits_to_keep" in inspect.signature(type(model).forward).parameters:
        kwargs["logits_to_keep"] = keep
    logits = model(input_ids=input_ids, position_ids=position_ids, use_cache=False, **kwargs).logits
    if keep is not None and not kwargs:
        logits = logits[:, keep]
    return logits
