"""What building a knowledge base and asking it a question return: plain records, shared by cag.api and
cag.kb.shards (a leaf module, so neither has to import the other for them)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field


@dataclass
class BuildStats:
    tokens: int
    seconds: float
    file_bytes: int
    reused: int = 0  # leading tokens taken from the previous cache (incremental update)
    prefilled: int | None = None  # tokens computed by this build (all of them unless incremental)
    how: str = ""  # one line: full prefill, incremental, or recomputed from which token

    @property
    def tokens_per_s(self) -> float:
        """Tokens computed per second (reused ones were not computed, so they do not count)."""
        done = self.prefilled if self.prefilled is not None else self.tokens
        return done / self.seconds if self.seconds > 0 else float("inf")


@dataclass
class Answer:
    question: str
    answer: str
    token_ids: list[int]
    ttft_s: float  # time to first generated token, tokenization included
    total_s: float
    prompt_tokens: int  # tokens of the full prompt the model conditions on
    cached_tokens: int  # of those, taken from the cache
    question_tokens: int  # of those, computed for this question
    new_tokens: int  # generated tokens
    boundary_ok: bool  # full-prompt tokens started with the whole cached prefix
    mode: str  # "cache" or "no-cache"
    cache_source: str  # "memory", "host", "disk", "redis" or "built": where this process got the prefix from
    finish_reason: str = "stop"  # "stop": end of turn or a stop string; "length": max_new_tokens reached
    shard: str | None = None  # the shard that answered, for knowledge split over several caches
    sources: list = field(default_factory=list)  # cag.kb.grounding.Source: the passages the answer rests on
    supported: bool = False  # whether its sources hold the answer's facts (support >= grounding.SUPPORTED_AT)
    support: float = 0.0  # the share of the answer's facts its sources hold, 0..1
    generated: str | None = None  # the model's own text when `answer` is the refusal (unsupported="refuse")
    grounding_s: float = 0.0  # time spent finding the sources and measuring the support (inside total_s)
    drafted: int = 0  # draft tokens from the knowledge the model verified (cag.drafts)
    accepted: int = 0  # of those, the ones it chose too: each saved a step

    def to_dict(self) -> dict:
        return asdict(self)
