"""A generation's event log: coalesces deltas per flush window and keeps the snapshot in step.

Events are JSON objects, one per stream message:

* ``{"type": "status", "status": "running"}`` when the generation starts;
* ``{"type": "delta", "text": "..."}`` for text — every delta buffered between two flushes
  of the writer becomes *one* event (up to ``MAX_DELTA_CHARS``), so the cost per generation
  follows the flush rate, not the token rate;
* ``{"type": "status", "status": <terminal>, "usage"?: {...}, "error"?: {...}}`` last; the
  stream is closed in the same transaction.

The snapshot row (text and ``next_offset``) is brought up to date at most every
``SNAPSHOT_INTERVAL`` seconds, and whenever its other fields change (the start, the end):
rewriting a live answer's row on every commit made each commit dirty a page per live
answer, and copied each answer's whole text again and again. A snapshot is therefore up to
that much behind its stream, never ahead, and its text always matches its ``next_offset``.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections import deque
from typing import Any

import anyio

from store import AppendBatch, AppendResult, StoreBackend, StoreError
from store.types import JSONDict

# Coalescing stops here: a longer run of text becomes several delta events, so no single
# event (and no single write to a client) grows without bound when a model streams fast.
MAX_DELTA_CHARS = 8192
# The snapshot row's text is updated at most this often while an answer streams.
SNAPSHOT_INTERVAL = 1.0


def encode_event(event: JSONDict) -> bytes:
    """The stored form of an event: compact UTF-8 JSON.

    Text that cannot be UTF-8 (a lone surrogate from an upstream's error message, say)
    is stored with U+FFFD in its place rather than failing the event.
    """
    text = json.dumps(event, ensure_ascii=False, separators=(",", ":"))
    try:
        return text.encode()
    except UnicodeEncodeError:
        return _pair_surrogates(text).encode()


def scrub(value: Any) -> Any:
    """``value`` with every string made valid text (lone surrogates become U+FFFD)."""
    if isinstance(value, str):
        return _pair_surrogates(value)
    if isinstance(value, dict):
        return {scrub(k): scrub(v) for k, v in value.items()}
    if isinstance(value, list):
        return [scrub(v) for v in value]
    return value


def decode_event(payload: bytes) -> JSONDict:
    """Parse a stored event."""
    event: JSONDict = json.loads(payload)
    return event


def status_event(status: str, **extra: Any) -> JSONDict:
    """A status event; ``extra`` (usage, error) is included when not ``None``."""
    event: JSONDict = {"type": "status", "status": status}
    event.update({k: v for k, v in extra.items() if v is not None})
    return event


class TextSanitizer:
    """Keeps text valid across chunk boundaries.

    A provider may split a UTF-16 surrogate pair across two chunks (JSON ``\\ud83d`` then
    ``\\ude00``). A trailing high surrogate is held back until the next chunk; any surrogate
    that is still unpaired becomes U+FFFD, since it cannot be stored or sent as UTF-8.
    """

    __slots__ = ("_held",)

    def __init__(self) -> None:
        self._held = ""

    def feed(self, text: str) -> str:
        """Text safe to emit now."""
        if not self._held and text.isascii():  # the usual case, and the cheapest
            return text
        text = self._held + text
        self._held = ""
        if text and "\ud800" <= text[-1] <= "\udbff":
            self._held, text = text[-1], text[:-1]
        return _pair_surrogates(text)

    def flush(self) -> str:
        """Whatever is still held, made safe."""
        held, self._held = self._held, ""
        return _pair_surrogates(held)


def _pair_surrogates(text: str) -> str:
    if not any("\ud800" <= ch <= "\udfff" for ch in text):
        return text
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


class GenerationLog:
    """The append source of one running generation (see ``store.AppendSource``).

    ``add_text`` and ``add_event`` only buffer (safe to call per token); the writer takes the
    buffer at its next flush, writes the events and the snapshot row in one transaction, and
    ``flush()`` waits until everything added so far is committed.
    """

    def __init__(
        self,
        store: StoreBackend,
        generation_id: str,
        stream_id: str,
        *,
        unsnapshotted: str = "",
        worker_id: str | None = None,
    ) -> None:
        """``unsnapshotted``: text already in the stream but not in the snapshot row (what a
        dead process committed after its last snapshot update), to go in with the next.
        ``worker_id``: the worker writing it; every batch is refused (``Fenced``) once the
        generation belongs to another."""
        self.generation_id = generation_id
        self.worker_id = worker_id
        self.stream_id = stream_id
        self._store = store
        self._lock = threading.Lock()
        self._items: list[str | bytes] = []
        self._fields: JSONDict = {}
        self._close = False
        # Text taken since the snapshot row's text was last updated, and when that was.
        self._unsnapshotted = [unsnapshotted] if unsnapshotted else []
        self._snapshot_at = -math.inf
        self._added = 0
        self._pending_chars = 0  # text and events added and not yet committed
        # Batches handed to the writer and not yet committed, oldest first: (items added up
        # to here, the items, their fields, their close flag, the snapshot state before).
        self._inflight: deque[
            tuple[int, list[str | bytes], JSONDict, bool, tuple[list[str], float]]
        ] = deque()
        self._committed = 0
        # Made only when someone waits: a commit per source many times a second would
        # otherwise make (and drop) an event each time.
        self._committed_event: anyio.Event | None = None
        self.error: StoreError | None = None

    def add_text(self, text: str) -> None:
        """Buffer a text delta."""
        if not text:
            return
        with self._lock:
            self._items.append(text)
            self._added += 1
            self._pending_chars += len(text)
        self._store.mark_dirty(self)

    def add_event(
        self, event: JSONDict, *, fields: JSONDict | None = None, close: bool = False
    ) -> None:
        """Buffer a non-text event; ``fields`` update the snapshot row in the same commit."""
        payload = encode_event(event)
        with self._lock:
            self._items.append(payload)
            if fields:
                self._fields.update(fields)
            self._close = self._close or close
            self._added += 1
            self._pending_chars += len(payload)
        self._store.mark_dirty(self)

    def set_fields(self, fields: JSONDict) -> None:
        """Update the snapshot row with the next commit (with whatever text is pending)."""
        with self._lock:
            self._fields.update(fields)
        self._store.mark_dirty(self)

    @property
    def pending_chars(self) -> int:
        """Characters (and event bytes) added and not yet committed."""
        return self._pending_chars

    async def wait_for_room(self, limit: int) -> None:
        """Back-pressure: wait while more than ``limit`` characters are uncommitted (the disk
        is slow or failing), so a fast provider cannot grow the buffer without bound."""
        while self._pending_chars > limit and self.error is None:
            await self._until_committed()

    async def flush(self) -> None:
        """Wait until everything added so far is committed.

        A write the store must retry (disk full, I/O error) is simply waited for; a batch
        that can never be written (its stream was closed or deleted elsewhere) raises.
        """
        target = self._added
        while self._committed < target:
            if self.error is not None:
                raise self.error
            await self._until_committed()
        if self.error is not None:  # the last batch itself could not be written
            raise self.error

    # -- the writer's side --------------------------------------------------------------------

    def take(self) -> AppendBatch | None:
        """Everything buffered, with consecutive text coalesced into delta events."""
        now = time.monotonic()
        with self._lock:
            snapshot_due = now - self._snapshot_at >= SNAPSHOT_INTERVAL
            if not (self._items or self._fields or self._close):
                if not (self._unsnapshotted and snapshot_due):
                    return None
            items, self._items = self._items, []
            fields, self._fields = self._fields, {}
            close, self._close = self._close, False
            before = (list(self._unsnapshotted), self._snapshot_at)
            self._inflight.append((self._added, items, fields, close, before))
        payloads: list[bytes] = []
        run: list[str] = []
        text: list[str] = []
        for item in items:
            if isinstance(item, str):
                run.append(item)
                continue
            if run:
                payloads.extend(_delta_payloads(run))
                text.extend(run)
                run = []
            payloads.append(item)
        if run:
            payloads.extend(_delta_payloads(run))
            text.extend(run)
        self._unsnapshotted.extend(text)
        if fields or close or snapshot_due:
            snapshot = "".join(self._unsnapshotted)
            self._unsnapshotted = []
            self._snapshot_at = now
            return AppendBatch(
                payloads, self.generation_id, snapshot, fields, close, worker_id=self.worker_id
            )
        # Left behind: come back when it is due, new text or not (a model may pause).
        revisit = self._snapshot_at + SNAPSHOT_INTERVAL - now
        return AppendBatch(
            payloads, self.generation_id, None, fields, close, revisit, self.worker_id
        )

    def untake(self) -> None:
        """The last batch taken was rolled back: hold its items again, ahead of newer ones."""
        with self._lock:
            _, items, fields, close, before = self._inflight.pop()
            self._items[0:0] = items
            self._fields = {**fields, **self._fields}
            self._close = self._close or close
            self._unsnapshotted, self._snapshot_at = before

    def committed(self, result: AppendResult) -> None:
        """The oldest batch in flight is durable."""
        with self._lock:
            self._settle_oldest()
        self._wake()

    def failed(self, error: StoreError) -> None:
        """The oldest batch in flight can never be written: ``flush`` raises from now on."""
        with self._lock:
            if self._inflight:
                self._settle_oldest()
        self.error = error
        self._wake()

    def _settle_oldest(self) -> None:
        added, items, _, _, _ = self._inflight.popleft()
        self._committed = added
        self._pending_chars -= sum(map(len, items))

    async def _until_committed(self) -> None:
        if self._committed_event is None:
            self._committed_event = anyio.Event()
        await self._committed_event.wait()

    def _wake(self) -> None:
        event, self._committed_event = self._committed_event, None
        if event is not None:
            event.set()


def _delta_payloads(run: list[str]) -> list[bytes]:
    """One delta event for the run, or several when it is longer than ``MAX_DELTA_CHARS``."""
    text = "".join(run)
    return [
        encode_event({"type": "delta", "text": text[i : i + MAX_DELTA_CHARS]})
        for i in range(0, len(text), MAX_DELTA_CHARS)
    ]
