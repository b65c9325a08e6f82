"""The client's logic, written once for both clients: each operation is a generator that yields the
`Call`s to make and the `Sleep`s to take, and is sent back each answer. `Client` runs them with
httpx.Client and time.sleep, `AsyncClient` with httpx.AsyncClient and asyncio.sleep."""

from __future__ import annotations

import time
from collections.abc import Generator
from typing import Any, TypeVar

import httpx

from dippy_studio.client._wire import Call, Sleep, api_error, next_cursor, page_params, parse_request, request_path
from dippy_studio.client.errors import RateLimited, WaitTimeout
from dippy_studio.client.models import Request
from dippy_studio.client.settings import ClientSettings

T = TypeVar("T")
Flow = Generator[Call | Sleep, Any, T]


def send(call: Call, settings: ClientSettings) -> Flow[httpx.Response]:
    """Make `call`, retrying a 429 or 503 after its Retry-After (or a doubling backoff without one),
    at most `max_retries` times and never for longer than `max_retry_wait_s` at once. Any other
    refusal raises its `ApiError` at once."""
    for attempt in range(settings.max_retries + 1):
        response = yield call
        if not response.is_error:
            return response
        error = api_error(response)
        if not isinstance(error, RateLimited) or attempt == settings.max_retries:
            raise error
        delay = error.retry_after if error.retry_after is not None else settings.retry_backoff_s * 2**attempt
        if delay > settings.max_retry_wait_s:
            raise error
        yield Sleep(delay)
    raise AssertionError("unreachable")  # pragma: no cover


def fetch(call: Call, settings: ClientSettings) -> Flow[Request]:
    return parse_request((yield from send(call, settings)))


def submit(call: Call, wait_s: float, settings: ClientSettings) -> Flow[Request]:
    """Submit, asking the server to hold the answer up to `wait_s`; when it answers sooner without
    the result (its own cap is shorter, or it does not wait), poll for the rest of `wait_s`."""
    start = time.monotonic()
    request = yield from fetch(call.preferring_wait(wait_s), settings)
    left = wait_s - (time.monotonic() - start)
    if request.done or left <= 0:
        return request
    try:
        return (yield from wait(request, left, settings))
    except WaitTimeout as timeout:
        return timeout.request


def wait(request: str | Request, timeout_s: float, settings: ClientSettings) -> Flow[Request]:
    """Poll until the request has finished; WaitTimeout after `timeout_s`."""
    end = time.monotonic() + timeout_s
    while True:
        current = yield from fetch(Call("GET", request_path(request)), settings)
        left = end - time.monotonic()
        if current.done:
            return current
        if left <= 0:
            raise WaitTimeout(current, timeout_s)
        yield Sleep(min(settings.poll_interval_s, left))


def page(
    path: str, params: dict[str, Any], size: int, cursor: str | None, settings: ClientSettings
) -> Flow[tuple[list[Any], str | None]]:
    """One page of a listing: its items (JSON) and the next page's cursor, None on the last."""
    response = yield from send(Call("GET", path, params=page_params(params, size, cursor)), settings)
    return response.json(), next_cursor(response)
