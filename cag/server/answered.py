"""An answer as the server's endpoints render it: one typed result, from the model or the response cache.

Why typed: every endpoint (OpenAI's chat and prompt completions, Ollama's chat and generate) words the same
result its own way; reading it through named fields, not a dict's keys, lets a typo fail where it is made and
keeps the JSON each endpoint sends in one place per shape.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .chat import Plan


@dataclass(frozen=True)
class Usage:
    """Tokens of one answer: its whole prompt, the part of it the cache held, and the tokens generated."""

    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def to_dict(self) -> dict:
        """As the response cache keeps it (and the access log and metrics read it)."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens, "cached_tokens": self.cached_tokens}

    @classmethod
    def of(cls, d: dict) -> "Usage":
        return cls(d["prompt_tokens"], d["completion_tokens"], d["cached_tokens"])

    def openai(self) -> dict:
        """OpenAI's usage object."""
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.total_tokens, "prompt_tokens_details": {"cached_tokens": self.cached_tokens}}


@dataclass(frozen=True)
class Answered:
    """One answer: the text given (the refusal, when it was refused), what the model generated, why it
    ended, its usage, sources and support, timings, and where it came from."""

    text: str
    generated: str | None
    finish_reason: str
    usage: Usage
    sources: list[dict]
    supported: bool
    support: float
    grounding_s: float
    ttft_s: float | None  # None: a response-cache hit (no model ran)
    total_s: float
    response_cache: str | None = None  # the kind of hit ("exact"...), None when the model answered
    cache_source: str | None = None  # the tier the prefix came from, "built", or "resident"
    mode: str | None = None
    draft: dict | None = None  # {"drafted": n, "accepted": n}; None for a response-cache hit

    def cag(self, plan: "Plan") -> dict:
        """cag's own numbers, beside an API's fields (clients ignore unknown keys): timings, where the answer
        came from, and what a reader checks it with: its sources, whether they support it (`support`: the
        share of its facts they hold) and, when it was refused, what the model had said (`generated`)."""
        return {"ttft_s": self.ttft_s, "total_s": self.total_s, "response_cache": self.response_cache,
                "cache_source": self.cache_source, "mode": self.mode, "history_turns": len(plan.history),
                "injection_flagged": plan.flagged, "sources": self.sources, "supported": self.supported,
                "support": self.support, "generated": self.generated, "grounding_s": self.grounding_s,
                "draft": self.draft}


def judged_fields(judged: dict) -> dict:
    """Citer.judge's fields (or an Answer's) as an Answered's: the answer given is `text`, sources are JSON."""
    return {"text": judged["answer"], "generated": judged["generated"],
            "sources": [s.to_dict() for s in judged["sources"]], "supported": judged["supported"],
            "support": judged["support"], "grounding_s": judged["grounding_s"]}
