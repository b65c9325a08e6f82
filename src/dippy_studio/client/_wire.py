"""What the sync and async clients share, with no I/O: how each call is built, and how each answer
is read. Both clients send exactly these `Call`s and parse with exactly these functions, so they
cannot drift apart."""

from __future__ import annotations

import hashlib
import io
import json
import mimetypes
import os
import zipfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, BinaryIO, Literal, TypedDict
from urllib.parse import quote

import httpx

from dippy_studio.client.errors import ApiError, IntegrityError, error_for
from dippy_studio.client.models import Event, Progress, Request

# An input image: a path (str or Path) to a file, its bytes, or a URL (http(s):// or data:) the
# orchestrator fetches itself.
ImageInput = str | os.PathLike[str] | bytes
# A training dataset: a folder of images with same-name .txt captions, a .zip of them (path or
# bytes), or an http(s):// URL of such a zip.
DatasetInput = str | os.PathLike[str] | bytes

_URL_PREFIXES = ("http://", "https://", "data:")
_DATASET_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".txt")
_MAGIC = ((b"\x89PNG", "image/png"), (b"\xff\xd8", "image/jpeg"))


class ImageOptions(TypedDict, total=False):
    """The fields of an image request besides `prompt`, `image` and `mask` (see the API's
    `ImageRequest`): `model` one the orchestrator serves (`models()`; its default when left out);
    `task` generate (the default; `width` and `height` required), edit, img2img or inpaint;
    `strength` in (0, 1] for img2img and inpaint; `loras` as `[{"id": ..., "scale": 1.0}]`."""

    model: str
    task: Literal["generate", "edit", "img2img", "inpaint"]
    width: int
    height: int
    seed: int
    steps: int
    guidance: float
    strength: float
    loras: list[dict[str, Any]]
    image_sha256: str
    mask_sha256: str
    webhook_url: str
    deadline_s: float


class TrainingOptions(TypedDict, total=False):
    """The fields of a LoRA training request besides the dataset and `trigger_word`: `model` is
    the one it is trained for (the orchestrator's default when left out), the only one it can be
    used with."""

    model: str
    name: str
    rank: int
    alpha: float
    steps: int
    lr: float
    seed: int
    max_seconds: float
    webhook_url: str
    deadline_s: float


def _checked(options: Mapping[str, Any], allowed: type) -> dict[str, Any]:
    unknown = sorted(set(options) - set(allowed.__annotations__))
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; known: {', '.join(allowed.__annotations__)}")
    return dict(options)


@dataclass(frozen=True)
class Call:
    """One HTTP exchange to make. `stream` leaves the body unread for the caller; `wait_s` is how
    long the server was asked to hold its answer (added to the timeout); `idle_s`, for an event
    stream, how long it may stay silent before the connection counts as dead."""

    method: str
    path: str
    params: dict[str, Any] = field(default_factory=dict)
    json: Any = None
    data: dict[str, str] | None = None
    files: dict[str, tuple[str, bytes, str]] | None = None
    headers: dict[str, str] = field(default_factory=dict)
    stream: bool = False
    wait_s: float = 0.0
    idle_s: float | None = None

    def request_args(self, timeout_s: float) -> dict[str, Any]:
        """Keyword arguments of `httpx.Client.build_request` (and the async one's)."""
        timeout = timeout_s + self.wait_s
        args: dict[str, Any] = {
            "params": {k: v for k, v in self.params.items() if v is not None},
            "headers": self.headers,
            "timeout": httpx.Timeout(timeout, read=self.idle_s) if self.idle_s is not None else timeout,
        }
        if self.json is not None:
            args["json"] = self.json
        if self.data is not None or self.files is not None:
            args["data"], args["files"] = self.data or {}, self.files or {}
        return args

    def preferring_wait(self, wait_s: float) -> Call:
        """This call asking the server to hold its answer up to `wait_s` (RFC 7240)."""
        if wait_s <= 0:
            return self
        return replace(self, headers={**self.headers, "Prefer": f"wait={wait_s:g}"}, wait_s=wait_s)


