"""The soak's load: client scenarios (generations, resumes, cancels, sessions, Durable
Streams), their checks, and the per-minute figures they feed (see ``bench/soak.py``)."""

from __future__ import annotations

import argparse
import contextlib
import json
import random
import tempfile
import time
from array import array
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from httpx_sse import ServerSentEvent, SSEError, aconnect_sse

from bench._durable import STREAM_ROOT, encode, unique_name
from bench._live import percentile
from bench._parse import TERMINAL

DEFAULT_MINUTES = 30.0
QUICK_MINUTES = 2.0
DEFAULT_CLIENTS = 50
DEFAULT_RATE = 50.0  # tokens/s of the simulated model
DEFAULT_TOKENS = 300  # most tokens an answer (a generation asks for a third to all of it)
DEFAULT_OUT = Path(tempfile.gettempdir()) / "keepstream-soak.json"
CAPACITY = 256  # the server's --max-running and --max-queued
LONG_POLL_TIMEOUT = 5.0  # the server's --long-poll-timeout, s
MAX_OPEN_SESSIONS = 8  # below the server's default of 10 open sessions per user
BASELINE_MINUTES = 5.0  # memory growth is measured from here (or a third of the run)
MEMORY_TARGET_PCT = 5.0
TIME_LIMIT_SLACK = 120.0  # --time-limit 0: the run's length plus this

REQUEST_TIMEOUT = 30.0  # one request, or the wait for the next SSE bytes
CONNECT_TIMEOUT = 5.0
KEEPALIVE_EXPIRY = 4.0  # uvicorn closes idle keep-alive connections after 5 s: not reused after 4
SCENARIO_TIMEOUT = 60.0
HEALTH_TIMEOUT = 5.0
RAMP_SECONDS = 5.0  # the clients start spread over this long
THINK_SECONDS = 0.5  # a client pauses up to this long between scenarios
MAX_SCENARIOS = 1_000_000  # per client: the loop's bound in count (time ends it long before)
MAX_MONITOR_STEPS = 1_000_000
CHECK_INTERVAL = 1.0  # how often the monitor looks whether the server is still alive
SETTLE_SECONDS = 10.0  # after the load, before the idle look at the server

MAX_DROPS = 3
MAX_DROP_EVENTS = 25  # a drop comes after 1 to this many events
RESUME_PAUSE = 1.0  # a dropped reader waits up to this long before resuming
MAX_RECONNECTS = 5  # connections beyond the planned drops before a reader gives up
POST_SSE_SHARE = 0.3  # generate: share of POSTs with Accept: text/event-stream
SESSION_DROP_SHARE = 0.3
SESSION_DELETE_SHARE = 0.25
STREAM_TTL_SHARE = 0.2
STREAM_TTL = 30  # seconds; such a stream is left to the server's expiry sweep
LONG_PAUSE_SHARE = 0.1  # stream: the writer pauses past the long-poll timeout once
MAX_APPEND_PAUSE = 0.2
MAX_EXTRA_POLLS = 10  # long-polls beyond one per message before a reader gives up
MAX_CATCH_UP_READS = 100
MERGE_PATCH = "application/merge-patch+json"

SCENARIO_WEIGHTS = {"generate": 25, "resume": 25, "cancel": 10, "session": 15, "stream": 25}
KINDS = ("create", "sse", "resume", "snapshot", "cancel", "session", "ses-sse", "stream", "poll")
ERROR_KINDS = ("5xx", "status", "mismatch", "timeout", "net", "client")
FATAL_ERRORS = ("5xx", "mismatch")  # these make the exit status 1
MAX_ERROR_SAMPLES = 20
LOG_TAIL_LINES = 40
WORDS = ("soak", "stream", "café", "日本語", "🙂", "résumé", "λ")


# -- figures --------------------------------------------------------------------------------------


