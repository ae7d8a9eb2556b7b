"""Batched answers on one shared prefix vs one question at a time (default model, CPU or GPU).

    .venv/bin/python bench/batch.py [--batch 8] [--max-new-tokens 32]

Throughput = generated tokens / wall seconds. The prefix is never copied per question (cag.engines.torch.batch);
answers are compared token by token with the one-at-a-time path. For scale, the same questions also
run one at a time through plain transformers (the prompt-reuse recipe: deep-copied prefix DynamicCache +
model.generate, float32 matmuls, no packing).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import copy

    import torch
    from transformers import DynamicCache

    import cag
    import core
    import torch_direct as direct
    from cag.engines.torch import kvcompat, models
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    lm = models.load(None)
    plain = models.load(None, pack=False)
    os.environ["CAG_HOME"] = tempfile.mkdtemp(prefix="cag-bench-")
    kb = cag.build([common.SAMPLE_DOCS], name="batch", lm=lm)
    questions = [r["q"] for r in common.sample_questions()][: args.batch]
    new_ids = [kb.builder.split(q).new_ids for q in questions]
    stops = lm.stop_ids

    kb.ask(questions[0], max_new_tokens=2)  # warm-up
    start = time.perf_counter()
    single = [kb.ask(q, max_new_tokens=args.max_new_tokens).token_ids for q in questions]
    single_s = time.perf_counter() - start
    start = time.perf_counter()
    batched = direct.generate_batch(lm, kb.layers, new_ids, max_new_tokens=args.max_new_tokens, stop_ids=stops)
    batch_s = time.perf_counter() - start
    prefix_cache = DynamicCache()
    with torch.inference_mode():
        kvcompat.forward(plain.model, torch.tensor([kb.prefix_ids]), prefix_cache)
    start = time.perf_counter()
    hf = [core.hf_generate(plain, kb.builder.split(q).ids, stops, args.max_new_tokens,
                           cache=copy.deepcopy(prefix_cache))[0] for q in questions]
    hf_s = time.perf_counter() - start
    tokens = sum(map(len, single))
    same = sum(a == b for a, b in zip(single, batched))
    result = {
        "machine": common.machine(),
        "config": {"batch": len(questions), "max_new_tokens": args.max_new_tokens, "knowledge_tokens": kb.tokens,
                   "dtype": lm.dtype, "device": str(lm.device)},
        "one_at_a_time": {"seconds": single_s, "tokens_per_s": tokens / single_s},
        "batched": {"seconds": batch_s, "tokens_per_s": sum(map(len, batched)) / batch_s},
        "hf_one_at_a_time": {"seconds": hf_s, "tokens_per_s": sum(map(len, hf)) / hf_s},
        "throughput_ratio": single_s / batch_s,
        "throughput_ratio_vs_hf": hf_s / batch_s,
        "identical": same,
        "identical_to_hf": sum(a == b for a, b in zip(batched, hf)),
    }
    path = common.write_results("batch", result, args.out)
    print(f"{len(questions)} questions on a {kb.tokens}-token prefix, max {args.max_new_tokens} new tokens, "
          f"{lm.device} {lm.dtype}; batched answers identical to one at a time {same}/{len(questions)}, "
          f"to plain transformers {result['identical_to_hf']}/{len(questions)}")
    print(common.table([
        ("plain transformers, one at a time", f"{hf_s:.2f}", f"{sum(map(len, hf)) / hf_s:.1f}", f"{single_s / hf_s:.2f}x"),
        ("cag, one at a time", f"{single_s:.2f}", f"{tokens / single_s:.1f}", "1.0x"),
        ("batched (shared prefix)", f"{batch_s:.2f}", f"{sum(map(len, batched)) / batch_s:.1f}", f"{single_s / batch_s:.1f}x"),
    ], ("mode", "seconds", "tokens/s", "throughput vs cag one at a time")))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