def events_call(request: str | Request, idle_s: float) -> Call:
    """`GET /v1/requests/{id}/events`, the server-sent events of one request."""
    headers = {"Accept": "text/event-stream"}
    return Call("GET", request_path(request, "/events"), headers=headers, stream=True, idle_s=idle_s)


@dataclass(frozen=True)
class Sleep:
    seconds: float


def request_path(request: str | Request, suffix: str = "") -> str:
    request_id = request.id if isinstance(request, Request) else request
    return f"/v1/requests/{quote(request_id, safe='')}{suffix}"


# ---- building calls ---------------------------------------------------------------------------------


def image_call(prompt: str, image: ImageInput | None, mask: ImageInput | None, options: Mapping[str, Any]) -> Call:
    """`POST /v1/images`: JSON when every input is a URL (or there is none), else a multipart form
    with the files as parts."""
    fields = _checked(options, ImageOptions)
    body = {"prompt": prompt, **{k: v for k, v in fields.items() if v is not None}}
    files: dict[str, tuple[str, bytes, str]] = {}
    for name, value in (("image", image), ("mask", mask)):
        if value is None:
            continue
        if _is_url(value):
            body[name] = value
        else:
            files[name] = _file_part(name, value)
    if not files:
        return Call("POST", "/v1/images", json=body)
    return Call("POST", "/v1/images", data=_form_fields(body), files=files)


def training_call(dataset: DatasetInput, trigger_word: str, options: Mapping[str, Any]) -> Call:
    """`POST /v1/loras`: the dataset as a zip part (a folder is zipped here) or as `dataset_url`."""
    fields = {"trigger_word": trigger_word, **_checked(options, TrainingOptions)}
    data = _form_fields({k: v for k, v in fields.items() if v is not None})
    if isinstance(dataset, str) and dataset.startswith(("http://", "https://")):
        return Call("POST", "/v1/loras", data={**data, "dataset_url": dataset})
    files = {"dataset": ("dataset.zip", dataset_zip(dataset), "application/zip")}
    return Call("POST", "/v1/loras", data=data, files=files)


def dataset_zip(dataset: DatasetInput) -> bytes:
    """The dataset as zip bytes: a zip as given, or a folder's images and captions zipped (hidden
    files and anything else left out; the orchestrator checks the rest)."""
    if isinstance(dataset, bytes):
        return dataset
    path = Path(dataset)
    if not path.is_dir():
        return path.read_bytes()
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for file in sorted(path.rglob("*")):
            relative = file.relative_to(path)
            if file.is_file() and file.suffix.lower() in _DATASET_SUFFIXES and not _hidden(relative):
                archive.write(file, relative.as_posix())
        if not archive.namelist():
            raise ValueError(f"{path} holds no images or captions ({', '.join(_DATASET_SUFFIXES)})")
    return buffer.getvalue()


def _hidden(relative: Path) -> bool:
    return any(part.startswith(".") for part in relative.parts)


def _is_url(value: ImageInput) -> bool:
    return isinstance(value, str) and value.startswith(_URL_PREFIXES)


def _file_part(name: str, value: ImageInput) -> tuple[str, bytes, str]:
    if isinstance(value, bytes | bytearray):
        data = bytes(value)
        return f"{name}{_suffix(data)}", data, _media_type(data)
    path = Path(value)
    data = path.read_bytes()
    return path.name, data, mimetypes.guess_type(path.name)[0] or _media_type(data)


def _media_type(data: bytes) -> str:
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return next((media for magic, media in _MAGIC if data.startswith(magic)), "application/octet-stream")


def _suffix(data: bytes) -> str:
    return {"image/png": ".png", "image/jpeg": ".jpg", "image/webp": ".webp"}.get(_media_type(data), "")


