"""GPU benchmark: a random-weight model with Llama-3.1-8B's shape in bf16, cag next to plain transformers.

    python3 bench/gpu.py               # CUDA: 8B shape, bf16, knowledge 2k/8k/32k/64k tokens (< 5 min on an H200)
    python3 bench/gpu.py --small       # CPU: tiny Llama config, float32, 256/512/1024 tokens (CI)

Runs from a bare checkout (cag need not be installed: bench/common.py puts the repo root on sys.path)
and builds its models itself, so nothing but the checkout travels to the GPU machine. Weights are
random, so only speed and bit-exactness mean anything. Sections, each guarded: an error is recorded
in the JSON and the table and the run goes on; a section that would end after --budget-s is skipped:

  exact    N random questions on one prefix restored from its cache file: the cached answer vs the
           piecewise reference (the prefix recomputed in the cache's pieces, then the question, as
           `kb.ask(use_cache=False)` does): token ids, and first-token logits bit for bit; and how often
           plain transformers' one-shot `generate` of the whole prompt gives the same tokens
  restore  a cache file of --restore-tokens tokens of the model's KV shape (4 GiB for the 8B shape at
           32k), read from a warm page cache: cag's verified restore (kvfile.load, BLAKE3 and SHA-256
           files) vs safetensors load_file (no verification) vs pinned host->device vs the same
           parallel read with no hashing and no device copy (on the CPU: load_file plus a copy, since
           it only maps the file, and a memory copy)
  batch    1/8/32 questions decoded together on one shared prefix: cag.engines.torch.batch vs plain transformers
           `generate` on a batch with the prefix's DynamicCache copied per row
  ttft     per knowledge size: cached TTFT (an answer on the prefilled Workspace, the torch engine) vs plain
           transformers on the full prompt and with prefix reuse (deepcopy of a prefilled DynamicCache
           + generate), and cag on the full prompt; decode tokens/s; the one-time prefill

Writes JSON to $OUT/gpu.json when OUT is set, else bench/results/gpu[-small].json, after every section
(a run cut short keeps what it measured); prints one table last.
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
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402  (first: it puts the repo root on sys.path)

import torch  # noqa: E402

from core import FirstToken  # noqa: E402

LLAMA_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=131072, rope_theta=500000.0)
SMALL = dict(vocab_size=2048, hidden_size=256, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, rope_theta=500000.0)
SLOW_RUN_S = 5.0  # a run this long is not repeated (the 64k full-prompt runs): the budget matters more


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


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def timed(device: torch.device, fn):
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - start


def best_of(fn, repeats: int):
    """The fastest of up to `repeats` runs (by their second element, the total time); a slow run is not repeated."""
    best = None
    for _ in range(repeats):
        run = fn()
        best = run if best is None or run[1] < best[1] else best
        if run[1] > SLOW_RUN_S:
            break
    return best


def guarded(device: torch.device, fn) -> dict:
    """fn()'s dict, or {"error": ...} when it fails (out of memory at 64k, say): one measurement lost, not the run."""
    try:
        return fn()
    except Exception as err:  # noqa: BLE001 - recorded in the results
        traceback.print_exc(file=sys.stderr)
        free(device)
        return {"error": f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"}


def random_ids(model, n: int, rng: torch.Generator) -> list[int]:
    return torch.randint(2, model.config.vocab_size, (n,), generator=rng).tolist()


# -- cag and plain transformers, one question ----------------------------------------------------------

_STATES: dict = {}


def state(model):
    """cag's per-model state for `model` (fast-path verdicts, plans), made once: as the torch engine keeps it."""
    import torch_direct as direct

    if id(model) not in _STATES:
        _STATES[id(model)] = direct.state_of(model)
    return _STATES[id(model)]


def cag_run(model, device, new_ids, prefix, reuse, max_new):
    """TTFT, total seconds and the tokens of one answer decoded by cag's torch engine (one row on `prefix`)."""
    import torch_direct as direct

    sync(device)
    start = time.perf_counter()
    ttft, tokens = None, []
    for token in direct.generate(state(model), new_ids, prefix=prefix, reuse=reuse, max_new_tokens=max_new):
        ttft = ttft if ttft is not None else time.perf_counter() - start
        tokens.append(token)
    sync(device)
    return ttft, time.perf_counter() - start, tokens


def hf_run(model, device, rows: list[list[int]], max_new: int, cache=None):
    """Plain transformers generate on a batch of equal-length prompts (cache: a DynamicCache of their
    leading tokens, one row per prompt): TTFT, total seconds and the new tokens of each row."""
    kw = {}
    if cache is not None:  # transformers 5.x renamed past_key_values to cache
        kw["cache" if "cache" in inspect.signature(type(model).forward).parameters else "past_key_values"] = cache
    ids = torch.tensor(rows, device=device)
    streamer = FirstToken() if len(rows) == 1 else None  # streamers take one row only
    sync(device)
    start = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new, do_sample=False,
                             pad_token_id=1, streamer=streamer, **kw)
    sync(device)
    total = time.perf_counter() - start
    first = streamer.first if streamer is not None and streamer.first else None
    return (first - start) if first else total, total, out[:, ids.shape[1]:].tolist()


