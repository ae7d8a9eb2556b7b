"""Server benchmark: requests/s and time to first token at 1, 4 and 8 concurrent streaming clients,
against a real `cag serve` process on loopback (the response cache is off: every request runs the model).

    .venv/bin/python bench/server.py [--tiny] [--requests 16] [--max-tokens 32] [--clients 1 4 8]

--tiny uses a 2-layer random-weight model (seconds, for CI); the default model gives the recorded numbers.
The knowledge base is the sample KB, created through the server's own POST /v1/kbs.
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


def start_server(home: Path, scratch: Path, model: str | None, workers: int) -> tuple[subprocess.Popen, str]:
    sys.path.insert(0, str(common.ROOT / "tests"))
    from serverutil import free_port

    port = free_port()
    config = scratch / "server.json"
    config.write_text(json.dumps({"model": model, "response_cache": False, "workers": workers,
                                  "max_tokens_limit": 4096}))
    env = {**os.environ, "CAG_HOME": str(home), "CAG_API_KEYS": ""}
    proc = subprocess.Popen([sys.executable, "-m", "cag", "serve", "--port", str(port), "--config", str(config)],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(1200):
        try:
            if httpx.get(url + "/healthz").status_code == 200:
                return proc, url
        except httpx.TransportError:
            time.sleep(0.1)
    proc.kill()
    raise SystemExit("the server did not start within 120 s")


def one_request(url: str, question: str, max_tokens: int) -> tuple[float, float, int]:
    """(ttft_s, total_s, generated tokens) for one streamed completion, measured by the client."""
    start, first, usage = time.perf_counter(), None, None
    body = {"model": "bench", "stream": True, "max_tokens": max_tokens, "stream_options": {"include_usage": True},
            "messages": [{"role": "user", "content": question}]}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: {"):
                continue
            event = json.loads(line[6:])
            if "error" in event:
                raise RuntimeError(event["error"]["message"])
            if event.get("usage"):
                usage = event["usage"]
            elif first is None and event["choices"] and event["choices"][0]["delta"].get("content"):
                first = time.perf_counter() - start
    total = time.perf_counter() - start
    return (first if first is not None else total), total, usage["completion_tokens"]


def run_level(url: str, clients: int, questions: list[str], requests: int, max_tokens: int) -> dict:
    results, errors, lock = [], [], threading.Lock()
    todo = iter(range(requests))

    def worker() -> None:
        while True:
            with lock:
                i = next(todo, None)
            if i is None:
                return
            try:
                r = one_request(url, questions[i % len(questions)], max_tokens)
                with lock:
                    results.append(r)
            except Exception as err:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(repr(err))

    start = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - start
    ttfts, totals = [r[0] for r in results], [r[1] for r in results]
    return {"clients": clients, "requests": len(results), "errors": len(errors), "error_samples": errors[:3],
            "wall_s": wall, "requests_per_s": len(results) / wall,
            "tokens_per_s": sum(r[2] for r in results) / wall,
            "ttft_median_s": common.median(ttfts), "ttft_max_s": max(ttfts, default=float("nan")),
            "latency_median_s": common.median(totals)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true", help="2-layer random-weight model (fast, numbers meaningless)")
    ap.add_argument("--requests", type=int, default=16, help="requests per concurrency level")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--clients", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    questions = [q["q"] for q in common.sample_questions()]
    with tempfile.TemporaryDirectory(prefix="cag-bench-server-") as tmp:
        home = Path(os.environ.get("CAG_HOME") or tmp) if not args.tiny else Path(tmp)
        model = None
        if args.tiny:
            sys.path.insert(0, str(common.ROOT / "tests"))
            from conftest import make_tiny_model

            model = str(make_tiny_model(Path(tmp) / "tiny-model", context=16384))  # the sample KB fits
        proc, url = start_server(home, Path(tmp), model, workers=max(args.clients))
        try:
            docs = [{"name": p.name, "text": p.read_text()} for p in sorted(common.SAMPLE_DOCS.iterdir())]
            httpx.delete(url + "/v1/kbs/bench", timeout=60)
            r = httpx.post(url + "/v1/kbs", json={"name": "bench", "documents": docs}, timeout=600)
            if r.status_code != 201:
                raise SystemExit(f"creating the knowledge base failed: {r.text}")
            kb_tokens = r.json()["tokens"]
            one_request(url, questions[0], 4)  # warm-up
            levels = [run_level(url, c, questions, args.requests, args.max_tokens) for c in args.clients]
            metrics = httpx.get(url + "/metrics").text
            httpx.delete(url + "/v1/kbs/bench", timeout=60)
        finally:
            proc.terminate()
            proc.wait(30)
    rows = [(lv["clients"], lv["requests"], lv["errors"], f"{lv['requests_per_s']:.2f}", f"{lv['tokens_per_s']:.1f}",
             f"{lv['ttft_median_s'] * 1000:.0f}", f"{lv['ttft_max_s'] * 1000:.0f}", f"{lv['latency_median_s']:.2f}")
            for lv in levels]
    print(f"model: {'tiny random' if args.tiny else 'SmolLM2-135M-Instruct'}, KB {kb_tokens} tokens, "
          f"max_tokens {args.max_tokens}, streaming, response cache off")
    print(common.table(rows, ("clients", "requests", "errors", "req/s", "gen tok/s", "TTFT med ms",
                              "TTFT max ms", "latency med s")))
    saved = [line for line in metrics.splitlines() if line.startswith("cag_tokens_saved_total")]
    data = {"bench": "server", "tiny": args.tiny, "kb_tokens": kb_tokens, "max_tokens": args.max_tokens,
            "levels": levels, "tokens_saved_metric": saved, "machine": common.machine()}
    path = common.write_results("server-tiny" if args.tiny else "server", data, args.out)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
