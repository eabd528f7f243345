"""The SSE connection itself: keep-alives, retry hints, and clients that stop reading."""

from __future__ import annotations

import socket

import anyio
import httpx

from .conftest import ServerFactory
from .support import start_generation, wait_for_status


async def test_keep_alive_comments_and_retry_hint_are_sent(server_factory: ServerFactory) -> None:
    server = server_factory("--sse-ping", "0.2", "--sse-retry-ms", "2500")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        generation = await start_generation(
            http, prompt="slow", params={"tokens_per_second": 1, "max_tokens": 3}
        )
        lines: list[str] = []
        with anyio.fail_after(10):
            async with http.stream("GET", f"/v1/generations/{generation['id']}/events") as resp:
                assert resp.headers["cache-control"] == "no-cache"
                async for line in resp.aiter_lines():
                    lines.append(line)
                    if sum(1 for seen in lines if seen.startswith(":")) >= 2:
                        break
        assert lines[0] == "retry: 2500"
        await http.post(f"/v1/generations/{generation['id']}/cancel")


async def test_a_client_that_stops_reading_is_dropped_and_the_generation_goes_on(
    server_factory: ServerFactory,
) -> None:
    server = server_factory("--sse-send-timeout", "1")
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        generation = await start_generation(
            http, prompt="flood", params={"tokens_per_second": 0, "max_tokens": 1_000_000}
        )
        done = await wait_for_status(http, generation["id"], {"completed"})
        url = f"/v1/generations/{generation['id']}/events"
        full = len(
            (await http.get(url)).content
        )  # what a reading client gets: about 6 MB, more than the
        # kernel buffers (4 MiB send buffer at most) can hold
        # A reader with a tiny receive buffer that never reads: the server's sends block.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.connect(("127.0.0.1", server.port))
        sock.sendall(f"GET {url} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode())
        await anyio.sleep(3)  # well past the 1 s send timeout
        received = 0
        sock.settimeout(10)  # a connection the server did not drop would hit this
        with sock:
            while chunk := sock.recv(1 << 16):
                received += len(chunk)
        assert received < full / 2  # the server hung up long before the end
        # The server is healthy and the generation is untouched.
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get(f"/v1/generations/{generation['id']}")).json() == done