def hf_prefill(model, rows: list[list[int]], device):
    from cag.engines.torch import kvcompat

    cache = kvcompat.empty_cache()
    with torch.inference_mode():
        kvcompat.forward(model, torch.tensor(rows, device=device), cache)
    return cache


def decode_rate(ttft: float, total: float, tokens: int) -> float:
    return (tokens - 1) / (total - ttft) if tokens > 1 and total > ttft else float("nan")


# -- sections ------------------------------------------------------------------------------------------

def ttft_size(model, device, n: int, args, rng) -> dict:
    """Cached TTFT vs plain transformers (full prompt, prefix reuse) and cag on the full prompt, at `n` tokens."""
    import torch_direct as direct
    from cag.engines.torch.workspace import Workspace

    ids = random_ids(model, n + args.question_tokens, rng)
    prefix_ids = ids[:n]
    layers, prefill_s = timed(device, lambda: direct.prefill(state(model), prefix_ids, chunk_size=args.chunk))
    ws = Workspace(layers, room=args.question_tokens + args.new_tokens + 8)
    del layers
    row = {"tokens": n, "prefill_s": prefill_s, "prefill_tok_s": n / prefill_s,
           "kv_bytes": sum(k.numel() * k.element_size() * 2 for k, _ in ws.prefix)}

    def measured(run) -> dict:
        ttft, total, tokens = best_of(run, args.repeats)
        tokens = tokens[0] if tokens and isinstance(tokens[0], list) else tokens  # hf_run: one row
        return {"ttft_s": ttft, "total_s": total, "decode_tok_s": decode_rate(ttft, total, len(tokens)),
                "tokens": tokens}

    row["cag-cache"] = guarded(device, lambda: measured(lambda: cag_run(model, device, ids[n:], ws, n, args.new_tokens)))
    del ws
    free(device)
    row["cag-recompute"] = guarded(device, lambda: measured(lambda: cag_run(model, device, ids, None, 0, args.new_tokens)))
    row["hf-full"] = guarded(device, lambda: measured(lambda: hf_run(model, device, [ids], args.new_tokens)))

    def hf_prefix() -> dict:
        hf_cache = hf_prefill(model, [prefix_ids], device)
        return measured(lambda: hf_run(model, device, [ids], args.new_tokens, copy.deepcopy(hf_cache)))

    row["hf-prefix"] = guarded(device, hf_prefix)
    same = lambda a, b: row[a].get("tokens") == row[b].get("tokens") if "error" not in row[a] and "error" not in row[b] \
        else None  # noqa: E731
    row["same_tokens_cache_vs_recompute"] = same("cag-cache", "cag-recompute")
    row["same_tokens_cag_vs_hf"] = same("cag-recompute", "hf-full")
    return row


