"""Request and response bodies in the OpenAI shape, plus cag's knowledge-base management bodies.

Every field cag reads, and every OpenAI field it does not support, is typed here, so a malformed value is
a 400 naming the field rather than an exception later. Whether a supported-in-shape field asks for
something cag cannot do (n > 1, tools, logprobs, echo…) is decided by guard.check_parameters; fields nobody
declared are accepted and ignored. Chat completions and (legacy, prompt-style) completions share one base.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Annotated, Any, Callable, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, Strict, StrictBool, StrictInt, field_validator

from .. import stoptext
from ..errors import CagError
from ..kb import grounding
from ..sampling import GREEDY_BELOW

_SURROGATE = re.compile(r"[\ud800-\udfff]")  # in a str decoded from JSON, only a lone one can remain
# Numbers and flags as JSON spells them, nothing pydantic would convert: true is no count, "8" no number,
# "yes" no flag. A client sending those has a bug that a silent conversion would hide.
Whole = StrictInt
Flag = StrictBool
Real = Annotated[float, Strict()]  # a whole number is a number too


class Body(BaseModel):
    """A request body (or a part of one). JSON can spell a lone UTF-16 surrogate ("\\ud800"), which is no
    character at all: no tokenizer, file or log can take it, so any text holding one is refused here, with
    the field's name, instead of failing wherever the text goes next."""

    model_config = ConfigDict(extra="allow")

    @field_validator("*", mode="before")
    @classmethod
    def _valid_text(cls, value: Any) -> Any:
        """A text field, before pydantic's own checks (which refuse it in less helpful words when the field
        has a length limit)."""
        return _valid_unicode(value) if isinstance(value, str) else value

    @field_validator("*")
    @classmethod
    def _valid_texts(cls, value: Any) -> Any:
        """Texts inside a validated field's lists and dicts."""
        return _valid_unicode(value)


def _valid_unicode(value: Any) -> Any:
    path = _lone_surrogate(value)
    if path is not None:
        where = f"the text at {'.'.join(path)}" if path else "the text"
        raise ValueError(f"{where} holds a lone surrogate, which is not valid Unicode; send UTF-8 text")
    return value


def _lone_surrogate(value: Any) -> list[str] | None:
    """Where in a field's value a text (or a dict key) holds a lone surrogate ([] for the value itself), or
    None. Nested Body models are not searched: they check their own fields, which names the exact field."""
    if isinstance(value, str):
        return [] if _SURROGATE.search(value) else None
    if isinstance(value, dict):
        if any(isinstance(k, str) and _SURROGATE.search(k) for k in value):
            return []
        items = value.items()
    elif isinstance(value, (list, tuple)):
        items = enumerate(value)
    else:
        return None
    for at, item in items:
        found = _lone_surrogate(item)
        if found is not None:
            return [str(at), *found]
    return None


class Message(Body):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[dict[str, Any]], None] = None

    @field_validator("content", mode="before")
    @classmethod
    def _text_parts_only(cls, value: Any) -> Any:
        """cag answers from text: a part must be {"type": "text", "text": "..."} (images, audio, files are refused)."""
        if value is not None and not isinstance(value, (str, list)):
            raise ValueError("content must be a string or a list of content parts")
        if isinstance(value, list):
            for i, part in enumerate(value):
                kind = part.get("type") if isinstance(part, dict) else None
                if kind != "text":
                    raise ValueError(f"content part {i} is of type {kind!r}; only 'text' parts are supported")
                if not isinstance(part.get("text"), str):
                    raise ValueError(f"content part {i} has no string 'text'")
        return value

    @property
    def text(self) -> str:
        """Plain text of the message (text parts joined)."""
        if isinstance(self.content, list):
            return "".join(p["text"] for p in self.content)
        return self.content or ""


class StreamOptions(Body):
    include_usage: Flag = False


class AnswerOptions(Body):
    """cag's own request options (the `cag` object): how many sources come with the answer and what an
    unsupported answer gets. Left out, each takes the server's default (ServerConfig.sources, .unsupported).
    Checked by the library's own check (grounding.check_options), so the server refuses exactly what
    KnowledgeBase.ask would. A misspelt key is refused rather than ignored: a client that asked for
    refusals and silently got flagged answers would show unsupported text as if it were checked."""

    model_config = ConfigDict(extra="forbid")

    sources: Optional[Whole] = Field(None, description=f"Sources given with the answer, 0 to {grounding.MAX_SOURCES}.")
    unsupported: Optional[str] = Field(None, description="What an answer its sources do not hold gets: 'flag' "
                                                         "(sent as it is, marked unsupported) or 'refuse' (replaced "
                                                         "by a refusal).")

    draft: Optional[Flag] = Field(None, description="Whether the answer verifies drafts from the knowledge (the same "
                                                    "tokens, sooner); left out: the server's `draft`.")

    @field_validator("sources")
    @classmethod
    def _sources(cls, value: Optional[int]) -> Optional[int]:
        if value is not None:
            _check_grounding(value, grounding.MODES[0])
        return value

    @field_validator("unsupported")
    @classmethod
    def _unsupported(cls, value: Optional[str]) -> Optional[str]:
        if value is not None:
            _check_grounding(grounding.DEFAULT_SOURCES, value)
        return value


