"""cag's exceptions. Every message says what went wrong and what the user can do about it.

The CLI prints ``str(err)`` on one line and exits non-zero; nothing below CagError should ever reach
a user as a traceback.
"""


class CagError(Exception):
    """Base class: anything cag refuses to do, with a message a user can act on."""


class KnowledgeError(CagError):
    """A knowledge source is missing, unreadable or empty."""


class KnowledgeTooLargeError(KnowledgeError):
    """The knowledge base does not fit the model's context window (minus the question/answer reserve)."""

    def __init__(self, tokens: int, fits: int, context: int, reserve: int, at_least: bool = False):
        self.tokens, self.fits, self.context, self.reserve = tokens, fits, context, reserve
        super().__init__(
            f"knowledge base is {'more than ' if at_least else ''}{tokens} tokens, but at most {fits} fit "
            f"(context window {context} minus {reserve} reserved for question and answer); "
            "split it into shards with `cag build --shard` (shard=True), remove documents, "
            "or use a model with a longer context"
        )


class ContextLengthError(CagError):
    """The cached knowledge + question (+ history) + the answer's token budget exceed the context window."""

    def __init__(self, prefix: int, rest: int, max_new_tokens: int, context: int):
        self.prefix, self.rest, self.max_new_tokens, self.context = prefix, rest, max_new_tokens, context
        over = prefix + rest + max_new_tokens - context
        super().__init__(
            f"the prompt does not fit the model's context window: {prefix} knowledge tokens + {rest} question and "
            f"history tokens + {max_new_tokens} answer tokens = {prefix + rest + max_new_tokens}, "
            f"{over} more than the {context} available; shorten the question or history, or lower max_new_tokens"
        )


class ModelError(CagError):
    """A model could not be found or loaded."""


class PromptError(CagError):
    """The chat template cannot be split into a cacheable prefix and a question."""


class CacheFileError(CagError):
    """A cache file is corrupt, truncated, tampered with, or was made for something else."""


class CacheMismatchError(CacheFileError):
    """A valid cache file made for another model, tokenizer, template, knowledge or dtype."""

    def __init__(self, path: str, field: str, expected: object, found: object):
        self.field, self.expected, self.found = field, expected, found
        super().__init__(
            f"cache file {path} was made for a different {field} "
            f"(file has {_short(found)}, expected {_short(expected)}); rebuild it with `cag build`"
        )


class StaleKnowledgeError(CagError):
    """The knowledge files changed since the cache was built and rebuilding was not allowed."""


class NotFoundError(CagError):
    """A named knowledge base does not exist."""


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:20] + "…"