@dataclass
class Window:
    """What completed in one stretch of the run (a minute, or all of it)."""

    counts: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    request_ms: array[float] = field(default_factory=lambda: array("d"))
    ttfe_ms: array[float] = field(default_factory=lambda: array("d"))

    def add(self, other: Window) -> None:
        """Add ``other``'s figures to these."""
        self.counts.update(other.counts)
        self.errors.update(other.errors)
        self.request_ms.extend(other.request_ms)
        self.ttfe_ms.extend(other.ttfe_ms)


def quantiles(values: array[float]) -> dict[str, float | None]:
    """p50, p90 and p99 (nearest rank) of ``values``."""
    ordered = sorted(values)
    return {f"p{q}": percentile(ordered, q / 100) for q in (50, 90, 99)}


class Stats:
    """The load's counters: a window per minute, the totals, the first errors."""

    def __init__(self) -> None:
        self.window = Window()
        self.total = Window()
        self.samples: list[str] = []
        self.started = time.monotonic()

    def count(self, kind: str, ms: float | None = None) -> None:
        """A request of ``kind`` completed (or failed); ``ms`` its latency, if it is timed."""
        self.window.counts[kind] += 1
        if ms is not None:
            self.window.request_ms.append(ms)

    def ttfe(self, ms: float) -> None:
        """An SSE response's first event arrived ``ms`` after its request was sent."""
        self.window.ttfe_ms.append(ms)

    def error(self, kind: str, detail: str) -> None:
        """Count an error of ``kind`` (one of ``ERROR_KINDS``); the first ones are kept."""
        self.window.errors[kind] += 1
        if len(self.samples) < MAX_ERROR_SAMPLES:
            at = time.monotonic() - self.started
            self.samples.append(f"{at:7.1f} s  {kind}: {detail}")

    def rotate(self) -> Window:
        """The current window, added to the totals and replaced by an empty one."""
        window, self.window = self.window, Window()
        self.total.add(window)
        return window


@dataclass
class SSERead:
    """One SSE response as a reader saw it."""

    status: int = 0
    headers: httpx.Headers = field(default_factory=httpx.Headers)
    events: int = 0
    stopped: bool = False  # the client closed it (a drop, or it had what it wanted)


@dataclass
class Transcript:
    """A generation's events as one reader assembled them, over any number of connections."""

    prefix: str = ""  # session streams: ids are "<generation id>:<offset>"
    text: list[str] = field(default_factory=list)
    last_id: int = 0
    status: str | None = None  # the terminal status, once seen
    problems: list[str] = field(default_factory=list)
    loose: bool = False  # the next id is not checked (after a ?text_offset= resume)

    def feed(self, event: ServerSentEvent) -> bool:
        """Take one event; whether to keep reading (not after the terminal status)."""
        raw = event.id or ""
        if self.prefix:
            if not raw.startswith(self.prefix):
                return True  # another answer of the session: not this transcript's
            raw = raw[len(self.prefix) :]
        try:
            offset = int(raw)
            data = json.loads(event.data)
        except ValueError as exc:
            self.problems.append(f"malformed event {event.id!r} {event.data[:80]!r}: {exc}")
            return False
        if not self.loose and offset != self.last_id + 1:
            self.problems.append(f"event id {offset} after {self.last_id}")
        self.loose = False
        self.last_id = offset
        if event.event == "delta":
            self.text.append(data["text"])
        elif event.event == "status" and data.get("status") in TERMINAL:
            self.status = data["status"]
            return False
        return True

    def verify(self, snapshot: dict[str, Any]) -> list[str]:
        """What differs from the generation's final snapshot (nothing, when all is well)."""
        problems = list(self.problems)
        if self.status is None:
            problems.append("no terminal status event")
        elif snapshot.get("status") != self.status:
            problems.append(f"final event {self.status}, snapshot {snapshot.get('status')}")
        text, expected = "".join(self.text), snapshot.get("text") or ""
        if text != expected:
            at = next(
                (i for i, (a, b) in enumerate(zip(text, expected, strict=False)) if a != b),
                min(len(text), len(expected)),
            )
            problems.append(
                f"text differs at character {at}: assembled {len(text)} characters, "
                f"snapshot {len(expected)}"
            )
        if snapshot.get("next_offset") != self.last_id:
            problems.append(
                f"last id {self.last_id}, snapshot next_offset {snapshot.get('next_offset')}"
            )
        return problems


