"""Test support: real keepstream servers in subprocesses, and SSE reading helpers."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import anyio
import httpx
from httpx_sse import ServerSentEvent, aconnect_sse

ROOT = Path(__file__).resolve().parent.parent
STARTUP_TIMEOUT = 20.0


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def spawn_until_ready(
    command: Sequence[str],
    *,
    env: dict[str, str],
    log: Path,
    ready_url: str,
    name: str,
    cwd: Path = ROOT,
) -> subprocess.Popen[bytes]:
    """Start ``command`` in ``cwd`` (output appended to ``log``) and wait until ``ready_url``
    answers 200. ``RuntimeError`` with the log if it exits or never does."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    with open(log, "ab") as log_file:
        proc = subprocess.Popen(
            command, stdout=log_file, stderr=subprocess.STDOUT, env=full_env, cwd=cwd
        )
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            output = log.read_text(errors="replace")
            raise RuntimeError(f"{name} exited with {proc.returncode}: {output}")
        try:
            if httpx.get(ready_url, timeout=1.0).status_code == 200:
                return proc
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    proc.kill()
    proc.wait(10)
    raise RuntimeError(f"{name} did not start: {log.read_text(errors='replace')}")


@dataclass
class Server:
    """A ``keepstream serve`` process on 127.0.0.1, on its own port and database file."""

    db: Path
    args: Sequence[str] = ()
    env: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    log: Path | None = None
    proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Server:
        """Start the process and wait until ``/healthz`` answers."""
        log_path = self.log or self.db.with_suffix(f".{self.port}.log")
        self.log = log_path
        command = [
            sys.executable,
            "-m",
            "web",
            "serve",
            "--db",
            str(self.db),
            "--port",
            str(self.port),
            "--log-level",
            "warning",
            *self.args,
        ]
        self.proc = spawn_until_ready(
            command, env=self.env, log=log_path, ready_url=f"{self.url}/healthz", name="server"
        )
        return self

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log and self.log.exists() else ""

    def kill(self) -> None:
        """SIGKILL: no shutdown code runs."""
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(10)

    def stop(self, timeout: float = 30.0) -> int:
        """SIGTERM and wait: the graceful path. Returns 0 for a clean exit.

        uvicorn re-raises the captured SIGTERM once its graceful shutdown is complete, so a
        clean exit ends with -SIGTERM; anything else is returned as it is.
        """
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()
        code = self.proc.returncode
        return 0 if code == -signal.SIGTERM else code


async def start_generation(client: httpx.AsyncClient, **body: Any) -> dict[str, Any]:
    """POST /v1/generations and return the 202 body."""
    response = await client.post("/v1/generations", json=body)
    assert response.status_code == 202, response.text
    data: dict[str, Any] = response.json()
    return data


async def read_events(
    client: httpx.AsyncClient,
    generation_id: str,
    *,
    headers: dict[str, str] | None = None,
    params: dict[str, Any] | None = None,
    max_events: int | None = None,
    timeout: float = 30.0,
) -> list[ServerSentEvent]:
    """Events of ``GET /v1/generations/{id}/events`` until the stream ends (or ``max_events``)."""
    events: list[ServerSentEvent] = []
    with anyio.fail_after(timeout):
        async with aconnect_sse(
            client,
            "GET",
            f"/v1/generations/{generation_id}/events",
            headers=dict(headers or {}),
            params=params,
        ) as source:
            if source.response.status_code == 204:
                return events
            assert source.response.status_code == 200, source.response.status_code
            async for sse in source.aiter_sse():
                if not sse.data:
                    continue  # a retry: line or keep-alive
                events.append(sse)
                if max_events is not None and len(events) >= max_events:
                    break
    return events


def text_of(events: Sequence[ServerSentEvent]) -> str:
    """The concatenated text of the delta events."""
    return "".join(sse.json()["text"] for sse in events if sse.event == "delta")


def final_status(events: Sequence[ServerSentEvent]) -> str | None:
    """The status of the last status event."""
    statuses = [sse.json()["status"] for sse in events if sse.event == "status"]
    return statuses[-1] if statuses else None


async def get_snapshot(
    client: httpx.AsyncClient, generation_id: str, timeout: float = 10.0
) -> dict[str, Any]:
    """``GET /v1/generations/{id}``, which must answer 200."""
    with anyio.fail_after(timeout):
        response = await client.get(f"/v1/generations/{generation_id}")
    assert response.status_code == 200, response.text
    snapshot: dict[str, Any] = response.json()
    return snapshot


async def wait_for_status(
    client: httpx.AsyncClient, generation_id: str, statuses: set[str], timeout: float = 30.0
) -> dict[str, Any]:
    """Poll the snapshot until its status is one of ``statuses``."""
    with anyio.fail_after(timeout):
        while True:
            snapshot: dict[str, Any] = (await client.get(f"/v1/generations/{generation_id}")).json()
            if snapshot["status"] in statuses:
                return snapshot
            await anyio.sleep(0.02)


def readme_block(after: str, language: str) -> str:
    """The first fenced ``language`` block of the README after the line ``after``."""
    readme = (ROOT / "README.md").read_text()
    start = readme.index(after)
    opening = readme.index(f"```{language}\n", start) + len(language) + 4
    return readme[opening : readme.index("```", opening)]


def simulated_answer(prompt: str, **params: Any) -> str:
    """The whole answer the simulated model gives ``prompt`` with ``params`` (its text is
    a function of those alone): what a continued answer must equal."""
    from streaming import GenerationRequest, SimulatedProvider

    request = GenerationRequest.from_json({"prompt": prompt, "params": params})
    return SimulatedProvider().answer(request)


async def read_raw(
    client: httpx.AsyncClient, generation_id: str, count: int, *, within: float = 20.0
) -> list[tuple[int, str, str]]:
    """The first ``count`` events as ``(id, event, data)``, exactly as sent, or those that
    came within ``within`` seconds."""
    received: list[tuple[int, str, str]] = []
    with anyio.move_on_after(within):
        async with client.stream("GET", f"/v1/generations/{generation_id}/events") as response:
            buffer = ""
            async for chunk in response.aiter_text():
                buffer += chunk
                while "\n\n" in buffer:
                    block, buffer = buffer.split("\n\n", 1)
                    fields = dict(
                        line.split(": ", 1) for line in block.splitlines() if ": " in line
                    )
                    if "data" in fields:
                        received.append((int(fields["id"]), fields["event"], fields["data"]))
                if len(received) >= count:
                    return received
    return received
