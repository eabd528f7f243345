"""Readers that stop reading hold a bounded amount of server memory, on every read path."""

from __future__ import annotations

import socket
from contextlib import ExitStack
from pathlib import Path

import anyio
import httpx

from .conftest import ServerFactory
from .support import wait_for_status

STUCK_READERS = 300  # a third each on the native, session and Durable Streams paths
MAX_GROWTH_MIB = 100
MiB = 1024 * 1024


def rss(pid: int) -> int:
    """Resident memory of a process, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmRSS")


def stuck_reader(port: int, path: str, stack: ExitStack) -> None:
    """A connection that asks for ``path`` with a tiny receive buffer and never reads."""
    sock = stack.enter_context(socket.socket())
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", port))
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())


async def settled_rss(pid: int, *, timeout: float = 30.0) -> tuple[int, int]:
    """RSS once it has stopped moving for a second (the readers' sends have blocked), and
    the peak seen on the way."""
    with anyio.fail_after(timeout):
        last = peak = rss(pid)
        while True:
            await anyio.sleep(0.5)
            now = rss(pid)
            peak = max(peak, now)
            if abs(now - last) <= MiB:
                return now, peak
            last = now


async def test_stuck_readers_of_a_long_answer_pin_little_memory(
    server_factory: ServerFactory,
) -> None:
    # Answers of about 6 MB; stuck clients are not dropped during the test.
    server = server_factory(
        *("--sim-tokens-per-second", "0", "--sim-max-tokens", "1000000"),
        *("--sse-send-timeout", "120", "--shutdown-grace", "1"),
    )
    assert server.proc is not None
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        session = (await http.post("/v1/sessions", json={})).json()
        posted = (
            await http.post(f"/v1/sessions/{session['id']}/messages", json={"content": "go"})
        ).json()
        generation_id = posted["generation_id"]
        await wait_for_status(http, generation_id, {"completed"}, timeout=60)
        paths = [
            f"/v1/generations/{generation_id}/events",
            f"/v1/sessions/{session['id']}/events",
            f"/v1/stream/{generation_id}?offset=-1&live=sse",
        ]
        for path in paths:  # once in full: caches warm, and each path really is long
            async with http.stream("GET", path) as response:
                size = 0
                async for chunk in response.aiter_bytes():
                    size += len(chunk)
                    if size > 5 * MiB:
                        break
            assert size > 5 * MiB, path
        before, _ = await settled_rss(server.proc.pid)
        with ExitStack() as stack:
            for i in range(STUCK_READERS):
                stuck_reader(server.port, paths[i % len(paths)], stack)
            after, peak = await settled_rss(server.proc.pid)
            assert (await http.get("/healthz")).status_code == 200
        growth = (after - before) / MiB
        per_reader = (after - before) / STUCK_READERS / 1024
        print(
            f"{STUCK_READERS} stuck readers: +{growth:.1f} MiB, {per_reader:.0f} KiB each,"
            f" peak +{(peak - before) / MiB:.1f} MiB"
        )
        # Connecting all at once costs no more than holding: no reader loads the whole answer.
        assert (peak - before) / MiB < MAX_GROWTH_MIB
        assert growth < MAX_GROWTH_MIB