@dataclass
class Received:
    """A Durable Stream's content as read: JSON values (a JSON stream's bodies are arrays)
    or bytes (a text stream's bodies are the appends, concatenated)."""

    json_mode: bool
    values: list[Any] = field(default_factory=list)
    data: bytearray = field(default_factory=bytearray)

    def add(self, body: bytes) -> None:
        """Take one response body (or, for what was sent, one append as a JSON array)."""
        if self.json_mode:
            self.values.extend(json.loads(body))
        else:
            self.data.extend(body)

    def same(self, other: Received) -> bool:
        """Whether both hold the same messages in the same order."""
        return (self.values, self.data) == (other.values, other.data)


@dataclass
class StreamRun:
    """One Durable Stream scenario: the stream, what was appended, what the reader got."""

    path: str
    json_mode: bool
    content_type: str
    count: int  # appends
    long_pause_at: int  # the append preceded by a pause past the long-poll timeout, or -1
    failed: bool = False  # a request failed (counted): nothing more to check
    sent: Received = field(init=False)
    heard: Received = field(init=False)

    def __post_init__(self) -> None:
        self.sent = Received(self.json_mode)
        self.heard = Received(self.json_mode)

    def matches(self, got: Received) -> bool:
        """Whether ``got`` is exactly what was appended."""
        return self.sent.same(got)


# -- the load -------------------------------------------------------------------------------------


