"""A GGUF model's text side: its own chat template (from the file) and llama.cpp's own tokenizer.

Why llama.cpp's tokenizer and not a converted one: the prefix state is computed by llama.cpp on the ids
it gets, so the ids must be exactly what llama.cpp makes of the text, for every architecture it runs.
Special-token parsing is off for all text; the template's own control tokens are found by their text
(cag.kb.prompt splits there), so a question holding `<|im_end|>` stays plain characters.
"""

from __future__ import annotations

import codecs
import hashlib
import json
import re
from datetime import datetime

from ...errors import PromptError

# A user-defined token spelled like markup (`<|im_end|>`, `<start_of_turn>`) is a turn marker in models
# converted without marking it as a control token; other user-defined tokens (runs of spaces, newlines)
# are ordinary text the template may contain anywhere.
_MARKER = re.compile(r"<[^<>\s]{1,64}>|\[[A-Z_]{2,32}\]")
from ..base import Codec
from .lib import ATTR_CONTROL, ATTR_USER_DEFINED, Model


class LlamaCodec(Codec):
    def __init__(self, model: Model):
        self.model = model
        self._template = model.chat_template()
        self._special: dict[str, int] = {}
        self.stop_ids: list[int] = []
        longest, h = 1, hashlib.sha256()
        for token in range(model.n_vocab):
            text, attr = model.token_text(token), model.token_attr(token)
            h.update(f"{token}\x00{attr}\x00{text}\x01".encode("utf-8", "surrogatepass"))
            if text and (attr & ATTR_CONTROL or (attr & ATTR_USER_DEFINED and _MARKER.fullmatch(text))):
                self._special.setdefault(text, token)
            if model.is_eog(token):
                self.stop_ids.append(token)
            longest = max(longest, len(text))  # the vocabulary's spelling: never shorter than the text it stands for
        bos, eos = model.bos_eos()
        self.bos_text = model.token_text(bos) if bos >= 0 else ""
        self.eos_text = model.token_text(eos) if eos >= 0 else ""
        for key in ("tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.add_bos_token",
                    "tokenizer.ggml.add_eos_token", "tokenizer.ggml.add_space_prefix"):
            h.update(f"{key}={model.meta(key)}\x01".encode())
        h.update(json.dumps([bos, eos]).encode())
        self._fingerprint = h.hexdigest()
        self._longest = longest
        self._compiled = None

    @property
    def chat_template(self) -> str | None:
        return self._template

    def render(self, messages: list[dict]) -> str:
        if self._compiled is None:
            self._compiled = _compile(self._template)
        try:
            return self._compiled.render(messages=messages, add_generation_prompt=True, bos_token=self.bos_text,
                                         eos_token=self.eos_text)
        except Exception as err:  # noqa: BLE001 - template errors come in many types; the caller retries or reports
            raise PromptError(f"the model's chat template cannot render a prompt: {err}") from None

    @property
    def special(self) -> dict[str, int]:
        return self._special

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        return self.model.tokenize(text, add_special)

    def longest_token(self) -> int:
        return self._longest

    def fingerprint(self) -> str:
        return self._fingerprint

    def stream(self) -> "ByteStream":
        return ByteStream(self.model)


class ByteStream:
    """Token ids -> text deltas: each token's bytes through an incremental UTF-8 decoder, so a character
    split over tokens is held back until it is complete; flush() renders what is left as a full decode would."""

    def __init__(self, model: Model):
        self.model = model
        self.ids: list[int] = []
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")
        self._pieces: list[str] = []

    def push(self, token: int) -> str:
        self.ids.append(token)
        piece = self._utf8.decode(self.model.piece(token))
        if piece:
            self._pieces.append(piece)
        return piece

    def flush(self) -> str:
        tail = self._utf8.decode(b"", final=True)
        if tail:
            self._pieces.append(tail)
        return tail

    def text(self) -> str:
        return "".join(self._pieces)


def _compile(template: str | None):
    """A chat template compiled the way Hugging Face's tokenizers render them (sandboxed Jinja, the same
    helpers), since GGUF files carry the model's Hugging Face template."""
    if template is None:
        raise PromptError("this model has no chat template")
    from jinja2.ext import loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message):
        raise PromptError(f"the chat template refused the prompt: {message}")

    def tojson(value, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
        return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = tojson
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(template)
