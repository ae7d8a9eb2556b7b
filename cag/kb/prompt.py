"""The prompt: knowledge in the model's chat template, split into a cacheable prefix and a question part.

The classic CAG bug is tokenizing the prefix and the question separately: BPE merges can cross the
seam, so prefix tokens + question tokens need not equal the tokens of the whole prompt. Here the
whole prompt is always rendered and tokenized as one string; the cache is reused only for the longest
run of leading tokens that equals the cached prefix (all of it, in the normal case), and everything
after that is computed. The model therefore always sees exactly the tokens of the full prompt.

A system message given with a question (`system`: the server's system/developer messages, `cag ask
--system`) is user text placed after the cached knowledge: a system turn of its own right after the
knowledge's, where the template allows one there; else appended to the knowledge's system turn (templates
that take a system message only first); else, like that turn, at the top of the first user turn
(templates without a system role); in the plain layout, an "# Instructions" section after the documents.
The cached prefix never changes: a system message only makes the computed part start a few tokens
earlier (where its prompt first differs from the prefix), and the answer is still the no-cache one.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass, field
from typing import Iterable, Sequence

from ..engines.base import Codec
from ..errors import PromptError
from ..stoptext import Endings
from .knowledge import SUPPORTED, Document

LAYOUT_VERSION = 1
PLAIN_STOPS = ("\n", "Question:", "Answer:")  # the end of the answer line, a next question or answer
DEFAULT_INSTRUCTION = (
    "You are a helpful assistant. Answer the user's question using only the documents below. "
    "If the documents do not contain the answer, say that you do not know. Answer briefly."
)
_SENTINEL = "\u2063CAG-QUESTION\u2063"
_SECTIONS = ("# Documents", "# Instructions", "# Question")  # the layout's own section headings
_INSTRUCTIONS = f"\n\n{_SECTIONS[1]}\n\n"  # before a system message that shares the knowledge's turn
_TITLE = "## "  # how the layout titles each document: "## name"


@dataclass(frozen=True)
class Turn:
    question: str
    answer: str


@dataclass
class Split:
    """One question's token plan: the full prompt's ids and how many leading ones come from the cache."""

    ids: list[int]
    reuse: int  # tokens of the cached prefix that equal the full prompt's first tokens
    prefix_len: int

    @property
    def boundary_ok(self) -> bool:
        return self.reuse == self.prefix_len

    @property
    def new_ids(self) -> list[int]:
        return self.ids[self.reuse:]


@dataclass
class PromptBuilder:
    """Renders knowledge + (history) + question with a tokenizer's chat template."""

    codec: Codec  # the engine's (a bare Hugging Face tokenizer: cag.engines.torch.codec.HFCodec.of(tokenizer))
    docs: Sequence[Document]
    instruction: str = DEFAULT_INSTRUCTION
    _prefix_ids: list[int] | None = field(default=None, init=False, repr=False)
    _head: tuple[str, list[int]] | None = field(default=None, init=False, repr=False)

    # -- identity ---------------------------------------------------------------------------------
    def __post_init__(self) -> None:
        self._safe = SafeEncoder(self.codec)

    @property
    def chat_template(self) -> str | None:
        return self.codec.chat_template

    @property
    def endings(self) -> Endings:
        """Where an answer ends besides the model's end-of-turn tokens: the one place that decides it per
        prompt format (every path, cached or not, alone or batched, reads its answer through it).

        Without a chat template (a base model) the prompt is Question/Answer text that such a model goes on
        writing: the answer is the rest of the "Answer:" line, and ends at its end or where it starts a
        next "Question:"/"Answer:", as a reader of that text would expect. A chat model ends its turn with
        its own token, but a small one may instead carry on reciting the prompt: a line that is one of the
        prompt's own headings (a document's "## name" title line, "# Documents", ...) ends its answer.
        Only whole lines laid out as the prompt lays out its own headings count, so an answer with
        Markdown headings of its own is never cut. A small chat model may also loop over its own answer
        until the token limit: a sentence it says again word for word ends the answer (Endings.repeats)."""
        if self.chat_template is None:
            return Endings(PLAIN_STOPS)
        return Endings(heading=LayoutHeadings(d.name for d in self.docs), lead="#", repeats=True)

    def fingerprint(self) -> str:
        """Changes whenever the same knowledge would be laid out differently in the prompt."""
        spec = {"layout": LAYOUT_VERSION, "chat_template": self.chat_template or "plain", "instruction": self.instruction}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    # -- rendering --------------------------------------------------------------------------------
    def knowledge_block(self) -> str:
        return "\n\n".join(f"{_TITLE}{d.name}\n{d.text}" for d in self.docs)

    def system_text(self) -> str:
        return f"{self.instruction}\n\n{_SECTIONS[0]}\n\n{self.knowledge_block()}"

    def render(self, question: str, history: Sequence[Turn] = (), system: str | None = None) -> str:
        """The full prompt as text (for people and logs; the model gets `split(...).ids`)."""
        return _unmark(self._render(question, history, mark=False, system=clean_system(system)))

    def _render(self, question: str, history: Sequence[Turn], mark: bool, system: str | None = None) -> str:
        """The prompt with every piece of user-supplied text (system block, system message, history,
        question) between _OPEN/_CLOSE when `mark`: what lies outside the marks is the template's own text."""
        wrap = (lambda text: f"{_OPEN}{_check(text)}{_CLOSE}") if mark else (lambda text: text)
        block = wrap(self.system_text())
        extra = wrap(system) if system else None
        merged = f"{block}{_INSTRUCTIONS}{extra}" if extra else block
        if self.chat_template is None:
            turns = "".join(f"Question: {wrap(t.question)}\nAnswer: {wrap(t.answer)}\n\n" for t in history)
            return f"{merged}\n\n{turns}Question: {wrap(question)}\nAnswer:"
        talk = []
        for t in history:
            talk += [{"role": "user", "content": wrap(t.question)}, {"role": "assistant", "content": wrap(t.answer)}]
        talk.append({"role": "user", "content": wrap(question)})
        layouts = [[{"role": "system", "content": block}, {"role": "system", "content": extra}] + talk] if extra else []
        layouts += [[{"role": "system", "content": merged}] + talk,  # refused by templates without a system role,
                    [{"role": "user", "content": f"{merged}\n\n{_SECTIONS[2]}\n\n{talk[0]['content']}"}] + talk[1:]]
        for messages in layouts:
            try:
                rendered = self.codec.render(messages)
            except Exception as err:  # noqa: BLE001 - a template refusing this layout raises a template error
                failure = err
                continue
            if extra is None or rendered.count(extra) >= sum(m["content"].count(extra) for m in messages):
                return rendered  # (a template may also drop a role it does not know, silently)
            failure = ValueError("the system message is missing from the rendered prompt")
        raise PromptError(f"the model's chat template cannot render a prompt: {failure}")

    def prefix_text(self) -> str:
        """Everything the template puts before the first question's text."""
        return _unmark(self._prefix_marked())

    def _prefix_marked(self) -> str:
        full = self._render(_SENTINEL, (), mark=True)
        if full.count(_SENTINEL) != 1:
            raise PromptError("the chat template does not place the question exactly once; cannot cache a prefix")
        return full.split(_SENTINEL)[0]

    def tokenize(self, text: str) -> list[int]:
        """Token ids of `text` as user-supplied text: special-token strings in it are plain characters."""
        return self._safe.encode([(text, True)], add_special=False)

    def prefix_ids(self) -> list[int]:
        if self._prefix_ids is None:
            self._prefix_ids = self._encode(self._prefix_marked())
        return self._prefix_ids

    def _encode(self, marked: str) -> list[int]:
        # A rendered chat template already holds its special tokens (BOS included where the model wants it).
        return self._safe.encode(_pieces(marked), add_special=self.chat_template is None)

    def _encode_prompt(self, marked: str) -> list[int]:
        """_encode(marked), reusing the ids of the prefix up to its last special token: text runs between
        special tokens are tokenized independently, so that part never changes with the question, and
        re-tokenizing the whole knowledge for every question would cost time in proportion to its size."""
        if self._head is None:
            head = self._safe.head(self._prefix_marked()) if self.chat_template is not None else ""
            self._head = (head, self._encode(head) if head else [])
        head, ids = self._head
        if head and marked.startswith(head):
            return ids + self._encode(marked[len(head):])
        return self._encode(marked)

    def exceeds(self, limit: int) -> int | None:
        """A cheap look before tokenizing the knowledge: a lower bound on its token count when that is
        already over `limit`, else None. Tokenizing megabytes of text at once takes gigabytes of memory;
        this reads the length and then counts in pieces, stopping as soon as the count is clearly over."""
        text = self.system_text()
        bound = len(text) // self.codec.longest_token()
        if bound > limit:
            return bound
        count, start, piece = 0, 0, 1 << 15
        while start < len(text):
            end = len(text) if start + piece >= len(text) else max(text.rfind(" ", start, start + piece),
                                                                    text.rfind("\n", start, start + piece), start + 1)
            count += len(self.codec.encode(text[start:end]))  # cut before a space:
            start = end  # where the tokenizer's pre-tokenizer splits anyway, so the pieces add up to the whole
            if count > limit + limit // 50 + 64:  # clearly over; near the limit the exact count decides
                return count
        return None

    # -- the split --------------------------------------------------------------------------------
    def split(self, question: str, history: Sequence[Turn] = (), prefix_ids: Sequence[int] | None = None,
              system: str | None = None) -> Split:
        """Tokenize the full prompt and find how much of it the cached prefix covers, verified token by token."""
        question = clean_question(question)
        prefix = list(self.prefix_ids() if prefix_ids is None else prefix_ids)
        ids = self._encode_prompt(self._render(question, history, mark=True, system=clean_system(system)))
        reuse = common_prefix_len(prefix, ids)
        if reuse == len(ids):  # always leave at least one token to compute the next-token logits from
            reuse -= 1
        return Split(ids=ids, reuse=reuse, prefix_len=len(prefix))