def batch_section(model, device, args, rng) -> dict:
    """Tokens/s for B questions decoded together on one shared prefix: cag.engines.torch.batch vs plain transformers."""
    import torch_direct as direct
    from cag.engines.torch import kvcompat

    n, q, new = args.batch_tokens, args.question_tokens, args.new_tokens
    prefix_ids = random_ids(model, n, rng)
    layers = direct.prefill(state(model), prefix_ids, chunk_size=args.chunk)
    attention = getattr(model.config, "_attn_implementation", None)
    rows = []
    try:
        for b in args.batches:
            questions = [random_ids(model, q, rng) for _ in range(b)]

            def one(b=b, questions=questions) -> dict:
                outs, cag_s = best_of(lambda: timed(device, lambda: direct.generate_batch(
                    state(model), layers, questions, max_new_tokens=new)), args.repeats)

                def plain():
                    def run():  # the prefix copied per row is part of what this recipe costs
                        cache = kvcompat.from_layers([(k.expand(b, -1, -1, -1).contiguous(),
                                                       v.expand(b, -1, -1, -1).contiguous()) for k, v in layers])
                        return hf_run(model, device, [prefix_ids + qs for qs in questions], new, cache)
                    (_, _, tokens), seconds = timed(device, run)
                    return tokens, seconds

                hf_tokens, hf_s = best_of(plain, args.repeats)
                return {"cag_s": cag_s, "hf_s": hf_s, "cag_tok_s": b * new / cag_s, "hf_tok_s": b * new / hf_s,
                        "same_tokens": sum(a == h for a, h in zip(outs, hf_tokens))}

            rows.append({"questions": b, "prefix_tokens": n, "new_tokens": new, **guarded(device, one)})
            free(device)
    finally:
        if attention is not None:  # cag.engines.torch.batch installs its own attention; later sections measure the model's
            kvcompat.set_attention(model, attention)
    return {"rows": rows}


def restore_section(model, device, dtype, args) -> dict:
    """GB/s from a cache file in the page cache: cag's verified restore vs safetensors vs host->device."""
    from safetensors.torch import load_file

    from cag.cache import checksum, kvfile, restore

    cfg = model.config
    n, heads = args.restore_tokens, cfg.num_key_value_heads
    dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    torch.manual_seed(1)
    layers = [(torch.randn(1, heads, n, dim, dtype=dtype, device=device),
               torch.randn(1, heads, n, dim, dtype=dtype, device=device)) for _ in range(cfg.num_hidden_layers)]
    nbytes = sum(k.numel() * k.element_size() * 2 for k, _ in layers)
    out = {"tokens": n, "bytes": nbytes, "threads": checksum.default_threads(), "cases": {}}
    methods = [kvfile.BLAKE3, kvfile.SHA256] if checksum.default_method() == kvfile.BLAKE3 else [kvfile.SHA256]
    if len(methods) == 1:
        out["note"] = "blake3 is not installed here: only SHA-256 files"
    host = [(k.to("cpu"), v.to("cpu")) for k, v in layers]
    del layers
    free(device)

    def measure(name: str, fn) -> None:
        times = []
        for _ in range(args.restore_repeats):
            got, seconds = timed(device, fn)
            del got
            free(device)
            times.append(seconds)
        out["cases"][name] = {"s": min(times), "first_s": times[0], "GB_s": nbytes / min(times) / 1e9}

    with tempfile.TemporaryDirectory(prefix="cag-gpu-bench-") as folder:
        for method in methods:
            path = Path(folder) / f"{method}.safetensors"
            kvfile.save(path, host, list(range(n)), {}, method=method)
            measure(f"cag verified ({method.split('-')[0]})", lambda: kvfile.load(path, device=device).layers)
        with restore.open_file(path) as source:
            lay = restore.layout(source, str(path))
            measure("read only (same threads, no hash, host)",
                    lambda: restore._fill(source, lay, str(path), None, torch.device("cpu"), frozenset(), None))
        if device.type == "cuda":
            measure("safetensors load_file (not verified)", lambda: load_file(str(path), device=str(device)))
        else:  # on the CPU load_file maps the file and reads nothing yet: copy its tensors to read every byte
            measure("safetensors load_file + copy (not verified)",
                    lambda: [t.clone() for t in load_file(str(path)).values()])
    if device.type == "cuda":
        pinned = [(k.pin_memory(), v.pin_memory()) for k, v in host]
        measure("pinned host -> device", lambda: [(k.to(device, non_blocking=True), v.to(device, non_blocking=True))
                                                  for k, v in pinned])
    else:
        measure("host memory copy", lambda: [(k.clone(), v.clone()) for k, v in host])
    return out


