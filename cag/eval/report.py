"""Turning per-question rows into the summary table, results.json, results.md and the PNG plots."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

from . import sources

COLUMNS = [  # (key, header, format)
    ("dataset", "dataset", "{}"), ("system", "system", "{}"), ("n", "n", "{}"),
    ("contains", "contains", "{:.2f}"), ("exact", "exact", "{:.2f}"), ("f1", "F1", "{:.2f}"),
    ("similarity", "similarity", "{:.3f}"), ("ttft_s", "TTFT s (med)", "{:.3f}"),
    ("seconds_per_q", "s/question (med)", "{:.2f}"), ("prompt_tokens", "prompt tokens/q", "{:.0f}"),
    ("build_s", "build s", "{:.2f}"), ("retrieval_hit", "answer retrieved", "{}"),
    ("source_precision", "source precision", "{:.2f}"), ("wrong_flagged", "wrong flagged", "{:.2f}"),
    ("right_flagged", "right flagged", "{:.2f}"), ("support_auc", "support AUC", "{:.2f}"),
]


def summarize(dataset: str, system: str, rows: list[dict], build_s: float, knowledge_tokens: int) -> dict:
    mean = lambda key: statistics.fmean(r[key] for r in rows) if rows else float("nan")  # noqa: E731
    median = lambda key: statistics.median(r[key] for r in rows) if rows else float("nan")  # noqa: E731
    hits = [r["retrieval_hit"] for r in rows if r.get("retrieval_hit") is not None]
    return {
        "dataset": dataset, "system": system, "n": len(rows), "knowledge_tokens": knowledge_tokens,
        "exact": mean("exact"), "contains": mean("contains"), "f1": mean("f1"), "similarity": mean("similarity"),
        "ttft_s": median("ttft_s"), "seconds_per_q": median("total_s"), "prompt_tokens": mean("prompt_tokens"),
        "context_tokens": mean("context_tokens"), "build_s": build_s,
        "retrieval_hit": round(statistics.fmean(hits), 2) if hits else "-",
        **sources.summary(rows),
    }


def markdown(summary: list[dict]) -> str:
    lines = ["| " + " | ".join(h for _, h, _ in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for s in summary:
        lines.append("| " + " | ".join(_cell(fmt, s[key]) for key, _, fmt in COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def _cell(fmt: str, value) -> str:
    if value is None:  # nothing to measure (a RAG system's support, no wrong answers)
        return "-"
    try:
        return fmt.format(value)
    except (ValueError, TypeError):
        return str(value)


def write(out: Path, summary: list[dict], rows: list[dict], meta: dict) -> list[Path]:
    """results.json, results.md and the plots; returns the paths written."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps({"meta": meta, "summary": summary, "questions": rows}, indent=1,
                                                 ensure_ascii=False))
    (out / "results.md").write_text(markdown(summary))
    written = [out / "results.json", out / "results.md", plot_accuracy(out / "accuracy_vs_time.png", summary)]
    if len({s["dataset"] for s in summary}) > 1:
        written.append(plot_ttft(out / "ttft_vs_knowledge.png", summary))
    return written


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_accuracy(path: Path, summary: list[dict]) -> Path:
    """Accuracy (contains) against median seconds per question: up and to the left is better."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    datasets = sorted({s["dataset"] for s in summary})
    markers = "os^Dvx*+"
    for system in dict.fromkeys(s["system"] for s in summary):
        pts = [s for s in summary if s["system"] == system]
        ax.scatter([p["seconds_per_q"] for p in pts], [p["contains"] for p in pts], label=system, s=45,
                   marker=markers[len(ax.collections) % len(markers)])
        for p in pts:
            if len(datasets) > 1:
                ax.annotate(p["dataset"], (p["seconds_per_q"], p["contains"]), fontsize=7, alpha=0.7)
    ax.set_xscale("log")
    ax.set_xlabel("median seconds per question (log)")
    ax.set_ylabel("accuracy (reference contained in answer)")
    ax.set_ylim(-0.05, 1.05)
    return _save(plt, fig, ax, path, "Accuracy vs time per question")


def plot_ttft(path: Path, summary: list[dict]) -> Path:
    """Median time to first token against knowledge size, one line per system."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for system in dict.fromkeys(s["system"] for s in summary):
        pts = sorted((s["knowledge_tokens"], s["ttft_s"]) for s in summary if s["system"] == system)
        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=system)
    ax.set_yscale("log")
    ax.set_xlabel("knowledge size (tokens)")
    ax.set_ylabel("median time to first token, s (log)")
    return _save(plt, fig, ax, path, "Time to first token vs knowledge size")


def _save(plt, fig, ax, path: Path, title: str) -> Path:
    ax.set_title(title)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
