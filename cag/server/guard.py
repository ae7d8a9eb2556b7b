"""Input limits, the OpenAI parameters cag refuses, and a prompt-injection heuristic, applied before
anything reaches the model.

The heuristic is a short list of phrasings typical of attempts to override the instructions or extract
the prompt. It is a tripwire, not a defence: `flag` counts and logs matches, `refuse` rejects them.
"""

from __future__ import annotations

import re
from typing import Any, Callable

from ..sampling import GREEDY_BELOW
from .config import ServerConfig
from .http_errors import ApiError
from .schemas import GenerationRequest


def _number(*neutral: float) -> Callable[[Any], bool]:
    """A JSON number equal to one of `neutral` asks for nothing; true is not 1, nor "0" 0 (as in cag.server.schemas)."""
    return lambda v: type(v) in (int, float) and v in neutral


# OpenAI parameters cag cannot honour: name -> (the values that ask for nothing, why). Any other value is
# refused with a 400 naming the parameter, rather than silently answering something else than was asked.
_NEUTRAL: dict[str, tuple[Callable[[Any], bool], str]] = {
    "n": (lambda v: v == 1, "cag returns one choice per request; send n=1 or leave it out"),
    "best_of": (lambda v: v == 1, "cag returns one choice per request; send best_of=1 or leave it out"),
    "logprobs": (lambda v: v is False, "cag does not return log probabilities"),
    "top_logprobs": (lambda v: v == 0, "cag does not return log probabilities"),
    "logit_bias": (lambda v: not v, "cag does not bias tokens"),
    "presence_penalty": (lambda v: v == 0, "cag applies no repetition penalties; send 0 or leave it out"),
    "frequency_penalty": (lambda v: v == 0, "cag applies no repetition penalties; send 0 or leave it out"),
    "tools": (lambda v: not v, "cag does not call tools or functions"),
    "functions": (lambda v: not v, "cag does not call tools or functions"),
    "tool_choice": (lambda v: v in ("none", "auto"), "cag does not call tools or functions"),
    "function_call": (lambda v: v in ("none", "auto"), "cag does not call tools or functions"),
    "response_format": (lambda v: v.get("type") == "text", 'cag answers in plain text; use {"type": "text"}'),
    "modalities": (lambda v: list(v) == ["text"], "cag answers with text only"),
    "audio": (lambda v: False, "cag answers with text only"),
    "prediction": (lambda v: False, "predicted outputs are not supported"),
    "reasoning_effort": (lambda v: False, "cag's models have no reasoning-effort setting"),
    "verbosity": (lambda v: False, "cag's models have no verbosity setting"),
    "web_search_options": (lambda v: False, "cag answers from its knowledge base only, without web search"),
    "echo": (lambda v: v is False, "cag answers the prompt as a question and does not repeat it"),
    "suffix": (lambda v: v == "", "cag does not insert text between a prompt and a suffix"),
    # Extensions of vLLM, llama-server and Ollama that OpenAI clients pass through (extra_body): also refused
    # rather than ignored, because each would change the answer.
    "repetition_penalty": (_number(1), "cag applies no repetition penalties; send 1 or leave it out"),
    "repeat_penalty": (_number(1), "cag applies no repetition penalties; send 1 or leave it out"),
    "min_tokens": (_number(0), "cag ends an answer at the model's end of turn; send 0 or leave it out"),
    "ignore_eos": (lambda v: v is False, "cag ends an answer at the model's end of turn"),
    "grammar": (lambda v: not v, "cag does not constrain answers to a grammar"),
    "json_schema": (lambda v: not v, "cag does not constrain answers to a schema"),
    "guided_json": (lambda v: not v, "cag does not constrain answers to a schema"),
    "guided_regex": (lambda v: not v, "cag does not constrain answers to a pattern"),
    "guided_choice": (lambda v: not v, "cag does not constrain answers to a choice"),
    "guided_grammar": (lambda v: not v, "cag does not constrain answers to a grammar"),
}
# Sampling extensions that change only a sampled answer: refused when the request samples (temperature > 0),
# harmless for a greedy one.
_SAMPLING: dict[str, tuple[Callable[[Any], bool], str]] = {
    "top_k": (_number(0, -1), "cag samples with temperature and top_p only; send 0 or -1 or leave it out"),
    "min_p": (_number(0), "cag samples with temperature and top_p only; send 0 or leave it out"),
    "typical_p": (_number(1), "cag samples with temperature and top_p only; send 1 or leave it out"),
    "mirostat": (_number(0), "cag samples with temperature and top_p only; send 0 or leave it out"),
}


def check_parameters(req: GenerationRequest) -> None:
    """Refuse a request that asks for something cag cannot do (harmless values such as n=1 pass). A chat
    request and a prompt completion each have their own subset of these parameters."""
    checks = {**_NEUTRAL, **(_SAMPLING if (req.temperature or 0) >= GREEDY_BELOW else {})}  # as cag.sampling decides
    for name, (neutral, why) in checks.items():
        value = getattr(req, name, None)
        if value is not None and not neutral(value):
            raise ApiError(400, f"{name}={_show(value)} is not supported: {why}", code="unsupported_parameter",
                           param=name)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."

_INJECTION = re.compile(
    r"ignore (all |any )?(the |your )?(previous|prior|above|earlier) (instructions|prompts?|rules)"
    r"|disregard (all |the |your )?(previous |prior |above )?(instructions|rules|system prompt)"
    r"|(reveal|print|show|repeat|output) (me )?(the |your )?(system prompt|hidden instructions|instructions above)"
    r"|you are now (?!going)|act as (an? )?(unfiltered|jailbroken)|developer mode|\bDAN\b"
    r"|</?(system|im_start|im_end)\b|<\|im_(start|end)\|>",
    re.IGNORECASE,
)


def check_prompt(config: ServerConfig, prompt: str) -> None:
    if len(prompt) > config.max_message_chars:
        raise ApiError(400, f"the prompt is {len(prompt)} characters; at most {config.max_message_chars} are accepted",
                       code="prompt_too_long", param="prompt")


def check_messages(config: ServerConfig, messages: list) -> None:
    if not messages:
        raise ApiError(400, "messages is empty: send at least one user message", code="empty_messages")
    if len(messages) > config.max_messages:
        raise ApiError(400, f"too many messages ({len(messages)}); at most {config.max_messages} are accepted",
                       code="too_many_messages")
    for i, m in enumerate(messages):
        if len(m.text) > config.max_message_chars:
            raise ApiError(400, f"message {i} is {len(m.text)} characters; at most {config.max_message_chars} are "
                                "accepted", code="message_too_long")


def injection(config: ServerConfig, text: str) -> bool:
    """True when the text looks like a prompt injection (and mode is flag); raises when mode is refuse."""
    if config.injection == "off" or not _INJECTION.search(text):
        return False
    if config.injection == "refuse":
        raise ApiError(400, "the request was refused: it looks like a prompt-injection attempt", code="injection")
    return True
