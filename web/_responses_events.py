"""A generation's log as OpenAI Responses objects and stream events.

Everything here is a pure function of the generation's row and its log, so a replay of the
log numbers every event exactly as the first reading did; that is what makes
``starting_after`` exact. A log holds ``status running``, then deltas, then one terminal
status (or only the terminal status, for a generation that ended before it ran). It maps to:

===========================  ==================================================================
seq 0                        ``response.created`` (status ``queued``, or ``in_progress`` for a
                             request that is not background)
``status running``           ``response.in_progress``, ``response.output_item.added`` (the
                             assistant message), ``response.content_part.added`` (its text)
each ``delta``               one ``response.output_text.delta``
terminal status              if it ran: ``response.output_text.done``,
                             ``response.content_part.done``, ``response.output_item.done``;
                             then ``response.completed``, ``response.failed`` (failed,
                             interrupted) or ``response.incomplete`` (cancelled)
===========================  ==================================================================

Statuses: queued → ``queued``, running → ``in_progress``, completed → ``completed``, failed →
``failed``, cancelled → ``cancelled``, interrupted → ``failed`` with the error keepstream
recorded (``code: server_error``, ``type: interrupted``). The SDK has no stream event for a
cancelled response, so a cancel ends the stream with ``response.incomplete`` carrying the
Response with status ``cancelled`` and the partial answer.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from store import GenerationRecord
from store.types import JSONDict
from streaming import answer_message_id

from ._responses_schemas import (
    OpenAIResponse,
    ResponseError,
    ResponseInputTokensDetails,
    ResponseOutputMessage,
    ResponseOutputText,
    ResponseOutputTokensDetails,
    ResponseStatus,
    ResponseUsage,
)

# Where a Responses request's options live in ``GenerationRequest.metadata``.
OPTIONS_KEY = "responses"

STATUSES: dict[str, ResponseStatus] = {
    "queued": "queued",
    "running": "in_progress",
    "completed": "completed",
    "failed": "failed",
    "cancelled": "cancelled",
    "interrupted": "failed",
}
FINAL_EVENTS = {"completed": "response.completed", "cancelled": "response.incomplete"}
FAILED_EVENT = "response.failed"
# OpenAI's error codes are a closed set; keepstream's own type goes into ``error.type``.
ERROR_CODE = "server_error"

# (sequence number, event type, event data)
StreamEvent = tuple[int, str, JSONDict]


@dataclass(frozen=True, slots=True)
class ResponseView:
    """What a Response says that never changes: the generation's id, when it was created,
    its model, and the request's Responses options."""

    id: str
    created_at: int
    model: str
    options: Mapping[str, Any]

    @classmethod
    def of(cls, record: GenerationRecord) -> ResponseView:
        """The view of a generation (one made through the native API has no options)."""
        metadata = record.request.get("metadata")
        options = metadata.get(OPTIONS_KEY) if isinstance(metadata, dict) else None
        return cls(
            id=record.id,
            created_at=int(record.created_at),
            model=record.model or record.provider,
            options=options if isinstance(options, dict) else {},
        )

    @property
    def item_id(self) -> str:
        """The id of the answer's output message: its message id in a session too."""
        return answer_message_id(self.id)

    @property
    def background(self) -> bool:
        """Whether it was created with ``background: true``."""
        return bool(self.options.get("background"))


def response_usage(usage: Mapping[str, Any] | None) -> ResponseUsage | None:
    """OpenAI's usage from a provider's: Responses names (the simulated model) or Chat
    Completions names (an OpenAI-compatible upstream)."""
    if not usage:
        return None

    def count(*names: str, source: Mapping[str, Any] = usage) -> int:
        for name in names:
            value = source.get(name)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        return 0

    input_tokens = count("input_tokens", "prompt_tokens")
    output_tokens = count("output_tokens", "completion_tokens")
    total = count("total_tokens") or input_tokens + output_tokens
    input_details = usage.get("input_tokens_details") or usage.get("prompt_tokens_details")
    output_details = usage.get("output_tokens_details") or usage.get("completion_tokens_details")
    return ResponseUsage(
        input_tokens=input_tokens,
        input_tokens_details=ResponseInputTokensDetails(
            cached_tokens=count("cached_tokens", source=input_details)
            if isinstance(input_details, dict)
            else 0
        ),
        output_tokens=output_tokens,
        output_tokens_details=ResponseOutputTokensDetails(
            reasoning_tokens=count("reasoning_tokens", source=output_details)
            if isinstance(output_details, dict)
            else 0
        ),
        total_tokens=total,
    )


def response_error(status: str, error: Mapping[str, Any] | None) -> ResponseError | None:
    """The error of a failed (or interrupted) generation; ``None`` otherwise."""
    if STATUSES.get(status) != "failed":
        return None
    error = error or {}
    message = error.get("message")
    kind = error.get("type")
    return ResponseError(
        code=ERROR_CODE,
        message=message if isinstance(message, str) else f"the generation ended {status}",
        type=kind if isinstance(kind, str) else status,
    )


