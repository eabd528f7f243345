"""A real HTTP peer on 127.0.0.1 that answers each connection with scripted raw bytes:
for the faults a keepstream server does not make itself but a proxy or a network does (a
502 page, a stream cut in the middle of an event)."""

from __future__ import annotations

import socket
import socketserver
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager


def http_response(status: str, headers: dict[str, str], body: bytes = b"") -> bytes:
    """A complete HTTP/1.1 response that closes its connection."""
    lines = [f"HTTP/1.1 {status}", *(f"{k}: {v}" for k, v in headers.items())]
    lines += [f"Content-Length: {len(body)}", "Connection: close"]
    return "\r\n".join(lines).encode() + b"\r\n\r\n" + body


def cut_stream(body: bytes) -> bytes:
    """The start of a chunked SSE response whose connection drops after ``body``: the
    client sees an incomplete body, as when a proxy or a network fails mid-answer."""
    head = (
        b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n"
        b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n"
    )
    return head + b"%x\r\n%s\r\n" % (len(body), body)


@contextmanager
def scripted_server(answers: Sequence[bytes]) -> Iterator[tuple[str, list[dict[str, str]]]]:
    """A server whose n-th connection gets ``answers[n]`` (then is closed); yields its URL
    and the headers of each request it received, in order."""
    requests: list[dict[str, str]] = []
    lock = threading.Lock()

    class Handler(socketserver.StreamRequestHandler):
        def handle(self) -> None:
            headers: dict[str, str] = {}
            self.rfile.readline()  # the request line
            while (line := self.rfile.readline().decode("latin-1").strip()) != "":
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            with lock:
                index = len(requests)
                requests.append(headers)
            if index < len(answers):
                self.wfile.write(answers[index])
                self.wfile.flush()
            self.request.shutdown(socket.SHUT_RDWR)

    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", requests
    finally:
        server.shutdown()
        server.server_close()
