"""Packed Q4_1/Q8_0 matmuls (cag/native) vs torch's float32 BLAS, by number of rows (default model).

    .venv/bin/python bench/kernels.py

Times all 211 linear layers of SmolLM2-135M once for M input rows, both ways, on the same weights.
This is where cag.packed.ROW_LIMIT comes from: up to it the packed kernels are used.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import common  # noqa: E402


def timed(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", default="1,2,4,8,16,24,32,48,64")
    ap.add_argument("--repeat", type=int, default=5)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from cag.engines.torch import models, packed

    lm = models.load(None, device="cpu", dtype="float32")
    layers = [m for m in lm.model.modules() if isinstance(m, packed.PackedLinear)]
    if not layers:
        sys.exit(f"nothing packed: {lm.packing}")
    packed.ROW_LIMIT = 1 << 30  # time the kernels at every size, whatever the switch-over is
    rows = []
    with torch.inference_mode():
        for m in map(int, args.rows.split(",")):
            x = {k: torch.randn(m, k) for k in {layer.in_features for layer in layers}}
            ours = timed(lambda: [layer(x[layer.in_features]) for layer in layers], args.repeat)
            blas = timed(lambda: [F.linear(x[layer.in_features], layer.weight) for layer in layers], args.repeat)
            rows.append({"rows": m, "packed_ms": ours * 1000, "float32_ms": blas * 1000, "speedup": blas / ours})
    result = {"machine": common.machine(), "packing": str(lm.packing), "results": rows}
    path = common.write_results("kernels", result, args.out)
    print(lm.packing)
    print(common.table([(r["rows"], f"{r['packed_ms']:.1f}", f"{r['float32_ms']:.1f}", f"{r['speedup']:.2f}x")
                        for r in rows], ("rows", "packed ms (all layers)", "float32 BLAS ms", "packed speedup")))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