def output_message(view: ResponseView, text: str, status: str) -> ResponseOutputMessage:
    """The answer as an output item: in progress while running, then completed or
    incomplete."""
    item_status = {"running": "in_progress", "completed": "completed"}.get(status, "incomplete")
    return ResponseOutputMessage(
        id=view.item_id,
        status=item_status,  # type: ignore[arg-type]
        content=[ResponseOutputText(text=text)],
    )


def response_object(
    view: ResponseView,
    status: str,
    *,
    text: str = "",
    started: bool = False,
    error: Mapping[str, Any] | None = None,
    usage: Mapping[str, Any] | None = None,
    finished_at: float | None = None,
) -> OpenAIResponse:
    """The Response for a generation in keepstream status ``status`` with ``text`` so far;
    ``started``: whether it ever ran (otherwise it has no output)."""
    options = view.options
    metadata = options.get("metadata")
    return OpenAIResponse(
        id=view.id,
        created_at=view.created_at,
        status=STATUSES.get(status, "failed"),
        background=view.background,
        completed_at=int(finished_at) if finished_at is not None else None,
        error=response_error(status, error),
        instructions=options.get("instructions"),
        max_output_tokens=options.get("max_output_tokens"),
        metadata=dict(metadata) if isinstance(metadata, dict) else {},
        model=view.model,
        output=[output_message(view, text, status)] if started else [],
        parallel_tool_calls=options.get("parallel_tool_calls", True),
        previous_response_id=options.get("previous_response_id"),
        temperature=options.get("temperature"),
        top_p=options.get("top_p"),
        tool_choice=options.get("tool_choice", "auto"),
        truncation=options.get("truncation", "disabled"),
        usage=response_usage(usage),
        user=options.get("user"),
    )


def snapshot(record: GenerationRecord) -> OpenAIResponse:
    """``GET /v1/responses/{id}``: the Response as the generation's row stands."""
    return response_object(
        ResponseView.of(record),
        record.status,
        text=record.text,
        started=record.started_at is not None,
        error=record.error,
        usage=record.usage,
        finished_at=record.finished_at,
    )


class EventMapper:
    """Turns one generation's log events, in order from the first, into numbered Responses
    stream events (see the module's table). One mapper per reading of the log."""

    def __init__(self, view: ResponseView) -> None:
        self.view = view
        self._next = 0
        self._started = False
        self._text: list[str] = []

    def _event(self, kind: str, **data: Any) -> StreamEvent:
        seq = self._next
        self._next += 1
        return seq, kind, {"type": kind, "sequence_number": seq, **data}

    def _where(self) -> JSONDict:
        return {"item_id": self.view.item_id, "output_index": 0, "content_index": 0}

    def created(self) -> list[StreamEvent]:
        """Sequence 0: ``response.created``."""
        status = "queued" if self.view.background else "running"
        return [self._event("response.created", response=response_object(self.view, status))]

    def feed(
        self, event: Mapping[str, Any], *, finished_at: float | None = None
    ) -> list[StreamEvent]:
        """The stream events for the next log event (``finished_at``: the row's, for the
        terminal status)."""
        kind = event.get("type")
        if kind == "delta":
            return self._delta(str(event.get("text", "")))
        if kind != "status":
            return []  # nothing else is logged today; a newer kind is not the SDK's business
        status = str(event.get("status"))
        if status == "running":
            return self._start()
        if status == "queued":
            return []
        return self._finish(status, event, finished_at)

    def _start(self) -> list[StreamEvent]:
        if self._started:
            return []
        self._started = True
        message = ResponseOutputMessage(id=self.view.item_id, status="in_progress", content=[])
        return [
            self._event("response.in_progress", response=response_object(self.view, "running")),
            self._event("response.output_item.added", output_index=0, item=message),
            self._event(
                "response.content_part.added",
                **self._where(),
                part=ResponseOutputText(text=""),
            ),
        ]

    def _delta(self, text: str) -> list[StreamEvent]:
        if not text:
            return []
        events = self._start()  # a log always opens with ``running``; never trust that blindly
        self._text.append(text)
        events.append(
            self._event("response.output_text.delta", **self._where(), delta=text, logprobs=[])
        )
        return events

    def _finish(
        self, status: str, event: Mapping[str, Any], finished_at: float | None
    ) -> list[StreamEvent]:
        text = "".join(self._text)
        events: list[StreamEvent] = []
        if self._started:
            events += [
                self._event("response.output_text.done", **self._where(), text=text, logprobs=[]),
                self._event(
                    "response.content_part.done",
                    **self._where(),
                    part=ResponseOutputText(text=text),
                ),
                self._event(
                    "response.output_item.done",
                    output_index=0,
                    item=output_message(self.view, text, status),
                ),
            ]
        final = response_object(
            self.view,
            status,
            text=text,
            started=self._started,
            error=event.get("error"),
            usage=event.get("usage"),
            finished_at=finished_at,
        )
        events.append(self._event(FINAL_EVENTS.get(status, FAILED_EVENT), response=final))
        return events
