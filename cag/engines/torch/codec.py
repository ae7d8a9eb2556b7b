"""A Hugging Face tokenizer as the engine seam's Codec: chat template, inert user text, incremental detokenizing.

Special tokens are recognised only where cag.kb.prompt says the template's own text is: a private copy of
the Rust tokenizer with `encode_special_tokens` set tokenizes everything else, so `<|im_end|>` in a
question is a few ordinary tokens, never the end-of-turn control token.
"""

from __future__ import annotations

import hashlib
import json
import threading
from typing import Sequence

from ...errors import PromptError
from ..base import Codec

_CODECS: dict[int, "HFCodec"] = {}
_LOCK = threading.Lock()


class HFCodec(Codec):
    def __init__(self, tokenizer):
        from tokenizers import Tokenizer

        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            raise PromptError(f"cag needs a fast (Rust) tokenizer; {type(tokenizer).__name__} is not one")
        self.backend = backend
        self.inert = Tokenizer.from_str(backend.to_str())  # a private copy: no shared flag to race on
        self.inert.encode_special_tokens = True
        self.inert.no_truncation()
        self.inert.no_padding()
        # Only the special added tokens: those `encode_special_tokens` makes inert in user text. Other added
        # tokens (Gemma's "\n", "\n\n", tab runs, "<table>"…: SentencePiece's user-defined pieces) are
        # ordinary text that user text and the template's own text both tokenize to.
        self._special = {t.content: i for i, t in backend.get_added_tokens_decoder().items() if t.special}
        self._longest: int | None = None
        self._fingerprint: str | None = None

    @classmethod
    def of(cls, tokenizer) -> "HFCodec":
        """One codec per tokenizer object (building one copies the tokenizer)."""
        with _LOCK:
            found = _CODECS.get(id(tokenizer))
            if found is None or found.tokenizer is not tokenizer:
                found = _CODECS[id(tokenizer)] = cls(tokenizer)
            return found

    @property
    def chat_template(self) -> str | None:
        return getattr(self.tokenizer, "chat_template", None) or None

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    @property
    def special(self) -> dict[str, int]:
        return self._special

    def encode(self, text: str, add_special: bool = False) -> list[int]:
        return list(self.inert.encode(text, add_special_tokens=add_special).ids)

    def longest_token(self) -> int:
        if self._longest is None:
            vocab = self.backend.get_vocab(with_added_tokens=False)
            decoder = self.backend.decoder
            self._longest = max(1, max((len(decoder.decode([t])) if decoder else len(t)) for t in vocab))
        return self._longest

    def fingerprint(self) -> str:
        """sha256 of the full tokenizer definition (vocab, merges, normalizer) and its special tokens."""
        if self._fingerprint is None:
            h = hashlib.sha256(self.backend.to_str().encode())
            h.update(json.dumps(sorted(map(str, self.tokenizer.all_special_tokens))).encode())
            self._fingerprint = h.hexdigest()
        return self._fingerprint

    def stream(self) -> "TextStream":
        return TextStream(self.tokenizer)


class TextStream:
    """Token ids -> text deltas, incrementally: each token costs the same however long the answer is.

    tokenizers' DecodeStream keeps only the few ids a character may still need, so a multi-byte character
    split over tokens is held back until it is complete (decoding the whole answer at every token made
    streaming quadratic in the answer's length). The deltas concatenated are `text()`: what a client
    streams is exactly the final answer.
    """

    def __init__(self, tokenizer):
        from tokenizers.decoders import DecodeStream

        self.tokenizer = tokenizer
        self.backend = tokenizer.backend_tokenizer
        self.ids: list[int] = []
        self._decoder = DecodeStream(skip_special_tokens=True)
        self._pieces: list[str] = []
        self._sent = 0

    def push(self, token: int) -> str:
        self.ids.append(token)
        piece = self._decoder.step(self.backend, token)
        if not piece:
            return ""
        self._pieces.append(piece)
        self._sent += len(piece)
        return piece

    def flush(self) -> str:
        """At the end: what is still held back (an incomplete character, as a full decode renders it), so
        that the deltas add up to text() and to decoding all ids at once."""
        full = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        tail = full[self._sent:] if full.startswith(self.text()) else ""
        if tail:
            self._pieces.append(tail)
            self._sent += len(tail)
        return tail

    def text(self) -> str:
        return "".join(self._pieces)


def stop_ids(tokenizer, generation_config=None) -> list[int]:
    """End-of-turn and end-of-sequence ids from the tokenizer and the generation config."""
    ids: set[int] = set()
    for value in (getattr(tokenizer, "eos_token_id", None), getattr(generation_config, "eos_token_id", None)):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(v for v in value if isinstance(v, int))
    vocab = tokenizer.get_vocab()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    plain = {i for i, t in backend.get_added_tokens_decoder().items() if not t.special} if backend else set()
    for marker in END_MARKERS:
        if marker in vocab and vocab[marker] not in plain:  # Gemma's "</s>" is an HTML tag, not an end
            ids.add(vocab[marker])
    return sorted(ids)


END_MARKERS = ("<|im_end|>", "<|eot_id|>", "<|end_of_text|>", "<end_of_turn>", "<|endoftext|>", "</s>")


def decode(tokenizer, ids: Sequence[int]) -> str:
    """The text of `ids` exactly as a TextStream streams it."""
    return HFCodec.of(tokenizer).decode(ids)
