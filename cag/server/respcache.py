"""Response cache: a repeated question on an unchanged knowledge base is answered without the model.

Two levels. Exact (always on): the same question text (only leading and trailing whitespace ignored, as the
prompt ignores it: other case or spacing gives other tokens and may give another answer), the same
conversation so far, generation limit and asking tenant (a hit must not tell one tenant what another asked).
Semantic (off unless `semantic_threshold` is set): a question without history may take the answer of an
earlier one of the same knowledge base, limit and tenant when both have the same canonical form
(cag.server.canonical: same words, numbers, units, question word, negation and tense, up to case,
punctuation, articles, politeness and a few spellings), the same must-match key (every identifier, code,
number with its sign and decimals, symbol, unit word, capitalised token and negation, exactly as typed) AND
their MiniLM sentence embeddings (cag.embed) reach the threshold. The cosine alone is not enough: "every
week" and "every month" score 0.98, "order QLW123456" and "order QLW654321" 0.94 (see bench/respcache.py).
Only greedy requests are cached (a sampled answer is meant to vary). Every key carries the knowledge base's
folder and content hash + build time, so a rebuilt KB never serves an old answer, and `drop(kb)` frees its
entries at once. A stored value holds the model's own text, never a refusal made of it: its sources and whether
it is refused depend on the asking request's options, and are worked out again at each hit (cag.server.chat).
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from .. import embed
from .canonical import question_key

SEMANTIC_THRESHOLD = 0.9  # the cosine to use with the semantic level on: measured by bench/respcache.py


@dataclass
class Hit:
    kind: str  # "exact" or "semantic"
    value: dict


@dataclass
class _Stored:
    value: dict
    question: str
    form: tuple | None = None  # the semantic index key: kb, content hash, limit, tenant, form, must-match key
    vector: torch.Tensor | None = None  # its embedding, computed when a question of the same key first comes


def normalize(text: str) -> str:
    """What the prompt makes of a question: cag.kb.prompt strips it, and nothing else."""
    return text.strip()


class ResponseCache:
    def __init__(self, size: int = 1024, semantic_threshold: float | None = None,
                 embedder: embed.Embedder | None = None):
        self.size, self.threshold = size, semantic_threshold
        self._embedder = embedder  # with the semantic level on: the process's shared one, loaded on first use
        self._exact: OrderedDict[tuple, _Stored] = OrderedDict()
        self._forms: dict[tuple, dict[tuple, None]] = {}  # semantic index key -> exact keys (ordered set)
        self._lock = threading.Lock()

    def get(self, kb: str, content_hash: str, question: str, history: tuple, limit: int,
            tenant: str = "") -> Hit | None:
        key = (kb, content_hash, normalize(question), history, limit, tenant)
        form = self._form(kb, content_hash, question, history, limit, tenant)
        with self._lock:
            stored = self._exact.get(key)
            if stored is not None:
                self._exact.move_to_end(key)
                return Hit("exact", stored.value)
            candidates = [self._exact[k] for k in self._forms.get(form, ())] if form else []
        if not candidates:
            return None  # no earlier question has this form: no embedding needed
        if self._embedder is None:
            self._embedder = embed.default()
        fresh = [c for c in candidates if c.vector is None]
        vectors = self._embedder.encode([question] + [c.question for c in fresh])
        for c, v in zip(fresh, vectors[1:]):
            c.vector = v
        scores = [float(vectors[0] @ c.vector) for c in candidates]
        best = max(range(len(scores)), key=scores.__getitem__)
        return Hit("semantic", candidates[best].value) if scores[best] >= self.threshold else None

    def put(self, kb: str, content_hash: str, question: str, history: tuple, limit: int, value: dict,
            tenant: str = "") -> None:
        key = (kb, content_hash, normalize(question), history, limit, tenant)
        stored = _Stored(value, question, self._form(kb, content_hash, question, history, limit, tenant))
        with self._lock:
            self._unlink(key)
            self._exact[key] = stored
            if stored.form:
                self._forms.setdefault(stored.form, {})[key] = None
            while len(self._exact) > self.size:
                self._unlink(next(iter(self._exact)))

    def drop(self, kb: str) -> None:
        with self._lock:
            for key in [k for k in self._exact if k[0] == kb]:
                self._unlink(key)

    def _form(self, kb: str, content_hash: str, question: str, history: tuple, limit: int,
              tenant: str) -> tuple | None:
        """The semantic index key, or None when the semantic level does not apply."""
        if self.threshold is None or history:
            return None
        key = question_key(question)
        return (kb, content_hash, limit, tenant, *key) if key else None

    def _unlink(self, key: tuple) -> None:
        stored = self._exact.pop(key, None)
        if stored is not None and stored.form:
            keys = self._forms.get(stored.form, {})
            keys.pop(key, None)
            if not keys:
                self._forms.pop(stored.form, None)
