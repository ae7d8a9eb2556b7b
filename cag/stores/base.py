"""What every cache tier stores and answers to: one Entry per knowledge base, one Store protocol.

An Entry carries everything a process needs to answer from a knowledge base it has never seen: the
prefix KV, the prefix token ids, the cache manifest (what it was made for), the knowledge base's
settings (kb.json) and the knowledge text itself. That is what lets a second machine with an empty
CAG_HOME answer from a cache another machine put into Redis.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import torch

from .. import kvfile
from ..kvcompat import KV
from ..kvfile import Expect


@dataclass
class Entry:
    name: str
    layers: KV
    prefix_ids: list[int]
    manifest: dict  # the kvfile manifest: fingerprints, tokens, dtype, created, checksums
    meta: dict  # kb.json: sources, model, dtype, instruction, reserve, policy
    snapshot: list[dict]  # the knowledge as knowledge.to_json gives it
    stored_at: float = field(default_factory=time.time)

    @property
    def nbytes(self) -> int:
        return layers_nbytes(self.layers)


@runtime_checkable
class Store(Protocol):
    """One cache tier. `get` returns None on a miss; a corrupt or mismatched copy raises CacheFileError."""

    name: str  # "memory", "host", "disk" or "redis": what Answer.cache_source reports
    persistent: bool  # survives the process (disk, redis)

    def get(self, name: str, expect: Expect, device: torch.device | str) -> Entry | None: ...

    def put(self, entry: Entry) -> None: ...

    def drop(self, name: str) -> bool: ...

    def has(self, name: str) -> bool: ...

    def info(self, name: str) -> dict | None: ...


def layers_nbytes(layers: KV) -> int:
    return sum(k.numel() * k.element_size() + v.numel() * v.element_size() for k, v in layers)


def matches(manifest: dict, expect: Expect) -> bool:
    """The same checks kvfile.load makes, for tiers that hold tensors already verified once."""
    return kvfile.mismatch(manifest, expect) is None


IDENTITY = ("model", "tokenizer", "template", "knowledge")


def save_file(path, entry: Entry) -> dict:
    """Write `entry` in the kvfile format. Only what the cache was made for is carried over from its
    manifest (plus its KV quantization); tokens, shapes, checksums and signature are made afresh."""
    identity = {k: entry.manifest[k] for k in IDENTITY if k in entry.manifest}
    return kvfile.save(path, entry.layers, entry.prefix_ids, identity, kv_quant=entry.manifest.get("kv_quant"))
