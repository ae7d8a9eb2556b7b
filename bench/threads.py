"""Threads under load: the default thread count against fixed ones, on a quiet machine and with other work
keeping every core busy (busy-loop processes this script starts and stops).

    .venv/bin/python bench/threads.py [--engines torch,gguf] [--questions 3] [--tokens 32] [--rounds 2]

Each (engine, threads, load) runs in a process of its own: it loads the default model (SmolLM2-135M-Instruct;
torch, or its Q4_1 GGUF through llama.cpp) with `threads` (None: the default, which takes the cores other work
leaves idle at each step, cag.engines.cores), builds the sample knowledge base and times `ask` on the first
--questions sample questions, greedy, --tokens tokens each (median of --rounds rounds). The quiet default is
compared with the fixed thread count that was the default before (every core; goal: within 5 %), the loaded
default with the best fixed count under the same load (goal: within 1.3x). Prints a table and writes
bench/results/threads.json.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

WORKER = r"""
import json, os, statistics, sys, time
sys.path.insert(0, {bench!r})
import common
import cag
from cag import engines
engine, threads, n, tokens, rounds = {engine!r}, {threads!r}, {n!r}, {tokens!r}, {rounds!r}
spec = None if engine == "torch" else str(__import__("cag.engines.torch.models", fromlist=["x"]).default_gguf_path())
lm = engines.load(spec, threads=threads, log=lambda m: None)
kb = cag.build([str(common.SAMPLE_DOCS)], name="threads-" + engine, model=spec, lm=lm, log=lambda m: None)
qs = [q["q"] for q in common.sample_questions()[:n]]
kb.ask(qs[0], max_new_tokens=4, sources=0)  # warm
times, answers = [], None
for _ in range(rounds):
    start = time.perf_counter()
    got = [kb.ask(q, max_new_tokens=tokens, sources=0) for q in qs]
    times.append(time.perf_counter() - start)
    answers = [a.answer for a in got]
print(json.dumps({{"seconds": statistics.median(times), "answers": answers}}))
"""


def spin() -> None:
    while True:
        pass


def run(engine: str, threads: int | None, args, home: Path) -> dict:
    code = WORKER.format(bench=str(Path(__file__).resolve().parent), engine=engine, threads=threads,
                         n=args.questions, tokens=args.tokens, rounds=args.rounds)
    env = {**os.environ, "CAG_HOME": str(home)}
    env.pop("CAG_THREADS", None)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=3600)
    if proc.returncode != 0:
        raise SystemExit(f"{engine} threads={threads} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--engines", default="torch,gguf")
    ap.add_argument("--questions", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--rounds", type=int, default=2)
    args = ap.parse_args()
    cores = len(os.sched_getaffinity(0))
    counts = sorted({1, max(1, cores // 2), cores})
    home = Path(os.environ.get("TMPDIR", "/tmp")) / "cag-bench-threads"
    flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("flags")), [])
    simd = [f for f in flags if f in ("avx2", "fma", "f16c", "avx512f", "avx512_vnni", "avx_vnni")]
    rows, results = [], {"machine": {**common.machine(), "simd": simd}, "cores": cores, "runs": []}
    for engine in args.engines.split(","):
        for load in ("quiet", "busy"):
            spinners = [multiprocessing.Process(target=spin, daemon=True) for _ in range(cores if load == "busy" else 0)]
            for p in spinners:
                p.start()
            time.sleep(1.0 if spinners else 0)
            try:
                got = {t: run(engine, t, args, home) for t in [None, *counts]}
            finally:
                for p in spinners:
                    p.terminate()
            best = min(got[t]["seconds"] for t in counts)
            same = all(got[t]["answers"] == got[None]["answers"] for t in counts)
            for t in [None, *counts]:
                s = got[t]["seconds"]
                rows.append((engine, load, "default" if t is None else str(t), f"{s:.2f}", f"{s / best:.2f}x"))
            results["runs"].append({"engine": engine, "load": load, "seconds": {str(t): got[t]["seconds"] for t in got},
                                    "best_fixed_s": best, "before_default_s": got[cores]["seconds"],
                                    "answers_same_for_every_count": same})
            rows.append(("", "", "answers same", str(same), ""))
    print(common.table(rows, ("engine", "load", "threads", "seconds", "vs best fixed")))
    print(f"\n{results['machine']}")
    print(f"wrote {common.write_results('threads', results)}")


if __name__ == "__main__":
    main()
