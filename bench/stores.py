"""Stores benchmark: how long it takes to get a prefix KV from each cache tier vs recomputing its prefill.

    .venv/bin/python bench/stores.py [--tokens 2000] [--repeat 3] [--large]

For the default model (and, with --large, a bigger random-weight Llama config) it prefills a padded
sample knowledge base once, writes the cache to every tier and times `get` from each: memory (same
device: a lookup, no bytes move), host (CPU RAM: a lookup on a CPU-only machine, a host-to-device copy
under CUDA), disk (kvfile: read + sha256 checksum), redis (a redis-server this script starts on loopback:
fetch + verify through the same file format). Bandwidth is cache bytes / load time where bytes move. Prints a table and writes
bench/results/stores.json.
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

import torch_direct as direct
from cag.engines.torch import models  # noqa: E402
from cag.cache import kvfile  # noqa: E402
from cag.kb.prompt import PromptBuilder  # noqa: E402
from cag.kb.knowledge import load as load_docs  # noqa: E402
from cag.cache.stores import DiskStore, Entry, HostStore, MemoryStore  # noqa: E402


def start_redis(folder: Path):
    exe = shutil.which("redis-server")
    if exe is None:
        return None, None
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                             "--dir", str(folder)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    for _ in range(100):
        try:
            redis.Redis(port=port).ping()
            return proc, f"redis://127.0.0.1:{port}/0"
        except redis.ConnectionError:
            time.sleep(0.05)
    proc.kill()
    return None, None


def large_model(folder: Path, tokenizer_from: Path) -> Path:
    """A random-weight Llama bigger than SmolLM2-135M's KV per token (16 layers x 8 KV heads x 64), same tokenizer."""
    import torch
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tokenizer_from)
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=512, intermediate_size=1408, num_hidden_layers=16,
                         num_attention_heads=8, num_key_value_heads=8, max_position_embeddings=8192,
                         eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id, tie_word_embeddings=True)
    LlamaForCausalLM(config).eval().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def bench_model(label: str, lm, docs_dir: Path, redis_url: str | None, repeat: int) -> list[dict]:
    builder = PromptBuilder(lm.codec, load_docs([docs_dir]))
    ids = builder.prefix_ids()
    prefill = []
    for _ in range(repeat):
        layers, s = common.timed(direct.prefill, lm, ids)
        prefill.append(s)
    meta = {"name": "bench", "model": label, "sources": [str(docs_dir)], "instruction": builder.instruction,
            "reserve": 0}  # the settings every build records: a tier reads a record with less as damaged
    entry = Entry("bench", layers, ids, {}, meta, [])
    nbytes = entry.nbytes
    rows = [{"model": label, "tier": "recompute (prefill)", "tokens": len(ids), "bytes": nbytes,
             "load_s": common.median(prefill)}]
    tiers = [MemoryStore(nbytes * 2), HostStore(nbytes * 2), DiskStore()]
    if redis_url:
        from cag.cache.stores.redis import RedisStore

        tiers.append(RedisStore(redis_url))
    for tier in tiers:
        tier.put(entry)
        times = []
        for _ in range(repeat):
            got, seconds = common.timed(tier.get, "bench", kvfile.Expect(), lm.device)
            times.append(seconds)
        kept = getattr(tier, "entries", {}).get("bench")  # memory tiers: did get hand out the kept tensors?
        copied = kept is None or got.layers[0][0].data_ptr() != kept.layers[0][0].data_ptr()
        rows.append({"model": label, "tier": tier.name, "tokens": len(ids), "bytes": nbytes,
                     "load_s": common.median(times), "copies": copied})
        tier.drop("bench")
    for r in rows:
        r["GB_per_s"] = r["bytes"] / r["load_s"] / 1e9 if r.get("copies") else None  # a lookup moves no bytes
        r["x_faster_than_prefill"] = rows[0]["load_s"] / r["load_s"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=2000)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--large", action="store_true", help="also a bigger random-weight Llama config")
    args = ap.parse_args()
    work = Path(tempfile.mkdtemp(prefix="cag-bench-stores-"))
    lm = models.load(None, device="cpu", dtype="float32")
    docs_dir = common.padded_knowledge(work / "docs", lm.tokenizer, args.tokens)
    os.environ["CAG_HOME"] = str(work / "home")  # disk tier writes here (the model was loaded already)
    redis_proc, url = start_redis(work)
    try:
        rows = bench_model("SmolLM2-135M", lm, docs_dir, url, args.repeat)
        if args.large:
            big = models.load(str(large_model(work / "large", lm.path)), device="cpu", dtype="float32")
            rows += bench_model("random Llama 16L/8KV/512d", big, docs_dir, url, args.repeat)
    finally:
        if redis_proc:
            redis_proc.terminate()
        shutil.rmtree(work, ignore_errors=True)
    print(common.table([(r["model"], r["tier"], r["tokens"], f"{r['bytes'] / 1e6:.1f} MB", f"{r['load_s'] * 1000:.3f} ms",
                         f"{r['GB_per_s']:.2f}" if r["GB_per_s"] else "no copy" if "copies" in r else "-",
                         f"{r['x_faster_than_prefill']:.0f}x")
                        for r in rows],
                       ("model", "tier", "tokens", "cache", "load", "GB/s", "vs prefill")))
    load = os.getloadavg()[0]
    print(f"load average during the run: {load:.1f} on {os.cpu_count()} CPUs (other jobs slow the prefill rows)")
    path = common.write_results("stores", {"machine": common.machine(), "args": vars(args), "rows": rows,
                                           "redis": bool(url), "load_average_1min": load})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