def _check_grounding(sources: int, unsupported: str) -> None:
    """grounding.check_options, its error worded as a field's (pydantic names the field)."""
    try:
        grounding.check_options(sources, unsupported)
    except CagError as err:
        raise ValueError(str(err)) from None


class GenerationRequest(Body):
    """What chat and prompt completions share: the knowledge base, sampling, limits, stop strings, streaming,
    and the OpenAI parameters of both that cag cannot honour (guard.check_parameters refuses any value
    that asks for something: n > 1, best_of > 1, non-zero penalties, a logit bias)."""

    model: str = Field(description="The knowledge base to answer from.")
    stream: Flag = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[Real] = Field(None, ge=0, le=2, allow_inf_nan=False,
                                         description=f"0 to 2; below {GREEDY_BELOW:g} the answer is greedy.")
    top_p: Optional[Real] = Field(None, ge=0, le=1, allow_inf_nan=False,
                                   description="0 to 1; the most likely token is always kept (0: only it).")
    seed: Optional[Whole] = Field(None, ge=-(2**63), le=2**64 - 1, description="A 64-bit integer.")
    max_tokens: Optional[Whole] = Field(None, ge=1)
    stop: Union[str, list[str], None] = Field(None, description=f"Up to {stoptext.MAX_STOPS} strings; the answer ends "
                                                                "before the first one and does not include it.")
    user: Optional[str] = None
    n: Optional[Whole] = Field(None, ge=1)
    best_of: Optional[Whole] = Field(None, ge=1)
    logit_bias: Optional[dict[str, Real]] = None
    presence_penalty: Optional[Real] = Field(None, ge=-2, le=2, allow_inf_nan=False)
    frequency_penalty: Optional[Real] = Field(None, ge=-2, le=2, allow_inf_nan=False)
    cag: Optional[AnswerOptions] = Field(None, description="cag's options: sources, unsupported, draft (cag "
                                                                  "extension).")

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        try:
            stoptext.checked(value)
        except CagError as err:
            raise ValueError(str(err)) from None
        return value

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class ChatRequest(GenerationRequest):
    messages: list[Message]
    max_completion_tokens: Optional[Whole] = Field(None, ge=1)
    metadata: Optional[dict[str, Any]] = None
    store: Optional[Flag] = None
    conversation_id: Optional[str] = Field(None, max_length=128,
                                           description="Keep turns server-side under this id (cag extension).")
    # OpenAI chat parameters cag cannot honour: typed so their shape is checked; guard.check_parameters
    # refuses any value that asks for something (tools, logprobs…).
    logprobs: Optional[Flag] = None
    top_logprobs: Optional[Whole] = Field(None, ge=0)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    functions: Optional[list[dict[str, Any]]] = None
    function_call: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[Flag] = None
    response_format: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    audio: Optional[dict[str, Any]] = None
    prediction: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[str] = None
    verbosity: Optional[str] = None
    web_search_options: Optional[dict[str, Any]] = None


class CompletionRequest(GenerationRequest):
    """OpenAI's legacy completions body. The prompt is the user's question to the knowledge base."""

    prompt: str = Field(description="The question: a string, or a list of exactly one string.")
    # OpenAI completion parameters cag cannot honour (refused by guard.check_parameters unless neutral).
    echo: Optional[Flag] = None
    suffix: Optional[str] = None
    logprobs: Optional[Whole] = Field(None, ge=0, le=5)

    @field_validator("prompt", mode="before")
    @classmethod
    def _one_prompt(cls, value: Any) -> Any:
        if isinstance(value, list):
            if not all(isinstance(v, str) for v in value):
                raise ValueError("the prompt must be text (token-id prompts are not accepted)")
            if len(value) != 1:
                raise ValueError(f"send one prompt per request (a string, or a list of one string), not {len(value)}")
            value = value[0]
        if not isinstance(value, str):
            raise ValueError("the prompt must be text (token-id prompts are not accepted)")
        return value


@dataclass(frozen=True)
class Shape:
    """How one endpoint words an answer: a chat message (streamed as deltas) or legacy completion text."""

    id_prefix: str
    object: str
    chunk_object: str
    choice: Callable[[str, str], dict]  # (whole answer, finish reason) -> the response's one choice
    piece: Callable[[Optional[str], Optional[str]], dict]  # (streamed text or None, finish reason) -> a chunk's choice
    opening: Optional[dict] = None  # the choice of the chunk sent before any text (chat: the role)


CHAT = Shape("chatcmpl", "chat.completion", "chat.completion.chunk",
             choice=lambda text, finish: {"index": 0, "message": {"role": "assistant", "content": text},
                                          "finish_reason": finish, "logprobs": None},
             piece=lambda text, finish: {"index": 0, "delta": {} if text is None else {"content": text},
                                         "finish_reason": finish, "logprobs": None},
             opening={"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None,
                      "logprobs": None})
TEXT = Shape("cmpl", "text_completion", "text_completion",
             choice=lambda text, finish: {"index": 0, "text": text, "finish_reason": finish, "logprobs": None},
             piece=lambda text, finish: {"index": 0, "text": text or "", "finish_reason": finish, "logprobs": None})


class Document(Body):
    name: str = Field(max_length=200)
    text: str


class KBCreate(Body):
    name: str
    documents: list[Document]
    model: Optional[str] = None  # one of the server's kb_models (config model and allowed_models); None: its own


class KBReplace(Body):
    documents: list[Document]
