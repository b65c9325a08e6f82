"""BodyLimit: oversize request bodies get 413 with a JSON detail, declared or not."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator

import httpx

from dippy_studio.protocol.asgi import BodyLimit

LIMIT = 1000


async def echo_length(scope, receive, send) -> None:
    """Reads the whole body, answers with its length."""
    assert scope["type"] == "http"
    size, more = 0, True
    while more:
        message = await receive()
        size += len(message.get("body", b""))
        more = message.get("more_body", False)
    body = json.dumps({"received": size}).encode()
    await send({"type": "http.response.start", "status": 200, "headers": [(b"content-type", b"application/json")]})
    await send({"type": "http.response.body", "body": body})


def post(app, path: str, content) -> httpx.Response:
    async def call() -> httpx.Response:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://test") as client:
            return await client.post(path, content=content)

    return asyncio.run(call())


def chunked(size: int, chunk: int = 256):
    """A body sent without Content-Length (Transfer-Encoding: chunked)."""

    async def chunks() -> AsyncIterator[bytes]:
        sent = 0
        while sent < size:
            part = min(chunk, size - sent)
            sent += part
            yield b"x" * part

    return chunks()


def test_a_declared_oversize_body_is_refused_before_the_app_runs() -> None:
    called = False

    async def app(scope, receive, send) -> None:
        nonlocal called
        called = True
        await echo_length(scope, receive, send)

    response = post(BodyLimit(app, limit=LIMIT), "/", b"x" * (LIMIT + 1))
    assert response.status_code == 413
    assert response.json() == {"detail": f"request body over the {LIMIT}-byte limit"}
    assert not called


def test_an_undeclared_oversize_body_is_refused_while_it_is_read() -> None:
    response = post(BodyLimit(echo_length, limit=LIMIT), "/", chunked(LIMIT * 3))
    assert response.status_code == 413
    assert response.json() == {"detail": f"request body over the {LIMIT}-byte limit"}


def test_bodies_up_to_the_limit_pass_declared_or_not() -> None:
    app = BodyLimit(echo_length, limit=LIMIT)
    assert post(app, "/", b"x" * LIMIT).json() == {"received": LIMIT}
    assert post(app, "/", chunked(LIMIT)).json() == {"received": LIMIT}


def test_the_limit_can_depend_on_the_path() -> None:
    app = BodyLimit(echo_length, limit=lambda path: 10 * LIMIT if path == "/upload" else LIMIT)
    assert post(app, "/upload", chunked(5 * LIMIT)).json() == {"received": 5 * LIMIT}
    assert post(app, "/json", chunked(5 * LIMIT)).status_code == 413
    assert post(app, "/json", b"x" * (5 * LIMIT)).status_code == 413


def test_an_answer_sent_before_the_body_was_read_is_kept() -> None:
    async def answers_then_reads(scope, receive, send) -> None:
        await send({"type": "http.response.start", "status": 202, "headers": []})
        await send({"type": "http.response.body", "body": b"early"})
        while (await receive()).get("more_body"):
            pass

    response = post(BodyLimit(answers_then_reads, limit=LIMIT), "/", chunked(LIMIT * 3))
    assert response.status_code == 202 and response.content == b"early"
