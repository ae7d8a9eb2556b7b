"""Host-memory tier: prefixes in CPU RAM (page-locked when CUDA is present, so copies to the GPU are fast).

It sits between device memory and disk: a prefix evicted from the GPU comes back over PCIe instead of
from a file, and on a CPU-only machine it is simply a second, larger LRU budget.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..kvfile import KV
from .base import Entry
from .memory import MemoryStore


class HostStore(MemoryStore):
    name = "host"

    def __init__(self, budget_bytes: int, on_evict=None):
        super().__init__(budget_bytes, on_evict, env="CAG_HOST_BYTES")
        self.pin = torch.cuda.is_available()

    def _keep(self, entry: Entry) -> Entry:
        def host(t: torch.Tensor) -> torch.Tensor:
            t = t.detach().to("cpu", copy=True)
            return t.pin_memory() if self.pin else t

        return replace(entry, layers=[(host(k), host(v)) for k, v in entry.layers])

    def share(self, name: str, layers: KV) -> None:
        """Nothing: this tier's point is a copy off the device, which survives the device copy's eviction."""

    def _deliver(self, entry: Entry, device: torch.device | str) -> Entry:
        layers = [(k.to(device, non_blocking=self.pin), v.to(device, non_blocking=self.pin)) for k, v in entry.layers]
        if self.pin:
            torch.cuda.synchronize()
        return replace(entry, layers=layers)
