"""Run linear layers whose float32 weights are exactly Q4_1 or Q8_0 values from that packed form.

Why: on a CPU, decoding one token reads every weight once, so it runs at memory bandwidth divided by
weight bytes. The default model ships as a Q4_1 GGUF file; dequantized to float32 it is 540 MB, but every
weight is still `d*q + m` for a 4-bit q and a float16 d and m per block of 32. Packing those blocks back
(20 bytes per 32 weights, the embedding/LM head as Q8_0) reads ~85 MB per token instead. Packing is
lossless or not done at all: each matrix is re-expanded and compared bit for bit with the float32 weights
before it is used, so answers differ from the float32 path only by the order of float32 sums.

Few rows (decoding, batched decoding, short questions) go to the packed kernels; many rows (building a
cache, long prompts) stay on torch's BLAS over the float32 weights, which is faster when the matmul is
compute-bound. Everything else in the model is untouched transformers code.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from ... import settings
from . import native

ROW_LIMIT = 48  # rows per call up to which the packed kernels beat float32 BLAS (measured on a 2-core EPYC)
Q41_BLOCK_BYTES, Q80_BLOCK_BYTES = 20, 34
_SAMPLE_ROWS = 16  # rows checked first: a matrix whose first rows are not exact blocks is not packed at all


def pack_q41(w: torch.Tensor) -> torch.Tensor | None:
    """[N, K] float32 weights as Q4_1 blocks ([N, K/32, 20] bytes), or None if they are not exactly Q4_1."""
    n, k = w.shape
    if k % 32 or w.dtype != torch.float32:
        return None
    b = w.detach().reshape(n, k // 32, 32)
    m = b.amin(-1)
    d = ((b.amax(-1) - m) / 15).half().float()
    q = torch.round((b - m[..., None]) / torch.where(d > 0, d, 1.0)[..., None]).clamp_(0, 15)
    if not (torch.equal(m.half().float(), m) and torch.equal(d[..., None] * q + m[..., None], b)):
        return None
    q = q.to(torch.uint8)
    out = torch.empty(n, k // 32, Q41_BLOCK_BYTES, dtype=torch.uint8)
    out[..., 0:2] = d.half().view(torch.uint8).view(n, k // 32, 2)
    out[..., 2:4] = m.half().view(torch.uint8).view(n, k // 32, 2)
    out[..., 4:] = q[..., :16] | (q[..., 16:] << 4)
    return out


def pack_q80(w: torch.Tensor) -> torch.Tensor | None:
    """[N, K] float32 weights as Q8_0 blocks ([N, K/32, 34] bytes), or None if they are not exactly Q8_0.

    Each block takes ggml's own Q8_0 scale (its largest magnitude / 127) where that reproduces it, else the
    largest magnitude / 16: Q5_0 and Q4_0 blocks (d*(q-16), d*(q-8), the largest one at -16*d or -8*d) are
    Q8_0 blocks of that scale with small q, so a Q4_K_M model's Q5_0 projections decode from 34 bytes per 32
    weights instead of 128. Either way every block is checked to give the float32 weights back exactly."""
    n, k = w.shape
    if k % 32 or w.dtype != torch.float32:
        return None
    b = w.detach().reshape(n, k // 32, 32)
    amax = b.abs().amax(-1)
    d = q = None
    for divisor in (127, 16):
        dd = (amax / divisor).half().float()
        qq = torch.round(b / torch.where(dd > 0, dd, 1.0)[..., None]).clamp_(-127, 127)
        exact = (dd[..., None] * qq == b).all(-1)
        if d is None:
            d, q, ok = dd, qq, exact
        else:
            use = ~ok & exact
            d, q, ok = torch.where(use, dd, d), torch.where(use[..., None], qq, q), ok | exact
        if bool(ok.all()):
            break
    if not bool(ok.all()):
        return None
    out = torch.empty(n, k // 32, Q80_BLOCK_BYTES, dtype=torch.uint8)
    out[..., 0:2] = d.half().view(torch.uint8).view(n, k // 32, 2)
    out[..., 2:] = q.to(torch.int8).view(torch.uint8)
    return out


def unpack(blocks: torch.Tensor, kind: str) -> torch.Tensor:
    """The float32 weights a packed matrix stands for (the check that packing lost nothing)."""
    n, nb, _ = blocks.shape
    d = blocks[..., 0:2].contiguous().view(torch.float16).float()
    if kind == "q4_1":
        m = blocks[..., 2:4].contiguous().view(torch.float16).float()
        qs = blocks[..., 4:]
        q = torch.cat([qs & 15, qs >> 4], dim=-1).float()
        return (d * q + m).reshape(n, nb * 32)
    q = blocks[..., 2:].contiguous().view(torch.int8).float()
    return (d * q).reshape(n, nb * 32)


class PackedLinear(torch.nn.Module):
    """nn.Linear (no bias) that keeps its float32 weight for many rows and packed blocks for few."""

    def __init__(self, linear: torch.nn.Linear, kind: str, blocks: torch.Tensor, kernels: native.Kernels):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight = linear.weight  # the same Parameter: tied embeddings stay tied
        self.bias = None
        self.kind = kind
        self.blocks = blocks  # a plain attribute, not a buffer: state_dict and fingerprints stay unchanged
        self._fn = kernels.q41_matmul if kind == "q4_1" else kernels.q80_matmul

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _kernel_matmul(self._fn, self.blocks, x, self.in_features, self.out_features)
        return y if y is not None else F.linear(x, self.weight)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, packed={self.kind}"


class FusedPacked:
    """Several packed projections of one input (q/k/v, gate/up) as a single kernel call.

    Each output row is computed independently by the kernels, so the fused call returns exactly what the
    separate calls would. The separate layers are re-pointed at slices of the fused blocks: no extra memory.
    """

    def __init__(self, layers: list[PackedLinear]):
        self.layers = layers
        self.in_features = layers[0].in_features
        self.out_features = sum(layer.out_features for layer in layers)
        self.blocks = torch.cat([layer.blocks for layer in layers])
        start = 0
        for layer in layers:
            layer.blocks = self.blocks[start:start + layer.out_features]
            start += layer.out_features
        self._fn = layers[0]._fn

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = _kernel_matmul(self._fn, self.blocks, x, self.in_features, self.out_features)
        return y if y is not None else torch.cat([layer(x) for layer in self.layers], -1)


def _kernel_matmul(fn, blocks: torch.Tensor, x: torch.Tensor, in_features: int, out_features: int) -> torch.Tensor | None:
    """x @ W^T from packed blocks, or None where the kernels do not apply (many rows, autograd, not CPU fp32)."""
    rows = x.numel() // in_features if in_features else 0
    if not (0 < rows <= ROW_LIMIT) or x.dtype != torch.float32 or x.device.type != "cpu" or torch.is_grad_enabled():
        return None
    x2 = x.reshape(rows, in_features).contiguous()
    y = torch.empty(rows, out_features, dtype=torch.float32)
    fn(x2.data_ptr(), rows, in_features, blocks.data_ptr(), out_features, y.data_ptr())
    return y.view(*x.shape[:-1], out_features)


def fuse(layers: list[torch.nn.Module]) -> FusedPacked | None:
    """A FusedPacked over `layers` when all are packed the same way on the same input size, else None."""
    if not all(isinstance(layer, PackedLinear) for layer in layers):
        return None
    if len({(layer.kind, layer.in_features) for layer in layers}) != 1:
        return None
    if all(getattr(layer, "_fused_in", None) is not None for layer in layers):
        return layers[0]._fused_in  # fused once per model (cag.fastdecode asks under its lock)
    fused = FusedPacked(layers)
    for layer in layers:
        layer._fused_in = fused
    return fused


@dataclass
class PackReport:
    """What pack_model did, for logs and `cag version`-style diagnostics."""

    packed: dict[str, int] = field(default_factory=dict)
    kept: int = 0  # linear layers left as float32 (not exactly representable, or with a bias)
    float32_bytes: int = 0
    packed_bytes: int = 0
    kernels: str = ""
    reason: str | None = None  # why nothing was packed

    def __str__(self) -> str:
        if self.reason:
            return f"packed weights off: {self.reason}"
        kinds = ", ".join(f"{n} {k}" for k, n in sorted(self.packed.items()))
        return (f"packed weights: {sum(self.packed.values())} linear layers ({kinds}), {self.kept} kept float32; "
                f"decoding reads {self.packed_bytes / 1e6:.0f} MB of them per token instead of "
                f"{self.float32_bytes / 1e6:.0f} MB ({self.kernels})")


def pack_model(model: torch.nn.Module, simd: str | None = None) -> PackReport:
    """Swap every exactly-representable float32 CPU linear layer for a PackedLinear, in place (kernels of
    the kernel set `simd`; None: the CAG_SIMD setting)."""
    report = PackReport()
    if not settings.current().packed_weights:
        report.reason = "disabled by CAG_PACKED_WEIGHTS=0"
        return report
    first = next(model.parameters(), None)
    if first is None or first.device.type != "cpu" or first.dtype != torch.float32:
        report.reason = "only float32 models on the CPU use packed weights"
        return report
    kernels = native.load(simd)
    if kernels is None:
        report.reason = native.why_not(simd)
        return report
    report.kernels = kernels.describe
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if type(child) is not torch.nn.Linear:
                continue
            if child.bias is not None:
                report.kept += 1
                continue
            for kind, pack in (("q4_1", pack_q41), ("q8_0", pack_q80)):
                if pack(child.weight[:_SAMPLE_ROWS]) is None:  # most weights that are not such blocks show it
                    continue                                    # in their first rows: skip the whole check
                blocks = pack(child.weight)
                if blocks is not None:
                    setattr(parent, name, PackedLinear(child, kind, blocks, kernels))
                    report.packed[kind] = report.packed.get(kind, 0) + 1
                    report.float32_bytes += child.weight.numel() * 4
                    report.packed_bytes += blocks.numel()
                    break
            else:
                report.kept += 1
    if not report.packed:
        report.reason = "no linear layer holds exactly Q4_1 or Q8_0 values"
    return report
