"""Input limits and a prompt-injection heuristic, applied before anything reaches the model.

The heuristic is a short list of phrasings typical of attempts to override the instructions or extract
the prompt. It is a tripwire, not a defence: `flag` counts and logs matches, `refuse` rejects them.
"""

from __future__ import annotations

import re

from .config import ServerConfig
from .errors import ApiError

_INJECTION = re.compile(
    r"ignore (all |any )?(the |your )?(previous|prior|above|earlier) (instructions|prompts?|rules)"
    r"|disregard (all |the |your )?(previous |prior |above )?(instructions|rules|system prompt)"
    r"|(reveal|print|show|repeat|output) (me )?(the |your )?(system prompt|hidden instructions|instructions above)"
    r"|you are now (?!going)|act as (an? )?(unfiltered|jailbroken)|developer mode|\bDAN\b"
    r"|</?(system|im_start|im_end)\b|<\|im_(start|end)\|>",
    re.IGNORECASE,
)


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