class LayoutHeadings:
    """Whether a line of an answer is one of the prompt's own headings: a section heading of the layout, or a
    document's title line, "## " and a name that is one of the knowledge's documents or a file name of a
    type knowledge is read from (a model reciting documents also makes up titles like "## onboarding.md")."""

    def __init__(self, names: Iterable[str]):
        self.names = frozenset(names)

    def __call__(self, line: str) -> bool:
        line = line.rstrip()  # from the line's start: a stream holds back only lines that start with "#"
        if line in _SECTIONS:
            return True
        if not line.startswith(_TITLE):
            return False
        name = line[len(_TITLE):].strip()
        return name in self.names or _file_name(name)


def _file_name(name: str) -> bool:
    """A single file name or path ending in a supported document suffix ("onboarding.md", "a/b.pdf")."""
    stem, dot, suffix = name.rpartition(".")
    return bool(stem) and bool(dot) and f".{suffix.lower()}" in SUPPORTED and " " not in name


# -- user text never becomes control tokens ---------------------------------------------------------

# Marks around user-supplied text while rendering (Supplementary Private Use Area-B: never in real text).
_OPEN, _CLOSE = "\U00100000", "\U00100001"


def _check(text: str) -> str:
    if _OPEN in text or _CLOSE in text:
        raise PromptError("the text contains the reserved characters U+100000/U+100001; remove them")
    return text