class FirstLogits:
    """The logits of the first forward whose input ends with `new_ids` (the first generated token's)."""

    def __init__(self, model, new_ids: list[int]):
        self.new_ids, self.logits = new_ids, None
        self.handle = model.register_forward_hook(self._hook, with_kwargs=True)

    def _hook(self, module, args, kwargs, output):
        ids = kwargs.get("input_ids", args[0] if args else None)
        if self.logits is None and ids is not None and ids.shape[-1] >= len(self.new_ids) \
                and ids[0, -len(self.new_ids):].tolist() == self.new_ids:
            self.logits = output.logits[0, -1].detach().clone()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def exact_section(model, device, args, rng) -> dict:
    """Cached (restored from its file) vs the piecewise reference, bit for bit; and vs one-shot generate."""
    from cag.cache import kvfile
    import torch_direct as direct
    from cag.engines.torch.workspace import Workspace
    from cag.kb.incremental import chunk_ends

    n, room = args.exact_tokens, args.question_tokens + args.new_tokens + 8
    prefix_ids = random_ids(model, n, rng)
    bounds = chunk_ends(0, n, args.chunk)
    with tempfile.TemporaryDirectory(prefix="cag-gpu-bench-") as folder:
        path = Path(folder) / "cache.safetensors"
        kvfile.save(path, direct.pieces(state(model), prefix_ids, bounds), prefix_ids, {"prefill_bounds": bounds})
        loaded = kvfile.load(path, device=device)
    ws = Workspace(loaded.layers, room=room)
    same_tokens = same_logits = same_hf = same_hf_logits = 0
    for _ in range(args.exact_questions):
        question = random_ids(model, args.question_tokens, rng)
        with FirstLogits(model, question) as cached:
            cached_ids = cag_run(model, device, question, ws, n, args.new_tokens)[2]
        reference = Workspace(direct.pieces(state(model), prefix_ids, bounds), room=room)
        with FirstLogits(model, question) as ref:
            ref_ids = cag_run(model, device, question, reference, n, args.new_tokens)[2]
        del reference
        with FirstLogits(model, question) as one_shot:
            hf_ids = hf_run(model, device, [prefix_ids + question], args.new_tokens)[2][0]
        same_tokens += cached_ids == ref_ids
        same_logits += _equal(cached.logits, ref.logits)
        same_hf += cached_ids == hf_ids
        same_hf_logits += _equal(cached.logits, one_shot.logits)
    return {"prefix_tokens": n, "pieces": len(bounds), "questions": args.exact_questions,
            "new_tokens": args.new_tokens, "cached_eq_reference_tokens": same_tokens,
            "cached_eq_reference_logits_bits": same_logits, "cached_eq_hf_one_shot_tokens": same_hf,
            "cached_eq_hf_one_shot_logits_bits": same_hf_logits}


def _equal(a: torch.Tensor | None, b: torch.Tensor | None) -> bool:
    return a is not None and b is not None and torch.equal(a, b)


# -- the run ----------------------------------------------------------------------------------------------

class Run:
    """Sections that cannot take the run down: each error is recorded; past the budget, sections are skipped."""

    def __init__(self, device: torch.device, deadline: float, result: dict, out: Path | None, name: str):
        self.device, self.deadline, self.result, self.out, self.name = device, deadline, result, out, name
        self.path: Path | None = None

    def section(self, key: str, fn, *args, estimate_s: float = 0.0):
        if time.perf_counter() + estimate_s > self.deadline:
            got = {"skipped": f"time budget (--budget-s): would end after it (estimate {estimate_s:.0f} s)"
                   if estimate_s else "time budget (--budget-s) spent"}
        else:
            start = time.perf_counter()
            try:
                got = fn(*args)
            except Exception as err:  # noqa: BLE001 - recorded, and the next section still runs
                traceback.print_exc(file=sys.stderr)
                got = {"error": f"{type(err).__name__}: {(str(err).splitlines() or [''])[0][:200]}"}
            got["section_s"] = time.perf_counter() - start
            free(self.device)
        self.result.setdefault("sections", {})[key] = got
        self.path = common.write_results(self.name, self.result, self.out)  # after each section: nothing is lost
        print(f"[{key}] {_brief(got)}", file=sys.stderr, flush=True)
        return got


def _brief(got: dict) -> str:
    return got.get("error") or got.get("skipped") or f"done in {got.get('section_s', 0):.1f} s"


