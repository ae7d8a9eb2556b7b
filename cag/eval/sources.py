"""Sources and support, scored: does an answer's first source hold the expected fact, and does `support`
tell right answers from wrong ones.

source precision   among right answers (the reference is contained in the answer), the share whose first
                   source contains the reference too (the same normalization as `contains`); a RAG system's
                   first source is its top retrieved chunk
wrong flagged      among wrong answers, the share marked unsupported (the higher the better)
right flagged      among right answers, the share marked unsupported (the lower the better)
support AUC        how well `support` ranks right answers above wrong ones (0.5: no better than chance)

A metric with nothing to measure (no right answers, no wrong ones, a system without support) is None.
"""

from __future__ import annotations

import statistics
from typing import Sequence

from . import scoring


def first_source_holds(snippets: Sequence[str], reference: str) -> bool | None:
    """Whether the first source contains the reference; None for an answer given without sources."""
    if not snippets:
        return None
    return bool(scoring.contains(snippets[0], reference))


def source_precision(rows: Sequence[dict]) -> float | None:
    """Of the rows with a right answer and a first source, the share whose first source holds the reference."""
    held = [r["first_source_contains"] for r in rows if r["contains"] and r.get("first_source_contains") is not None]
    return statistics.fmean(held) if held else None


def flagged(rows: Sequence[dict], right: bool, threshold: float | None = None) -> float | None:
    """The share of right (or wrong) answers marked unsupported: `supported` as given, or support below
    `threshold` when one is given."""
    mine = [r for r in rows if bool(r["contains"]) == right and r.get("support") is not None]
    if not mine:
        return None
    if threshold is None:
        return statistics.fmean(not r["supported"] for r in mine)
    return statistics.fmean(r["support"] < threshold for r in mine)


def auc(scores: Sequence[float], positive: Sequence[bool]) -> float | None:
    """ROC AUC: the chance that a random positive scores above a random negative (ties count half)."""
    pos = [s for s, p in zip(scores, positive) if p]
    neg = [s for s, p in zip(scores, positive) if not p]
    if not pos or not neg:
        return None
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


def percentile(xs: Sequence[float], q: float) -> float | None:
    """The q-th percentile (0..100), linear between the nearest ranks."""
    if not xs:
        return None
    xs = sorted(xs)
    at = (len(xs) - 1) * q / 100
    lo = int(at)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (at - lo)


def summary(rows: Sequence[dict]) -> dict:
    """The source and support figures of one system's rows (None where there is nothing to measure)."""
    judged = [r for r in rows if r.get("support") is not None]
    times = [r["grounding_s"] for r in judged if r.get("grounding_s") is not None]
    return {
        "source_precision": source_precision(rows),
        "wrong_flagged": flagged(rows, right=False), "right_flagged": flagged(rows, right=True),
        "support_auc": auc([r["support"] for r in judged], [bool(r["contains"]) for r in judged]),
        "grounding_s": statistics.median(times) if times else None, "grounding_p95_s": percentile(times, 95),
    }
