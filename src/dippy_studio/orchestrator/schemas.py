"""The public API's wire models: what clients send and what they get back."""

from __future__ import annotations

import unicodedata
from datetime import datetime
from typing import Annotated, Any

import httpx
from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    TypeAdapter,
    ValidationError,
    model_validator,
)

from dippy_studio.orchestrator.states import RequestStatus
from dippy_studio.protocol.limits import (
    MAX_LORAS,
    MAX_SEED,
    Guidance,
    ImageSide,
    LoraScale,
    Prompt,
    Seed,
    Steps,
    Strength,
    Task,
)
from dippy_studio.protocol.schemas import HttpUrl, Sha256

# No job can be dispatched, run and called back in less (a shorter deadline is refused).
MIN_DEADLINE_S = 1.0

# What every id this API hands out looks like (`req_...`, `lora_...`, `key_...`). A path or field
# that cannot be one is refused before it reaches the database: PostgreSQL takes no NUL in text.
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_-]{0,63}$"
Identifier = Annotated[str, Field(pattern=ID_PATTERN)]


def _control_character(text: str) -> str | None:
    """The first control character (Unicode category Cc: NUL, newlines, DEL, ...) in `text`."""
    return next((char for char in text if unicodedata.category(char) == "Cc"), None)


def _one_line(text: str) -> str:
    if (char := _control_character(text)) is not None:
        raise ValueError(f"has a control character ({char!r}): give one line of text")
    return text


def _usable_url(url: str) -> str:
    """An http(s) URL an HTTP client can request as given: no whitespace or control characters
    (none is part of a URL: percent-encode them) and a host that parses. Anything else would be
    stored now and fail when fetched or posted to."""
    if (char := _control_character(url)) is not None or (char := next((c for c in url if c.isspace()), None)):
        raise ValueError(f"has whitespace or control characters ({char!r}): percent-encode them")
    try:
        host = httpx.URL(url).host
    except httpx.InvalidURL as exc:
        raise ValueError(f"is not a URL we can request: {exc}") from None
    if not host:
        raise ValueError("names no host")
    return url


# A single-line label a client names something by (kept in the database, shown back).
Label = Annotated[str, AfterValidator(_one_line)]
# A URL the orchestrator fetches (inputs, LoRAs, datasets) or posts to (webhooks).
ClientUrl = Annotated[HttpUrl, AfterValidator(_usable_url)]
_CLIENT_URL: TypeAdapter[str] = TypeAdapter(ClientUrl)


def _image_source(source: str) -> str:
    """An input image given as a URL must be a usable one; a data: URI is read later."""
    if source.startswith(("http://", "https://")):
        try:
            return _CLIENT_URL.validate_python(source)
        except ValidationError as exc:
            raise ValueError(exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    return source


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class LoraInput(_Strict):
    """A LoRA to apply: one of yours by `id`, or a .safetensors file at `url` (fetched once, by us)."""

    id: Identifier | None = Field(default=None, max_length=64)
    url: ClientUrl | None = None
    sha256: Sha256 | None = Field(default=None, description="With `url`: the file's sha256, checked after download.")
    scale: LoraScale = 1.0

    @model_validator(mode="after")
    def _one_source(self) -> LoraInput:
        if (self.id is None) == (self.url is None):
            raise ValueError("give exactly one of 'id' or 'url'")
        if self.sha256 is not None and self.url is None:
            raise ValueError("'sha256' goes with 'url'")
        return self


# A 32x32 orange square and an all-white mask of its size (canonical PNGs), for the examples.
_EXAMPLE_IMAGE = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAIAAAD8GO2jAAAALUlEQVR4nGM8UaHBQEvARFPTRy0YtWDUglEL"
    "Ri0YtWDUglELRi0YtWDUAioCAJv+Aai8/qzNAAAAAElFTkSuQmCC"
)
_EXAMPLE_MASK = (
    "data:image/png;base64,iVBORw0KGgoAAAANSUhEUgAAACAAAAAgCAAAAABWESUoAAAAGUlEQVR4nGP8z4AfMBGQH1UwqmBUwbBVAACj"
    "PQE/b0XQuQAAAABJRU5ErkJggg=="
)


