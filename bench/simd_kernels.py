"""cag's CPU kernel sets (cag/engines/torch/native) on the default model, each against the others.

    .venv/bin/python bench/simd_kernels.py [--sets avx512,avx2,portable] [--threads 2] [--prefix 1500]

Two measurements, for every kernel set this CPU runs (or --sets), on the same weights:

  matmul  all 211 linear layers of SmolLM2-135M once for M input rows: the packed Q4_1/Q8_0 kernels of each
          set, and torch's float32 BLAS. This is where cag.engines.torch.packed.ROW_LIMIT comes from: up to it the packed
          kernels are used.
  step    the C decoding step (cag_step: every layer, attention, LM head) for 1 and 4 answers after a
          cached prefix of --prefix tokens (random ids: the speed does not depend on them), --steps
          tokens each; median milliseconds per step and tokens/s, and the CPU time per step (all threads:
          on a shared machine, one thread's CPU time is steadier than the wall clock).

The sets take turns --rounds times, so a busy machine slows each of them alike; the medians are over all
rounds. An AVX-512 machine runs the AVX2 set too (built with -mavx2 -mfma -mf16c only): a fair stand-in for
the same code on a CPU without AVX-512, at this machine's memory bandwidth.
"""

from __future__ import annotations

import argparse
import random
import statistics
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


def cpu_flags() -> list[str]:
    """The SIMD flags of this CPU that decide the kernel sets (Linux /proc/cpuinfo)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("flags", "Features")):
                wanted = {"avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "asimd", "fphp"}
                return sorted(set(line.split(":", 1)[1].split()) & wanted)
    except OSError:
        pass
    return []


def matmuls(layers, kernel_sets: dict, rows: list[int], repeat: int, rounds: int) -> list[dict]:
    results = []
    with torch.inference_mode():
        for m in rows:
            x = {k: torch.randn(m, k) for k in {layer.in_features for layer in layers}}
            y = {n: torch.empty(m, n) for n in {layer.out_features for layer in layers}}
            times: dict[str, list[float]] = {name: [] for name in kernel_sets}
            for _ in range(rounds):
                for name, kernels in kernel_sets.items():
                    calls = [((kernels.q41_matmul if layer.kind == "q4_1" else kernels.q80_matmul),
                              x[layer.in_features], layer) for layer in layers]
                    times[name].append(timed(lambda: [fn(xs.data_ptr(), m, layer.in_features, layer.blocks.data_ptr(),
                                                         layer.out_features, y[layer.out_features].data_ptr())
                                                      for fn, xs, layer in calls], repeat))
            blas = timed(lambda: [F.linear(x[layer.in_features], layer.weight) for layer in layers], repeat)
            results.append({"rows": m, "float32_ms": blas * 1000,
                            "packed_ms": {name: statistics.median(t) * 1000 for name, t in times.items()}})
    return results


def steps(model, kernel_sets: dict, prefix: int, count: int, batches: list[int], rounds: int) -> list[dict]:
    from cag.engines.torch import nativestep
    from cag.engines.torch.native.harness import Decoding, prefill

    rng = random.Random(0)
    vocab = model.config.vocab_size
    shared = prefill(model, [rng.randrange(3, vocab) for _ in range(prefix)])
    plans = {name: nativestep.Plan(model, kernels) for name, kernels in kernel_sets.items()}
    results = []
    for rows in batches:
        times: dict[str, list[float]] = {name: [] for name in kernel_sets}
        cpu: dict[str, list[float]] = {name: [] for name in kernel_sets}
        for _ in range(rounds):
            for name, plan in plans.items():
                decoding = Decoding(plan, shared, rows=rows, room=count + 1)
                tokens = [rng.randrange(3, vocab) for _ in range(rows)]
                decoding.step(tokens)  # warm-up: the weights into cache, the pages touched
                for _ in range(count):
                    start, start_cpu = time.perf_counter(), time.process_time()
                    logits = decoding.step(tokens)
                    times[name].append(time.perf_counter() - start)
                    cpu[name].append(time.process_time() - start_cpu)
                    tokens = [int(t) for t in logits.argmax(-1)]
        for name, t in times.items():
            ms = statistics.median(t) * 1000
            results.append({"kernel_set": name, "rows": rows, "prefix_tokens": prefix, "ms_per_step": ms,
                            "tokens_per_s": rows * 1000 / ms, "best_ms": min(t) * 1000,
                            "cpu_ms_per_step": statistics.median(cpu[name]) * 1000, "steps": len(t)})
    return results


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sets", default=None, help="kernel sets, comma-separated (default: every set this CPU runs)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's choice)")
    ap.add_argument("--rows", default="1,2,4,8,16,32,48,64", help="matmul rows to time")
    ap.add_argument("--repeat", type=int, default=5, help="matmul repeats per round")
    ap.add_argument("--prefix", type=int, default=1500, help="cached prefix tokens before the decoding steps")
    ap.add_argument("--steps", type=int, default=24, help="decoding steps per set per round")
    ap.add_argument("--batches", default="1,4", help="answers decoding together in the step")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    from transformers.utils import logging as hf_logging

    from cag.engines.torch import models, native, packed

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    names = args.sets.split(",") if args.sets else list(native.cpu_sets())
    kernel_sets = {name: native.load(name) for name in names}
    missing = {name: native.why_not(name) for name, k in kernel_sets.items() if k is None}
    if missing:
        sys.exit("; ".join(f"{name}: {why}" for name, why in missing.items()))
    lm = models.load(None, device="cpu", dtype="float32")
    layers = [m for m in lm.model.modules() if isinstance(m, packed.PackedLinear)]
    if not layers:
        sys.exit(f"nothing packed: {lm.packing}")

    matmul = matmuls(layers, kernel_sets, [int(r) for r in args.rows.split(",")], args.repeat, args.rounds)
    step = steps(lm.model, kernel_sets, args.prefix, args.steps, [int(b) for b in args.batches.split(",")],
                 args.rounds)
    result = {"machine": {**common.machine(), "cpu_flags": cpu_flags()},
              "kernel_sets": {name: k.describe for name, k in kernel_sets.items()}, "packing": str(lm.packing),
              "matmul": matmul, "step": step}
    path = common.write_results("kernels", result, args.out)
    print(f"{result['machine']['cpu']} ({' '.join(result['machine']['cpu_flags'])}), "
          f"{result['machine']['threads']} threads")
    print(common.table([(r["rows"], f"{r['float32_ms']:.1f}", *(f"{r['packed_ms'][n]:.1f}" for n in names),
                         f"{r['float32_ms'] / r['packed_ms'][names[0]]:.2f}x") for r in matmul],
                       ("rows", "float32 BLAS ms", *(f"{n} ms" for n in names), f"{names[0]} vs BLAS")))
    print()
    print(common.table([(r["kernel_set"], r["rows"], r["prefix_tokens"], f"{r['ms_per_step']:.2f}",
                         f"{r['tokens_per_s']:.1f}", f"{r['best_ms']:.2f}", f"{r['cpu_ms_per_step']:.2f}")
                        for r in step],
                       ("kernel set", "answers", "cached prefix", "ms/step (median)", "tokens/s", "best ms",
                        "CPU ms/step")))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
