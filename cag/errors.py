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
            f"{_room(tokens, context, reserve, exact=not at_least)}split it into shards with `cag build --shard` (shard=True), "
            "remove documents, or use a model with a longer context"
        )


class EvalError(CagError):
    """A dataset is malformed or an evaluation option cannot be honoured (cag eval)."""


def _room(tokens: int, context: int, reserve: int, exact: bool) -> str:
    """The reserve's part in a knowledge base that does not fit: when a smaller one makes room, say which
    (`exact`: `tokens` is the knowledge's whole length, not a count stopped early)."""
    left = context - tokens  # what a reserve could be with this knowledge in the window
    if exact and 64 <= left < reserve:
        return (f"keep fewer tokens free for questions and answers with `cag build --reserve {left}` (or less; "
                f"now {reserve}), ")
    return f"keep fewer tokens free with `cag build --reserve N` (now {reserve} of the {context}-token window), "


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


class ModelMissingError(ModelError):
    """The model file or folder named is not there (deleted, moved, or an Ollama model no longer pulled): a
    knowledge base built with it adds what to do, since its cache is useless without that very model."""


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
            "(file has {}, expected {}); rebuild it with `cag build`".format(*_told_apart(found, expected))
        )


class ModelChangedError(CacheMismatchError):
    """The model a knowledge base names was replaced since its cache was made (another file at the same path,
    a re-pulled Ollama tag, retrained weights). Refused rather than rebuilt: answering from another model
    than the one the user built with must be their explicit choice (`cag build`), never a silent one."""

    def __init__(self, kb: str, model: str, expected: str, found: str | None):
        CagError.__init__(
            self, f"the model of knowledge base {kb!r} changed since its cache was built: {model} is now a "
            f"different model (fingerprint {_short(expected)}, the cache's {_short(found)}); put the original back, "
            f"or run `cag build` again to answer with this one (nothing of the old cache is reused)")
        self.field, self.expected, self.found = "model", expected, found


class StaleKnowledgeError(CagError):
    """The knowledge files changed since the cache was built and rebuilding was not allowed."""


class NotFoundError(CagError):
    """A named knowledge base does not exist."""


def _short(value: object) -> str:
    text = str(value)
    return text if len(text) <= 24 else text[:20] + "…"


_WHOLE, _WINDOW = 60, 32  # a side up to _WHOLE characters is shown whole, a longer one as a window


def _told_apart(found: object, expected: object) -> tuple[str, str]:
    """Both sides of a mismatch as a user can tell them apart. Values that print alike (the text '8192'
    and the number 8192) are shown with their types; long ones from just before where they first differ,
    since their shared beginning ("llama-cpp-python 0.3…") is exactly what does not tell them apart."""
    a, b = str(found), str(expected)
    if a == b:
        return f"{found!r} ({json_kind(found)})", f"{expected!r} ({json_kind(expected)})"
    at = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return _around(a, at), _around(b, at)


def _around(text: str, at: int) -> str:
    """`text` whole when short, else a window of it from shortly before position `at` (from the start of the
    word holding `at`, when that is near)."""
    if len(text) <= _WHOLE:
        return text
    start = max(text.rfind(" ", 0, at) + 1, at - _WINDOW // 2, 0)
    piece = text[start:start + _WINDOW]
    return ("…" if start else "") + piece + ("…" if start + _WINDOW < len(text) else "")


def json_kind(value: object) -> str:
    """A value's type in the words of JSON, in which manifests and requests come: "a string", "a boolean"…"""
    kinds = {bool: "a boolean", int: "a whole number", float: "a number", str: "a string", type(None): "null",
             list: "an array", dict: "an object"}
    return kinds.get(type(value), f"a {type(value).__name__}")
