"""Sources and support in the evaluation: source precision, flagged shares, the AUC of support, and the
report's columns for them (hand-made rows, and `cag eval` end to end on the tiny model)."""

from __future__ import annotations

import random

import pytest

from cag.eval import dataset, generate, report, retrieval, sources
from cag.eval.runner import _row, run
from cag.eval.systems import Reply, titled
from cag.kb import knowledge, passages
from cag.kb.grounding import Citer


def _r(contains: float, first: bool | None = None, support: float | None = None,
       supported: bool | None = None, grounding_s: float | None = None) -> dict:
    return {"contains": contains, "first_source_contains": first, "support": support, "supported": supported,
            "grounding_s": grounding_s}


# -- the measures, by hand ----------------------------------------------------------------------------

def test_first_source_is_matched_like_contains():
    assert sources.first_source_holds(["Velra lives in The Thornmere, by the river.", "x"], "thornmere") is True
    assert sources.first_source_holds(["Velra lives in Thornmeres."], "Thornmere") is False
    assert sources.first_source_holds(["Nothing here.", "Velra lives in Thornmere."], "Thornmere") is False
    assert sources.first_source_holds([], "Thornmere") is None


def test_source_precision_counts_right_answers_with_sources_only():
    rows = [_r(1, True), _r(1, True), _r(1, False),  # right: 2 of 3 cite the fact first
            _r(0, True), _r(0, False),  # wrong answers do not count, whatever their sources
            _r(1, None)]  # a right answer given without sources does not count
    assert sources.source_precision(rows) == pytest.approx(2 / 3)
    assert sources.source_precision([_r(0, True)]) is None
    assert sources.source_precision([_r(1, None)]) is None


def test_flagged_shares_as_given_and_at_a_threshold():
    rows = [_r(1, support=0.9, supported=True), _r(1, support=0.55, supported=False),
            _r(1, support=0.65, supported=True), _r(1, support=1.0, supported=True),
            _r(0, support=0.2, supported=False), _r(0, support=0.65, supported=True),
            _r(0, support=0.0, supported=False)]
    assert sources.flagged(rows, right=True) == pytest.approx(1 / 4)
    assert sources.flagged(rows, right=False) == pytest.approx(2 / 3)
    assert sources.flagged(rows, right=True, threshold=0.7) == pytest.approx(2 / 4)
    assert sources.flagged(rows, right=False, threshold=0.7) == pytest.approx(3 / 3)
    assert sources.flagged(rows, right=False, threshold=0.1) == pytest.approx(1 / 3)
    assert sources.flagged([_r(1, support=None)], right=True) is None  # a RAG system has no support


def test_auc_by_hand():
    # positives 0.9 and 0.4 against negatives 0.8 and 0.3: 0.9 beats both, 0.4 beats 0.3 only -> 3/4
    assert sources.auc([0.9, 0.8, 0.4, 0.3], [True, False, True, False]) == pytest.approx(0.75)
    assert sources.auc([1.0, 0.2, 0.1], [True, False, False]) == 1.0
    assert sources.auc([0.1, 0.9], [True, False]) == 0.0
    assert sources.auc([0.5, 0.5, 0.5], [True, False, True]) == 0.5  # ties count half
    assert sources.auc([1.0, 0.6, 0.6, 0.0], [True, True, False, False]) == pytest.approx((2 + 1.5) / 4)
    assert sources.auc([0.3, 0.4], [True, True]) is None


def test_auc_agrees_with_scikit_learn():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = random.Random(3)
    for _ in range(20):
        scores = [rng.choice([0.0, 0.25, 0.5, 0.6, 1.0]) for _ in range(40)]
        labels = [rng.random() < 0.4 + 0.4 * s for s in scores]
        assert sources.auc(scores, labels) == pytest.approx(metrics.roc_auc_score(labels, scores))


def test_percentile():
    assert sources.percentile([3.0, 1.0, 2.0], 50) == 2.0
    assert sources.percentile(list(range(101)), 95) == pytest.approx(95.0)
    assert sources.percentile([1.0, 2.0], 95) == pytest.approx(1.95)
    assert sources.percentile([], 95) is None


# -- rows and report --------------------------------------------------------------------------------

def test_a_row_scores_its_first_source():
    q = dataset.Question("In which town does Velra Osk live?", "Thornmere")
    cited = Reply("Velra Osk lives in Thornmere.", 0.1, 0.5, 5, 50, sources=["Velra Osk lives in Thornmere.",
                                                                            "Thornmere was founded in 1204."],
                  supported=True, support=1.0, grounding_s=0.002)
    row = _row("d", "cag", 0, q, cited)
    assert row["contains"] == 1.0 and row["first_source_contains"] is True
    assert (row["supported"], row["support"], row["grounding_s"]) == (True, 1.0, 0.002)
    second = Reply("Velra Osk lives in Thornmere.", 0.1, 0.5, 5, 50, retrieved=["Osk is a weaver.", "Thornmere."],
                   sources=["Osk is a weaver.", "Thornmere."])  # a RAG system whose top chunk misses the fact
    row = _row("d", "bm25@2", 0, q, second)
    assert row["first_source_contains"] is False and row["retrieval_hit"] is True and row["support"] is None