def _form_fields(body: Mapping[str, Any]) -> dict[str, str]:
    """JSON fields as form parts: strings as they are, everything else (numbers, `loras`) as JSON."""
    return {k: v if isinstance(v, str) else json.dumps(v) for k, v in body.items()}


# ---- reading answers ------------------------------------------------------------------------------


def api_error(response: httpx.Response) -> ApiError:
    """The exception for a refusal, with the server's reason (`{"detail": ...}`, `errors` on a 422)."""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict) and isinstance(body.get("detail"), str):
        reason, errors = body["detail"], body.get("errors")
    else:
        reason, errors = response.text[:500] or response.reason_phrase, None
    headers = {k.lower(): v for k, v in response.headers.items()}
    return error_for(response.status_code, reason, errors if isinstance(errors, list) else None, headers)


def next_cursor(response: httpx.Response) -> str | None:
    """Where the next page starts (`X-Next-Cursor`), or None on the last page."""
    return response.headers.get("x-next-cursor") or None


def parse_request(response: httpx.Response) -> Request:
    return Request.model_validate(response.json())


def event_from(name: str, data: str) -> Event:
    """A typed `Event` from one server-sent event's name and data."""
    payload = json.loads(data) if data else {}
    payload = payload if isinstance(payload, dict) else {"value": payload}
    fields: dict[str, Any] = {"event": name, "data": payload}
    if name == "status":
        fields["request"] = Request.model_validate(payload)
    elif name == "progress":
        fields["progress"] = Progress.model_validate(payload)
    elif name == "queue":
        fields["queue_position"] = payload.get("position")
    return Event(**fields)


class SseDecoder:
    """Server-sent events from the lines of a `text/event-stream` body (the WHATWG rules this API
    uses: `event:`, multi-line `data:`, comments and keep-alive pings ignored)."""

    def __init__(self) -> None:
        self._name = ""
        self._data: list[str] = []

    def feed(self, line: str) -> Iterator[Event]:
        if not line:
            if self._data:
                yield event_from(self._name or "message", "\n".join(self._data))
            self._name, self._data = "", []
            return
        if line.startswith(":"):
            return
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "event":
            self._name = value
        elif name == "data":
            self._data.append(value)


def finished(event: Event) -> bool:
    """The stream's last event: a terminal status."""
    return event.request is not None and event.request.done


def check_digest(expected: str | None, actual: str) -> None:
    if expected and expected != actual:
        raise IntegrityError(f"the result's sha256 is {actual}, not {expected} as the API says")


def page_params(params: Mapping[str, Any], page_size: int, cursor: str | None) -> dict[str, Any]:
    return {**params, "limit": page_size, "cursor": cursor}


def page_size(settings_size: int, limit: int | None, seen: int) -> int:
    """The next page's size: no more than the items still wanted."""
    return settings_size if limit is None else max(1, min(settings_size, limit - seen))


class Sink:
    """Where a download goes: memory, or a file written beside `path` and moved there only once
    the whole body has arrived and its sha256 checks out."""

    def __init__(self, path: str | os.PathLike[str] | None) -> None:
        self.path = Path(path) if path is not None else None
        self._digest = hashlib.sha256()
        self._part = self.path.with_name(self.path.name + ".part") if self.path is not None else None
        self._file: BinaryIO = open(self._part, "wb") if self._part is not None else io.BytesIO()  # noqa: SIM115

    def write(self, chunk: bytes) -> None:
        self._digest.update(chunk)
        self._file.write(chunk)

    def finish(self, expected_sha256: str | None) -> bytes | Path:
        data = self._file.getvalue() if isinstance(self._file, io.BytesIO) else b""
        self._file.close()
        try:
            check_digest(expected_sha256, self._digest.hexdigest())
        except IntegrityError:
            self.abort()
            raise
        if self.path is None:
            return data
        assert self._part is not None
        os.replace(self._part, self.path)
        return self.path

    def abort(self) -> None:
        self._file.close()
        if self._part is not None:
            self._part.unlink(missing_ok=True)
