"""Decode speed on the CPU: cag vs plain transformers' Python loop, same model, same dtype, same run.

    .venv/bin/python bench/decode.py [--tokens 2000] [--steps 64] [--questions 4] [--simd avx2]

Systems (all greedy, float32, default model):
  hf-loop      plain transformers: model(...) once per token with a DynamicCache (deep-copied prefix),
               argmax in Python: what a user writes without cag
  cag-float32  cag's decoder with plain float32 matmuls (CAG_PACKED_WEIGHTS=0), C step
  cag-lean     packed Q4_1/Q8_0 weights (cag.engines.torch.packed), the lean Python step (CAG_NATIVE_STEP=0)
  cag          cag's default: packed weights and the C decoding step (cag.engines.torch.nativestep) over the
               preallocated KV workspace

Each question decodes exactly --steps tokens (end-of-turn ignored) on top of a cached prefix of
~--tokens knowledge tokens, and once with no prefix at all (short context). Time per token excludes the
question's prefill (time to first token). Token ids are compared across systems. --simd runs cag on
one kernel set (CAG_SIMD: avx512, avx2, neon, portable; default the best this CPU has); the packing line
of the results names the set that ran. bench/simd_kernels.py compares the sets side by side.
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

import common  # noqa: E402


def hf_loop(model, prefix_cache, ids: list[int], steps: int) -> tuple[list[int], float]:
    from transformers import DynamicCache

    cache = copy.deepcopy(prefix_cache) if prefix_cache is not None else DynamicCache()
    key = "cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"
    out_ids = []
    with torch.inference_mode():
        out = model(input_ids=torch.tensor([ids]), **{key: cache}, use_cache=True)
        start = time.perf_counter()
        for _ in range(steps):
            token = out.logits[:, -1].argmax(-1, keepdim=True)
            out_ids.append(int(token))
            if len(out_ids) == steps:
                break
            out = model(input_ids=token, **{key: cache}, use_cache=True)
    return out_ids, (time.perf_counter() - start) / (steps - 1)


def cag_decode(lm, workspace, reuse: int, ids: list[int], steps: int) -> tuple[list[int], float]:
    import torch_direct as direct

    out, start = [], None
    for token in direct.generate(lm, ids, workspace, reuse=reuse, max_new_tokens=steps, stop_ids=()):
        if start is None:
            start = time.perf_counter()
        out.append(token)
    return out, (time.perf_counter() - start) / (steps - 1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=2000, help="knowledge size in tokens (approx.)")
    ap.add_argument("--steps", type=int, default=64, help="tokens decoded per question")
    ap.add_argument("--questions", type=int, default=4)
    ap.add_argument("--simd", default=None, help="kernel set (CAG_SIMD); default: the best this CPU runs")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if args.simd:
        os.environ["CAG_SIMD"] = args.simd

    import cag
    import torch_direct as direct
    from cag.engines.torch import kvcompat, models
    from cag.engines.torch.workspace import Workspace
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    os.environ.setdefault("CAG_HOME", str(Path.home() / ".cache" / "cag"))
    fast = models.load(None, device="cpu", dtype="float32")
    plain = models.load(None, device="cpu", dtype="float32", pack=False)
    lean = models.load(None, device="cpu", dtype="float32")
    os.environ["CAG_NATIVE_STEP"] = "0"  # decided on a model's first step: this one never uses the C step
    list(direct.generate(lean, [1, 2, 3], max_new_tokens=2))
    del os.environ["CAG_NATIVE_STEP"]
    home = Path(tempfile.mkdtemp(prefix="cag-bench-"))
    docs = common.padded_knowledge(home / "docs", plain.tokenizer, args.tokens)
    os.environ["CAG_HOME"] = str(home)
    kb = cag.build([docs], name="decode", lm=plain)
    questions = [r["q"] for r in common.sample_questions()][: args.questions]

    results = {}
    for context in ("knowledge", "short"):
        splits = [kb.builder.split(q) for q in questions]
        if context == "knowledge":
            prefix_layers, reuse = kb.layers, kb.tokens
            prefix_cache = kvcompat.from_layers([(k.clone(), v.clone()) for k, v in prefix_layers])
            jobs = [s.new_ids for s in splits]
        else:  # no prefix: a bare chat turn with the question only
            prefix_layers, reuse, prefix_cache = None, 0, None
            jobs = [plain.tokenizer.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True)
                    for q in questions]
            jobs = [j["input_ids"] if isinstance(j, dict) or hasattr(j, "keys") else j for j in jobs]
        per = {"hf-loop": [], "cag-float32": [], "cag-lean": [], "cag": []}
        tokens = {k: [] for k in per}
        for ids in jobs:
            ws = Workspace(prefix_layers) if prefix_layers is not None else None
            for name, run in (("hf-loop", lambda: hf_loop(plain.model, prefix_cache, ids, args.steps)),
                              ("cag-float32", lambda: cag_decode(plain, ws, reuse, ids, args.steps)),
                              ("cag-lean", lambda: cag_decode(lean, ws, reuse, ids, args.steps)),
                              ("cag", lambda: cag_decode(fast, ws, reuse, ids, args.steps))):
                out, s = run()
                per[name].append(s)
                tokens[name].append(out)
            print(f"[{context}] {len(ids)} question tokens: " + "  ".join(f"{k} {v[-1] * 1000:.1f} ms/token"
                                                                        for k, v in per.items()), file=sys.stderr)
        med = {k: common.median(v) for k, v in per.items()}
        results[context] = {
            "prefix_tokens": reuse,
            "ms_per_token": {k: v * 1000 for k, v in med.items()},
            "tokens_per_s": {k: 1 / v for k, v in med.items()},
            "speedup_vs_hf_loop": {k: med["hf-loop"] / v for k, v in med.items()},
            "identical_to_hf_loop": {k: sum(a == b for a, b in zip(tokens[k], tokens["hf-loop"])) for k in per},
            "questions": len(jobs),
        }

    result = {"machine": common.machine(), "config": {"steps": args.steps, "knowledge_tokens": kb.tokens,
                                                      "packing": str(fast.packing)}, "results": results}
    path = common.write_results("decode", result, args.out)
    print(f"\n{fast.packing}")
    rows = []
    for context, r in results.items():
        for k in per:
            rows.append((f"{context} ({r['prefix_tokens']} cached)", k, f"{r['ms_per_token'][k]:.1f}",
                         f"{r['tokens_per_s'][k]:.1f}", f"{r['speedup_vs_hf_loop'][k]:.2f}x",
                         f"{r['identical_to_hf_loop'][k]}/{r['questions']}"))
    print(common.table(rows, ("context", "system", "ms/token", "tokens/s", "vs hf-loop", "same tokens as hf-loop")))
    print(f"results: {path}")


if __name__ == "__main__":
    main()