class Load:
    """The scenarios, run by ``--clients`` client tasks against one server."""

    def __init__(self, client: httpx.AsyncClient, stats: Stats, opts: argparse.Namespace) -> None:
        self.client = client
        self.stats = stats
        self.opts = opts
        self.max_events = 4 * opts.tokens + 100  # one response carries at most this many
        self.free_sessions: list[str] = []  # open sessions no client is using
        self.open_sessions = 0  # open sessions, in use or not (and being created)

    # -- requests

    async def call(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        expect: Sequence[int] = (200,),
        timed: bool = True,
        headers: dict[str, str] | None = None,
        content: bytes | None = None,
        body: Any = None,
    ) -> httpx.Response | None:
        """One request; the response, or ``None`` when it failed (the failure counted).

        ``timed``: its latency goes into the request percentiles (not a long-poll's).
        """
        t0 = time.perf_counter()
        try:
            response = await self.client.request(
                method, path, headers=headers, content=content, json=body
            )
        except httpx.TimeoutException as exc:
            self.stats.count(kind)
            self.stats.error("timeout", f"{method} {path}: {type(exc).__name__}")
            return None
        except httpx.HTTPError as exc:
            self.stats.count(kind)
            self.stats.error("net", f"{method} {path}: {type(exc).__name__}: {exc}")
            return None
        self.stats.count(kind, (time.perf_counter() - t0) * 1000 if timed else None)
        if response.status_code not in expect:
            self.bad_status(method, path, response)
            return None
        return response

    def bad_status(self, method: str, path: str, response: httpx.Response) -> None:
        """Count a response whose status was not expected (a 5xx apart)."""
        kind = "5xx" if response.status_code >= 500 else "status"
        self.stats.error(
            kind, f"{method} {path} answered {response.status_code}: {response.content[:300]!r}"
        )

    async def sse(
        self,
        kind: str,
        method: str,
        path: str,
        *,
        keep_reading: Callable[[ServerSentEvent], bool],
        headers: dict[str, str] | None = None,
        body: Any = None,
    ) -> SSERead | None:
        """An SSE request; every event (``retry:``-only blocks aside) goes to
        ``keep_reading`` until it answers ``False`` or the server ends the response.

        A ``GET`` may answer 204 (nothing left). ``None`` when it failed (counted).
        """
        read = SSERead()
        t0 = time.perf_counter()
        try:
            async with aconnect_sse(
                self.client, method, path, headers=dict(headers or {}), json=body
            ) as source:
                response = source.response
                read.status, read.headers = response.status_code, response.headers
                self.stats.count(kind)
                if read.status == 204 and method == "GET":
                    return read
                if read.status != 200:
                    await response.aread()
                    self.bad_status(method, path, response)
                    return None
                async with contextlib.aclosing(source.aiter_sse()) as events:
                    async for event in events:
                        if not event.data:
                            continue  # the retry: block
                        if read.events == 0:
                            self.stats.ttfe((time.perf_counter() - t0) * 1000)
                        read.events += 1
                        if not keep_reading(event):
                            read.stopped = True
                            break
                        if read.events >= self.max_events:
                            self.stats.error(
                                "mismatch", f"{method} {path}: over {read.events} events"
                            )
                            return None
        except httpx.TimeoutException as exc:
            self.stats.error("timeout", f"{method} {path} (SSE): {type(exc).__name__}")
            return None
        except (httpx.HTTPError, SSEError) as exc:
            self.stats.error("net", f"{method} {path} (SSE): {type(exc).__name__}: {exc}")
            return None
        return read

    # -- generations

    def generation_body(self, rng: random.Random) -> dict[str, Any]:
        """A request for an answer of a third to all of ``--tokens`` tokens."""
        tokens = rng.randint(max(1, self.opts.tokens // 3), self.opts.tokens)
        prompt = f"soak {rng.randrange(1_000_000)} {rng.choice(WORDS)}"
        return {"prompt": prompt, "params": {"max_tokens": tokens}}

    async def create(self, rng: random.Random) -> str | None:
        """``POST /v1/generations`` (202); the new generation's id."""
        response = await self.call(
            "create", "POST", "/v1/generations", expect=(202,), body=self.generation_body(rng)
        )
        return None if response is None else str(response.json()["id"])

    async def read_once(
        self, transcript: Transcript, path: str, *, kind: str, stop_after: int | None, mode: str
    ) -> SSERead | None:
        """One connection to a generation's (or session's) events, from where ``transcript``
        is (``mode``: ``last-event-id``, ``offset`` or ``text_offset``), closed by the client
        after ``stop_after`` events."""
        headers: dict[str, str] = {}
        query = ""
        if transcript.last_id:
            if mode == "offset":
                query = f"?offset={transcript.last_id}"
            elif mode == "text_offset":
                query = f"?text_offset={len(''.join(transcript.text))}"
                transcript.loose = True
            else:
                headers["Last-Event-ID"] = f"{transcript.prefix}{transcript.last_id}"
        seen = 0

        def keep_reading(event: ServerSentEvent) -> bool:
            nonlocal seen
            seen += 1
            more = transcript.feed(event)
            return more and (stop_after is None or seen < stop_after)

        return await self.sse(kind, "GET", path + query, keep_reading=keep_reading, headers=headers)

    async def follow(
        self,
        transcript: Transcript,
        path: str,
        rng: random.Random,
        *,
        drops: int,
        kind: str = "sse",
        resume_kind: str = "resume",
        modes: Sequence[str] = ("last-event-id", "offset", "text_offset"),
        endless: bool = False,
    ) -> bool:
        """Read to the terminal status, dropping the connection ``drops`` times at random
        points and resuming; whether it got there without a failed request.

        ``endless``: the server may end a response before the terminal status (a session's
        stream can end when the session closes); the reader then reconnects.
        """
        for attempt in range(drops + MAX_RECONNECTS):
            stop_after = rng.randint(1, MAX_DROP_EVENTS) if attempt < drops else None
            read = await self.read_once(
                transcript,
                path,
                kind=kind if transcript.last_id == 0 else resume_kind,
                stop_after=stop_after,
                mode=rng.choice(modes),
            )
            if read is None:
                return False
            if transcript.status is not None or transcript.problems:
                return True
            if read.status == 204:
                transcript.problems.append(f"204 at id {transcript.last_id} before the end")
                return True
            if not read.stopped and not endless:
                transcript.problems.append(f"the stream ended at id {transcript.last_id}")
                return True
            await anyio.sleep(rng.uniform(0, RESUME_PAUSE))
        transcript.problems.append(f"no terminal status after {drops + MAX_RECONNECTS} reads")
        return True

    async def check(self, transcript: Transcript, generation_id: str) -> None:
        """Compare ``transcript`` with the generation's snapshot; a difference is a mismatch."""
        response = await self.call("snapshot", "GET", f"/v1/generations/{generation_id}")
        if response is None:
            return
        problems = transcript.verify(response.json())
        if problems:
            self.stats.error("mismatch", f"{generation_id}: {'; '.join(problems)}")

    async def generate(self, rng: random.Random, client: int) -> None:
        """Start a generation and read it to the end in one go."""
        transcript = Transcript()
        if rng.random() < POST_SSE_SHARE:
            read = await self.sse(
                "create",
                "POST",
                "/v1/generations",
                keep_reading=transcript.feed,
                body=self.generation_body(rng),
            )
            if read is None:
                return
            generation_id = read.headers.get("Keepstream-Generation-Id", "")
            if not generation_id:
                self.stats.error("status", "POST /v1/generations (SSE): no generation id")
                return
        else:
            created = await self.create(rng)
            if created is None:
                return
            generation_id = created
        path = f"/v1/generations/{generation_id}/events"
        if transcript.status is None and not transcript.problems:
            if not await self.follow(transcript, path, rng, drops=0):
                return
        await self.check(transcript, generation_id)

    async def resume(self, rng: random.Random, client: int) -> None:
        """Start a generation and read it with 1 to ``MAX_DROPS`` drops and resumes."""
        generation_id = await self.create(rng)
        if generation_id is None:
            return
        transcript = Transcript()
        path = f"/v1/generations/{generation_id}/events"
        if await self.follow(transcript, path, rng, drops=rng.randint(1, MAX_DROPS)):
            await self.check(transcript, generation_id)

    async def cancel(self, rng: random.Random, client: int) -> None:
        """Start a generation, maybe read a little, cancel it, read the rest."""
        generation_id = await self.create(rng)
        if generation_id is None:
            return
        transcript = Transcript()
        path = f"/v1/generations/{generation_id}/events"
        if rng.random() < 0.7:
            stop_after = rng.randint(1, 8)
            read = await self.read_once(
                transcript, path, kind="sse", stop_after=stop_after, mode="last-event-id"
            )
            if read is None:
                return
        for _ in range(2 if rng.random() < 0.3 else 1):  # cancelling again changes nothing
            cancel_path = f"/v1/generations/{generation_id}/cancel"
            if await self.call("cancel", "POST", cancel_path) is None:
                return
        if transcript.status is None and not transcript.problems:
            if not await self.follow(transcript, path, rng, drops=0):
                return
        if transcript.status not in (None, "cancelled", "completed"):
            transcript.problems.append(f"ended {transcript.status} after a cancel")
        await self.check(transcript, generation_id)

    # -- sessions

    async def session(self, rng: random.Random, client: int) -> None:
        """Use an open session (or open one): a message, its answer, reads, maybe delete it."""
        session_id: str | None = None
        if self.free_sessions and (self.open_sessions >= MAX_OPEN_SESSIONS or rng.random() < 0.7):
            session_id = self.free_sessions.pop(rng.randrange(len(self.free_sessions)))
        elif self.open_sessions < MAX_OPEN_SESSIONS:
            self.open_sessions += 1
            body = {"title": f"soak {client}", "on_busy": "queue", "context": {"client": client}}
            response = await self.call("session", "POST", "/v1/sessions", expect=(201,), body=body)
            if response is None:
                self.open_sessions -= 1
                return
            session_id = str(response.json()["id"])
        else:  # every session is in use: a sidebar's look instead
            await self.call("session", "GET", "/v1/sessions?limit=20")
            return
        deleted = False
        try:
            deleted = await self.use_session(session_id, rng)
        finally:
            if deleted:
                self.open_sessions -= 1
            else:
                self.free_sessions.append(session_id)

    async def use_session(self, session_id: str, rng: random.Random) -> bool:
        """Post, follow the answer, read, patch; whether the session was deleted."""
        base = f"/v1/sessions/{session_id}"
        content = f"question {rng.randrange(1_000_000)} {rng.choice(WORDS)}"
        response = await self.call(
            "session", "POST", f"{base}/messages", expect=(202,), body={"content": content}
        )
        if response is None:
            return False
        generation_id = response.json().get("generation_id")
        if not isinstance(generation_id, str):
            self.stats.error("status", f"POST {base}/messages: no generation ({response.text})")
            return False
        transcript = Transcript(prefix=f"{generation_id}:")
        drops = 1 if rng.random() < SESSION_DROP_SHARE else 0
        followed = await self.follow(
            transcript,
            f"{base}/events",
            rng,
            drops=drops,
            kind="ses-sse",
            resume_kind="ses-sse",
            modes=("last-event-id",),
            endless=True,
        )
        if followed:
            await self.check(transcript, generation_id)
        if rng.random() < 0.5:
            await self.call("session", "GET", base)
        else:
            await self.call("session", "GET", "/v1/sessions?limit=20")
        if rng.random() < 0.3:
            patch = json.dumps({"context": {"turn": rng.randrange(1000)}}).encode()
            await self.call(
                "session", "PATCH", base, headers={"Content-Type": MERGE_PATCH}, content=patch
            )
        if rng.random() < SESSION_DELETE_SHARE:
            return await self.call("session", "DELETE", base, expect=(204,)) is not None
        return False

    # -- Durable Streams

    async def stream(self, rng: random.Random, client: int) -> None:
        """A Durable Stream's life: create, append while a long-poll reader follows, close,
        read back, delete (unless it has a TTL: the server's sweep removes it)."""
        json_mode = rng.random() < 0.5
        count = rng.randint(3, 15)
        run = StreamRun(
            path=STREAM_ROOT + unique_name(f"soak{client}"),
            json_mode=json_mode,
            content_type="application/json" if json_mode else "text/plain",
            count=count,
            long_pause_at=rng.randrange(count) if rng.random() < LONG_PAUSE_SHARE else -1,
        )
        with_ttl = rng.random() < STREAM_TTL_SHARE
        headers = {"Content-Type": run.content_type}
        if with_ttl:
            headers["Stream-TTL"] = str(STREAM_TTL)
        if await self.call("stream", "PUT", run.path, expect=(201,), headers=headers) is None:
            return
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.append_all, run, rng, tg.cancel_scope)
            tg.start_soon(self.long_poll, run, tg.cancel_scope)
        if run.failed:
            return
        if not run.matches(run.heard):
            self.stats.error("mismatch", f"{run.path}: the long-poll reader got other data")
        if await self.read_back(run, rng) and not with_ttl:
            if await self.call("stream", "DELETE", run.path, expect=(204,)) is not None:
                await self.call("stream", "GET", f"{run.path}?offset=-1", expect=(404,))

    async def append_all(
        self, run: StreamRun, rng: random.Random, scope: anyio.CancelScope
    ) -> None:
        """``run.count`` appends at random short intervals (one long pause, maybe), then a
        close-only ``POST``; a failure stops the reader too."""
        headers = {"Content-Type": run.content_type}
        for i in range(run.count):
            if i == run.long_pause_at:  # past the long-poll timeout: the reader gets a 204
                await anyio.sleep(LONG_POLL_TIMEOUT + 0.5)
            else:
                await anyio.sleep(rng.uniform(0, MAX_APPEND_PAUSE))
            if run.json_mode:  # sometimes an array of two, which the server flattens
                values = [{"i": i, "word": rng.choice(WORDS)} for _ in range(rng.randint(1, 2))]
                body = json.dumps(values if len(values) > 1 else values[0]).encode()
                as_read = json.dumps(values).encode()  # a read gives the values in an array
            else:
                body = as_read = encode(i, time.perf_counter_ns())
            appended = await self.call(
                "stream", "POST", run.path, expect=(204,), headers=headers, content=body
            )
            if appended is None:
                run.failed = True
                scope.cancel()
                return
            run.sent.add(as_read)
        closing = {"Stream-Closed": "true"}
        if await self.call("stream", "POST", run.path, expect=(204,), headers=closing) is None:
            run.failed = True
            scope.cancel()

    async def long_poll(self, run: StreamRun, scope: anyio.CancelScope) -> None:
        """Follow the stream from its start with ``live=long-poll`` until it is closed."""
        offset, cursor = "-1", ""
        for _ in range(run.count + MAX_EXTRA_POLLS):
            url = f"{run.path}?offset={offset}&live=long-poll"
            if cursor:
                url += f"&cursor={cursor}"
            response = await self.call("poll", "GET", url, expect=(200, 204), timed=False)
            if response is None:
                run.failed = True
                scope.cancel()
                return
            if response.status_code == 200:
                run.heard.add(response.content)
            offset = response.headers.get("Stream-Next-Offset", offset)
            cursor = response.headers.get("Stream-Cursor", cursor)
            if response.headers.get("Stream-Closed", "").lower() == "true":
                return
        self.stats.error("mismatch", f"{run.path}: not closed after {run.count} appends")
        run.failed = True

    async def read_back(self, run: StreamRun, rng: random.Random) -> bool:
        """Catch-up reads from the start to the end; whether they gave what was appended
        (a difference is counted as a mismatch). Sometimes the last read again with its
        ``ETag`` (304 expected) and a ``HEAD`` (closed expected)."""
        offset = "-1"
        got = Received(run.json_mode)
        last: httpx.Response | None = None
        for _ in range(MAX_CATCH_UP_READS):
            last = await self.call("stream", "GET", f"{run.path}?offset={offset}")
            if last is None:
                return False
            got.add(last.content)
            next_offset = last.headers.get("Stream-Next-Offset", offset)
            if last.headers.get("Stream-Up-To-Date", "").lower() == "true" or next_offset == offset:
                break
            offset = next_offset
        if not run.matches(got):
            self.stats.error("mismatch", f"{run.path}: the catch-up read got other data")
            return False
        if last is not None and rng.random() < 0.5:
            etag = {"If-None-Match": last.headers.get("ETag", "")}
            url = f"{run.path}?offset={offset}"
            await self.call("stream", "GET", url, expect=(304,), headers=etag)
            head = await self.call("stream", "HEAD", run.path)
            if head is not None and head.headers.get("Stream-Closed", "").lower() != "true":
                self.stats.error("status", f"HEAD {run.path}: not closed after the close")
        return True

    # -- clients

    async def run_client(self, index: int, end: float, seed: int) -> None:
        """One client: scenarios picked by weight until ``end`` (``anyio.current_time()``)."""
        rng = random.Random(seed * 1_000_003 + index)
        names = list(SCENARIO_WEIGHTS)
        weights = list(SCENARIO_WEIGHTS.values())
        scenarios: dict[str, Callable[[random.Random, int], Any]] = {
            "generate": self.generate,
            "resume": self.resume,
            "cancel": self.cancel,
            "session": self.session,
            "stream": self.stream,
        }
        await anyio.sleep(RAMP_SECONDS * index / max(1, self.opts.clients))
        for _ in range(MAX_SCENARIOS):
            if anyio.current_time() >= end:
                return
            name = rng.choices(names, weights)[0]
            try:
                with anyio.fail_after(SCENARIO_TIMEOUT):
                    await scenarios[name](rng, index)
            except TimeoutError:
                self.stats.error("timeout", f"a {name} scenario took over {SCENARIO_TIMEOUT:g} s")
            except Exception as exc:  # a bug of this script: counted, and the client goes on
                self.stats.error("client", f"{name}: {type(exc).__name__}: {exc}")
            await anyio.sleep(rng.uniform(0, THINK_SECONDS))


# -- watching the server --------------------------------------------------------------------------