class ImageRequest(_Strict):
    """An image request. `task` says which: `generate` (text to image, the default), `edit` (an
    instruction applied to `image`), `img2img` (the prompt drawn over `image`, `strength` of the
    way) or `inpaint` (the same inside `mask`'s white part). The image tasks' output is `image`'s
    size (scaled to fit the model) unless width and height are given."""

    model: str | None = Field(
        default=None,
        max_length=64,
        description="The model (`GET /v1/models`); the orchestrator's default when left out.",
        examples=["tiny"],
    )
    task: Task = Field(default="generate", description="generate (default), edit, img2img or inpaint.")
    prompt: Prompt
    image: Annotated[str, AfterValidator(_image_source)] | None = Field(
        default=None,
        description="edit, img2img, inpaint: the input image (PNG, JPEG or WebP) as an http(s):// URL "
        "(fetched once, by us) or a `data:image/png;base64,...` URI. EXIF orientation is applied.",
        examples=["https://example.com/photo.jpg", _EXAMPLE_IMAGE],
    )
    image_sha256: Sha256 | None = Field(default=None, description="The image's sha256 as sent, checked when given.")
    mask: Annotated[str, AfterValidator(_image_source)] | None = Field(
        default=None,
        description="inpaint: the mask, the image's size, as a URL or data: URI; white is repainted, black kept.",
        examples=[_EXAMPLE_MASK],
    )
    mask_sha256: Sha256 | None = Field(default=None, description="The mask's sha256 as sent, checked when given.")
    strength: Strength | None = Field(
        default=None,
        description="img2img, inpaint: how far from the image, in (0, 1]; the model's default when left out.",
        examples=[0.6],
    )
    seed: Seed | None = Field(default=None, description="Random when left out.")
    width: ImageSide | None = Field(
        default=None, description="Required for generate; for the image tasks the input's size when left out."
    )
    height: ImageSide | None = Field(default=None, description="As width.")
    steps: Steps | None = Field(default=None, description="The profile's default when left out.")
    guidance: Guidance | None = None
    loras: list[LoraInput] = Field(default_factory=list, max_length=MAX_LORAS)
    webhook_url: ClientUrl | None = None
    deadline_s: float | None = Field(
        default=None,
        ge=MIN_DEADLINE_S,
        description="Seconds from now the request may take; at most the orchestrator's max_deadline_s.",
    )
    # Files uploaded as multipart parts ("image", "mask"): bytes as sent, instead of `image`/`mask`.
    _uploads: dict[str, bytes] = PrivateAttr(default_factory=dict)

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"prompt": "a lighthouse at dusk", "width": 256, "height": 256, "seed": 7},
                {"task": "edit", "prompt": "make it night", "image": "https://example.com/photo.jpg", "seed": 7},
                {"task": "img2img", "prompt": "an oil painting", "image": _EXAMPLE_IMAGE, "strength": 0.6},
                {"task": "inpaint", "prompt": "a red door", "image": _EXAMPLE_IMAGE, "mask": _EXAMPLE_MASK},
            ]
        },
    )

    def with_uploads(self, **uploads: bytes | None) -> ImageRequest:
        """This request with uploaded files (multipart parts) for `image` and `mask`."""
        self._uploads = {name: data for name, data in uploads.items() if data is not None}
        return self

    def upload(self, name: str) -> bytes | None:
        return self._uploads.get(name)


class Submitted(BaseModel):
    request_id: str
    status: RequestStatus
    status_url: str
    result_url: str
    cancel_url: str


class ResultInfo(BaseModel):
    url: str
    sha256: str
    bytes: int
    content_type: str
    lora_id: str | None = Field(default=None, description="Training: the new LoRA, for `loras` in /v1/images.")
    data_base64: str | None = Field(default=None, description="The PNG itself, only in a `Prefer: wait` answer.")


class WebhookInfo(BaseModel):
    state: str
    attempts: int


class Progress(BaseModel):
    """How far the miner is: denoising steps of an image, or optimizer steps of a training run
    (with its latest loss and the miner's estimate of the time left)."""

    step: int = Field(ge=0)
    total: int = Field(ge=1)
    loss: float | None = None
    eta_s: float | None = Field(default=None, ge=0)


class RequestView(Submitted):
    kind: str
    model: str = Field(description="The model the request is for.")
    created_at: datetime
    dispatched_at: datetime | None
    started_at: datetime | None
    finished_at: datetime | None
    deadline: datetime
    attempts: int
    miner_uid: int | None
    miner_hotkey: str | None
    timings: dict[str, Any]
    error: str | None
    input: dict[str, Any]
    result: ResultInfo | None
    webhook: WebhookInfo | None
    progress: Progress | None = Field(
        default=None,
        description="The running attempt's latest progress report; null before the first and once finished.",
    )
    queue_position: int | None = Field(
        default=None,
        description="While queued: 1 + the requests of its miner lane (images, or training) queued before it "
        "that still have time. An estimate: the dispatcher takes turns between API keys. Null in lists "
        "and webhooks, and once dispatched.",
    )


class ModelInfo(BaseModel):
    """A model profile this orchestrator serves, with the limits it checks requests against."""

    id: str = Field(description="The profile's name.")
    description: str
    tasks: list[str] = Field(description="The image tasks `POST /v1/images` accepts for it.")
    kinds: list[str] = Field(description="The job kinds it serves: one per task, and `training` (LoRAs).")
    min_side: int
    max_side: int = Field(description="Width and height are multiples of 16 in min_side..max_side.")
    max_steps: int
    default_steps: int
    default_guidance: float
    max_input_pixels: int = Field(description="The largest input image (width x height) an image task accepts.")
    default: bool = Field(description="True for the model requests that name none get.")


class Readiness(BaseModel):
    ready: bool
    problems: list[str]
    healthy_miners: int


class LoraView(BaseModel):
    id: str
    name: str
    trigger_word: str
    rank: int
    model: str = Field(description="The model it was trained for: the only one it can be used with.")
    sha256: str
    created_at: datetime
    source_request_id: str | None


class TrainingRequest(_Strict):
    """A LoRA training request (the multipart form of `POST /v1/loras`, with the upload read)."""

    trigger_word: Label = Field(min_length=1, max_length=64)
    model: str | None = Field(default=None, max_length=64)
    name: Label | None = Field(default=None, max_length=200)
    dataset: bytes | None = None
    dataset_url: ClientUrl | None = None
    rank: int | None = Field(default=None, ge=1, le=256)
    alpha: float | None = Field(default=None, gt=0, le=1024)
    steps: int | None = Field(default=None, ge=1, le=100_000)
    lr: float | None = Field(default=None, gt=0, le=1.0)
    seed: int = Field(default=0, ge=0, le=MAX_SEED)
    max_seconds: float | None = Field(default=None, gt=0, le=7 * 24 * 3600)

    @model_validator(mode="after")
    def _one_source(self) -> TrainingRequest:
        if (self.dataset is None) == (self.dataset_url is None):
            raise ValueError("give exactly one of a 'dataset' file or a 'dataset_url'")
        return self
