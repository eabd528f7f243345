"""The OpenAI Responses view's request and response bodies, as msgspec types.

They follow the official ``openai`` SDK's own types (``openai.types.responses``), which are
the ground truth: every field its ``Response`` model requires is present, with the same
names and shapes. Request fields keepstream cannot honour are not declared, so they are
refused (422) rather than silently ignored; fields that do not change a text answer are
accepted.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from msgspec import UNSET, Meta, Struct, UnsetType

from ._schemas import Request

ResponseStatus = Literal["queued", "in_progress", "completed", "failed", "cancelled", "incomplete"]
ResponseInputRole = Literal["user", "assistant", "system", "developer"]

# OpenAI's bounds on metadata: 16 pairs, keys up to 64 characters, values up to 512.
MetadataKey = Annotated[str, Meta(max_length=64)]
MetadataValue = Annotated[str, Meta(max_length=512)]
Metadata = Annotated[dict[MetadataKey, MetadataValue], Meta(max_length=16)]


# -- requests ----------------------------------------------------------------------------------


class ResponseInputText(Request):
    """A text part of an input message (``output_text`` when an earlier answer is sent back)."""

    type: Literal["input_text", "output_text"]
    text: str
    annotations: list[Any] | UnsetType = UNSET
    logprobs: list[Any] | UnsetType = UNSET


class ResponseInputMessage(Request):
    """One message of ``input``: a role and text, as a string or text parts. An output item
    of an earlier response (with its ``id`` and ``status``) is accepted as it is."""

    role: ResponseInputRole
    content: str | list[ResponseInputText]
    type: Literal["message"] | UnsetType = UNSET
    id: str | UnsetType = UNSET
    status: Literal["in_progress", "completed", "incomplete"] | UnsetType = UNSET
    phase: Literal["commentary", "final_answer"] | UnsetType | None = UNSET


class CreateResponse(Request):
    """``POST /v1/responses``: a text answer to ``input`` (and the conversation before
    ``previous_response_id``), run as a keepstream generation.

    ``tools`` must be empty and ``text.format`` (if given) plain text: keepstream streams
    text answers only. ``temperature`` and ``top_p`` go to providers that take them.
    ``store``, ``user``, ``reasoning``, ``include``, ``stream_options``, ``service_tier``,
    ``prompt_cache_key`` and ``safety_identifier`` are accepted and change nothing.
    """

    model: Annotated[str, Meta(min_length=1)]
    input: str | list[ResponseInputMessage] | UnsetType = UNSET
    instructions: str | None = None
    background: bool | None = None
    stream: bool | None = None
    # The real API's minimum; what the model then produces is the provider's business.
    max_output_tokens: Annotated[int, Meta(ge=16)] | None = None
    metadata: Metadata | None = None
    previous_response_id: str | None = None
    temperature: Annotated[float, Meta(ge=0, le=2)] | None = None
    top_p: Annotated[float, Meta(ge=0, le=1)] | None = None
    truncation: Literal["auto", "disabled"] | None = None
    tool_choice: Literal["none", "auto"] | None = None
    tools: list[dict[str, Any]] | None = None
    parallel_tool_calls: bool | None = None
    text: dict[str, Any] | None = None
    reasoning: dict[str, Any] | None = None
    store: bool | None = None
    user: str | None = None
    include: list[str] | None = None
    stream_options: dict[str, Any] | None = None
    service_tier: str | None = None
    prompt_cache_key: str | None = None
    safety_identifier: str | None = None


# -- the Response object -----------------------------------------------------------------------


class ResponseOutputText(Struct, kw_only=True):
    """The text of an answer."""

    type: Literal["output_text"] = "output_text"
    text: str
    annotations: list[Any] = []
    logprobs: list[Any] = []


class ResponseOutputMessage(Struct, kw_only=True):
    """The answer, as the one output item of a response."""

    id: str
    type: Literal["message"] = "message"
    role: Literal["assistant"] = "assistant"
    status: Literal["in_progress", "completed", "incomplete"]
    content: list[ResponseOutputText]


class ResponseError(Struct, kw_only=True):
    """Why a response failed: OpenAI's ``code``, a message, and keepstream's error type."""

    code: str
    message: str
    type: str | None = None


class ResponseIncompleteDetails(Struct, kw_only=True):
    """Why a response is incomplete."""

    reason: Literal["max_output_tokens", "content_filter"] | None = None


class ResponseInputTokensDetails(Struct, kw_only=True):
    """Cached input tokens."""

    cached_tokens: int = 0
    cache_write_tokens: int = 0


class ResponseOutputTokensDetails(Struct, kw_only=True):
    """Reasoning tokens among the output tokens."""

    reasoning_tokens: int = 0


class ResponseUsage(Struct, kw_only=True):
    """Token counts, as the provider reported them."""

    input_tokens: int
    input_tokens_details: ResponseInputTokensDetails
    output_tokens: int
    output_tokens_details: ResponseOutputTokensDetails
    total_tokens: int


class ResponseTextFormat(Struct, kw_only=True, frozen=True):
    """The answer's format: always plain text."""

    type: Literal["text"] = "text"


class ResponseTextConfig(Struct, kw_only=True, frozen=True):
    """The answer's text configuration."""

    format: ResponseTextFormat = ResponseTextFormat()


class OpenAIResponse(Struct, kw_only=True):
    """A response: a keepstream generation seen through the OpenAI Responses API (its
    ``id`` is the generation's id)."""

    id: str
    object: Literal["response"] = "response"
    created_at: int
    status: ResponseStatus
    background: bool
    completed_at: int | None
    error: ResponseError | None
    incomplete_details: ResponseIncompleteDetails | None = None
    instructions: str | None
    max_output_tokens: int | None
    metadata: dict[str, str]
    model: str
    output: list[ResponseOutputMessage]
    parallel_tool_calls: bool
    previous_response_id: str | None
    temperature: float | None
    top_p: float | None
    text: ResponseTextConfig = ResponseTextConfig()
    tool_choice: Literal["none", "auto"]
    tools: list[Any] = []
    truncation: Literal["auto", "disabled"]
    usage: ResponseUsage | None
    user: str | None
