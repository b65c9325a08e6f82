"""ASGI pieces the services share (plain ASGI, no framework)."""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

__all__ = ["BodyLimit", "RefuseBeforeBody", "Scope", "request_target"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def request_target(scope: Scope) -> str:
    """The path and query string as the client sent them (what btauth and Epistula targets sign)."""
    target = scope.get("raw_path", scope["path"].encode()).decode("latin-1")
    if scope.get("query_string"):
        target += "?" + scope["query_string"].decode("latin-1")
    return target


class RefuseBeforeBody:
    """Middleware: answer `{"detail": reason}` with `refuse(scope)`'s status, without running the
    app or reading the body, when it returns `(status, reason)`; else run the app.

    For checks the headers can decide (a signature's shape, receiver, freshness and sender): a
    framework that parses the body before its dependencies run would otherwise read, and hold,
    every unauthenticated body first.
    """

    def __init__(self, app: ASGIApp, refuse: Callable[[Scope], tuple[int, str] | None]) -> None:
        self.app = app
        self.refuse = refuse

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refusal = self.refuse(scope) if scope["type"] == "http" else None
        if refusal is None:
            await self.app(scope, receive, send)
            return
        status, reason = refusal
        await _answer(send, status, reason)


class BodyLimit:
    """Middleware: refuse request bodies over the limit with 413 and `{"detail": ...}` before
    they are buffered or parsed.

    `limit` is a byte count, or a function of the request path giving one (for services whose
    upload routes take more than their JSON routes). A declared Content-Length over the limit
    is refused before the app runs; a body without one (chunked) is counted as the app reads
    it, and refused once the count passes the limit.
    """

    def __init__(self, app: ASGIApp, limit: int | Callable[[str], int]) -> None:
        self.app = app
        self.limit_for: Callable[[str], int] = limit if callable(limit) else (lambda _path: limit)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope["path"])
        for name, value in scope.get("headers", []):
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await _too_large(send, limit)
                return
        seen = 0
        started = False

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            # An app that answered before reading the whole body keeps its answer: a second
            # response start would break the protocol.
            if not started:
                await _too_large(send, limit)


class _BodyTooLarge(Exception):
    pass


async def _too_large(send: Send, limit: int) -> None:
    await _answer(send, 413, f"request body over the {limit}-byte limit")


async def _answer(send: Send, status: int, detail: str) -> None:
    body = json.dumps({"detail": detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})