def test_summary_and_markdown_show_the_new_columns():
    rows = [{**_r(1, True, 0.9, True, 0.001), "exact": 1.0, "f1": 1.0, "similarity": 1.0, "ttft_s": 0.1,
             "total_s": 0.2, "prompt_tokens": 5, "context_tokens": 50, "retrieval_hit": None},
            {**_r(1, False, 0.5, False, 0.003), "exact": 0.0, "f1": 0.5, "similarity": 0.8, "ttft_s": 0.1,
             "total_s": 0.2, "prompt_tokens": 5, "context_tokens": 50, "retrieval_hit": None},
            {**_r(0, False, 0.2, False, 0.002), "exact": 0.0, "f1": 0.0, "similarity": 0.1, "ttft_s": 0.1,
             "total_s": 0.2, "prompt_tokens": 5, "context_tokens": 50, "retrieval_hit": None}]
    s = report.summarize("d", "cag", rows, 1.0, 50)
    assert s["source_precision"] == 0.5 and s["wrong_flagged"] == 1.0 and s["right_flagged"] == 0.5
    assert s["support_auc"] == 1.0 and s["grounding_s"] == 0.002 and s["grounding_p95_s"] == pytest.approx(0.0029)
    rag = report.summarize("d", "bm25@1", [{**r, "support": None, "supported": None, "grounding_s": None}
                                           for r in rows], 0.1, 50)
    assert rag["source_precision"] == 0.5 and rag["wrong_flagged"] is None and rag["support_auc"] is None
    table = report.markdown([s, rag])
    assert "| source precision | wrong flagged | right flagged | support AUC |" in table
    assert "| 0.50 | 1.00 | 0.50 | 1.00 |" in table and "| 0.50 | - | - | - |" in table


# -- with a real passage index (no model) ----------------------------------------------------------------

def test_right_answers_cite_the_passage_that_holds_them_first():
    data = generate.generate(2000, 30, seed=5, two_hop=0.0)
    docs = [knowledge.Document(f"{i}.md", knowledge.normalize(d["text"])) for i, d in enumerate(data.documents)]
    citer = Citer(passages.PassageIndex.build(docs))
    rows = []
    for q in [q for q in data.questions if q.q.startswith("In which town does")]:
        name = q.q.removeprefix("In which town does ").removesuffix(" live?")
        g = citer.ground(q.q, f"{name} lives in {q.a}.", 3)
        rows.append({"contains": 1.0, "first_source_contains": sources.first_source_holds(
            [s.snippet for s in g.sources], q.a), "support": g.support, "supported": g.supported})
        assert name in g.sources[0].snippet, (q, g.sources[0])
    assert len(rows) >= 4
    assert sources.source_precision(rows) == 1.0 and sources.flagged(rows, right=True) == 0.0


# -- end to end (tiny random model) --------------------------------------------------------------

def test_eval_reports_sources_for_every_system(tiny_lm, cag_home):
    data = generate.generate(220, 3, seed=4, count_tokens=lambda t: len(tiny_lm.tokenizer(t)["input_ids"]))
    result = run([data], systems=["cag", "in-context", "bm25"], top_k=[1], max_new_tokens=6, lm=tiny_lm,
                 show_progress=False)
    by = {s["system"]: s for s in result["summary"]}
    rows = {(r["system"], r["index"]): r for r in result["questions"]}
    count = lambda t: len(tiny_lm.codec.encode(t))  # noqa: E731
    chunks = {c.text for c in retrieval.chunk_documents(titled(data), count)}
    for i in range(3):
        cag_row, ref, rag = rows["cag", i], rows["in-context", i], rows["bm25@1", i]
        assert isinstance(cag_row["support"], float) and isinstance(cag_row["supported"], bool)
        assert cag_row["grounding_s"] > 0
        # the same answer of the same knowledge base: the same sources and support
        assert (ref["first_source"], ref["support"]) == (cag_row["first_source"], cag_row["support"])
        assert rag["first_source"] in chunks  # its top retrieved chunk
        assert rag["support"] is None and rag["first_source_contains"] is not None
    for key in ("source_precision", "wrong_flagged", "right_flagged", "support_auc", "grounding_s",
                "grounding_p95_s"):
        assert key in by["cag"] and key in by["bm25@1"]
    assert by["bm25@1"]["wrong_flagged"] is None and by["cag"]["grounding_s"] > 0
    assert "support AUC" in report.markdown(result["summary"])
