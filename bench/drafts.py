"""Drafts from the knowledge: one answer at a time, cag with and without them, against llama-server.

    .venv/bin/python bench/drafts.py [--threads 2] [--max-tokens 64] [--questions 20] [--no-peer]
                                     [--gguf PATH --out bench/results/drafts-NAME.json]

The sample knowledge base and questions, greedy, answered one at a time after a warm-up question:
- cag in process (KnowledgeBase.ask), the default model on the transformers engine and its Q4_1 GGUF on
  the llama.cpp engine (with --gguf: that GGUF on the llama.cpp engine only), with drafts (the default) and without (--no-draft); every drafted answer is
  compared token for token with the undrafted one;
- llama-server (llama.cpp's own server, from the prebuilt `xllamacpp` wheel: pip install xllamacpp),
  same GGUF and threads, the knowledge as the system message and its prompt cache on: in its default
  configuration, and with its own n-gram speculative decoding (ngram-simple, drafts from the prompt and
  answer) as its best option for this workload.
Per question: wall seconds, time to first token (llama-server: its prompt time) and decode tokens/s
(tokens after the first over the time after it; llama-server: its own predicted_per_second). Answers
differ in length between the two (cag ends at its prompt layout's endings, llama-server at end of turn or
--max-tokens): compare decode tokens/s, and per-question time with the tokens beside it.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402


def cag_rows(model: str | None, label: str, questions: list[str], args) -> list[dict]:
    import cag

    kb = cag.build([common.SAMPLE_DOCS], name="drafts-bench", model=model, threads=args.threads,
                   log=lambda _m: None)
    kb.ask("What is this about?", max_new_tokens=8, sources=0)  # warm: kernels, plans, the first step's check
    rows, plain = [], {}
    for draft in (0, None):
        runs = [kb.ask(q, max_new_tokens=args.max_tokens, sources=0, draft=draft) for q in questions]
        if draft == 0:
            plain = {q: a.token_ids for q, a in zip(questions, runs)}
        same = sum(a.token_ids == plain[q] for q, a in zip(questions, runs))
        rows.append(_row(f"cag {label}", "drafts" if draft is None else "no drafts", runs, same,
                         sum(a.drafted for a in runs), sum(a.accepted for a in runs)))
    return rows


def _row(system: str, config: str, runs, same: int | None, drafted: int, accepted: int) -> dict:
    tokens = sum(a.new_tokens for a in runs)
    after_first = sum(max(0, a.new_tokens - 1) for a in runs)
    decode_s = sum(a.total_s - a.ttft_s for a in runs)
    return {"system": system, "config": config, "questions": len(runs), "tokens": tokens,
            "per_question_s": sum(a.total_s for a in runs) / len(runs),
            "ttft_ms": common.median([a.ttft_s * 1000 for a in runs]),
            "decode_tok_s": after_first / decode_s if decode_s else float("nan"),
            "same_as_undrafted": same, "drafted": drafted, "accepted": accepted,
            "acceptance": accepted / drafted if drafted else None}


class _Asked:
    def __init__(self, total_s: float, timings: dict):
        self.total_s = total_s
        self.new_tokens = int(timings.get("predicted_n", 0))
        self.ttft_s = timings.get("prompt_ms", 0) / 1000
        self.predicted_s = timings.get("predicted_ms", 0) / 1000
        self.drafted = int(timings.get("draft_n", 0) or 0)
        self.accepted = int(timings.get("draft_n_accepted", 0) or 0)


def server_rows(gguf: Path, questions: list[str], args) -> list[dict]:
    import httpx
    import xllamacpp as xl

    knowledge = "\n\n".join(f"## {p.name}\n{p.read_text()}" for p in sorted(common.SAMPLE_DOCS.iterdir()))
    system = "Answer the question from these documents.\n\n# Documents\n" + knowledge
    rows = []
    for config in ("default", "ngram-simple drafts"):
        params = xl.CommonParams()
        params.model.path = str(gguf)
        params.n_ctx = 8192
        params.n_parallel = 1
        params.cpuparams.n_threads = params.cpuparams_batch.n_threads = args.threads
        params.cache_prompt = True
        if config != "default":
            params.speculative.types = [xl.common_speculative_type.COMMON_SPECULATIVE_TYPE_NGRAM_SIMPLE]
        server = xl.Server(params)
        base = server.listening_address.rstrip("/")
        if not base.startswith("http"):
            base = "http://" + base

        def ask(q: str) -> _Asked:
            body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": q}],
                    "max_tokens": args.max_tokens, "temperature": 0, "cache_prompt": True}
            start = time.perf_counter()
            r = httpx.post(base + "/v1/chat/completions", json=body, timeout=600)
            r.raise_for_status()
            return _Asked(time.perf_counter() - start, r.json().get("timings", {}))

        ask("What is this about?")  # warm: the knowledge computed once, kept by the prompt cache
        runs = [ask(q) for q in questions]
        row = _row("llama-server", config, runs, None, sum(a.drafted for a in runs), sum(a.accepted for a in runs))
        predicted = sum(a.predicted_s for a in runs)
        row["decode_tok_s"] = sum(max(0, a.new_tokens - 1) for a in runs) / predicted if predicted else float("nan")
        rows.append(row)
        del server
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--questions", type=int, default=20)
    ap.add_argument("--no-peer", action="store_true", help="cag only (no llama-server)")
    ap.add_argument("--gguf", type=Path, default=None, help="another GGUF (the llama.cpp engine and llama-server)")
    ap.add_argument("--out", type=Path, default=common.RESULTS / "drafts.json")
    args = ap.parse_args()
    os.environ.setdefault("CAG_HOME", tempfile.mkdtemp(prefix="cag-drafts-"))
    from cag.engines.torch.models import default_gguf_path

    questions = [q["q"] for q in common.sample_questions()][:args.questions]
    gguf = args.gguf or default_gguf_path()
    rows = [] if args.gguf else cag_rows(None, "torch", questions, args)
    rows += cag_rows(str(gguf), "llama.cpp", questions, args)
    if not args.no_peer:
        rows += server_rows(gguf, questions, args)
    print(f"\n{'system':<17} {'config':<20} {'s/question':>10} {'TTFT ms':>8} {'decode tok/s':>12} {'tokens':>6} "
          f"{'accepted':>9} {'same':>5}")
    for r in rows:
        acc = f"{r['acceptance']:.0%}" if r["acceptance"] is not None else "-"
        same = "-" if r["same_as_undrafted"] is None else f"{r['same_as_undrafted']}/{r['questions']}"
        print(f"{r['system']:<17} {r['config']:<20} {r['per_question_s']:>10.3f} {r['ttft_ms']:>8.0f} "
              f"{r['decode_tok_s']:>12.1f} {r['tokens']:>6} {acc:>9} {same:>5}")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"machine": common.machine(), "gguf": gguf.name, "threads": args.threads,
                                    "max_tokens": args.max_tokens, "rows": rows}, indent=2) + "\n")
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
