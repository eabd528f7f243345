"""Value types of the generation engine."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from store.types import JSONDict

ROLES = frozenset({"system", "user", "assistant", "tool", "developer"})


@dataclass(frozen=True, slots=True)
class ChatMessage:
    """One message of a conversation sent to the model."""

    role: str
    content: str


def fit_history(messages: Sequence[ChatMessage], budget: int) -> list[ChatMessage]:
    """The most recent of ``messages`` whose texts fit in ``budget`` characters together,
    oldest first (what a conversation sends the model: a window that ends now)."""
    kept: list[ChatMessage] = []
    for message in reversed(messages):
        if len(message.content) > budget:
            break
        budget -= len(message.content)
        kept.append(message)
    kept.reverse()
    return kept


@dataclass(frozen=True, slots=True)
class GenerationRequest:
    """What to generate: the conversation, which provider and model, and its parameters."""

    messages: tuple[ChatMessage, ...]
    provider: str | None = None
    model: str | None = None
    params: JSONDict = field(default_factory=dict)
    # Kept with the generation and never sent to a provider, keyed by who keeps it (the
    # OpenAI Responses view keeps a response's options under "responses").
    metadata: JSONDict = field(default_factory=dict)
    # What the provider kept from its newest answer in the session (see ``ProviderChunk``),
    # plus "unheard": how many of ``messages`` before the last came after that answer.
    # Set by keepstream, never by a request body.
    provider_state: JSONDict = field(default_factory=dict)

    @classmethod
    def from_json(cls, body: Any) -> GenerationRequest:
        """Validate a request body (``{messages | prompt, provider?, model?, params?}``).

        Raises ``ValueError`` naming the first problem found.
        """
        if not isinstance(body, dict):
            raise ValueError("the request body must be a JSON object")
        where = _lone_surrogate(body, "")
        if where is not None:
            raise ValueError(f"{where} contains an unpaired UTF-16 surrogate (invalid text)")
        unknown = set(body) - {"messages", "prompt", "provider", "model", "params"}
        if unknown:
            raise ValueError(f"unknown field(s): {', '.join(sorted(unknown))}")
        if ("messages" in body) == ("prompt" in body):
            raise ValueError("give exactly one of 'messages' or 'prompt'")
        if "prompt" in body:
            prompt = body["prompt"]
            if not isinstance(prompt, str) or not prompt:
                raise ValueError("'prompt' must be a non-empty string")
            messages: tuple[ChatMessage, ...] = (ChatMessage("user", prompt),)
        else:
            raw = body["messages"]
            if not isinstance(raw, list) or not raw:
                raise ValueError("'messages' must be a non-empty list")
            parsed = []
            for i, item in enumerate(raw):
                if not isinstance(item, dict):
                    raise ValueError(f"messages[{i}] must be an object")
                role, content = item.get("role"), item.get("content")
                if not isinstance(role, str) or role not in ROLES:  # (a dict is unhashable)
                    raise ValueError(f"messages[{i}].role must be one of {sorted(ROLES)}")
                if not isinstance(content, str):
                    raise ValueError(f"messages[{i}].content must be a string")
                parsed.append(ChatMessage(role, content))
            messages = tuple(parsed)
        provider, model, params = body.get("provider"), body.get("model"), body.get("params", {})
        if provider is not None and (not isinstance(provider, str) or not provider):
            raise ValueError("'provider' must be a non-empty string")
        if model is not None and (not isinstance(model, str) or not model):
            raise ValueError("'model' must be a non-empty string")
        if not isinstance(params, dict):
            raise ValueError("'params' must be an object")
        return cls(messages, provider, model, params)

    @classmethod
    def from_stored(cls, stored: JSONDict) -> GenerationRequest:
        """A request as ``to_json`` stored it, ``metadata`` and ``provider_state`` included."""
        body = {
            key: stored[key]
            for key in ("messages", "provider", "model", "params")
            if stored.get(key) is not None
        }
        request = cls.from_json(body)
        metadata, state = stored.get("metadata"), stored.get("provider_state")
        return replace(
            request,
            metadata=metadata if isinstance(metadata, dict) else {},
            provider_state=state if isinstance(state, dict) else {},
        )

    def to_json(self) -> JSONDict:
        """The request as stored with its generation (``metadata`` and ``provider_state``
        only when set)."""
        stored: JSONDict = {
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "provider": self.provider,
            "model": self.model,
            "params": self.params,
        }
        if self.metadata:
            stored["metadata"] = self.metadata
        if self.provider_state:
            stored["provider_state"] = self.provider_state
        return stored

    @property
    def prompt(self) -> str:
        """The last user message (what the simulated model echoes)."""
        for message in reversed(self.messages):
            if message.role == "user":
                return message.content
        return ""


def _lone_surrogate(value: Any, path: str) -> str | None:
    """The path of the first string (key or value) holding a lone surrogate, if any.

    JSON may escape half of a surrogate pair (``"\\ud83d"``); such text cannot be encoded as
    UTF-8, so it is refused up front instead of failing the generation later.
    """
    if isinstance(value, str):
        return path or "body" if _has_surrogate(value) else None
    if isinstance(value, dict):
        for key, item in value.items():
            child = f"{path}.{key}" if path else str(key)
            if _has_surrogate(key):
                return child
            found = _lone_surrogate(item, child)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = _lone_surrogate(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def _has_surrogate(text: str) -> bool:
    return not text.isascii() and any("\ud800" <= ch <= "\udfff" for ch in text)


@dataclass(frozen=True, slots=True)
class ProviderChunk:
    """One piece of a provider's answer: text, and/or token usage at the end, and/or
    ``state`` for the conversation's next answer (Dify's ``conversation_id``): the last
    state seen is kept with the generation and handed to the provider, as
    ``request.provider_state``, for the next answer of the same session."""

    text: str = ""
    usage: JSONDict | None = None
    state: JSONDict | None = None
