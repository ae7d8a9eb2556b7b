"""The torch engine driven directly on per-layer tensors, below the seam: a harness for the tests and
benchmarks that time or check one piece (a prefill, a decoding loop) on a bare transformers model. It
lives with the tests (bench/common.py puts this folder on the benchmarks' path too), not in cag.

Everything here is the engine's own code path (the same Workspace, rows and decoder the engine uses);
only the bookkeeping a KnowledgeBase does (prompts, caches, stores) is left out.
"""

from __future__ import annotations

from typing import Iterator, Sequence

import torch

from cag import decode
from cag.engines.base import Job
from cag.engines.torch import batch
from cag.engines.torch.engine import prefill_pieces
from cag.engines.torch.state import ModelState
from cag.engines.torch.workspace import Workspace
from cag.kb.incremental import DEFAULT_CHUNK, chunk_ends
from cag.sampling import Sampling

KV = list[tuple[torch.Tensor, torch.Tensor]]


def state_of(model) -> ModelState:
    """The ModelState of a loaded TorchEngine, or a new one around a bare transformers model."""
    if isinstance(model, ModelState):
        return model
    if isinstance(model, torch.nn.Module):
        return ModelState(model)
    return model.state


@torch.inference_mode()
def pieces(model, ids: Sequence[int], ends: Sequence[int]) -> KV:
    """The per-layer KV of `ids`, one forward per piece (what a cache records as its prefill_bounds)."""
    state = state_of(model)
    return prefill_pieces(state.model, state.device, ids, ends, 0, None, None)


def prefill(model, ids: Sequence[int], chunk_size: int = DEFAULT_CHUNK) -> KV:
    return pieces(model, ids, chunk_ends(0, len(ids), chunk_size))


def decoder(model, prefix) -> batch.Decoder:
    return batch.Decoder(state_of(model), prefix if isinstance(prefix, Workspace) else Workspace(prefix or []))


def generate(model, new_ids: Sequence[int], prefix=None, reuse: int = 0, max_new_tokens: int = 256,
             sampling: Sampling = Sampling(), stop_ids: Sequence[int] = ()) -> Iterator[int]:
    """One answer's tokens, decoded inline on `prefix` (a Workspace, per-layer tensors, or None: from scratch)."""
    job = Job(list(new_ids), reuse, max_new_tokens, sampling, frozenset(stop_ids))
    return decode.tokens(decoder(model, prefix), job)


def generate_batch(model, prefix, questions: Sequence[Sequence[int]], max_new_tokens: int = 256,
                   stop_ids: Sequence[int] = (), reuse: Sequence[int] | None = None) -> list[list[int]]:
    """Greedy answers to several questions decoded together on one prefix (each equals its answer alone)."""
    dec = decoder(model, prefix)
    reuse = list(reuse) if reuse is not None else [dec.workspace.length] * len(questions)
    jobs = [Job(list(q), r, max_new_tokens, Sampling(), frozenset(stop_ids)) for q, r in zip(questions, reuse)]
    return decode.together(dec, jobs)
