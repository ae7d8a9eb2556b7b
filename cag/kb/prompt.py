"""The prompt: knowledge in the model's chat template, split into a cacheable prefix and a question part.

The classic CAG bug is tokenizing the prefix and the question separately: BPE merges can cross the
seam, so prefix tokens + question tokens need not equal the tokens of the whole prompt. Here the
whole prompt is always rendered and tokenized as one string; the cache is reused only for the longest
run of leading tokens that equals the cached prefix (all of it, in the normal case), and everything
after that is computed. The model therefore always sees exactly the tokens of the full prompt.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from typing import Sequence

from ..errors import PromptError
from .knowledge import Document

LAYOUT_VERSION = 1
DEFAULT_INSTRUCTION = (
    "You are a helpful assistant. Answer the user's question using only the documents below. "
    "If the documents do not contain the answer, say that you do not know. Answer briefly."
)
_SENTINEL = "\u2063CAG-QUESTION\u2063"


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

    tokenizer: object
    docs: Sequence[Document]
    instruction: str = DEFAULT_INSTRUCTION
    _prefix_ids: list[int] | None = field(default=None, init=False, repr=False)
    _head: tuple[str, list[int]] | None = field(default=None, init=False, repr=False)

    # -- identity ---------------------------------------------------------------------------------
    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or None

    def fingerprint(self) -> str:
        """Changes whenever the same knowledge would be laid out differently in the prompt."""
        spec = {"layout": LAYOUT_VERSION, "chat_template": self.chat_template or "plain", "instruction": self.instruction}
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()

    # -- rendering --------------------------------------------------------------------------------
    def knowledge_block(self) -> str:
        return "\n\n".join(f"## {d.name}\n{d.text}" for d in self.docs)

    def system_text(self) -> str:
        return f"{self.instruction}\n\n# Documents\n\n{self.knowledge_block()}"

    def render(self, question: str, history: Sequence[Turn] = ()) -> str:
        """The full prompt as text (for people and logs; the model gets `split(...).ids`)."""
        return _unmark(self._render(question, history, mark=False))

    def _render(self, question: str, history: Sequence[Turn], mark: bool) -> str:
        """The prompt with every piece of user-supplied text (system block, history, question) between
        _OPEN/_CLOSE when `mark`: what lies outside the marks is the template's own text."""
        wrap = (lambda text: f"{_OPEN}{_check(text)}{_CLOSE}") if mark else (lambda text: text)
        system = wrap(self.system_text())
        if self.chat_template is None:
            turns = "".join(f"Question: {wrap(t.question)}\nAnswer: {wrap(t.answer)}\n\n" for t in history)
            return f"{system}\n\n{turns}Question: {wrap(question)}\nAnswer:"
        messages = [{"role": "system", "content": system}]
        for t in history:
            messages += [{"role": "user", "content": wrap(t.question)}, {"role": "assistant", "content": wrap(t.answer)}]
        messages.append({"role": "user", "content": wrap(question)})
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # noqa: BLE001 - templates without a system role raise template errors
            messages = [{"role": "user", "content": f"{system}\n\n# Question\n\n{messages[1]['content']}"}] + messages[2:]
            try:
                return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            except Exception as err:  # noqa: BLE001
                raise PromptError(f"the model's chat template cannot render a prompt: {err}") from None

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
        return self._encoder().encode([(text, True)], add_special=False)

    def prefix_ids(self) -> list[int]:
        if self._prefix_ids is None:
            self._prefix_ids = self._encode(self._prefix_marked())
        return self._prefix_ids

    def _encode(self, marked: str) -> list[int]:
        # A rendered chat template already holds its special tokens (BOS included where the model wants it).
        return self._encoder().encode(_pieces(marked), add_special=self.chat_template is None)

    def _encode_prompt(self, marked: str) -> list[int]:
        """_encode(marked), reusing the ids of the prefix up to its last special token: text runs between
        special tokens are tokenized independently, so that part never changes with the question, and
        re-tokenizing the whole knowledge for every question would cost time in proportion to its size."""
        if self._head is None:
            head = self._encoder().head(self._prefix_marked()) if self.chat_template is not None else ""
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
        enc = self._encoder()
        bound = len(text) // enc.longest_token()
        if bound > limit:
            return bound
        count, start, piece = 0, 0, 1 << 15
        while start < len(text):
            end = len(text) if start + piece >= len(text) else max(text.rfind(" ", start, start + piece),
                                                                    text.rfind("\n", start, start + piece), start + 1)
            count += len(enc.inert.encode(text[start:end], add_special_tokens=False).ids)  # cut before a space:
            start = end  # where the tokenizer's pre-tokenizer splits anyway, so the pieces add up to the whole
            if count > limit + limit // 50 + 64:  # clearly over; near the limit the exact count decides
                return count
        return None

    def _encoder(self) -> "SafeEncoder":
        return SafeEncoder.of(self.tokenizer)

    # -- the split --------------------------------------------------------------------------------
    def split(self, question: str, history: Sequence[Turn] = (), prefix_ids: Sequence[int] | None = None) -> Split:
        """Tokenize the full prompt and find how much of it the cached prefix covers, verified token by token."""
        question = clean_question(question)
        prefix = list(self.prefix_ids() if prefix_ids is None else prefix_ids)
        ids = self._encode_prompt(self._render(question, history, mark=True))
        reuse = common_prefix_len(prefix, ids)
        if reuse == len(ids):  # always leave at least one token to compute the next-token logits from
            reuse -= 1
        return Split(ids=ids, reuse=reuse, prefix_len=len(prefix))


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
    same ids as plain tokenization of the whole prompt (tested).
    """

    _cache: "dict[int, SafeEncoder]" = {}
    _lock = threading.Lock()

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise PromptError(f"cag needs a fast (Rust) tokenizer; {type(tokenizer).__name__} is not one")
        self.normal = backend
        self.inert = Tokenizer.from_str(backend.to_str())  # a private copy: no shared flag to race on
        self.inert.encode_special_tokens = True
        self.inert.no_truncation()
        self.inert.no_padding()
        self._longest: int | None = None
        added = {t.content: i for i, t in backend.get_added_tokens_decoder().items()}
        self.added = added
        self.split_at = re.compile("(" + "|".join(re.escape(c) for c in sorted(added, key=len, reverse=True)) + ")") \
            if added else None

    @classmethod
    def of(cls, tokenizer) -> "SafeEncoder":
        with cls._lock:
            enc = cls._cache.get(id(tokenizer))
            if enc is None or enc.tokenizer is not tokenizer:
                enc = cls._cache[id(tokenizer)] = cls(tokenizer)
            return enc

    def head(self, marked: str) -> str:
        """`marked` up to and including its last special token outside user text ("" if none)."""
        end, pos = 0, 0
        for text, user in _pieces(marked):
            if not user and self.split_at is not None:
                for m in self.split_at.finditer(text):
                    end = pos + m.end()
            pos += len(text)
        return _prefix_of(marked, end)

    def longest_token(self) -> int:
        """Characters in the longest token: a text of N characters is at least N / this many tokens."""
        if self._longest is None:
            vocab = self.normal.get_vocab(with_added_tokens=False)
            decoder = self.normal.decoder
            self._longest = max(1, max((len(decoder.decode([t])) if decoder else len(t)) for t in vocab))
        return self._longest

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
            return list(self.inert.encode(runs[0], add_special_tokens=True).ids)
        ids: list[int] = []
        for run in runs:
            if isinstance(run, int):
                ids.append(run)
            elif run:
                ids += self.inert.encode(run, add_special_tokens=False).ids
        return ids


def clean_question(question: str) -> str:
    question = question.strip()
    if not question:
        raise PromptError("the question is empty")
    return question


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    n = min(len(a), len(b))
    for i in range(n):
        if a[i] != b[i]:
            return i
    return n
