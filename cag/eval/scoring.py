"""Answer scoring: SQuAD-style normalization, exact match, containment, token F1, embedding similarity.

Small models answer in sentences ("Velra lives in Thornmere."), so exact match alone says little;
`contains` (the reference appears in the answer) and token F1 carry most of the signal, and the
paper's measure (cosine similarity of sentence embeddings) is reported next to them.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation)


def normalize(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (the SQuAD evaluation's normalization)."""
    text = text.lower().translate(_PUNCT)
    return " ".join(_ARTICLES.sub(" ", text).split())


def exact(answer: str, reference: str) -> float:
    return float(normalize(answer) == normalize(reference))


def contains(answer: str, reference: str) -> float:
    """1.0 when the reference's normalized words appear, in order and whole, inside the answer."""
    ref, ans = normalize(reference), normalize(answer)
    return float(bool(ref) and f" {ref} " in f" {ans} ")


def token_f1(answer: str, reference: str) -> float:
    a, r = normalize(answer).split(), normalize(reference).split()
    if not a or not r:
        return float(a == r)
    common = sum((Counter(a) & Counter(r)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(a), common / len(r)
    return 2 * precision * recall / (precision + recall)


def similarity(answers: Sequence[str], references: Sequence[str], embedder) -> list[float]:
    """Cosine similarity of each answer's embedding with its reference's (the CAG paper's measure)."""
    if not answers:
        return []
    a, r = embedder.encode(list(answers)), embedder.encode(list(references))
    return [float(x) for x in (a * r).sum(dim=-1)]
