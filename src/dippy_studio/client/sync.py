"""`Client`: the API from ordinary (blocking) Python. `AsyncClient` (aio.py) is the same for asyncio."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
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

__all__ = ["Client"]

USER_AGENT = "dippy-studio-client"


def http_headers(settings: ClientSettings) -> dict[str, str]:
    headers = {"User-Agent": USER_AGENT}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    return headers


class Client:
    """A client of a Dippy Studio orchestrator's API.

    `base_url` and `api_key` default to the environment's DIPPY_API_URL and DIPPY_API_KEY (what
    `dippy-studio up` prints); the other keywords override `ClientSettings`. Every call that the
    server refuses raises an `ApiError` subclass carrying `status` and the server's `reason`;
    429 and 503 are retried after their Retry-After first.

        from dippy_studio.client import Client

        with Client("http://127.0.0.1:8090", "dsk_...") as client:
            request = client.submit("a lighthouse at dusk", width=256, height=256, wait=60)
            client.download(request, "lighthouse.png")
    """

    def __init__(
        self,
        base_url: str | None = None,
        api_key: str | None = None,
        *,
        transport: httpx.BaseTransport | None = None,
        **settings: Any,
    ) -> None:
        self.settings = ClientSettings.resolve(base_url, api_key, **settings)
        self._http = httpx.Client(
            base_url=self.settings.base_url,
            headers=http_headers(self.settings),
            timeout=self.settings.timeout_s,
            transport=transport,
        )

    # ---- requests -----------------------------------------------------------------------------

    def submit(
        self,
        prompt: str,
        *,
        image: ImageInput | None = None,
        mask: ImageInput | None = None,
        wait: float = 0.0,
        **options: Unpack[ImageOptions],
    ) -> Request:
        """Submit an image request; see `ImageOptions` for the options (`task`, `width`, ...).

        `image` and `mask` are a path, bytes, or a URL (http(s):// or data:). With `wait=N` the
        server holds its answer until the image is ready (the PNG then comes inline, so
        `download` needs no second call), polling for the rest of N seconds if it answers
        sooner; the request returned may still be unfinished (check `.done`).

            request = client.submit("make it night", task="edit", image="photo.png", seed=7, wait=60)
            png = client.download(request)
        """
        return self._run(_flows.submit(image_call(prompt, image, mask, options), wait, self.settings))

    def get(self, request: str | Request) -> Request:
        """The request's current status."""
        return self._run(_flows.fetch(Call("GET", request_path(request)), self.settings))

    def wait(self, request: str | Request, timeout: float = 300.0) -> Request:
        """Poll until the request has finished (succeeded, failed or canceled) and return it;
        `WaitTimeout` (a TimeoutError) after `timeout` seconds, the request still running."""
        return self._run(_flows.wait(request, timeout, self.settings))

    def stream(self, request: str | Request) -> Iterator[Event]:
        """The request's live events (`GET /v1/requests/{id}/events`) until it has finished:
        `status` (`event.request`), `progress` (`event.progress`) and `queue`
        (`event.queue_position`).

            for event in client.stream(request):
                print(event.event, event.data)
        """
        call = events_call(request, self.settings.stream_idle_s)
        response: httpx.Response = self._run(_flows.send(call, self.settings))
        decoder = SseDecoder()
        try:
            for line in response.iter_lines():
                for event in decoder.feed(line):
                    yield event
                    if finished(event):
                        return
        finally:
            response.close()

    def download(self, request: str | Request, path: str | os.PathLike[str] | None = None) -> bytes | Path:
        """The result (PNG, or a LoRA's .safetensors): its bytes, or with `path` written there
        (returns the Path). The sha256 is checked (`IntegrityError`); a request that has not
        succeeded gives `Conflict` (409) with the server's reason."""
        sink = Sink(path)
        if isinstance(request, Request) and request.result is not None and request.result.data is not None:
            sink.write(request.result.data)
            return sink.finish(request.result.sha256)
        call = Call("GET", request_path(request, "/result"), stream=True)
        try:
            response: httpx.Response = self._run(_flows.send(call, self.settings))
            try:
                for chunk in response.iter_bytes():
                    sink.write(chunk)
            finally:
                response.close()
        except BaseException:
            sink.abort()
            raise
        return sink.finish(response.headers.get("x-result-sha256"))

    def cancel(self, request: str | Request) -> Request:
        """Cancel a request that has not finished; `Conflict` (409) when it already has."""
        return self._run(_flows.fetch(Call("POST", request_path(request, "/cancel")), self.settings))

    def list_requests(self, *, status: Status | str | None = None, limit: int | None = None) -> Iterator[Request]:
        """Your requests, newest first, page after page (at most `limit` of them)."""
        for item in self._pages("/v1/requests", {"status": status}, limit):
            yield Request.model_validate(item)

    # ---- LoRAs --------------------------------------------------------------------------------

    def train_lora(
        self, dataset: DatasetInput, trigger_word: str, *, wait: float = 0.0, **options: Unpack[TrainingOptions]
    ) -> Request:
        """Train a LoRA on `dataset`: a folder of images with same-name .txt captions (zipped
        here), a .zip (path or bytes), or a URL of one. When the request succeeds,
        `request.result.lora_id` names the LoRA, for `loras=[{"id": ...}]` of `submit`.

            training = client.wait(client.train_lora("photos/", "sks", steps=200), timeout=3600)
            image = client.submit("a sks dog", width=512, height=512, loras=[{"id": training.result.lora_id}])
        """
        return self._run(_flows.submit(training_call(dataset, trigger_word, options), wait, self.settings))

    def get_lora(self, lora_id: str) -> Lora:
        response = self._run(_flows.send(Call("GET", f"/v1/loras/{quote(lora_id, safe='')}"), self.settings))
        return Lora.model_validate(response.json())

    def list_loras(self, *, limit: int | None = None) -> Iterator[Lora]:
        """Your LoRAs, page after page (at most `limit` of them)."""
        for item in self._pages("/v1/loras", {}, limit):
            yield Lora.model_validate(item)

    def models(self) -> list[Model]:
        """The models the orchestrator serves (`GET /v1/models`), with their limits; `model=` of
        `submit` and `train_lora` names one."""
        response = self._run(_flows.send(Call("GET", "/v1/models"), self.settings))
        return [Model.model_validate(item) for item in response.json()]

    # ---- plumbing -----------------------------------------------------------------------------

    def _pages(self, path: str, params: dict[str, Any], limit: int | None) -> Iterator[Any]:
        seen, cursor = 0, None
        while limit is None or seen < limit:
            size = page_size(self.settings.page_size, limit, seen)
            items, cursor = self._run(_flows.page(path, params, size, cursor, self.settings))
            for item in items[: None if limit is None else limit - seen]:
                seen += 1
                yield item
            if cursor is None:
                return

    def _run(self, flow: _flows.Flow[Any]) -> Any:
        reply: Any = None
        try:
            while True:
                step = flow.send(reply)
                if isinstance(step, Call):
                    reply = self._send(step)
                else:
                    time.sleep(step.seconds)
                    reply = None
        except StopIteration as done:
            return done.value

    def _send(self, call: Call) -> httpx.Response:
        request = self._http.build_request(call.method, call.path, **call.request_args(self.settings.timeout_s))
        response = self._http.send(request, stream=call.stream)
        if call.stream and response.is_error:
            response.read()
            response.close()
        return response

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()