def main(argv=None) -> None:
    started = time.perf_counter()
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--small", action="store_true", help="tiny Llama config on the CPU (float32), for CI")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default=None,
                    help="weights and KV (default: float32 small, bfloat16 on CUDA)")
    ap.add_argument("--sizes", default=None, help="knowledge sizes in tokens (default 2048,8192,32768,65536; small: 256,512,1024)")
    ap.add_argument("--new-tokens", type=int, default=None, help="tokens to decode per question (default 32; small 16)")
    ap.add_argument("--question-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2, help="best of this many runs (a run over 5 s is not repeated)")
    ap.add_argument("--chunk", type=int, default=None, help="prefill chunk size (default 4096 on CUDA, 128 small)")
    ap.add_argument("--batches", default="1,8,32", help="questions decoded together in the batch section")
    ap.add_argument("--batch-tokens", type=int, default=None, help="shared prefix of the batch section (default 2048; small 256)")
    ap.add_argument("--restore-tokens", type=int, default=None,
                    help="cache size of the restore section in tokens (default 32768: 4 GiB for the 8B shape; small 4096)")
    ap.add_argument("--restore-repeats", type=int, default=3)
    ap.add_argument("--exact-tokens", type=int, default=None, help="prefix of the exactness section (default 2048; small 384)")
    ap.add_argument("--exact-questions", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=None,
                    help="skip a section that would end after this many seconds from the start (a knowledge size "
                         "is estimated from the one before; default 270 on CUDA, unlimited small)")
    ap.add_argument("--sections", default="exact,restore,batch,ttft", help="which sections to run, in this order")
    args = ap.parse_args(argv)
    small = args.small
    args.sizes = [int(s) for s in (args.sizes or ("256,512,1024" if small else "2048,8192,32768,65536")).split(",")]
    args.batches = [int(b) for b in args.batches.split(",")]
    for name, default_small, default_gpu in (("new_tokens", 16, 32), ("chunk", 128, 4096), ("batch_tokens", 256, 2048),
                                             ("restore_tokens", 4096, 32768), ("exact_tokens", 384, 2048)):
        if getattr(args, name) is None:
            setattr(args, name, default_small if small else default_gpu)
    budget = args.budget_s if args.budget_s is not None else (float("inf") if small else 270.0)
    if small:
        device, dtype, shape = torch.device("cpu"), torch.float32, SMALL
    else:
        if not torch.cuda.is_available():
            sys.exit("error: no CUDA device; run with --small for the CPU configuration")
        device, dtype, shape = torch.device("cuda"), torch.bfloat16, LLAMA_8B
    dtype = getattr(torch, args.dtype) if args.dtype else dtype
    from transformers.utils import logging as hf_logging

    import cag

    hf_logging.set_verbosity_error()
    out = Path(os.environ["OUT"]) / "gpu.json" if os.environ.get("OUT") else None
    if out:
        out.parent.mkdir(parents=True, exist_ok=True)
    model, build_model_s = timed(device, lambda: make_model(shape, device, dtype))
    result = {"machine": common.machine(), "cag_from": str(Path(cag.__file__).resolve().parent), "small": small,
              "device": str(device), "dtype": str(dtype), "shape": shape,
              "params": sum(p.numel() for p in model.parameters()), "build_model_s": build_model_s,
              "args": {k: v for k, v in vars(args).items()}}
    run = Run(device, started + budget, result, out, "gpu-small" if small else "gpu")
    rng = torch.Generator().manual_seed(0)
    warm = argparse.Namespace(**{**vars(args), "repeats": 1})
    run.section("warm-up", ttft_size, model, device, min(args.sizes), warm, rng)  # first-call costs, not measured
    for key in args.sections.split(","):
        if key == "exact":
            run.section("exact", exact_section, model, device, args, rng)
        elif key == "restore":
            run.section("restore", restore_section, model, device, dtype, args)
        elif key == "batch":
            run.section("batch", batch_section, model, device, args, rng)
        elif key == "ttft":
            last = None  # (tokens, seconds) of the size before: the next one costs about (ratio)^1.5 as much
            for n in args.sizes:
                estimate = last[1] * (n / last[0]) ** 1.5 if last else 0.0
                got = run.section(f"ttft-{n}", ttft_size, model, device, n, args, rng, estimate_s=estimate)
                last = (n, got["section_s"]) if "section_s" in got else last
    print(f"results: {run.path}")
    print(f"\n{result['device']} {result['dtype']}, {result['params'] / 1e6:.1f}M params "
          f"({'small CPU config' if small else 'Llama-3.1-8B shape'}), random weights, {args.question_tokens} "
          f"question tokens, {args.new_tokens} decoded; best of {args.repeats}; cag from {result['cag_from']}")
    print(common.table(table_rows(result, args), ("section", "case", "cag", "plain transformers / baseline", "gain")))


def table_rows(result: dict, args) -> list[tuple]:
    """Every section's rows for the one table (errors and skips included)."""
    rows = []
    for key, got in result.get("sections", {}).items():
        if key == "warm-up":
            continue
        if "error" in got or "skipped" in got:
            rows.append((key, "-", "ERROR: " + got["error"] if "error" in got else "skipped: " + got["skipped"], "-", "-"))
        elif key == "exact":
            q = got["questions"]
            rows.append(("exact", f"{q} q on {got['prefix_tokens']} tok, {got['pieces']} pieces",
                         f"cached == reference: tokens {got['cached_eq_reference_tokens']}/{q}, "
                         f"first logits bits {got['cached_eq_reference_logits_bits']}/{q}",
                         f"one-shot generate: same tokens {got['cached_eq_hf_one_shot_tokens']}/{q}, first logits "
                         f"bits {got['cached_eq_hf_one_shot_logits_bits']}/{q}", "-"))
        elif key == "restore":
            cases = got["cases"]
            verified = [c for c in cases if c.startswith("cag verified")]
            load = next((v for c, v in cases.items() if c.startswith("safetensors")), None)
            others = ", ".join(f"{c} {v['GB_s']:.2f}" for c, v in cases.items() if not c.startswith("cag verified"))
            for c in verified:
                rows.append(("restore GB/s", f"{got['bytes'] / 1e6:.0f} MB, {c.split('(')[1][:-1]}, "
                             f"{got['threads']} threads", f"{cases[c]['GB_s']:.2f} (verified)", others,
                             f"{cases[c]['GB_s'] / load['GB_s']:.2f}x load_file" if load else "-"))
        elif key == "batch":
            for r in got["rows"]:
                case = f"{r['questions']} q on {r['prefix_tokens']} tok"
                if "error" in r:
                    rows.append(("batch tok/s", case, "ERROR: " + r["error"], "-", "-"))
                    continue
                rows.append(("batch tok/s", case, f"{r['cag_tok_s']:.1f}",
                             f"{r['hf_tok_s']:.1f} (prefix copied per row); same tokens {r['same_tokens']}/{r['questions']}",
                             f"{r['cag_tok_s'] / r['hf_tok_s']:.2f}x"))
        elif key.startswith("ttft-"):
            n = got["tokens"]
            cache, full, pre, rec = (got[k] for k in ("cag-cache", "hf-full", "hf-prefix", "cag-recompute"))
            ms = lambda r: f"{r['ttft_s'] * 1000:.1f}" if "error" not in r else "ERROR"  # noqa: E731
            tps = lambda r: f"{r['decode_tok_s']:.1f}" if "error" not in r else "ERROR"  # noqa: E731
            ratio = lambda a, b, key: f"{a[key] / b[key]:.2f}x" if "error" not in a and "error" not in b else "-"  # noqa: E731
            rows.append(("TTFT ms", f"{n} tok", f"{ms(cache)} (cache)",
                         f"full {ms(full)}, prefix reuse {ms(pre)}; cag full prompt {ms(rec)}",
                         f"{ratio(full, cache, 'ttft_s')}, {ratio(pre, cache, 'ttft_s')}"))
            rows.append(("decode tok/s", f"{n} tok", tps(cache), f"{tps(full)} (full), {tps(pre)} (prefix reuse)",
                         ratio(cache, full, "decode_tok_s")))
            same = {True: "yes", False: "NO", None: "-"}[got["same_tokens_cache_vs_recompute"]]
            rows.append(("prefill", f"{n} tok", f"{got['prefill_s']:.2f} s ({got['prefill_tok_s']:.0f} tok/s)",
                         f"KV {got['kv_bytes'] / 1e6:.0f} MB; same tokens cache/full prompt: {same}", "-"))
            errors = [f"{k}: {got[k]['error']}" for k in ("cag-cache", "cag-recompute", "hf-full", "hf-prefix")
                      if "error" in got[k]]
            if errors:
                rows.append(("TTFT ms", f"{n} tok", "ERROR: " + "; ".join(errors), "-", "-"))
    return rows


if __name__ == "__main__":
    main()
