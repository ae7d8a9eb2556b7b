"""The RAG side: documents cut into paragraph chunks, and top-k retrieval by BM25 (bm25s) or MiniLM embeddings.

Chunks are whole paragraphs packed up to `max_tokens` model tokens (a paragraph longer than that is cut
by words), so a retrieved chunk reads like the knowledge the other systems see, just less of it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Sequence

from ..errors import EvalError

DEFAULT_CHUNK_TOKENS = 256


@dataclass(frozen=True)
class Chunk:
    name: str  # "<document name>" or "<document name> (part N)"
    text: str


def chunk_documents(documents: Sequence[dict], count_tokens: Callable[[str], int],
                    max_tokens: int = DEFAULT_CHUNK_TOKENS) -> list[Chunk]:
    chunks: list[Chunk] = []
    for doc in documents:
        parts = _pack(_pieces(doc["text"], count_tokens, max_tokens), count_tokens, max_tokens)
        for i, text in enumerate(parts):
            chunks.append(Chunk(doc["name"] if len(parts) == 1 else f"{doc['name']} (part {i + 1})", text))
    return chunks


def _pieces(text: str, count_tokens, max_tokens: int) -> list[str]:
    pieces = []
    for para in (p.strip() for p in re.split(r"\n\s*\n", text)):
        if not para:
            continue
        if count_tokens(para) <= max_tokens:
            pieces.append(para)
            continue
        words, current = para.split(), []
        for word in words:
            if current and count_tokens(" ".join(current + [word])) > max_tokens:
                pieces.append(" ".join(current))
                current = []
            current.append(word)
        if current:
            pieces.append(" ".join(current))
    return pieces


def _pack(pieces: list[str], count_tokens, max_tokens: int) -> list[str]:
    packed: list[str] = []
    for piece in pieces:
        if packed and count_tokens(packed[-1] + "\n\n" + piece) <= max_tokens:
            packed[-1] += "\n\n" + piece
        else:
            packed.append(piece)
    return packed


class Bm25:
    """Sparse retrieval with bm25s (English stop words removed)."""

    def __init__(self, chunks: Sequence[Chunk]):
        import bm25s

        self._bm25s = bm25s
        self.chunks = list(chunks)
        self.index = bm25s.BM25()
        self.index.index(bm25s.tokenize([c.text for c in self.chunks], stopwords="en", show_progress=False),
                         show_progress=False)

    def top(self, query: str, k: int) -> list[int]:
        tokens = self._bm25s.tokenize([query], stopwords="en", return_ids=False, show_progress=False)
        if not any(t in self.index.vocab_dict for t in tokens[0]):  # no word in common: nothing to rank by
            return list(range(min(k, len(self.chunks))))
        ids, _ = self.index.retrieve(tokens, k=min(k, len(self.chunks)), show_progress=False)
        return [int(i) for i in ids[0]]


class Dense:
    """Dense retrieval: cosine similarity of MiniLM embeddings of the question and each chunk."""

    def __init__(self, chunks: Sequence[Chunk], embedder):
        self.chunks = list(chunks)
        self.embedder = embedder
        self.vectors = embedder.encode([f"{c.name}\n{c.text}" for c in self.chunks])

    def top(self, query: str, k: int) -> list[int]:
        scores = self.vectors @ self.embedder.encode([query])[0]
        return [int(i) for i in scores.topk(min(k, len(self.chunks))).indices]


def make(kind: str, chunks: Sequence[Chunk], embedder_factory: Callable[[], object]):
    if kind == "bm25":
        return Bm25(chunks)
    if kind == "dense":
        return Dense(chunks, embedder_factory())
    raise EvalError(f"unknown retriever {kind!r}: use bm25 or dense")
