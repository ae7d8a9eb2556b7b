"""int8 KV: one byte per value plus one fp16 scale per (layer, head, token) vector.

Halves a bf16 cache (quarters an fp32 one) on disk and in transit. Symmetric absmax per head-vector
keeps outliers in one token from hurting the rest. It is lossy: answers can change; bench/kvquant.py
measures how often they stay token-identical and how accuracy moves.
"""

from __future__ import annotations

import torch

MODES = ("int8",)


def quantize(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., dim] float -> (int8 [..., dim], fp16 scale [..., 1])."""
    scale = t.float().abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 127.0
    q = torch.round(t.float() / scale).clamp_(-127, 127).to(torch.int8)
    return q, scale.to(torch.float16)


def dequantize(q: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return (q.float() * scale.float()).to(dtype)


def roundtrip(t: torch.Tensor) -> torch.Tensor:
    """What a tensor becomes after int8 storage (for measuring the effect without a file)."""
    return dequantize(*quantize(t), t.dtype)
