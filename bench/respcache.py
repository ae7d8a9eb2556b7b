"""Semantic response cache: how often it answers a different question, and how often a paraphrase.

    .venv/bin/python bench/respcache.py [--thresholds 0.8,0.85,0.9,0.95,0.97,0.99] [--repeat 50]

Three hand-made sets of question pairs (examples/respcache/, made by make_sets.py): near misses (the same
words with one changed entity, number, unit, question word, negation, comparison, verb, tense…), identifier
near misses (one changed identifier or code, sign, decimal, unit token, currency, date, time, symbol or
negation: Level3 / Level2, -15 / 15, lbs / pounds), which a cache must never answer from each other, and
paraphrases (exactly the same question in other words: a hit is welcome). For each pair the first
question's answer is cached and the second is asked.

Rows: MiniLM cosine alone at several thresholds (the semantic level as it was: nearest earlier question at
or above the threshold), the canonical form and must-match key alone (cag.server.canonical.question_key),
and the two together as cag ships them, through the real ResponseCache. Also the cost of a lookup: a
question whose form and key match no cached one costs no embedding; one that matches costs one MiniLM
forward. Prints tables and writes bench/results/respcache.json.
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
    """Median get() time: a question whose form and key match nothing cached, and one whose form and key do."""
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
    from cag.server.canonical import question_key
    from cag.server.respcache import SEMANTIC_THRESHOLD

    hf_logging.set_verbosity_error()
    embedder = embed.default()
    sets = {name: pairs(name) for name in ("near_miss", "identifier_near_miss", "paraphrase")}

    def cosines(rows):
        a, b = embedder.encode([r["a"] for r in rows]), embedder.encode([r["b"] for r in rows])
        return (a * b).sum(1).tolist()

    cos = {name: cosines(rows) for name, rows in sets.items()}
    same_key = {name: [question_key(r["a"]) == question_key(r["b"]) for r in rows] for name, rows in sets.items()}

    results = []

    def add(setting: str, hits: dict[str, list[bool]]) -> None:
        row: dict = {"setting": setting}
        for name, rows in sets.items():
            h = hits[name]
            label = "paraphrase_hits" if name == "paraphrase" else f"{name}_false_hits"
            row |= {label: sum(h), f"{name}_pairs": len(rows), f"{label[:-5]}_hit_rate": sum(h) / len(rows)}
            if name != "paraphrase":
                row[f"{label}_by_kind"] = dict(Counter(r["kind"] for r, x in zip(rows, h) if x))
        results.append(row)

    for t in thresholds:
        add(f"cosine >= {t:g} alone", {name: [c >= t for c in cs] for name, cs in cos.items()})
    add("form + must-match key alone", same_key)
    for t in sorted({*thresholds, SEMANTIC_THRESHOLD}):
        label = f"form + key + cosine >= {t:g} (ResponseCache)" + (" [shipped]" if t == SEMANTIC_THRESHOLD else "")
        add(label, {name: through_cache(rows, t, embedder) for name, rows in sets.items()})
    timing = lookup_ms(embedder, SEMANTIC_THRESHOLD, args.repeat)

    para_cos, para_key = cos["paraphrase"], same_key["paraphrase"]
    result = {"machine": common.machine(), "shipped_threshold": SEMANTIC_THRESHOLD, "rows": results,
              **{f"{name}_cosine": {"max": max(cos[name]), "median": statistics.median(cos[name])}
                 for name in ("near_miss", "identifier_near_miss")},
              "paraphrase_cosine": {"min": min(para_cos), "median": statistics.median(para_cos)},
              "paraphrase_key_match_min_cosine": min((c for c, m in zip(para_cos, para_key) if m), default=None),
              "lookup_ms": timing,
              **{f"{name}_kinds": dict(Counter(r["kind"] for r in sets[name]))
                 for name in ("near_miss", "identifier_near_miss")}}
    path = common.write_results("respcache", result, args.out)

    def share(r: dict, label: str, name: str) -> str:
        return f"{r[label]}/{r[name + '_pairs']} ({100 * r[label] / r[name + '_pairs']:.1f}%)"

    print(common.table([(r["setting"], share(r, "near_miss_false_hits", "near_miss"),
                         share(r, "identifier_near_miss_false_hits", "identifier_near_miss"),
                         share(r, "paraphrase_hits", "paraphrase")) for r in results],
                       ("setting", "near-miss false hits", "identifier near-miss false hits", "paraphrase hits")))
    print()
    for name in ("near_miss", "identifier_near_miss"):
        print("%s cosine: max %.3f, median %.3f" % (name, result[f"{name}_cosine"]["max"],
                                                    result[f"{name}_cosine"]["median"]))
    print("paraphrase cosine: min %.3f, median %.3f; paraphrases with the same form and key: min cosine %.3f" % (
        min(para_cos), statistics.median(para_cos), result["paraphrase_key_match_min_cosine"]))
    old = next(r for r in results if r["setting"] == "cosine >= 0.95 alone")
    print("false hits of cosine >= 0.95 alone by kind:", old["near_miss_false_hits_by_kind"],
          old["identifier_near_miss_false_hits_by_kind"])
    print("lookup: %.2f ms when no cached question has the form, %.1f ms when one does (one embedding)" % (
        timing["form miss"], timing["form match"]))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
