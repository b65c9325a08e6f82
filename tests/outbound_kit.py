"""SSRF test kit: a loopback listener that counts every connection it accepts, and a DNS stub
whose answers turn from a public address to 127.0.0.1 (DNS rebinding)."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

PUBLIC = "1.1.1.1"
REBINDING_HOST = "rebind.example.com"


@dataclass
class Listener:
    """Answers 204 to GET and POST, and a redirect to `redirect_to` on /redirect."""

    port: int = 0
    connections: int = 0
    hosts: list[str] = field(default_factory=list)  # the Host header of each request
    redirect_to: str = "http://10.0.0.1/"

    def url(self, path: str = "/", host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.port}{path}"


@pytest.fixture
def listener() -> Iterator[Listener]:
    state = Listener()

    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args: Any) -> None:
            pass

        def do_GET(self) -> None:
            state.hosts.append(self.headers.get("host", ""))
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(302 if self.path == "/redirect" else 204)
            if self.path == "/redirect":
                self.send_header("location", state.redirect_to)
            self.send_header("content-length", "0")
            self.end_headers()

        do_POST = do_GET

    class Server(ThreadingHTTPServer):
        def process_request(self, request: Any, client_address: Any) -> None:
            state.connections += 1
            super().process_request(request, client_address)

    httpd = Server(("127.0.0.1", 0), Handler)
    state.port = httpd.server_address[1]
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield state
    httpd.shutdown()
    httpd.server_close()


class Rebinding:
    """`socket.getaddrinfo` for REBINDING_HOST: PUBLIC for the first `public_answers` lookups,
    127.0.0.1 after (or from the moment `rebind()` is called). Other names resolve as usual."""

    def __init__(self, public_answers: int) -> None:
        self.public_answers = public_answers
        self.lookups = 0
        self._real = socket.getaddrinfo

    def rebind(self) -> None:
        self.public_answers = self.lookups

    def __call__(self, host: Any, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        if host != REBINDING_HOST:
            return self._real(host, port, *args, **kwargs)
        self.lookups += 1
        address = PUBLIC if self.lookups <= self.public_answers else "127.0.0.1"
        return [(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP, "", (address, int(port or 80)))]


def rebinding(monkeypatch: pytest.MonkeyPatch, public_answers: int) -> Rebinding:
    stub = Rebinding(public_answers)
    monkeypatch.setattr(socket, "getaddrinfo", stub)
    return stub


@contextlib.contextmanager
def answering_without_end(head: bytes, chunk: bytes, pause_s: float) -> Iterator[tuple[str, list[socket.socket]]]:
    """A loopback HTTP server that answers every request with `head`, then `chunk` again and
    again, `pause_s` apart, until it is closed: a receiver or file server that never finishes.
    Yields its base URL and the connections it accepted."""
    listener = socket.create_server(("127.0.0.1", 0))
    connections: list[socket.socket] = []

    def serve() -> None:
        while True:
            try:
                connection, _ = listener.accept()
            except OSError:
                return
            connections.append(connection)
            connection.recv(1 << 16)
            try:
                connection.sendall(head)
                while True:
                    connection.sendall(chunk)
                    time.sleep(pause_s)
            except OSError:
                pass

    threading.Thread(target=serve, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{listener.getsockname()[1]}", connections
    finally:
        listener.close()
        for connection in connections:
            connection.close()
