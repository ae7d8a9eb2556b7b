"""Core benchmark: per-question latency and time to first token with the cache vs without, build cost,
file size and load time — next to plain Hugging Face transformers code measured in the same run.

    .venv/bin/python bench/core.py [--tokens 2000] [--max-new-tokens 64] [--questions 20]

cag runs with its defaults (packed Q4_1/Q8_0 weights on the CPU, cag.engines.torch.packed). The plain-transformers
baselines load the same model files without packing (float32 matmuls everywhere), same dtype, greedy:
  hf-full    model.generate(full prompt ids)                       (in-context, no prefix cache)
  hf-prefix  deepcopy(prefix DynamicCache) + model.generate(...)    (the documented prompt-reuse recipe)
"""

from __future__ import annotations

import argparse
import copy
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402
from transformers import DynamicCache  # noqa: E402
from transformers.generation.streamers import BaseStreamer  # noqa: E402

import common  # noqa: E402


class FirstToken(BaseStreamer):
    """Records when generate() emits its first new token (the first put() is the prompt)."""

    def __init__(self):
        self.calls, self.first = 0, None

    def put(self, value):
        self.calls += 1
        if self.calls == 2 and self.first is None:
            self.first = time.perf_counter()

    def end(self):
        pass


def hf_generate(lm, ids, stops, max_new, cache=None):
    kw = {}
    if cache is not None:
        name = "cache" if "cache" in inspect.getsource(type(lm.model).generate) else "past_key_values"
        kw[name] = cache
    streamer = FirstToken()
    start = time.perf_counter()
    out = lm.model.generate(torch.tensor([ids]), max_new_tokens=max_new, do_sample=False, eos_token_id=stops,
                            pad_token_id=stops[0], streamer=streamer, **kw)
    total = time.perf_counter() - start
    new = out[0, len(ids):].tolist()
    while new and new[-1] in stops:
        new.pop()
    return new, (streamer.first or time.perf_counter()) - start, total


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000, help="knowledge size in tokens (approx.)")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--model", default=None)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()

    import cag
    from cag.engines.torch import models
    from cag.cache import kvfile

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    home = Path(tempfile.mkdtemp(prefix="cag-bench-"))
    os.environ.setdefault("CAG_HOME", str(Path.home() / ".cache" / "cag"))
    lm, load_model_s = common.timed(models.load, args.model, device="cpu")
    plain = models.load(args.model, device="cpu", pack=False)  # plain transformers: float32 matmuls everywhere
    docs = common.padded_knowledge(home / "docs", lm.tokenizer, args.tokens)
    os.environ["CAG_HOME"] = str(home)  # keep benchmark knowledge bases out of the user's home

    kb, build_s = common.timed(cag.build, [docs], name="bench", lm=lm)
    cache_path = home / "kbs" / "bench" / "cache.safetensors"
    _, load_s = common.timed(kvfile.load, cache_path)
    questions = [r["q"] for r in common.sample_questions()][: args.questions]
    stops = lm.stop_ids

    # the documented HF prompt-reuse recipe: prefill the prefix once into a DynamicCache
    prefix_cache = DynamicCache()
    with torch.inference_mode():
        plain.model(input_ids=torch.tensor([kb.prefix_ids]), **{
            ("cache" if "cache" in inspect.signature(type(plain.model).forward).parameters else "past_key_values"): prefix_cache})

    rows = {k: {"ttft": [], "total": []} for k in ("cag-cache", "cag-no-cache", "hf-full", "hf-prefix")}
    same_nocache = same_hf = 0
    new_tokens = []
    for i, q in enumerate(questions, 1):
        a = kb.ask(q, max_new_tokens=args.max_new_tokens)
        b = kb.ask(q, max_new_tokens=args.max_new_tokens, use_cache=False)
        ids = kb.builder.split(q).ids
        hf_full, ttft_f, tot_f = hf_generate(plain, ids, stops, args.max_new_tokens)
        hf_pre, ttft_p, tot_p = hf_generate(plain, ids, stops, args.max_new_tokens, cache=copy.deepcopy(prefix_cache))
        for key, ttft, total in (("cag-cache", a.ttft_s, a.total_s), ("cag-no-cache", b.ttft_s, b.total_s),
                                 ("hf-full", ttft_f, tot_f), ("hf-prefix", ttft_p, tot_p)):
            rows[key]["ttft"].append(ttft)
            rows[key]["total"].append(total)
        same_nocache += a.token_ids == b.token_ids
        same_hf += a.token_ids == hf_full == hf_pre
        new_tokens.append(a.new_tokens)
        print(f"[{i}/{len(questions)}] {a.new_tokens} tokens  cache {a.total_s:.2f}s  no-cache {b.total_s:.2f}s  "
              f"hf-full {tot_f:.2f}s  hf-prefix {tot_p:.2f}s", file=sys.stderr, flush=True)

    med = {k: {m: common.median(v[m]) for m in ("ttft", "total")} for k, v in rows.items()}
    base = med["cag-cache"]
    table_rows = [(k, f"{v['ttft'] * 1000:.0f}", f"{v['total']:.2f}", f"{v['ttft'] / base['ttft']:.1f}x",
                   f"{v['total'] / base['total']:.1f}x") for k, v in med.items()]
    result = {
        "machine": common.machine(),
        "config": {"knowledge_tokens": kb.tokens, "questions": len(questions), "max_new_tokens": args.max_new_tokens,
                   "dtype": lm.dtype, "device": str(lm.device), "packing": str(lm.packing)},
        "build": {"prefill_s": kb.build_stats.seconds, "build_total_s": build_s,
                  "prefill_tokens_per_s": kb.build_stats.tokens_per_s, "file_bytes": cache_path.stat().st_size,
                  "load_s": load_s, "model_load_s": load_model_s},
        "median": med,
        "per_question": rows,
        "median_new_tokens": common.median(new_tokens),
        "identical": {"cache_vs_no_cache": same_nocache, "cag_vs_hf_generate": same_hf, "of": len(questions)},
        "speedup_total_vs_no_cache": med["cag-no-cache"]["total"] / base["total"],
        "speedup_ttft_vs_no_cache": med["cag-no-cache"]["ttft"] / base["ttft"],
    }
    path = common.write_results("core", result, args.out)
    print(f"\nknowledge {kb.tokens} tokens, {len(questions)} questions, max {args.max_new_tokens} new tokens, "
          f"median answer {result['median_new_tokens']:.0f} tokens, {lm.device} {lm.dtype}")
    print(f"build: prefill {kb.build_stats.seconds:.2f}s ({kb.build_stats.tokens_per_s:.0f} tok/s), "
          f"file {cache_path.stat().st_size / 1e6:.1f} MB, load {load_s * 1000:.0f} ms")
    print(f"identical answers: cache vs no-cache {same_nocache}/{len(questions)}, "
          f"cag vs plain HF generate {same_hf}/{len(questions)}")
    print(common.table(table_rows, ("system", "median TTFT ms", "median total s", "TTFT vs cag", "total vs cag")))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
