"""Stop strings: end an answer before the first of them, without ever streaming text that gets cut.

Text arrives in deltas; a delta may end with the start of a stop string ("Q" of "Question:"), so that
much is held back until the next delta shows whether the stop string follows. What `push` returns is
final: concatenated, the returned pieces equal `text`, the answer up to (not including) the stop string.
"""

from __future__ import annotations

from collections.abc import Sequence

from .errors import CagError

MAX_STOPS = 4  # OpenAI's limit; also bounds the per-token work


def checked(stops: str | Sequence[str] | None) -> list[str]:
    """A stop string or sequence of them as a list; CagError when there are too many, one is empty or one
    is not text (the one check for the API, the CLI and the server's request schema)."""
    items = [] if stops is None else [stops] if isinstance(stops, str) else stops
    if not isinstance(items, Sequence) or not all(isinstance(s, str) for s in items):
        raise CagError(f"stop must be a string or a list of at most {MAX_STOPS} strings")
    if len(items) > MAX_STOPS:
        raise CagError(f"at most {MAX_STOPS} stop strings are supported (got {len(items)})")
    if any(not s for s in items):
        raise CagError("stop strings must be non-empty text")
    return list(items)


class StopText:
    def __init__(self, stops: Sequence[str] = (), layout: Sequence[str] = ()):
        """`stops`: the caller's (checked); `layout`: the prompt layout's own end markers (cag.kb.prompt)."""
        self.stops = checked(stops) + [s for s in layout if s]
        self.text = ""  # the answer so far, up to the stop string once one is found
        self.stopped = False
        self._sent = 0  # characters of `text` already returned
        self._seen = ""  # everything pushed, including text after a stop string

    def push(self, delta: str) -> str:
        """The part of the answer that is now certain (may be empty)."""
        if self.stopped or not delta:
            return ""
        if not self.stops:
            self.text += delta
            return self._release(len(self.text))
        start = max(0, len(self._seen) - max(map(len, self.stops)) + 1)
        self._seen += delta
        hits = [i for s in self.stops if (i := self._seen.find(s, start)) >= 0]
        if hits:
            self.stopped = True
            self.text = self._seen[:min(hits)]
            return self._release(len(self.text))
        self.text = self._seen
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        """At the end of generation: whatever was held back (no stop string followed it)."""
        return self._release(len(self.text))

    def _held(self) -> int:
        """How many trailing characters could be the start of a stop string."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self._seen)), longest, -1):
                if self._seen.endswith(s[:n]):
                    longest = n
                    break
        return longest

    def _release(self, upto: int) -> str:
        upto = max(upto, self._sent)
        out, self._sent = self.text[self._sent:upto], upto
        return out
