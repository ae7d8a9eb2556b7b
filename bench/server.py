"""Server benchmark: many concurrent streaming clients on one knowledge base, continuous batching on vs off,
against a real `cag serve` process on loopback (the response cache is off: every request runs the model).

    .venv/bin/python bench/server.py [--tiny] [--clients 32] [--rounds 1] [--max-tokens 32] [--off-workers 4]
                                     [--gguf PATH] [--modes on off llama-server llama-server-best]

Each client sends `rounds` streamed chat requests one after another (all clients start together); the
sample questions are spread over the clients. Reported per mode: requests, errors, aggregate generated
tokens/s (all clients' tokens over the wall time), time to first token p50/p95 and request latency p50, as
the clients measure them. "on" is `cag serve` with continuous batching (max_batch = clients); "off" decodes
each answer on its own in `--off-workers` threads (the server's default 4 unless given). Every answer is
also checked against the other mode's answer to the same question (greedy: they must be equal).

--tiny uses a 2-layer random-weight model (seconds, for CI); the default model gives the recorded numbers.
The knowledge base is the sample KB, created through the server's own POST /v1/kbs.

The peer: with --gguf, `cag serve` answers with that GGUF (the llama.cpp engine), and the modes
"llama-server" (llama.cpp's own server from the prebuilt `xllamacpp` wheel, requirements/bench.txt: its
defaults, one slot per client) and "llama-server-best" (its options for this workload: one KV cache shared
by the slots, the prompt cache in RAM) answer from the same file, with the knowledge as the system message
and the same threads, clients and questions. Each mode also reports its first answer after start: from
starting the server (its process for cag, with the knowledge base's cache already on disk; the embedded
server for llama-server) to the end of its first answer, the restart a user waits through.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def start_server(home: Path, scratch: Path, model: str | None, settings: dict) -> tuple[subprocess.Popen, str]:
    sys.path.insert(0, str(common.ROOT / "tests"))
    from serverutil import free_port

    port = free_port()
    config = scratch / "server.json"
    config.write_text(json.dumps({"model": model, "response_cache": False, "max_tokens_limit": 4096, **settings}))
    env = {**os.environ, "CAG_HOME": str(home), "CAG_API_KEYS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "cag", "serve", "--port", str(port), "--config", str(config),
                             "--log-level", "warning"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def one_request(url: str, question: str, max_tokens: int, system: str | None = None) -> tuple[float, float, int, str]:
    """(ttft_s, total_s, generated tokens, text) for one streamed completion, measured by the client; `system`:
    a system message before the question (llama-server's knowledge; cag has it cached)."""
    start, first, usage, text = time.perf_counter(), None, None, ""
    messages = [{"role": "user", "content": question}]
    if system is not None:
        messages.insert(0, {"role": "system", "content": system})
    body = {"model": "bench", "stream": True, "max_tokens": max_tokens, "stream_options": {"include_usage": True},
            "messages": messages, "temperature": 0}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=3600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                usage = event["usage"]
            elif event["choices"] and (piece := event["choices"][0]["delta"].get("content")):
                text += piece
                if first is None:
                    first = time.perf_counter() - start
    total = time.perf_counter() - start
    return (first if first is not None else total), total, usage["completion_tokens"], text


def run_mode(url: str, clients: int, rounds: int, questions: list[str], max_tokens: int,
             system: str | None = None) -> dict:
    results, errors, lock = [], [], threading.Lock()
    start_line = threading.Barrier(clients)

    def client(c: int) -> None:
        start_line.wait()
        for r in range(rounds):
            q = questions[(c + r * clients) % len(questions)]
            try:
                got = one_request(url, q, max_tokens, system)
                with lock:
                    results.append((q, *got))
            except Exception as err:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(err))

    start = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts, totals = sorted(r[1] for r in results), [r[2] for r in results]
    return {"requests": len(results), "errors": len(errors), "error_samples": errors[:3], "wall_s": wall,
            "tokens": sum(r[3] for r in results), "tokens_per_s": sum(r[3] for r in results) / wall,
            "ttft_p50_s": _percentile(ttfts, 50), "ttft_p95_s": _percentile(ttfts, 95),
            "latency_p50_s": common.median(totals), "answers": {r[0]: r[4] for r in results}}


def _percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    xs = sorted(xs)
    return xs[min(len(xs) - 1, max(0, round(p / 100 * len(xs) + 0.5) - 1))]  # nearest rank


LLAMA_SERVER = ("llama-server", "llama-server-best")


