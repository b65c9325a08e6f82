"""`AsyncClient`: `Client` for asyncio, method for method. Both run the same flows (`_flows`) on the
same calls and parsers (`_wire`); only the I/O differs."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator
from pathlib import Path
from types import TracebackType
from typing import Any, Unpack
from urllib.parse import quote

import httpx

from dippy_studio.client import _flows
from dippy_studio.client._wire import (
    Call,
    DatasetInput,
    ImageInput,
    ImageOptions,
    Sink,
    SseDecoder,
    TrainingOptions,
    events_call,
    finished,
    image_call,
    page_size,
    request_path,
    training_call,
)
from dippy_studio.client.models import Event, Lora, Model, Request, Status
from dippy_studio.client.settings import ClientSettings
from dippy_studio.client.sync import http_headers

__all__ = ["AsyncClient"]


class AsyncClient:
    """`Client` for asyncio: the same methods and arguments, awaited (`stream`, `list_requests`
    and `list_loras` are async iterators).

        from dippy_studio.client import AsyncClient

        async with AsyncClient("http://127.0.0.1:8090", "dsk_...") as client:
            request = await client.submit("a lighthouse at dusk", width=256, height=256, wait=60)
            png = await client.download(request)
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        **settings: Any,
    ) -> None:
        self.settings = ClientSettings.resolve(base_url, api_key, **settings)
        self._http = httpx.AsyncClient(
            base_url=self.settings.base_url,
            headers=http_headers(self.settings),
            timeout=self.settings.timeout_s,
            transport=transport,
        )

    # ---- requests -----------------------------------------------------------------------------

    async def submit(
        self,
        prompt: str,
        *,
        image: ImageInput | None = None,
        mask: ImageInput | None = None,
        wait: float = 0.0,
        **options: Unpack[ImageOptions],
    ) -> Request:
        """As `Client.submit`."""
        return await self._run(_flows.submit(image_call(prompt, image, mask, options), wait, self.settings))

    async def get(self, request: str | Request) -> Request:
        return await self._run(_flows.fetch(Call("GET", request_path(request)), self.settings))

    async def wait(self, request: str | Request, timeout: float = 300.0) -> Request:
        """As `Client.wait`."""
        return await self._run(_flows.wait(request, timeout, self.settings))

    async def stream(self, request: str | Request) -> AsyncIterator[Event]:
        """As `Client.stream`: `async for event in client.stream(request): ...`"""
        call = events_call(request, self.settings.stream_idle_s)
        response: httpx.Response = await self._run(_flows.send(call, self.settings))
        decoder = SseDecoder()
        try:
            async for line in response.aiter_lines():
                for event in decoder.feed(line):
                    yield event
                    if finished(event):
                        return
        finally:
            await response.aclose()

    async def download(self, request: str | Request, path: str | os.PathLike[str] | None = None) -> bytes | Path:
        """As `Client.download`."""
        sink = Sink(path)
        if isinstance(request, Request) and request.result is not None and request.result.data is not None:
            sink.write(request.result.data)
            return sink.finish(request.result.sha256)
        call = Call("GET", request_path(request, "/result"), stream=True)
        try:
            response: httpx.Response = await self._run(_flows.send(call, self.settings))
            try:
                async for chunk in response.aiter_bytes():
                    sink.write(chunk)
            finally:
                await response.aclose()
        except BaseException:
            sink.abort()
            raise
        return sink.finish(response.headers.get("x-result-sha256"))

    async def cancel(self, request: str | Request) -> Request:
        return await self._run(_flows.fetch(Call("POST", request_path(request, "/cancel")), self.settings))

    async def list_requests(
        self, *, status: Status | str | None = None, limit: int | None = None
    ) -> AsyncIterator[Request]:
        async for item in self._pages("/v1/requests", {"status": status}, limit):
            yield Request.model_validate(item)

    # ---- LoRAs --------------------------------------------------------------------------------

    async def train_lora(
        self, dataset: DatasetInput, trigger_word: str, *, wait: float = 0.0, **options: Unpack[TrainingOptions]
    ) -> Request:
        """As `Client.train_lora`."""
        return await self._run(_flows.submit(training_call(dataset, trigger_word, options), wait, self.settings))

    async def get_lora(self, lora_id: str) -> Lora:
        response = await self._run(_flows.send(Call("GET", f"/v1/loras/{quote(lora_id, safe='')}"), self.settings))
        return Lora.model_validate(response.json())

    async def list_loras(self, *, limit: int | None = None) -> AsyncIterator[Lora]:
        async for item in self._pages("/v1/loras", {}, limit):
            yield Lora.model_validate(item)

    async def models(self) -> list[Model]:
        """The models the orchestrator serves (`GET /v1/models`), with their limits; `model=` of
        `submit` and `train_lora` names one."""
        response = await self._run(_flows.send(Call("GET", "/v1/models"), self.settings))
        return [Model.model_validate(item) for item in response.json()]

    # ---- plumbing -----------------------------------------------------------------------------

    async def _pages(self, path: str, params: dict[str, Any], limit: int | None) -> AsyncIterator[Any]:
        seen, cursor = 0, None
        while limit is None or seen < limit:
            size = page_size(self.settings.page_size, limit, seen)
            items, cursor = await self._run(_flows.page(path, params, size, cursor, self.settings))
            for item in items[: None if limit is None else limit - seen]:
                seen += 1
                yield item
            if cursor is None:
                return

    async def _run(self, flow: _flows.Flow[Any]) -> Any:
        reply: Any = None
        try:
            while True:
                step = flow.send(reply)
                if isinstance(step, Call):
                    reply = await self._send(step)
                else:
                    await asyncio.sleep(step.seconds)
                    reply = None
        except StopIteration as done:
            return done.value

    async def _send(self, call: Call) -> httpx.Response:
        request = self._http.build_request(call.method, call.path, **call.request_args(self.settings.timeout_s))
        response = await self._http.send(request, stream=call.stream)
        if call.stream and response.is_error:
            await response.aread()
            await response.aclose()
        return response

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
