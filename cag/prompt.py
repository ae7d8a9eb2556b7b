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
from dataclasses import dataclass, field
from typing import Sequence

from .errors import PromptError
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

    def render(self, question: str, history: Sequence[Turn] = ()) -> str:
        system = f"{self.instruction}\n\n# Documents\n\n{self.knowledge_block()}"
        if self.chat_template is None:
            turns = "".join(f"Question: {t.question}\nAnswer: {t.answer}\n\n" for t in history)
            return f"{system}\n\n{turns}Question: {question}\nAnswer:"
        messages = [{"role": "system", "content": system}]
        for t in history:
            messages += [{"role": "user", "content": t.question}, {"role": "assistant", "content": t.answer}]
        messages.append({"role": "user", "content": question})
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
        full = self.render(_SENTINEL)
        if full.count(_SENTINEL) != 1:
            raise PromptError("the chat template does not place the question exactly once; cannot cache a prefix")
        return full.split(_SENTINEL)[0]

    def tokenize(self, text: str) -> list[int]:
        # A rendered chat template already holds its special tokens (BOS included where the model wants it).
        add_special = self.chat_template is None
        return list(self.tokenizer(text, add_special_tokens=add_special)["input_ids"])

    def prefix_ids(self) -> list[int]:
        if self._prefix_ids is None:
            self._prefix_ids = self.tokenize(self.prefix_text())
        return self._prefix_ids

    # -- the split --------------------------------------------------------------------------------
    def split(self, question: str, history: Sequence[Turn] = (), prefix_ids: Sequence[int] | None = None) -> Split:
        """Tokenize the full prompt and find how much of it the cached prefix covers, verified token by token."""
        question = clean_question(question)
        prefix = list(self.prefix_ids() if prefix_ids is None else prefix_ids)
        ids = self.tokenize(self.render(question, history))
        reuse = common_prefix_len(prefix, ids)
        if reuse == len(ids):  # always leave at least one token to compute the next-token logits from
            reuse -= 1
        return Split(ids=ids, reuse=reuse, prefix_len=len(prefix))


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