def _unmark(text: str) -> str:
    return text.replace(_OPEN, "").replace(_CLOSE, "")


def _prefix_of(marked: str, n: int) -> str:
    """The shortest prefix of `marked` holding `n` characters of unmarked text (marks included, none dangling)."""
    pos = seen = 0
    while seen < n:
        if marked[pos] not in (_OPEN, _CLOSE):
            seen += 1
        pos += 1
    return marked[:pos]


def _pieces(marked: str) -> list[tuple[str, bool]]:
    """(text, is_user) pieces of a marked render, in order."""
    out, user = [], False
    for part in re.split(f"({_OPEN}|{_CLOSE})", marked):
        if part == _OPEN:
            user = True
        elif part == _CLOSE:
            user = False
        elif part:
            out.append((part, user))
    return out


class SafeEncoder:
    """Tokenizes a prompt whose template text may hold special tokens but whose user text may not.

    A tokenizer turns `<|im_end|>` into the end-of-turn control token wherever it appears, so a question
    (or a document, or an earlier turn) containing it could close its own turn and open a system turn.
    Here special tokens are recognised only in the template's own text; in user text they are ordinary
    characters. Between two of the template's special tokens the text (template and user text together)
    is tokenized as one run, exactly as the tokenizer would, so prompts without such strings get the
    same ids as plain tokenization of the whole prompt (tested, on every engine's tokenizer).
    """

    def __init__(self, codec: Codec):
        self.codec = codec
        added = codec.special
        self.added = added
        self.split_at = re.compile("(" + "|".join(re.escape(c) for c in sorted(added, key=len, reverse=True)) + ")") \
            if added else None

    def head(self, marked: str) -> str:
        """`marked` up to and including its last special token outside user text ("" if none)."""
        end, pos = 0, 0
        for text, user in _pieces(marked):
            if not user and self.split_at is not None:
                for m in self.split_at.finditer(text):
                    end = pos + m.end()
            pos += len(text)
        return _prefix_of(marked, end)

    def encode(self, pieces: list[tuple[str, bool]], add_special: bool) -> list[int]:
        """Ids of the concatenated pieces; added tokens count only inside template (is_user False) pieces."""
        runs: list[str | int] = [""]  # text runs, with the template's special-token ids between them
        for text, user in pieces:
            parts = [text] if user or self.split_at is None else self.split_at.split(text)
            for j, part in enumerate(parts):
                if j % 2:
                    runs += [self.added[part], ""]
                else:
                    runs[-1] += part
        if add_special:  # the plain layout: one run, the tokenizer's own BOS/EOS handling
            if len(runs) != 1:
                raise PromptError("a prompt without a chat template cannot hold special tokens")
            return self.codec.encode(runs[0], add_special=True)
        ids: list[int] = []
        for run in runs:
            if isinstance(run, int):
                ids.append(run)
            elif run:
                ids += self.codec.encode(run)
        return ids


def clean_question(question: str) -> str:
    question = question.strip()
    if not question:
        raise PromptError("the question is empty")
    return question


def clean_system(system: str | None) -> str | None:
    """A system message as the prompt holds it: without the whitespace around it; None when there is none."""
    return (system or "").strip() or None


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
