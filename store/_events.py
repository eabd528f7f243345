"""Wake-up events by key, for waiters in this process."""

from __future__ import annotations

import weakref

import anyio


class ChangeEvents:
    """Per-key events (a stream's, a session's), each set and replaced by the next change
    to its key. Held weakly: the waiters hold their events, and a key nobody waits on costs
    nothing (one that stops waiting leaves no entry behind)."""

    def __init__(self) -> None:
        self._events: weakref.WeakValueDictionary[str, anyio.Event] = weakref.WeakValueDictionary()

    def __len__(self) -> int:
        """How many keys have an event someone still holds."""
        return len(self._events)

    def event(self, key: str) -> anyio.Event:
        """The event the next change to ``key`` sets (take it before reading what it
        guards)."""
        event = self._events.get(key)
        if event is None:
            event = self._events[key] = anyio.Event()
        return event

    def wake(self, keys: list[str]) -> None:
        """Set the events of ``keys``."""
        for key in keys:
            event = self._events.pop(key, None)
            if event is not None:
                event.set()

    def wake_all(self) -> None:
        """Set every event (after messages may have been missed)."""
        self.wake(list(self._events.keys()))
