"""Semantic response cache: how often it answers a different question, and how often a paraphrase.

    .venv/bin/python bench/respcache.py [--thresholds 0.8,0.85,0.9,0.95,0.97,0.99] [--repeat 50]

Two hand-made sets of question pairs (examples/respcache/, made by make_sets.py): near misses (the same
words with one changed entity, number, unit, question word, negation, comparison, verb, tense…: a cache
must never answer one with the other) and paraphrases (exactly the same question in other words: a hit
is welcome). For each pair the first question's answer is cached and the second is asked.

Rows: MiniLM cosine alone at several thresholds (the semantic level as it was: nearest earlier question at
or above the threshold), the canonical-form check alone, and the two together as cag ships them, through
the real ResponseCache. Also the cost of a lookup: a question whose form matches no cached one costs no
embedding; one that matches costs one MiniLM forward. Prints tables and writes bench/results/respcache.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

SETS = common.ROOT / "examples" / "respcache"


def pairs(name: str) -> list[dict]:
    return [json.loads(line) for line in (SETS / f"{name}.jsonl").read_text().splitlines() if line.strip()]


def through_cache(rows: list[dict], threshold: float, embedder) -> list[bool]:
    """Semantic hits of the real ResponseCache: put the first question, ask the second."""
    from cag.server.respcache import ResponseCache

    cache = ResponseCache(size=len(rows) + 1, semantic_threshold=threshold, embedder=embedder)
    hits = []
    for i, r in enumerate(rows):
        cache.put(f"kb{i}", "hash", r["a"], (), 64, {"text": "answer to " + r["a"]})
        hit = cache.get(f"kb{i}", "hash", r["b"], (), 64)
        assert hit is None or hit.kind == "semantic"
        hits.append(hit is not None)
    return hits


def lookup_ms(embedder, threshold: float, repeat: int) -> dict:
    """Median get() time: a question whose form matches nothing cached, and one whose form matches."""
    from cag.server.respcache import ResponseCache

    cache = ResponseCache(size=1024, semantic_threshold=threshold, embedder=embedder)
    cache.put("kb", "hash", "Who founded the Zephyr Guild?", (), 64, {"text": "x"})
    out = {}
    for label, question in (("form miss", "When was the Zephyr Guild founded?"),
                            ("form match", "Can you tell me who founded the Zephyr Guild?")):
        times = []
        for _ in range(repeat):
            start = time.perf_counter()
            cache.get("kb", "hash", question, (), 64)
            times.append((time.perf_counter() - start) * 1000)
        out[label] = statistics.median(times)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--thresholds", default="0.8,0.85,0.9,0.95,0.97,0.99")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--out", type=Path, default=None)
    args = ap.parse_args()
    thresholds = [float(t) for t in args.thresholds.split(",")]

    from transformers.utils import logging as hf_logging

    from cag import embed
    from cag.server.canonical import question_form
    from cag.server.respcache import SEMANTIC_THRESHOLD

    hf_logging.set_verbosity_error()
    embedder = embed.default()
    near, para = pairs("near_miss"), pairs("paraphrase")

    def cosines(rows):
        a, b = embedder.encode([r["a"] for r in rows]), embedder.encode([r["b"] for r in rows])
        return (a * b).sum(1).tolist()

    near_cos, para_cos = cosines(near), cosines(para)
    near_form = [question_form(r["a"]) == question_form(r["b"]) for r in near]
    para_form = [question_form(r["a"]) == question_form(r["b"]) for r in para]

    results = []

    def add(setting: str, near_hits: list[bool], para_hits: list[bool]) -> None:
        results.append({"setting": setting, "near_miss_false_hits": sum(near_hits), "near_miss_pairs": len(near),
                        "false_hit_rate": sum(near_hits) / len(near), "paraphrase_hits": sum(para_hits),
                        "paraphrase_pairs": len(para), "paraphrase_hit_rate": sum(para_hits) / len(para),
                        "false_hits_by_kind": dict(Counter(r["kind"] for r, h in zip(near, near_hits) if h))})

    for t in thresholds:
        add(f"cosine >= {t:g} alone", [c >= t for c in near_cos], [c >= t for c in para_cos])
    add("canonical form alone", near_form, para_form)
    for t in sorted({*thresholds, SEMANTIC_THRESHOLD}):
        label = f"form + cosine >= {t:g} (ResponseCache)" + (" [shipped]" if t == SEMANTIC_THRESHOLD else "")
        add(label, through_cache(near, t, embedder), through_cache(para, t, embedder))
    timing = lookup_ms(embedder, SEMANTIC_THRESHOLD, args.repeat)

    result = {"machine": common.machine(), "shipped_threshold": SEMANTIC_THRESHOLD, "rows": results,
              "near_miss_cosine": {"max": max(near_cos), "median": statistics.median(near_cos)},
              "paraphrase_cosine": {"min": min(para_cos), "median": statistics.median(para_cos)},
              "paraphrase_form_match_min_cosine": min((c for c, m in zip(para_cos, para_form) if m), default=None),
              "lookup_ms": timing, "near_miss_kinds": dict(Counter(r["kind"] for r in near))}
    path = common.write_results("respcache", result, args.out)
    print(common.table([(r["setting"], f"{r['near_miss_false_hits']}/{r['near_miss_pairs']}",
                         f"{100 * r['false_hit_rate']:.1f}%", f"{r['paraphrase_hits']}/{r['paraphrase_pairs']}",
                         f"{100 * r['paraphrase_hit_rate']:.1f}%") for r in results],
                       ("setting", "near-miss false hits", "rate", "paraphrase hits", "rate")))
    print()
    print("near-miss cosine: max %.3f, median %.3f; paraphrase cosine: min %.3f, median %.3f; "
          "paraphrases with the same form: min cosine %.3f" % (
              result["near_miss_cosine"]["max"], result["near_miss_cosine"]["median"],
              result["paraphrase_cosine"]["min"], result["paraphrase_cosine"]["median"],
              result["paraphrase_form_match_min_cosine"]))
    old = next(r for r in results if r["setting"] == "cosine >= 0.95 alone")
    print("false hits of cosine >= 0.95 alone by kind:", old["false_hits_by_kind"])
    print("lookup: %.2f ms when no cached question has the form, %.1f ms when one does (one embedding)" % (
        timing["form miss"], timing["form match"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
