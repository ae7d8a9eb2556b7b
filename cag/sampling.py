"""How the next token is chosen from a row's logits: greedy, or sampled (temperature, top-p, seed).

A leaf module so that the engine (one answer) and cag.engines.torch.batch (answers decoded together) pick tokens with
the same code: a row's choice depends only on its own logits and its own generator, so a seeded sampled
answer is the same whether it was decoded alone or beside others.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .errors import CagError

# Below this a temperature is greedy. Sampling at temperature T divides the logits by T: as T shrinks the
# distribution collapses onto the most likely token, and well before T reaches float32's smallest numbers
# (1e-300 becomes 0 there) the division overflows to inf/nan. vLLM draws the same line at the same value.
GREEDY_BELOW = 1e-5


@dataclass(frozen=True)
class Sampling:
    """Greedy unless a temperature of at least GREEDY_BELOW is given; a seed makes sampling repeatable.

    top_p keeps the smallest set of most likely tokens whose probabilities add up to top_p, and always the
    most likely one: top_p=0 (or anything tiny) is that one token. Values that cannot be sampled with (NaN,
    infinities, a negative temperature, top_p outside [0, 1]) are refused here, so the API, the CLI and the
    server refuse the same ones.
    """

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None

    def __post_init__(self) -> None:
        if not _number(self.temperature) or not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise CagError(f"temperature must be a finite number of at least 0 (0 is greedy), not {self.temperature!r}")
        if not _number(self.top_p) or not 0 <= self.top_p <= 1:
            raise CagError(f"top_p must be a number from 0 to 1, not {self.top_p!r}")

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    def generator(self, device: torch.device) -> torch.Generator | None:
        """The answer's own random stream: seeded when a seed is given (one per answer, never shared)."""
        if self.greedy or self.seed is None:
            return None
        return torch.Generator(device=device).manual_seed(self.seed)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def pick(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> int:
    """The next token from one row's logits [vocab]."""
    if sampling.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        # compared in float32, a tiny top_p is 0: the top token is kept explicitly, not by the comparison
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
        keep[0] = True
        sorted_probs = sorted_probs * keep
        choice = torch.multinomial(sorted_probs / sorted_probs.sum(), 1, generator=generator)
        return int(order[choice])
    return int(torch.multinomial(probs, 1, generator=generator))
