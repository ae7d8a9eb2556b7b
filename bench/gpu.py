"""GPU benchmark: a random-weight model with Llama-3.1-8B's shape in bf16, CAG vs recomputing the prefill.

    python bench/gpu.py                      # CUDA: 8B shape, bf16, knowledge 2k/8k/32k/64k tokens
    python bench/gpu.py --small              # CPU: tiny Llama config, float32, 256/512/1024 tokens (CI)

Per knowledge size, with random token ids (weights are random, so only speed means anything):
  cag-cache     cag.engine.generate on the prefilled Workspace: only the question's tokens run
  cag-recompute cag.engine.generate on the whole prompt (what in-context does every question)
  hf-full       plain transformers model.generate(full prompt)
  hf-prefix     plain transformers: deepcopy(prefilled DynamicCache) + model.generate(full prompt)
plus decode tokens/s, the one-time prefill, and at one size the cache's load bandwidth from each tier:
safetensors file -> device (cag's verified kvfile.load, and bare safetensors.load_file), host memory
(pinned on CUDA) -> device. The file was just written, so it is read from a warm page cache.
Writes JSON to $OUT/gpu.json when OUT is set, else bench/results/gpu[-small].json; prints a table last.
"""

from __future__ import annotations

import argparse
import copy
import gc
import inspect
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torch  # noqa: E402

import common  # noqa: E402
from core import FirstToken  # noqa: E402

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0)
SMALL = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rope_theta=500000.0)


