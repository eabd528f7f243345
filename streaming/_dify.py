"""A provider for Dify chat apps: ``POST {base_url}/chat-messages`` in streaming mode.

Dify keeps the conversation itself: a message carries only the new ``query`` and the
``conversation_id`` of the conversation it continues. The id Dify gives an answer is kept
with the generation (``ProviderChunk.state``) and handed back for the session's next answer,
with the messages Dify has not heard since (an answer that failed before reaching it)
prefixed to the query as a transcript. With no conversation to continue (the first message,
a regenerated answer, a conversation Dify no longer knows), the whole history keepstream
holds goes into the query that way, so nothing the user said is lost.

The stream is ``data: {"event": ...}`` events: ``message`` and ``agent_message`` carry text,
``message_file`` a file the app produced (appended as a Markdown link), ``message_end`` the
usage and the end, ``error`` a failure; ``ping`` and the workflow, node, thought and
text-to-speech events carry no answer text and are skipped. Faults are handled as
``_upstream`` describes; Dify cannot continue a partial answer, so a fault after the first
token fails the generation with its text kept. An answer that ends early (a cancel, a fault)
is stopped on Dify's side as well (``/chat-messages/{task_id}/stop``).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator
from contextlib import aclosing
from typing import Any
from urllib.parse import urljoin

import anyio
from httpx_sse import ServerSentEvent

from store.types import JSONDict

from ._exceptions import ProviderError
from ._provider import GenerationRun
from ._upstream import (
    DEFAULT_LIMITS,
    EventStreamUpstream,
    Malformed,
    Parsed,
    UpstreamLimits,
    coded_error_text,
    json_object,
)
from .types import ChatMessage, GenerationRequest, ProviderChunk

logger = logging.getLogger("keepstream.dify")

# Request params passed through to Dify as they are, with the JSON type each must have:
# the app's input variables, files for multimodal apps (``{"type", "transfer_method",
# "url" | "upload_file_id"}``), title generation, the end user, a workflow version.
PASSTHROUGH_PARAMS: dict[str, type] = {
    "inputs": dict,
    "files": list,
    "auto_generate_name": bool,
    "user": str,
    "workflow_id": str,
}
# The end user Dify scopes conversations to, when a generation has no owner.
ANONYMOUS_USER = "keepstream"
# How long telling Dify to stop an abandoned answer may take.
STOP_TIMEOUT = 3.0
ROLE_LABELS = {
    "system": "System",
    "developer": "System",
    "user": "User",
    "assistant": "Assistant",
    "tool": "Tool",
}


class DifyProvider:
    """Streams answers of a Dify chat, agent or chatflow app.

    ``base_url`` is the app's API root (``https://api.dify.ai/v1``), ``api_key`` the app's
    key; ``limits`` its timeouts and retries. The conversation is
    continued on Dify's side from ``request.provider_state["conversation_id"]``; the end
    user is the ``user`` param, else the generation's owner.
    """

    name = "dify"

    def __init__(
        self,
        *,
        base_url: str,
        api_key: str,
        limits: UpstreamLimits = DEFAULT_LIMITS,
    ) -> None:
        if not api_key:
            raise ValueError("a Dify app needs its API key")
        self.base_url = base_url.rstrip("/")
        self.upstream = EventStreamUpstream(
            headers={"Authorization": f"Bearer {api_key}"}, limits=limits
        )

    def validate(self, request: GenerationRequest) -> None:
        """Raise ``ValueError`` for params Dify is not given, or for a conversation that
        does not end with a user message (Dify answers a query)."""
        unknown = set(request.params) - set(PASSTHROUGH_PARAMS)
        if unknown:
            raise ValueError(f"unsupported dify params: {', '.join(sorted(unknown))}")
        for key, kind in PASSTHROUGH_PARAMS.items():
            value = request.params.get(key)
            if value is not None and not isinstance(value, kind):
                raise ValueError(f"params.{key} must be {_JSON_TYPE_NAMES[kind]}")
        files = request.params.get("files") or []
        if not all(isinstance(item, dict) for item in files):
            raise ValueError("params.files must be a list of objects")
        if request.messages[-1].role != "user" or not request.messages[-1].content:
            raise ValueError("dify answers a user message: the last message must be one")

    def _user(self, request: GenerationRequest, run: GenerationRun) -> str:
        user = request.params.get("user")
        return user if isinstance(user, str) and user else run.owner or ANONYMOUS_USER

    def _body(
        self, request: GenerationRequest, run: GenerationRun, conversation_id: str | None
    ) -> dict[str, Any]:
        if conversation_id is None:
            query = query_text(request.messages, unheard=len(request.messages) - 1)
        else:
            unheard = request.provider_state.get("unheard")
            query = query_text(request.messages, unheard=unheard if isinstance(unheard, int) else 0)
        body: dict[str, Any] = {
            "inputs": {},
            **{key: value for key, value in request.params.items() if value is not None},
            "query": query,
            "response_mode": "streaming",
            "user": self._user(request, run),
        }
        if conversation_id is not None:
            body["conversation_id"] = conversation_id
        return body

    async def stream(
        self, request: GenerationRequest, *, run: GenerationRun
    ) -> AsyncGenerator[ProviderChunk, None]:
        """Dify's answer; every failure becomes ``ProviderError``. Closing the generator (or
        cancelling it) closes the connection and stops the answer on Dify's side."""
        known = request.provider_state.get("conversation_id")
        conversation_id = known if isinstance(known, str) and known else None
        url = f"{self.base_url}/chat-messages"
        try:
            response = await self.upstream.open(url, self._body(request, run, conversation_id))
        except ProviderError as exc:
            if conversation_id is None or exc.status != 404:
                raise
            # Dify no longer has the conversation (deleted, or another app's): a new one,
            # which hears the history as a transcript.
            logger.info("dify conversation %s is gone; starting a new one", conversation_id)
            response = await self.upstream.open(url, self._body(request, run, None))
        reader = _EventReader(self.base_url)
        ended = False
        try:
            async with aclosing(self.upstream.chunks(response, reader.parse)) as chunks:
                async for chunk in chunks:
                    yield chunk
            ended = True
        finally:
            await response.aclose()
            if not ended and reader.task_id is not None:
                await self._stop(reader.task_id, self._user(request, run))

    async def _stop(self, task_id: str, user: str) -> None:
        """Ask Dify to stop an answer nobody reads any more; best effort, bounded, and
        shielded (it runs while the generation is being cancelled)."""
        with anyio.move_on_after(STOP_TIMEOUT, shield=True):
            try:
                response = await self.upstream.client.post(
                    f"{self.base_url}/chat-messages/{task_id}/stop", json={"user": user}
                )
                if response.status_code != 200:
                    logger.info("dify did not stop task %s: %s", task_id, response.status_code)
            except Exception as exc:  # best effort: the generation's own end matters more
                logger.info("could not stop dify task %s: %s", task_id, exc)

    async def aclose(self) -> None:
        """Close the HTTP connection pool."""
        await self.upstream.aclose()


