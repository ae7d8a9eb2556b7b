"""Request and response bodies in the OpenAI shape, plus cag's knowledge-base management bodies.

Unknown fields are accepted and ignored (clients send plenty: `n`, `logprobs`, `tools`…), as OpenAI's
own server does for the ones it does not use.
"""

from __future__ import annotations

from typing import Any, Literal, Optional, Union

from pydantic import BaseModel, ConfigDict, Field


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: Union[str, list[dict[str, Any]], None] = None

    @property
    def text(self) -> str:
        """Plain text of the message; multi-part content keeps its text parts only."""
        if isinstance(self.content, list):
            return "".join(p.get("text", "") for p in self.content if p.get("type") == "text")
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
    seed: Optional[int] = None
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    user: Optional[str] = None
    conversation_id: Optional[str] = Field(None, max_length=128,
                                           description="Keep turns server-side under this id (cag extension).")


class Document(BaseModel):
    name: str = Field(max_length=200)
    text: str


class KBCreate(BaseModel):
    name: str
    documents: list[Document]


class KBReplace(BaseModel):
    documents: list[Document]