def start_llama_server(gguf: Path, clients: int, threads: int, best: bool):
    """llama.cpp's own server (xllamacpp embeds it) on `gguf`: (server, url). Each slot holds the whole
    knowledge; `best` shares one KV cache between the slots and keeps prompts in RAM."""
    import xllamacpp as xl

    params = xl.CommonParams()
    params.model.path = str(gguf)
    params.n_parallel = clients
    params.n_ctx = clients * 2560  # per slot: the 1.5k-token knowledge, a question and the answer
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = threads
    params.cache_prompt = True
    if best:
        params.kv_unified = True
        params.cache_ram_mib = 2048
    server = xl.Server(params)
    url = server.listening_address.rstrip("/")
    return server, url if url.startswith("http") else "http://" + url


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="2-layer random-weight model (fast, numbers meaningless)")
    ap.add_argument("--clients", type=int, default=32, help="concurrent streaming clients")
    ap.add_argument("--rounds", type=int, default=1, help="requests per client, one after another")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--off-workers", type=int, default=4, help="generation threads without continuous batching")
    ap.add_argument("--modes", nargs="+", default=["on", "off"], choices=["on", "off", *LLAMA_SERVER])
    ap.add_argument("--gguf", type=Path, default=None, help="cag serve's model, and llama-server's")
    ap.add_argument("--threads", type=int, default=2, help="llama-server's threads (cag takes the idle cores)")
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    if any(m in LLAMA_SERVER for m in args.modes) and args.gguf is None:
        raise SystemExit("the llama-server modes need --gguf (the same file for both servers)")
    questions = [q["q"] for q in common.sample_questions()]
    settings = {"on": {"continuous_batching": True, "max_batch": args.clients, "workers": args.clients},
                "off": {"continuous_batching": False, "workers": args.off_workers},
                "llama-server": {"workers": args.clients}, "llama-server-best": {"workers": args.clients}}
    modes, kb_tokens, first_answer = {}, None, {}
    with tempfile.TemporaryDirectory(prefix="cag-bench-server-") as tmp:
        home = Path(os.environ.get("CAG_HOME") or tmp) if not args.tiny else Path(tmp)
        model = str(args.gguf) if args.gguf else None
        if args.tiny:
            sys.path.insert(0, str(common.ROOT / "tests"))
            from conftest import make_tiny_model

            model = str(make_tiny_model(Path(tmp) / "tiny-model", context=16384))  # the sample KB fits
        docs = [{"name": p.name, "text": p.read_text()} for p in sorted(common.SAMPLE_DOCS.iterdir())]
        knowledge = ("Answer the question from these documents.\n\n# Documents\n"
                     + "\n\n".join(f"## {d['name']}\n{d['text']}" for d in docs))
        scratch = Path(tmp) / "setup"
        scratch.mkdir()
        proc, url = start_server(home, scratch, model, settings["on"])  # the knowledge base, built once
        try:
            httpx.delete(url + "/v1/kbs/bench", timeout=60)
            r = httpx.post(url + "/v1/kbs", json={"name": "bench", "documents": docs}, timeout=600)
            if r.status_code != 201:
                raise SystemExit(f"creating the knowledge base failed: {r.text}")
            kb_tokens = r.json()["tokens"]
        finally:
            proc.terminate()
            proc.wait(30)
        for mode in args.modes:
            scratch = Path(tmp) / mode
            scratch.mkdir()
            started = time.perf_counter()
            system = knowledge if mode in LLAMA_SERVER else None
            if system is not None:
                server, url = start_llama_server(args.gguf, args.clients, args.threads, mode.endswith("best"))
                stop = lambda: None  # noqa: E731 - the embedded server stops when it is dropped (below)
            else:
                proc, url = start_server(home, scratch, model, settings[mode])
                stop = lambda proc=proc: (proc.terminate(), proc.wait(30))  # noqa: E731
            try:
                one_request(url, questions[0], 4, system)  # warm-up: loads the knowledge (base), builds the kernels
                first_answer[mode] = time.perf_counter() - started
                modes[mode] = run_mode(url, args.clients, args.rounds, questions, args.max_tokens, system)
            finally:
                stop()
                server = None
    same = None
    if "on" in modes and "off" in modes:
        a, b = modes["on"]["answers"], modes["off"]["answers"]
        same = sum(a[q] == b[q] for q in a if q in b), len(set(a) & set(b))
    rows = [(mode, settings[mode].get("max_batch", "-"), settings[mode]["workers"], m["requests"], m["errors"],
             f"{m['tokens_per_s']:.1f}", f"{m['ttft_p50_s'] * 1000:.0f}", f"{m['ttft_p95_s'] * 1000:.0f}",
             f"{m['latency_p50_s']:.2f}", f"{m['wall_s']:.1f}", f"{first_answer[mode]:.2f}")
            for mode, m in modes.items()]
    name = "tiny random" if args.tiny else (args.gguf.name if args.gguf else "SmolLM2-135M-Instruct")
    print(f"model: {name}, KB {kb_tokens} tokens, {args.clients} concurrent streaming clients x {args.rounds}, "
          f"max_tokens {args.max_tokens}, response cache off")
    print(common.table(rows, ("mode", "max_batch", "workers", "requests", "errors", "gen tok/s", "TTFT p50 ms",
                              "TTFT p95 ms", "latency p50 s", "wall s", "first answer s")))
    if same is not None:
        print(f"answers equal in both modes: {same[0]}/{same[1]} questions")
    for mode in modes:
        modes[mode]["first_answer_s"] = first_answer[mode]
    data = {"bench": "server", "tiny": args.tiny, "model": name, "kb_tokens": kb_tokens, "clients": args.clients,
            "rounds": args.rounds, "max_tokens": args.max_tokens, "settings": settings,
            "modes": {mode: {k: v for k, v in m.items() if k != "answers"} for mode, m in modes.items()},
            "answers_equal": same and {"equal": same[0], "compared": same[1]}, "machine": common.machine()}
    path = common.write_results("server-tiny" if args.tiny else "server", data, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
