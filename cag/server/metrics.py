"""Prometheus metrics, in a registry of their own (so several apps can live in one test process)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

_LATENCY = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_GROUNDING = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1)  # sources take milliseconds


class Metrics:
    def __init__(self, price_per_1k_tokens: float = 0.0):
        self.price = price_per_1k_tokens
        r = self.registry = CollectorRegistry()
        self.requests = Counter("cag_requests", "Chat completion requests by outcome", ["status"], registry=r)
        self.response_cache = Counter("cag_response_cache", "Response cache lookups", ["result"], registry=r)
        self.kb_loads = Counter("cag_kb_loads", "Knowledge base lookups by where the prefix came from",
                                ["tier"], registry=r)
        self.ttft = Histogram("cag_ttft_seconds", "Time to first token (model answers)", buckets=_LATENCY, registry=r)
        self.latency = Histogram("cag_request_seconds", "Total latency of a chat completion", buckets=_LATENCY,
                                 registry=r)
        self.tokens = Counter("cag_tokens", "Prompt tokens (cached + computed) and generated tokens", ["kind"],
                              registry=r)
        self.saved = Counter("cag_tokens_saved",
                             "Prompt tokens not computed versus sending the whole knowledge base each time",
                             registry=r)
        self.cost = Counter("cag_estimated_cost", "Estimated cost of the tokens computed, at the configured "
                            "price per 1k tokens", registry=r)
        self.cost_full = Counter("cag_estimated_cost_without_cache", "Estimated cost had every request sent "
                                 "the whole knowledge base and no response cache", registry=r)
        self.guard = Counter("cag_guard_flags", "Requests matching the prompt-injection heuristic", ["action"],
                             registry=r)
        self.model_bytes = Gauge("cag_model_bytes", "Memory each loaded model holds: its weights and the prefixes "
                                 "of the knowledge bases loaded on it", ["model", "engine", "part"], registry=r)
        self.model_kbs = Gauge("cag_model_knowledge_bases", "Knowledge bases loaded on each model",
                               ["model", "engine"], registry=r)
        self.supported = Counter("cag_answers_supported", "Answers given, by whether their sources support them "
                                 "(response-cache hits included)", ["supported"], registry=r)
        for label in ("true", "false"):
            self.supported.labels(label)  # both shown from the start, at 0
        self.grounding = Histogram("cag_grounding_seconds", "Time finding an answer's sources and measuring its "
                                   "support", buckets=_GROUNDING, registry=r)
        self.model_idle = Gauge("cag_model_idle_seconds", "Seconds since an answer last ran on each loaded model (0 "
                                "while one runs); past its keep-alive it is unloaded", ["model", "engine"], registry=r)
        self.drafts = Counter("cag_draft_tokens", "Draft tokens from the knowledge verified, by whether the model "
                              "chose them too (each one taken saved a decoding step)", ["result"], registry=r)
        for label in ("accepted", "rejected"):
            self.drafts.labels(label)
        self.budget = Gauge("cag_model_budget_bytes", "The memory budget of models and their knowledge bases "
                            "(model_bytes)", registry=r)

    def memory(self, usage: list[dict], budget: int) -> None:
        """What the loaded models hold now (cag.server.model_pool.ModelPool.usage); models no longer loaded vanish."""
        self.model_bytes.clear()
        self.model_kbs.clear()
        self.model_idle.clear()
        for row in usage:
            for part in ("weights", "prefixes"):
                self.model_bytes.labels(row["model"], row["engine"], part).set(row[part])
            self.model_kbs.labels(row["model"], row["engine"]).set(row["knowledge_bases"])
            self.model_idle.labels(row["model"], row["engine"]).set(row["idle_s"])
        self.budget.set(budget)

    def answered(self, usage: dict, ttft_s: float | None, total_s: float, cached_response: bool) -> None:
        """Record one answer; a response-cache hit computed nothing, so all its prompt tokens are saved."""
        prompt, cached, generated = usage["prompt_tokens"], usage["cached_tokens"], usage["completion_tokens"]
        computed = 0 if cached_response else prompt - cached
        produced = 0 if cached_response else generated
        self.tokens.labels("prompt").inc(prompt)
        self.tokens.labels("cached").inc(prompt - computed)
        self.tokens.labels("computed").inc(computed)
        self.tokens.labels("generated").inc(produced)
        self.saved.inc(prompt - computed)
        self.cost.inc((computed + produced) * self.price / 1000)
        self.cost_full.inc((prompt + generated) * self.price / 1000)
        self.latency.observe(total_s)
        if ttft_s is not None:
            self.ttft.observe(ttft_s)

    def drafted(self, draft: dict | None) -> None:
        """Record one answer's drafts (none for a response-cache hit)."""
        if draft:
            self.drafts.labels("accepted").inc(draft["accepted"])
            self.drafts.labels("rejected").inc(draft["drafted"] - draft["accepted"])

    def grounded(self, supported: bool, seconds: float) -> None:
        """Record one answer's support (response-cache hits too: their sources are found again)."""
        self.supported.labels("true" if supported else "false").inc()
        self.grounding.observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
