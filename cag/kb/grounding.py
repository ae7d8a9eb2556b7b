"""Sources and support: which passages of the knowledge base an answer rests on, and whether they hold it.

The answer's tokens are decided before any of this runs and nothing here feeds back into them: sources are
a function of the question, the finished answer's text and the passage index (cag.kb.passages), so a cached
and a no-cache answer, or a streamed and a non-streamed one, get the same sources.

An answer's facts are what it says beyond its question: numbers with the unit that follows them, quoted
phrases, names (capitalized words inside a sentence) and other content words. Passages are first found by
BM25 over the answer's facts and the question's words, then ranked by the share of the answer's
facts each one holds. A number counts only with its unit beside it ("12 months" is not "12 days") and in a
passage that also holds a word of its context (its sentence in the answer, and the question): "12 days" of
travel expenses do not support "12 days of annual leave". A source's score is that share; `support` is the
share held by the first SUPPORT_SOURCES sources together, and an answer is `supported` when it reaches
SUPPORTED_AT. An answer that adds nothing to its question (a bare "No.") is
judged on its own words where it has some, and is otherwise unsupported.
"""

from __future__ import annotations

import math
import re
import time
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Sequence

import numpy as np

from ..errors import CagError
from .passages import PassageIndex

DEFAULT_SOURCES = 3  # sources given with an answer unless asked otherwise
MAX_SOURCES = 20
SUPPORT_SOURCES = 3  # the sources whose text the support is measured on
SUPPORTED_AT = 0.6  # support at which an answer counts as supported (bench/grounding.py measured the choice)
CANDIDATES = 24  # passages BM25 hands to the fact-share ranking
MODES = ("flag", "refuse")
REFUSAL = "The knowledge base does not contain the answer to this question."
WEIGHTS = {"number": 3.0, "quote": 3.0, "name": 2.0, "word": 1.0}
UNIT_REACH = 3
ANCHORED_AT = 0.5  # the share of a question's names (by rarity) a passage holds to be about its subject
BRIDGE_SHARE = 0.05  # a name in at most this share of passages (or 2) links its passages to the subject  # a number's unit must follow it within this many words in a source