def query_text(messages: tuple[ChatMessage, ...], *, unheard: int) -> str:
    """What Dify is asked: the last message, preceded by the ``unheard`` messages before it
    (those Dify's conversation does not hold) as a transcript."""
    last = messages[-1].content
    earlier = messages[max(0, len(messages) - 1 - unheard) : -1] if unheard > 0 else ()
    if not earlier:
        return last
    transcript = "\n\n".join(f"{ROLE_LABELS[m.role]}: {m.content}" for m in earlier)
    return f"The conversation so far:\n\n{transcript}\n\n---\n\n{last}"


class _EventReader:
    """Reads one answer's events, remembering its task id (to stop it) and reporting the
    conversation id (kept with each answer, for the next) with the first event that names
    it."""

    def __init__(self, base_url: str) -> None:
        self.base_url = base_url  # what relative file URLs are relative to
        self.task_id: str | None = None
        self._conversation_id: str | None = None
        self._agent = False  # agent_message deltas seen: a closing message repeats them

    def parse(self, sse: ServerSentEvent) -> Parsed:
        """One Dify event; ``Malformed`` when it has no ``event`` or its text is not a
        string, ``ProviderError`` for an ``error`` event."""
        if sse.event == "ping" or not sse.data:
            return Parsed()
        obj = json_object(sse.data)
        event = obj.get("event")
        if not isinstance(event, str):
            raise Malformed(sse.data)
        if isinstance(obj.get("task_id"), str):
            self.task_id = obj["task_id"]
        state = self._state(obj)
        if event == "error":
            self.task_id = None  # the task has ended on Dify's side: nothing to stop
            status = obj.get("status")
            raise ProviderError(
                f"upstream error: {coded_error_text(obj)}",
                status=status if isinstance(status, int) else None,
                kind="upstream_error",
            )
        if event == "message_replace":
            # Output moderation replaced the answer; what was committed cannot be unsaid.
            replacement = obj.get("answer")
            raise ProviderError(
                f"upstream withdrew the answer (moderation), replacing it with: {replacement!r}",
                kind="upstream_error",
            )
        text = ""
        if event in ("message", "agent_message"):
            answer = obj.get("answer")
            if not isinstance(answer, str):
                raise Malformed(sse.data)
            if event == "agent_message":
                self._agent = True
            if event == "agent_message" or not self._agent:
                text = answer
        elif event == "message_file":
            text = _file_link(obj, self.base_url)
        elif event == "message_end":
            metadata = obj.get("metadata")
            usage = metadata.get("usage") if isinstance(metadata, dict) else None
            usage = usage if isinstance(usage, dict) else None
            return Parsed(ProviderChunk("", usage, state), finished=True, last=True)
        if text or state is not None:
            return Parsed(ProviderChunk(text, None, state), progress=True)
        # A workflow step, a node, a thought, speech: the app is at work.
        return Parsed(progress=True)

    def _state(self, obj: JSONDict) -> JSONDict | None:
        conversation_id = obj.get("conversation_id")
        if not isinstance(conversation_id, str) or not conversation_id:
            return None
        if conversation_id == self._conversation_id:
            return None
        self._conversation_id = conversation_id
        return {"conversation_id": conversation_id}


def _file_link(obj: JSONDict, base_url: str) -> str:
    """A file the app produced, as a Markdown link (an image as an image). A self-hosted
    Dify without ``FILES_URL`` gives a path: it is on the API's host."""
    url = obj.get("url")
    if not isinstance(url, str) or not url or obj.get("belongs_to", "assistant") != "assistant":
        return ""
    url = urljoin(base_url, url)
    kind = obj.get("type")
    if kind == "image":
        return f"\n\n![image]({url})\n\n"
    return f"\n\n[{kind if isinstance(kind, str) and kind else 'file'}]({url})\n\n"


_JSON_TYPE_NAMES = {dict: "an object", list: "a list", bool: "a boolean", str: "a string"}
