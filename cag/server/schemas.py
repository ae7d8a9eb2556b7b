"""Request and response bodies in the OpenAI shape, plus cag's knowledge-base management bodies.

Every field cag reads, and every OpenAI field it does not support, is typed here, so a malformed value is
a 400 naming the field rather than an exception later. Whether a supported-in-shape field asks for
something cag cannot do (n > 1, tools, logprobs…) is decided by guard.check_parameters; fields nobody
declared are accepted and ignored.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field, field_validator

MAX_STOP = 4  # OpenAI's limit on stop sequences


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
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


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="allow")
    include_usage: bool = False


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")
    model: str = Field(description="The knowledge base to answer from.")
    messages: list[Message]
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**64 - 1, description="A 64-bit integer.")
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    stop: Union[str, list[str], None] = Field(None, description=f"Up to {MAX_STOP} strings; the answer ends "
                                                                "before the first one and does not include it.")
    user: Optional[str] = None
    metadata: Optional[dict[str, Any]] = None
    store: Optional[bool] = None
    conversation_id: Optional[str] = Field(None, max_length=128,
                                           description="Keep turns server-side under this id (cag extension).")
    # OpenAI parameters cag cannot honour: typed so their shape is checked; guard.check_parameters
    # refuses any value that asks for something (n > 1, tools, logprobs, non-zero penalties…).
    n: Optional[int] = Field(None, ge=1)
    best_of: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = None
    top_logprobs: Optional[int] = Field(None, ge=0)
    logit_bias: Optional[dict[str, float]] = None
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    tools: Optional[list[dict[str, Any]]] = None
    tool_choice: Union[str, dict[str, Any], None] = None
    functions: Optional[list[dict[str, Any]]] = None
    function_call: Union[str, dict[str, Any], None] = None
    parallel_tool_calls: Optional[bool] = None
    response_format: Optional[dict[str, Any]] = None
    modalities: Optional[list[str]] = None
    audio: Optional[dict[str, Any]] = None
    prediction: Optional[dict[str, Any]] = None
    reasoning_effort: Optional[str] = None
    verbosity: Optional[str] = None
    web_search_options: Optional[dict[str, Any]] = None

    @field_validator("stop", mode="before")
    @classmethod
    def _stops(cls, value: Any) -> Any:
        items = [] if value is None else [value] if isinstance(value, str) else value
        if not isinstance(items, list) or not all(isinstance(s, str) for s in items):
            raise ValueError(f"stop must be a string or a list of at most {MAX_STOP} strings")
        if len(items) > MAX_STOP:
            raise ValueError(f"at most {MAX_STOP} stop sequences are accepted, not {len(items)}")
        if any(not s for s in items):
            raise ValueError("a stop sequence must not be empty")
        return value

    @property
    def stop_sequences(self) -> tuple[str, ...]:
        return (self.stop,) if isinstance(self.stop, str) else tuple(self.stop or ())


class Document(BaseModel):
    name: str = Field(max_length=200)
    text: str


class KBCreate(BaseModel):
    name: str
    documents: list[Document]


class KBReplace(BaseModel):
    documents: list[Document]