_STOP = frozenset("""
a about above after again against all also am an and any are as at be because been before being below between
both but by can could did do does doing down during each few for from further had has have having he her here
hers herself him himself his how i if in into is it its itself just me more most my myself no nor not now of off
on once only or other our ours ourselves out over own same she should so some such than that the their theirs
them themselves then there these they this those through to too under until up very was we were what when where
which while who whom why will with would you your yours yourself yourselves yes may might must shall s t
answer question according knowledge base document documents text
""".split())
_NUMBER_WORDS = {w: str(i) for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen twenty".split())}
_NUMBER_WORDS.update({"thirty": "30", "forty": "40", "fifty": "50", "sixty": "60", "seventy": "70",
                      "eighty": "80", "ninety": "90", "hundred": "100", "thousand": "1000"})
_TOKEN = re.compile(r"\d+(?::\d\d)+|\d+(?:\.\d+)?|[^\W\d_]+|\d+", re.UNICODE)
_SENTENCES = re.compile(r"(?<=[.!?:;])\s+|\n")
_QUOTE = re.compile(r"\"([^\"\n]{3,200})\"|“([^”\n]{3,200})”")


class GroundingError(CagError):
    """A grounding option out of range (the count of sources, or what an unsupported answer gets)."""


@dataclass(frozen=True)
class Source:
    """One passage an answer rests on, as a person can look it up."""

    document: str
    locator: str  # heading path, "page N" or "lines A-B"
    snippet: str  # the passage's text (at most ~300 characters)
    score: float  # the share of the answer's facts this passage holds, 0..1
    page: int | None = None
    lines: tuple[int, int] = (1, 1)
    heading: tuple[str, ...] = ()

    def to_dict(self) -> dict:
        d = asdict(self)
        d["lines"], d["heading"] = list(self.lines), list(self.heading)
        return d


@dataclass(frozen=True)
class Grounding:
    """An answer's sources and how well they hold it."""

    sources: list[Source] = field(default_factory=list)
    supported: bool = False
    support: float = 0.0

    def to_dict(self) -> dict:
        return {"sources": [s.to_dict() for s in self.sources], "supported": self.supported, "support": self.support}


def check_options(sources: int, unsupported: str) -> None:
    """Refuse what no answer can be given with, before any work (the CLI, the API and the server alike)."""
    if type(sources) is not int or not 0 <= sources <= MAX_SOURCES:
        raise GroundingError(f"sources must be a whole number from 0 to {MAX_SOURCES} (got {sources!r})")
    if unsupported not in MODES:
        raise GroundingError(f"unsupported must be one of {', '.join(MODES)} (got {unsupported!r})")


# -- words and facts ---------------------------------------------------------------------------------

def words(text: str) -> list[str]:
    """Lower-cased, lightly stemmed words and numbers, with number words as digits ("two" -> "2")."""
    text = unicodedata.normalize("NFKC", text).replace("’", "'")
    text = re.sub(r"(?<=\d),(?=\d{3}\b)", "", text)  # 1,200 -> 1200
    return [_stem(t.lower()) for t in _TOKEN.findall(text)]


def _stem(word: str) -> str:
    if word[:1].isdigit() or word in _STOP:
        return word
    word = _NUMBER_WORDS.get(word, word)
    if len(word) > 4 and word.endswith("ies"):
        return word[:-3] + "y"
    if len(word) > 4 and word.endswith(("ches", "shes", "sses", "xes")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith(("ss", "us", "is")):
        return word[:-1]
    return word


@dataclass(frozen=True)
class Fact:
    kind: str  # number, quote, name or word
    terms: tuple[str, ...]  # a number: (number, unit) or (number,); a quote: its words; else one word
    context: frozenset[str] = frozenset()  # a number's: the other words of its sentence and of the question

    @property
    def weight(self) -> float:
        return WEIGHTS[self.kind]


def facts(question: str, answer: str) -> list[Fact]:
    """What the answer says beyond the question (each fact once)."""
    asked = set(words(question))
    found: dict[Fact, None] = {}
    for m in _QUOTE.finditer(answer):
        quoted = tuple(words(m.group(1) or m.group(2)))
        if quoted and not set(quoted) <= asked:
            found[Fact("quote", quoted)] = None
    names = _names(answer)
    context = {w for w in asked if w not in _STOP and not w[:1].isdigit()}
    for sentence in _SENTENCES.split(answer):
        toks = words(sentence)
        around = context | {w for w in toks if w not in _STOP and not w[:1].isdigit()}
        for i, w in enumerate(toks):
            if w[:1].isdigit():
                if w in asked:
                    continue
                unit = toks[i + 1] if i + 1 < len(toks) and toks[i + 1].isalpha() and toks[i + 1] not in _STOP \
                    else None
                terms = (w, unit) if unit else (w,)
                found[Fact("number", terms, frozenset(around - set(terms)))] = None
            elif w not in _STOP and w not in asked and len(w) > 1 and not _after_number(toks, i):
                found[Fact("name" if w in names else "word", (w,))] = None
    return list(found)


def decided(judged: dict, unsupported: str) -> dict:
    """A judgement (Citer.judge's fields, or an Answer's) as `unsupported` wants it: with "refuse" an
    unsupported answer becomes REFUSAL and the model's text moves to `generated`."""
    if unsupported != "refuse" or judged["supported"]:
        return judged
    return {**judged, "answer": REFUSAL, "generated": judged["answer"]}


def _anchors(question: str) -> list[str]:
    """What a question is about: its names (capitalized words after its first) and its numbers."""
    toks = _TOKEN.findall(question)
    named = [_stem(t.lower()) for t in toks[1:] if t[:1].isupper()] + [w for w in words(question) if w[:1].isdigit()]
    return [w for w in dict.fromkeys(named) if w not in _STOP]


def _after_number(toks: list[str], i: int) -> bool:
    """A number's unit is part of the number's fact, not a fact of its own."""
    return i > 0 and toks[i - 1][:1].isdigit()


def _names(answer: str) -> set[str]:
    """Words written with a capital inside a sentence (not the sentence's first word): names, mostly."""
    out = set()
    for sentence in _SENTENCES.split(answer):
        for word in _TOKEN.findall(sentence)[1:]:
            if word[:1].isupper():
                out.add(_stem(word.lower()))
    return out


# -- matching ------------------------------------------------------------------------------------------

class _Passage:
    """A passage's words, ready to be matched against facts."""

    def __init__(self, text: str):
        self.toks = words(text)
        self.set = set(self.toks)
        self.at: dict[str, list[int]] = {}
        for i, w in enumerate(self.toks):
            self.at.setdefault(w, []).append(i)
        # each sentence's words and the names in it (capitalized words, a sentence's first one included)
        self.sentences = [(set(words(s)), {_stem(t.lower()) for t in _TOKEN.findall(s) if t[:1].isupper()} - _STOP)
                          for s in _SENTENCES.split(text)]

    def holds(self, fact: Fact) -> bool:
        first = fact.terms[0]
        if fact.kind == "quote":
            n = len(fact.terms)
            return any(tuple(self.toks[i:i + n]) == fact.terms for i in self.at.get(first, ()))
        if fact.kind == "number":
            if fact.context and self.set.isdisjoint(fact.context):
                return False
            if len(fact.terms) == 2:
                unit = fact.terms[1]
                return any(unit in self.toks[i + 1:i + 1 + UNIT_REACH] for i in self.at.get(first, ()))
        return first in self.set


def _share(found: Sequence[bool], fs: Sequence[Fact]) -> float:
    total = sum(f.weight for f in fs)
    return sum(f.weight for f, ok in zip(fs, found) if ok) / total if total else 0.0


class _Bm25:
    """BM25 scores of a fixed set of documents (lists of words) for a query (a list of words, repeats count)."""

    K1, B = 1.5, 0.75

    def __init__(self, docs: list[list[str]]):
        self.n = len(docs)
        lengths = np.array([len(d) for d in docs], dtype=np.float64)
        norm = self.K1 * (1 - self.B + self.B * lengths / max(lengths.mean() if self.n else 1.0, 1e-9))
        counts: dict[str, dict[int, int]] = {}
        for i, doc in enumerate(docs):
            for w in doc:
                at = counts.setdefault(w, {})
                at[i] = at.get(i, 0) + 1
        self.terms: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # word -> (passages, their weight for it)
        for w, at in counts.items():
            ids = np.fromiter(at, dtype=np.int64, count=len(at))
            tf = np.fromiter(at.values(), dtype=np.float64, count=len(at))
            idf = math.log(1 + (self.n - len(at) + 0.5) / (len(at) + 0.5))
            self.terms[w] = (ids, idf * tf * (self.K1 + 1) / (tf + norm[ids]))

    def scores(self, query: list[str]) -> np.ndarray:
        out = np.zeros(self.n)
        for w in query:
            if w in self.terms:
                ids, weight = self.terms[w]
                out[ids] += weight
        return out


class Citer:
    """Sources and support for answers from one passage index, with everything per passage worked out when a
    knowledge base loads (a few ms), not while an answer waits.

    The first-stage search is BM25 (Lucene's variant, bm25s's default: k1 1.5, b 0.75) over each passage's
    heading path and words, computed here over the postings of the query's words. Not bm25s itself: every
    index it builds takes tqdm's process-wide lock, even with progress off, and a process forked while
    another thread of its parent held that lock (transformers' progress bars start one) hangs for ever."""

    def __init__(self, index: PassageIndex):
        self.index = index
        self._parsed = [_Passage(t) for t in index.texts]
        self._postings: dict[str, list[int]] = {}  # word -> the passages holding it
        for i, p in enumerate(self._parsed):
            for w in p.set:
                self._postings.setdefault(w, []).append(i)
        self._bm25 = _Bm25([[w for w in words(" ".join(p.heading)) + parsed.toks if w not in _STOP]
                            for p, parsed in zip(index.passages, self._parsed)])

    def _linked(self, question: str) -> set[int] | None:
        """The passages about the question's subject (None: it names none, every passage may be): those that
        hold its names and numbers (ANCHORED_AT of their weight, rarer words weighing more), and those that
        share a rare name with a sentence of theirs that holds one (the town a person of the question lives
        in, for the river that flows through it). A name the knowledge base never mentions links nothing."""
        named = _anchors(question)
        if not named:
            return None
        n = len(self._parsed)
        weight = {a: math.log(1 + n / len(self._postings[a])) if a in self._postings else 0.0 for a in named}
        total = sum(weight.values())
        if total == 0:
            return set()
        held: dict[int, float] = {}
        for a, w in weight.items():
            for i in self._postings.get(a, ()):
                held[i] = held.get(i, 0.0) + w
        about = {i for i, w in held.items() if w >= ANCHORED_AT * total}
        rare = max(2, BRIDGE_SHARE * n)
        bridges = {name for i in about for ws, names in self._parsed[i].sentences if not ws.isdisjoint(weight)
                   for name in names if name not in weight and len(self._postings.get(name, ())) <= rare}
        return about | {i for name in bridges for i in self._postings.get(name, ())}

    def ground(self, question: str, answer: str, sources: int = DEFAULT_SOURCES) -> Grounding:
        """The answer's first `sources` sources and its support (measured on SUPPORT_SOURCES of them)."""
        if not len(self.index):
            return Grounding()
        fs = facts(question, answer)
        own = fs or [Fact("word", (w,)) for w in dict.fromkeys(words(answer)) if w not in _STOP and len(w) > 1]
        ranked = self._ranked(question, fs, own, self._linked(question))
        top = ranked[:max(sources, SUPPORT_SOURCES)]
        held = [[self._parsed[i].holds(f) for f in own] for i, score in top[:SUPPORT_SOURCES] if score > 0]
        together = [any(col) for col in zip(*held)] if held else []
        support = round(_share(together, own), 4) if held else 0.0
        shown = [self._source(i, score) for i, score in top[:sources]]
        return Grounding(shown, support >= SUPPORTED_AT, support)

    def judge(self, question: str, answer: str, sources: int, unsupported: str) -> dict:
        """An answer's grounding as cag.results.Answer's fields: with unsupported="refuse" an unsupported
        answer becomes REFUSAL and the model's text moves to `generated`."""
        start = time.perf_counter()
        g = self.ground(question, answer, sources)
        return decided({"answer": answer, "generated": None, "sources": g.sources, "supported": g.supported,
                        "support": g.support, "grounding_s": time.perf_counter() - start}, unsupported)

    def _ranked(self, question: str, fs: list[Fact], own: list[Fact],
                linked: set[int] | None) -> list[tuple[int, float]]:
        """Passages by the share of the answer's facts they hold (none for a passage not about the question's
        subject: `_linked`), then by BM25 of the answer's facts and the question's words."""
        asked = [w for w in dict.fromkeys(words(question)) if w not in _STOP]
        scores = self._bm25.scores([t for f in (fs or own) for t in f.terms if t] * 2 + asked)
        order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))[:CANDIDATES]
        top = max(float(scores[order[0]]), 1e-9) if order else 1.0
        rows = []
        for i in order:
            mine = own and (linked is None or i in linked)
            share = _share([self._parsed[i].holds(f) for f in own], own) if mine else 0.0
            rows.append((i, round(share, 4), float(scores[i]) / top))
        rows.sort(key=lambda r: (-r[1], -r[2], r[0]))
        return [(i, share) for i, share, _ in rows]

    def _source(self, i: int, score: float) -> Source:
        p = self.index.passages[i]
        return Source(p.document, p.locator, _clip(self.index.texts[i]), score, p.page, p.lines, p.heading)


def _clip(text: str, limit: int = 330) -> str:
    if len(text) <= limit:
        return text
    cut = text.rfind(" ", 0, limit - 1)
    return text[:cut if cut > limit // 2 else limit - 1].rstrip() + "…"
