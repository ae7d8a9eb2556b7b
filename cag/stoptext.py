"""Stop strings: end an answer before the first of them, without ever streaming text that gets cut.

Text arrives in deltas; a delta may end with the start of a stop string ("Q" of "Question:"), so that
much is held back until the next delta shows whether the stop string follows. What `push` returns is
final: concatenated, the returned pieces equal `text`, the answer up to (not including) the stop string.

Stops are matched on the answer as its reader gets it: the whitespace before its first visible character
is never part of it (an answer is returned stripped), so it is dropped before matching, and a stop "\\n"
ends the answer's first line instead of an answer that starts on a new line.

Besides the caller's strings, the prompt's layout ends an answer (`Endings`, decided per prompt format in
cag.kb.prompt): strings of its own that end it anywhere, and whole lines that are the layout's headings
(a document's title line); an answer that reaches one has run on into a copy of the prompt. With `repeats`,
an answer also ends before a sentence that repeats one of its own word for word: a small model that has said
its answer loops over it until the token limit. Text that could still become such a repeat (it so far reads
as the start of an earlier sentence) is held back until it diverges.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from .errors import CagError

MAX_STOPS = 4  # OpenAI's limit; also bounds the per-token work
REPEAT_CHARS = 16  # a sentence this long or longer, said again word for word, ends the answer
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+|\n+")


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


def _never(_line: str) -> bool:
    return False


@dataclass(frozen=True)
class Endings:
    """Where the prompt's layout says an answer is over (besides the model's end-of-turn tokens).

    `stops` end it wherever they appear; `heading(line)` says whether a whole line is one of the layout's
    headings, and the answer then ends before that line. `lead` is how every such line starts: a line that
    starts so is held back from a stream until it is whole and judged."""

    stops: tuple[str, ...] = ()
    heading: Callable[[str], bool] = _never
    lead: str = ""
    repeats: bool = False  # a sentence said again word for word ends the answer


class StopText:
    def __init__(self, stops: Sequence[str] = (), layout: Endings | Sequence[str] = ()):
        """`stops`: the caller's (checked); `layout`: the prompt layout's own endings (cag.kb.prompt), or
        just its end strings."""
        self.layout = layout if isinstance(layout, Endings) else Endings(tuple(s for s in layout if s))
        self.stops = checked(stops) + [s for s in self.layout.stops if s]
        self.text = ""  # the answer so far, up to the stop once one is found
        self.stopped = False
        self._sent = 0  # characters of `text` already returned
        self._seen = ""  # everything pushed (from the first visible character), including text after a stop
        self._line = 0  # where the first line not yet judged against the layout's headings starts
        self._sentence = 0  # where the first sentence not yet judged as a repeat starts
        self._said: set[str] = set()  # the answer's complete sentences so far (with `repeats`)

    def push(self, delta: str) -> str:
        """The part of the answer that is now certain (may be empty)."""
        if self.stopped or not delta:
            return ""
        if not self._seen:
            delta = delta.lstrip()
            if not delta:
                return ""
        start = max(0, len(self._seen) - max(map(len, self.stops), default=1) + 1)
        self._seen += delta
        cut = self._first_stop(start)
        if cut is not None:
            return self._stop_at(cut)
        self.text = self._seen
        return self._release(len(self.text) - self._held())

    def flush(self) -> str:
        """At the end of generation: whatever was held back, unless its last line is a layout heading or its
        last sentence a repeat."""
        if not self.stopped and self._line < len(self._seen) and self.layout.heading(self._seen[self._line:]):
            return self._stop_at(self._line)
        if not self.stopped and self._sentence < len(self._seen) and self._repeat(self._seen[self._sentence:]):
            return self._stop_at(self._sentence)
        return self._release(len(self.text))

    def _stop_at(self, cut: int) -> str:
        self.stopped = True
        self.text = self._seen[:cut]
        return self._release(cut)

    def _first_stop(self, start: int) -> int | None:
        """Where the earliest stop string or heading line in the text seen so far begins (None: none yet)."""
        hits = [i for s in self.stops if (i := self._seen.find(s, start)) >= 0]
        heading = self._heading_line()
        if heading is not None:
            hits.append(heading)
        repeat = self._repeated_sentence()
        if repeat is not None:
            hits.append(repeat)
        return min(hits, default=None)

    def _repeated_sentence(self) -> int | None:
        """The start of the first newly completed sentence that the answer already said (with `repeats`)."""
        if not self.layout.repeats:
            return None
        while (end := _SENTENCE_END.search(self._seen, self._sentence)) is not None:
            begin, self._sentence = self._sentence, end.end()
            if self._repeat(self._seen[begin:end.start()]):
                return begin
            self._remember(self._seen[begin:end.start()])
        return None

    def _repeat(self, sentence: str) -> bool:
        said = _words(sentence)
        return len(said) >= REPEAT_CHARS and said in self._said

    def _remember(self, sentence: str) -> None:
        said = _words(sentence)
        if len(said) >= REPEAT_CHARS:
            self._said.add(said)

    def _could_repeat(self) -> int:
        """How many trailing characters (the sentence in progress) read so far as the start of an earlier one."""
        if not self.layout.repeats or not self._said:
            return 0
        partial = self._seen[self._sentence:]
        begun = _words(partial)
        if begun and any(s.startswith(begun) for s in self._said):
            return len(partial)
        return 0

    def _heading_line(self) -> int | None:
        """The start of the first newly completed line that is a layout heading."""
        while (end := self._seen.find("\n", self._line)) >= 0:
            begin, self._line = self._line, end + 1
            if self.layout.heading(self._seen[begin:end]):
                return begin
        return None

    def _held(self) -> int:
        """How many trailing characters could still be the start of a stop string or of a heading line."""
        longest = 0
        for s in self.stops:
            for n in range(min(len(s) - 1, len(self._seen)), longest, -1):
                if self._seen.endswith(s[:n]):
                    longest = n
                    break
        lead = self.layout.lead
        partial = self._seen[self._line:]
        if lead and partial and (partial.startswith(lead) or lead.startswith(partial)):
            longest = max(longest, len(partial))
        return max(longest, self._could_repeat())

    def _release(self, upto: int) -> str:
        upto = max(upto, self._sent)
        out, self._sent = self.text[self._sent:upto], upto
        return out


def _words(text: str) -> str:
    """A sentence as compared for repeats: its words, single-spaced."""
    return " ".join(text.split())
