"""Running an evaluation: every system over every question of every dataset, scored, summarized, written.

    import cag.eval
    summary = cag.eval.run(["examples/datasets/fictional-3k.json"], systems=["cag", "bm25"], top_k=[3])
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Sequence

from .. import engines
from ..engines.base import Engine
from ..kb import knowledge
from ..kb.prompt import PromptBuilder
from . import dataset as ds
from . import embed, report, scoring, sources
from . import systems as sysmod
from .retrieval import DEFAULT_CHUNK_TOKENS

ALL_SYSTEMS = ("cag", "in-context", "bm25", "dense")


def run(datasets: Sequence[str | Path | ds.Dataset], *, systems: Sequence[str] = ALL_SYSTEMS,
        top_k: Sequence[int] = (1, 3, 5), max_new_tokens: int = 48, limit: int | None = None,
        out: str | Path | None = None, lm: Engine | None = None, model: str | None = None,
        device: str | None = None, dtype: str | None = None, chunk_tokens: int = DEFAULT_CHUNK_TOKENS,
        show_progress: bool = True, log=lambda _msg: None) -> dict:
    """Evaluate; returns {"meta", "summary", "questions", "files"} and writes them under `out` when given."""
    sysmod.check(list(systems), list(top_k))
    loaded = [d if isinstance(d, ds.Dataset) else ds.load(d) for d in datasets]
    loaded = [d.limited(limit) for d in loaded]
    lm = lm or engines.load(model, device=device, dtype=dtype, log=log)
    meta = {"model": lm.name, "device": str(lm.device), "dtype": lm.dtype,
            "max_new_tokens": max_new_tokens, "top_k": list(top_k), "chunk_tokens": chunk_tokens,
            "limit": limit, "date": time.strftime("%Y-%m-%d %H:%M:%S")}
    summary, rows, files = [], [], []
    with _progress(show_progress) as bar:
        for data in loaded:
            s, r = _run_one(data, lm, list(systems), list(top_k), max_new_tokens, chunk_tokens, bar)
            for row in s:  # a line per system too: progress bars do not render when stderr is not a terminal
                log(f"{row['dataset']} {row['system']}: contains {row['contains']:.2f}, "
                    f"median {row['seconds_per_q']:.2f} s/question, build {row['build_s']:.2f} s")
            summary += s
            rows += r
            if out:  # after every dataset, so an interrupted long run keeps what it finished
                files = report.write(Path(out), summary, rows, meta)
    return {"meta": meta, "summary": summary, "questions": rows, "files": [str(f) for f in files]}


def _run_one(data: ds.Dataset, lm, names, top_k, max_new_tokens, chunk_tokens, bar):
    docs = [knowledge.Document(d["name"], d["text"]) for d in sysmod.titled(data)]
    knowledge_tokens = len(PromptBuilder(lm.codec, docs).prefix_ids())
    chosen, shared = sysmod.make(data, lm, names, top_k, embed.default, chunk_tokens)
    summary, rows = [], []
    try:
        for system in chosen:
            task = bar.add_task(f"{data.name} {system.name}", total=len(data.questions)) if bar else None
            build_s = system.build()
            mine = []
            for i, q in enumerate(data.questions):
                reply = system.answer(q.q, max_new_tokens)
                mine.append(_row(data.name, system.name, i, q, reply))
                if bar:
                    bar.advance(task)
            sims = scoring.similarity([r["answer"] for r in mine], [r["reference"] for r in mine], embed.default())
            for r, sim in zip(mine, sims):
                r["similarity"] = sim
            rows += mine
            summary.append(report.summarize(data.name, system.name, mine, build_s, knowledge_tokens))
    finally:
        shared.close()
    return summary, rows


def _row(dataset: str, system: str, index: int, q: ds.Question, reply: sysmod.Reply) -> dict:
    hit = None
    if reply.retrieved:
        hit = any(scoring.contains(text, q.a) for text in reply.retrieved)
    return {
        "dataset": dataset, "system": system, "index": index, "question": q.q, "reference": q.a, "hops": q.hops,
        "answer": reply.answer, "exact": scoring.exact(reply.answer, q.a), "contains": scoring.contains(reply.answer, q.a),
        "f1": scoring.token_f1(reply.answer, q.a), "ttft_s": reply.ttft_s, "total_s": reply.total_s,
        "prompt_tokens": reply.prompt_tokens, "context_tokens": reply.context_tokens, "retrieval_hit": hit,
        "first_source": reply.sources[0] if reply.sources else None,
        "first_source_contains": sources.first_source_holds(reply.sources, q.a),
        "supported": reply.supported, "support": reply.support, "grounding_s": reply.grounding_s,
    }


class _NoBar:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def _progress(show: bool):
    if not show:
        return _NoBar()
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                    console=Console(stderr=True), transient=False)
