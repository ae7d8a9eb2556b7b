"""The torch engine: a Hugging Face model through transformers, behind the engine seam.

Prefill runs transformers' own forward over a DynamicCache, piece by piece (cag.engines.torch.kvcompat);
answers are rows of cag.engines.torch.batch, each reading the prefix's per-layer tensors in place and
writing its own positions to a buffer of its own (cag.engines.torch.workspace), decoded by the C step,
the lean Python step or transformers' forward (cag.engines.torch.fastdecode decides, per model, once).
Everything cag decides about the model lives in one ModelState this engine owns.
"""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch

from .. import kvquant
from ...errors import CacheFileError
from ..base import Engine, Payload, Progress
from . import batch, kvcompat
from .codec import HFCodec, stop_ids
from .state import ModelState
from .workspace import Workspace


class TorchEngine(Engine):
    kind = "torch"

    def __init__(self, name: str, path: Path, model: torch.nn.Module, tokenizer, device: torch.device,
                 dtype: torch.dtype, model_fingerprint: str, context_window: int, packing=None):
        self.name, self.path = name, path
        self.tokenizer = tokenizer
        self._device, self._dtype = device, dtype
        self.model_fingerprint = model_fingerprint
        self.context_window = context_window
        self.packing = packing  # cag.engines.torch.packed.PackReport: which layers decode from packed blocks
        self.state = ModelState(model)
        self.codec = HFCodec.of(tokenizer)
        self.stop_ids = stop_ids(tokenizer, getattr(model, "generation_config", None))

    @property
    def model(self) -> torch.nn.Module:
        return self.state.model

    @property
    def config(self):
        return self.state.model.config

    @property
    def device(self) -> torch.device:
        return self._device

    @property
    def torch_dtype(self) -> torch.dtype:
        return self._dtype

    @property
    def nbytes(self) -> int:
        if self.model is None:  # closed
            return 0
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return weights + (self.packing.packed_bytes if self.packing is not None else 0)

    # -- identity ------------------------------------------------------------------------------------------
    def identity(self) -> dict:
        return {"name": self.name, "path": str(self.path), "fingerprint": self.model_fingerprint, "engine": self.kind}

    @property
    def storage(self) -> dict:
        name = str(self._dtype).removeprefix("torch.")
        return {"dtype": name, "kv": name}

    def options(self) -> dict:
        return {"dtype": self.storage["dtype"]}

    def kv_quant_problem(self, kv_quant: str) -> str | None:
        if kv_quant in kvquant.MODES:
            return None
        return f"unknown KV quantization {kv_quant!r}: use one of {', '.join(kvquant.MODES)}"

    # -- the prefix ----------------------------------------------------------------------------------------
    @torch.inference_mode()
    def prefill(self, ids: Sequence[int], ends: Sequence[int], base: Workspace | None = None, keep: int = 0,
                progress: Progress | None = None, kv_quant: str | None = None) -> Workspace:
        past = [(k[:, :, :keep], v[:, :, :keep]) for k, v in base.layers] if base is not None and keep else None
        if past is not None and base.length < keep:
            raise ValueError(f"cannot keep {keep} positions of a prefix of {base.length}")
        self.state.threads_now()
        layers = prefill_pieces(self.model, self.device, ids, ends, keep if past else 0, progress, past)
        if kv_quant:
            layers = [(kvquant.roundtrip(k), kvquant.roundtrip(v)) for k, v in layers]
        return Workspace(layers)

    def export(self, prefix: Workspace) -> Payload:
        return Payload(layers=list(prefix.layers))

    def restore(self, payload: Payload, ids: Sequence[int], manifest: dict) -> Workspace:
        self._check(payload, len(ids), manifest.get("kv_quant") is not None)
        return Workspace(payload.layers)

    def prefix_nbytes(self, tokens: int) -> int:
        layers, kv_heads, head_dim = self._kv_shape()
        return 2 * layers * kv_heads * head_dim * tokens * self._dtype.itemsize

    def _kv_shape(self) -> tuple[int, int, int]:
        """(layers, KV heads, head size) of the model's attention: the shape of a prefix's keys and values."""
        cfg = self.config.get_text_config() if hasattr(self.config, "get_text_config") else self.config
        kv_heads = getattr(cfg, "num_key_value_heads", None) or cfg.num_attention_heads
        return cfg.num_hidden_layers, kv_heads, getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads

    def _check(self, payload: Payload, tokens: int, quantized: bool) -> None:
        """A cache's tensors must be this model's: layer count, KV heads, head size, dtype, and finite."""
        layers, kv_heads, head_dim = self._kv_shape()
        if payload.state is not None or len(payload.layers) != layers:
            raise CacheFileError(f"the cache holds {len(payload.layers)} layers of keys/values, but the model has "
                                 f"{layers}; it was made for another model: rebuild it")
        want = [1, kv_heads, tokens, head_dim]
        for i, (k, v) in enumerate(payload.layers):
            for name, t in (("keys", k), ("values", v)):
                if list(t.shape) != want:
                    raise CacheFileError(f"layer {i} {name} of the cache have shape {list(t.shape)}, but the model "
                                         f"needs {want} ([batch, kv heads, tokens, head size]); rebuild it")
                if t.dtype != self._dtype:
                    raise CacheFileError(f"layer {i} {name} of the cache are {str(t.dtype).removeprefix('torch.')}, "
                                         f"but the model runs in {str(self._dtype).removeprefix('torch.')}; rebuild it")
                if not _finite(t):
                    raise CacheFileError(f"layer {i} {name} of the cache hold NaN or infinite values, which no "
                                         "forward pass produces; the file is damaged: rebuild it")

    # -- answers -------------------------------------------------------------------------------------------
    def decoder(self, prefix: Workspace) -> batch.Decoder:
        return batch.Decoder(self.state, prefix)

    def close(self) -> None:
        """Let the weights go now, not when the last reference to the engine does: a server that unloads this
        model gets back the mapped safetensors and the packed copies even if a request or a log still holds the
        engine. A closed engine answers nothing more."""
        with self.state.lock:
            self.state.model = None
            self.state.fusions = None
            self.state.native_plan = None


def _finite(t: torch.Tensor) -> bool:
    """No NaN or infinity, checked in pieces (a float32 copy of a large prefix at once would double it)."""
    flat = t.reshape(-1)
    step = 1 << 24
    return all(bool(torch.isfinite(flat[i:i + step]).all()) for i in range(0, flat.numel(), step))


def prefill_pieces(model, device: torch.device, ids: Sequence[int], ends: Sequence[int], start: int,
            progress: Progress | None, past) -> list:
    """The KV of `ids`, computed one forward per piece, piece i ending at ends[i], after `past` (the KV of
    the first `start` positions, taken as is)."""
    cache = kvcompat.from_layers([(k.to(device), v.to(device)) for k, v in past]) if past else kvcompat.empty_cache()
    for end in ends:
        if not start < end <= len(ids):
            raise ValueError(f"prefill pieces must rise within the {len(ids)} ids (piece {start}..{end})")
        kvcompat.forward(model, torch.tensor([list(ids[start:end])], dtype=torch.long, device=device), cache)
        if progress:
            progress(end - start)
        start = end
    if start != len(ids):
        raise ValueError(f"prefill pieces end at {start}, not at the last of the {len(ids)} ids")
    if not ends:
        return [(k, v) for k, v in past] if past else []
    return kvcompat.to_layers(cache)