def make_model(shape: dict, device: torch.device, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape, tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    old = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # build the weights directly in the target dtype, on the target device
    try:
        with torch.device(device):
            torch.manual_seed(0)
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(old)
    model.generation_config.eos_token_id = None  # random weights: never stop early, every run decodes N tokens
    return model.eval()


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def cag_run(model, device, new_ids, prefix, reuse, max_new):
    """TTFT, total seconds and the tokens of one cag.engine.generate call."""
    from cag import engine

    sync(device)
    start = time.perf_counter()
    ttft, tokens = None, []
    for token in engine.generate(model, new_ids, prefix=prefix, reuse=reuse, max_new_tokens=max_new):
        ttft = ttft if ttft is not None else time.perf_counter() - start
        tokens.append(token)
    sync(device)
    return ttft, time.perf_counter() - start, tokens


def hf_run(model, device, ids, max_new, cache=None):
    """The same through plain transformers generate (cache: a DynamicCache of the prompt's leading tokens)."""
    kw = {}
    if cache is not None:  # transformers 5.x renamed past_key_values to cache
        kw["cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"] = cache
    streamer = FirstToken()
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(torch.tensor([ids], device=device), max_new_tokens=max_new,
                             do_sample=False, pad_token_id=1, streamer=streamer, **kw)
    sync(device)
    total = time.perf_counter() - start
    return (streamer.first or time.perf_counter()) - start, total, out[0, len(ids):].tolist()


def hf_prefill(model, ids, device):
    from cag import kvcompat

    cache = kvcompat.empty_cache()
    with torch.inference_mode():
        kvcompat.forward(model, torch.tensor([ids], device=device), cache)
    return cache


def decode_rate(ttft: float, total: float, tokens: int) -> float:
    return (tokens - 1) / (total - ttft) if tokens > 1 and total > ttft else float("nan")


def measure_size(model, device, n: int, args, rng) -> dict:
    from cag import engine

    ids = torch.randint(2, model.config.vocab_size, (n + args.question_tokens,), generator=rng).tolist()
    prefix_ids = ids[:n]
    sync(device)
    start = time.perf_counter()
    layers = engine.prefill(model, prefix_ids, chunk_size=args.chunk)
    sync(device)
    prefill_s = time.perf_counter() - start
    ws = engine.Workspace(layers, room=args.question_tokens + args.new_tokens + 8)
    del layers
    row = {"tokens": n, "prefill_s": prefill_s, "prefill_tok_s": n / prefill_s}
    runs = {}
    for name, fn in (
        ("cag-cache", lambda: cag_run(model, device, ids[n:], ws, n, args.new_tokens)),
        ("cag-recompute", lambda: cag_run(model, device, ids, None, 0, args.new_tokens)),
        ("hf-full", lambda: hf_run(model, device, ids, args.new_tokens)),
    ):
        runs[name] = best_of(fn, args.repeats)
    hf_cache = hf_prefill(model, prefix_ids, device)
    runs["hf-prefix"] = best_of(lambda: hf_run(model, device, ids, args.new_tokens, copy.deepcopy(hf_cache)),
                                args.repeats)
    del hf_cache
    for name, (ttft, total, tokens) in runs.items():
        row[name] = {"ttft_s": ttft, "total_s": total, "decode_tok_s": decode_rate(ttft, total, len(tokens))}
    row["same_tokens_cache_vs_recompute"] = runs["cag-cache"][2] == runs["cag-recompute"][2]
    row["same_tokens_cag_vs_hf"] = runs["cag-recompute"][2] == runs["hf-full"][2]
    row["kv_bytes"] = sum(k.numel() * k.element_size() * 2 for k, _ in ws.prefix)
    if n == args.load_size:
        row["load"] = measure_load(ws.prefix, prefix_ids, device)
    del ws
    free(device)
    return row


def best_of(fn, repeats: int):
    """Fastest of `repeats` runs (first-call warm-up effects excluded by the warm-up in main)."""
    best = None
    for _ in range(repeats):
        run = fn()
        best = run if best is None or run[1] < best[1] else best
    return best


def measure_load(prefix, prefix_ids, device) -> dict:
    """Seconds and GB/s to get the cache onto the device from a safetensors file and from host memory."""
    from safetensors.torch import load_file

    from cag import kvfile

    host = [(k.to("cpu"), v.to("cpu")) for k, v in prefix]
    if device.type == "cuda":
        host = [(k.pin_memory(), v.pin_memory()) for k, v in host]
    nbytes = sum(k.numel() * k.element_size() * 2 for k, _ in host)
    out = {"bytes": nbytes}
    with tempfile.TemporaryDirectory(prefix="cag-gpu-bench-") as folder:
        path = Path(folder) / "cache.safetensors"
        kvfile.save(path, host, prefix_ids, {})
        for name, fn in (("file_cag_verified", lambda: kvfile.load(path, device=device).layers),
                         ("file_safetensors", lambda: load_file(str(path), device=str(device))),
                         ("host_to_device", lambda: [(k.to(device, non_blocking=True), v.to(device, non_blocking=True))
                                                     for k, v in host])):
            sync(device)
            start = time.perf_counter()
            got = fn()
            sync(device)
            seconds = time.perf_counter() - start
            del got
            out[name] = {"s": seconds, "GB_s": nbytes / seconds / 1e9}
    return out


def free(device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny Llama config on the CPU (float32), for CI")
    ap.add_argument("--sizes", default=None, help="knowledge sizes in tokens (default 2048,8192,32768,65536; small: 256,512,1024)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens to decode per question (default 32; small 16)")
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk size (default 4096 on CUDA, 512 small)")
    ap.add_argument("--load-size", type=int, default=None, help="size at which to measure load bandwidth (default: 8192, small: 512)")
    args = ap.parse_args(argv)
    small = args.small
    sizes = [int(s) for s in (args.sizes or ("256,512,1024" if small else "2048,8192,32768,65536")).split(",")]
    args.new_tokens = args.new_tokens or (16 if small else 32)
    args.chunk = args.chunk or (512 if small else 4096)
    args.load_size = args.load_size or (512 if small else 8192)
    if small:
        device, dtype, shape = torch.device("cpu"), torch.float32, SMALL
    else:
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device; run with --small for the CPU configuration")
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, LLAMA_8B
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    start = time.perf_counter()
    model = make_model(shape, device, dtype)
    sync(device)
    build_model_s = time.perf_counter() - start
    rng = torch.Generator().manual_seed(0)
    measure_size(model, device, min(sizes), argparse.Namespace(**{**vars(args), "repeats": 1, "load_size": -1}), rng)  # warm-up
    rows = []
    for n in sizes:
        rows.append(measure_size(model, device, n, args, rng))
        r = rows[-1]
        print(f"{n} tokens: prefill {r['prefill_s']:.2f}s, ttft cache {r['cag-cache']['ttft_s'] * 1000:.1f} ms vs "
              f"recompute {r['cag-recompute']['ttft_s'] * 1000:.1f} ms", file=sys.stderr, flush=True)
    result = {"machine": common.machine(), "small": small, "device": str(device), "dtype": str(dtype),
              "shape": shape, "params": sum(p.numel() for p in model.parameters()), "build_model_s": build_model_s,
              "new_tokens": args.new_tokens, "question_tokens": args.question_tokens, "repeats": args.repeats,
              "rows": rows}
    out = Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
    path = common.write_results("gpu-small" if small else "gpu", result, out)
    print_tables(result, path)


def print_tables(result: dict, path: Path) -> None:
    rows = result["rows"]
    names = ("cag-cache", "cag-recompute", "hf-full", "hf-prefix")
    loads = [r["load"] for r in rows if "load" in r]
    if loads:
        ld = loads[0]
        print(f"\nload {ld['bytes'] / 1e6:.0f} MB of KV: " + ", ".join(
            f"{k} {ld[k]['s'] * 1000:.0f} ms ({ld[k]['GB_s']:.2f} GB/s)"
            for k in ("file_cag_verified", "file_safetensors", "host_to_device")))
    print(f"results: {path}")
    print(f"\n{result['device']} {result['dtype']}, {result['params'] / 1e6:.1f}M params "
          f"({'small CPU config' if result['small'] else 'Llama-3.1-8B shape'}), random weights, "
          f"{result['question_tokens']} question tokens, {result['new_tokens']} decoded; best of {result['repeats']}")
    table = []
    for r in rows:
        table.append((r["tokens"], f"{r['prefill_s']:.2f}", *(f"{r[n]['ttft_s'] * 1000:.1f}" for n in names),
                      f"{r['cag-recompute']['ttft_s'] / r['cag-cache']['ttft_s']:.1f}x",
                      f"{r['cag-cache']['decode_tok_s']:.1f}", f"{r['hf-full']['decode_tok_s']:.1f}",
                      "yes" if r["same_tokens_cache_vs_recompute"] else "NO"))
    print(common.table(table, ("tokens", "prefill s", *(f"TTFT ms {n}" for n in names), "TTFT gain",
                               "decode tok/s cag", "decode tok/s hf", "same tokens")))


if __name__ == "__main__":
    main()
