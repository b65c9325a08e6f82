"""OpenAI-compatible image endpoints, for builders who already use the official `openai` client:

    POST /v1/images/generations   text to image (JSON)
    POST /v1/images/edits         an edit of an uploaded image, or inpainting with a mask (multipart)

Point the client at the orchestrator (`OpenAI(base_url="http://host:port/v1", api_key="dsk_...")`).
Each image of a call (`n`) is one request of the native API (`POST /v1/images`), submitted through
the same path (`Orchestrator.submit`), so admission, rate limits, validation, routing, audits and
scores are the same; each counts once against the key's rate limit. The call waits for its images,
at most the orchestrator's `max_wait_s` (and the request's deadline), and answers OpenAI's shape:
`{"created": unix seconds, "data": [{"b64_json" | "url": ..., "revised_prompt": null}]}`, each item
also naming its `request_id` and `seed` (extensions: the request is in `GET /v1/requests` too).

Differences from OpenAI's API, on purpose:
- `response_format` defaults to `b64_json` (the PNG inline); `url` is a link to the PNG that
  needs no key for `URL_TTL_S` seconds, as OpenAI's do: it carries an expiry and the
  orchestrator hotkey's signature over the request id and that expiry, so every replica checks
  it and nothing is stored (`GET /v1/images/files/{request_id}`).
- `model` is one of the models this orchestrator serves (`GET /v1/models`), or left out for its
  default; any other is refused (`model_not_found`, naming the served ones). `size` is
  `WIDTHxHEIGHT` within that model's limits, or `auto` (1024 clamped to the model for a
  generation; the input image's size for an edit).
- Options that would change the image in a way this API cannot honour (`quality` other than
  auto/standard, `style`, a transparent `background`, an `output_format` other than png,
  `stream`, ...) are refused with 400, never silently ignored; `user`, `safety_identifier`,
  `moderation` and `input_fidelity` are accepted and ignored.
- Extensions (JSON fields, or `extra_body=` in the client): `seed` (image i of n gets seed + i),
  `steps`, `guidance`, `loras`, `deadline_s`, and for edits `strength`.
- An edit's `mask` follows OpenAI's convention: a PNG with an alpha channel, the image's size,
  whose fully transparent pixels are edited. It is converted to this API's mask (white repaints)
  and the edit runs as `inpaint`; without a mask it runs as `edit`.

Refusals carry OpenAI's error object beside this API's `detail` (`{"detail": reason, "error":
{"message", "type", "param", "code"}}`), so the client raises its typed errors: a bad input is 400
(`BadRequestError`), a bad key 401 (`AuthenticationError`), a spent rate limit 429
(`RateLimitError`, with Retry-After). With no healthy miner the call is refused at once (503)
rather than held; images not finished in time answer 504 with their request ids, marked
`x-should-retry: false` so the client does not queue the same work again.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import io
import re
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Body, Depends, Query, Request, Response
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse
from fastapi.routing import APIRoute
from fastapi.security import HTTPAuthorizationCredentials
from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationError
from starlette.datastructures import UploadFile
from starlette.exceptions import HTTPException

from dippy_studio.orchestrator import errors, kinds
from dippy_studio.orchestrator.api import bearer, bearer_secret, http_error, json_value
from dippy_studio.orchestrator.image_inputs import TASK_KINDS
from dippy_studio.orchestrator.models import ApiKey, Job
from dippy_studio.orchestrator.schemas import ImageRequest, LoraInput
from dippy_studio.orchestrator.service import Orchestrator
from dippy_studio.orchestrator.states import RequestStatus
from dippy_studio.protocol.http_errors import ErrorBody, error_body
from dippy_studio.protocol.images import canonical_png
from dippy_studio.protocol.keys import Signer
from dippy_studio.protocol.limits import ImageSide, ProfileLimits, profile_limits

# Images per call: each is a job on a miner, and the call holds its connection until all are done.
MAX_N = 4
# OpenAI's default size, clamped to the profile, for a generation without one.
DEFAULT_SIDE = 1024
_SIZE = re.compile(r"^(\d{1,5})x(\d{1,5})$")
# The native API's own check of a side (a multiple of 16, at most MAX_SIDE).
_SIDE: TypeAdapter[int] = TypeAdapter(ImageSide)

# OpenAI options this API takes only at their default (or an equivalent): any other value would
# ask for an image this API cannot make, so it is refused rather than ignored.
_DEFAULT_ONLY: dict[str, frozenset[Any]] = {
    "quality": frozenset({"auto", "standard"}),
    "style": frozenset(),
    "background": frozenset({"auto", "opaque"}),
    "output_format": frozenset({"png"}),
    "output_compression": frozenset(),
    "stream": frozenset({False, "false", "False"}),
    "partial_images": frozenset({0, "0"}),
}
# OpenAI options that do not change the image here: accepted and ignored.
_IGNORED = frozenset({"user", "safety_identifier", "moderation", "input_fidelity"})

# How long an image's `url` works, as OpenAI's links (an hour).
URL_TTL_S = 3600
# What the hotkey signs for a link: a prefix of its own, so the signature means nothing elsewhere.
_URL_DOMAIN = b"dippy-studio image url\n"
# Hex; 64 bytes for sr25519 and ed25519 hotkeys, 65 for ecdsa.
_SIGNATURE = r"^[0-9a-f]{2,260}$"

_TYPES = {401: "invalid_request_error", 402: "insufficient_quota", 429: "rate_limit_error"}
_CODES = {
    401: "invalid_api_key",
    402: "insufficient_quota",
    413: "payload_too_large",
    429: "rate_limit_exceeded",
    504: "timeout",
}


@dataclass(frozen=True)
class Caller:
    """The admitted key, and its secret for counting the call's further images."""

    key: ApiKey
    secret: str | None


class Refused(Exception):
    """A refusal of the OpenAI-compatible API: its status, reason, and OpenAI's `param`/`code`."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = dict(headers or {})


def error_response(refused: Refused) -> JSONResponse:
    """This API's refusal body with OpenAI's error object beside it."""
    status = refused.status
    kind = _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")
    code = refused.code if refused.code is not None else _CODES.get(status)
    error = {"message": refused.message, "type": kind, "param": refused.param, "code": code}
    return JSONResponse({**error_body(refused.message), "error": error}, status_code=status, headers=refused.headers)


def as_refused(exc: Exception) -> Refused | None:
    """What the client is told for an exception raised while serving a call; None: not a refusal."""
    if isinstance(exc, Refused):
        return exc
    if isinstance(exc, errors.OrchestratorError):
        exc = http_error(exc)
    if isinstance(exc, RequestValidationError | ValidationError):
        problems = [(_param(error.get("loc", ())), str(error.get("msg", ""))) for error in exc.errors()]
        message = "; ".join(f"{param or 'body'}: {msg}" for param, msg in problems[:10]) or "invalid request"
        return Refused(400, message, param=problems[0][0] if problems else None)
    if isinstance(exc, HTTPException):
        # OpenAI answers every invalid request with 400, where the native API says 422.
        status = 400 if exc.status_code == 422 else exc.status_code
        return Refused(status, str(exc.detail), headers=exc.headers)
    return None


def _param(loc: Sequence[Any]) -> str | None:
    """The request field an error is about (its top-level name), as OpenAI's `param` names it."""
    names = [str(part) for part in loc if part not in ("body", "query", "header")]
    if not names:
        return None
    # The native request's width and height come from `size`.
    return "size" if names[0] in ("width", "height") else names[0]


class OpenAIRoute(APIRoute):
    """A route whose refusals, including those of its dependencies and body validation, answer in
    OpenAI's error shape (the app's handlers answer the native API's)."""

    def get_route_handler(self) -> Callable[[Request], Any]:
        handler = super().get_route_handler()

        async def answer(request: Request) -> Response:
            try:
                return await handler(request)
            except Exception as exc:
                refused = as_refused(exc)
                if refused is None:
                    raise
                return error_response(refused)

        return answer


# ---- the wire models ----------------------------------------------------------------------------


class _Options(BaseModel):
    """Fields both endpoints take. Unknown fields are kept, then refused or ignored by name
    (`option_problem`), so a newer client's options get a reason rather than a silent default."""

    model_config = ConfigDict(extra="allow")

    prompt: str = Field(description="What to draw, or (edits) the instruction.")
    model: str | None = Field(
        default=None,
        description="A model this orchestrator serves (`GET /v1/models`), or leave it out for the default.",
    )
    n: int | None = Field(default=1, ge=1, le=MAX_N, description=f"Images to make, 1 to {MAX_N}.")
    size: str | None = Field(
        default=None, description="`WIDTHxHEIGHT` within the profile's limits, or `auto`.", examples=["256x256"]
    )
    response_format: Literal["b64_json", "url"] | None = Field(
        default=None, description="`b64_json` (default): the PNG inline; `url`: a link to it, for an hour."
    )
    quality: str | None = Field(default=None, description="Only `auto` or `standard`: use `steps` instead.")
    style: str | None = Field(default=None, description="Not offered: refused when given.")
    user: str | None = Field(default=None, description="Accepted and ignored.")
    # Extensions.
    seed: int | None = Field(default=None, description="Extension: image i of n gets seed + i; random when left out.")
    steps: int | None = Field(default=None, description="Extension: denoising steps (the profile's default).")
    guidance: float | None = Field(default=None, description="Extension: guidance scale (the profile's default).")
    deadline_s: float | None = Field(default=None, description="Extension: seconds the request may take.")


class GenerationsRequest(_Options):
    loras: list[LoraInput] = Field(default_factory=list, description="Extension: LoRAs, as in `POST /v1/images`.")


class EditsForm(_Options):
    """The multipart form of `POST /v1/images/edits`, besides its `image` and `mask` files."""

    strength: float | None = Field(default=None, description="Extension, with a mask: how far from the image.")
    loras: str | None = Field(default=None, description="Extension: the LoRAs as a JSON array, as in `/v1/images`.")


class ImageData(BaseModel):
    b64_json: str | None = Field(default=None, description="The PNG, base64 (`response_format` b64_json).")
    url: str | None = Field(default=None, description="A link to the PNG, without a key for an hour.")
    revised_prompt: None = None
    request_id: str = Field(description="Extension: the request behind this image, as in `GET /v1/requests`.")
    seed: int = Field(description="Extension: the seed it was drawn with.")


class ImagesResponse(BaseModel):
    created: int = Field(description="Unix seconds when the call was made.")
    data: list[ImageData]


# ---- pure pieces --------------------------------------------------------------------------------


def option_problem(options: Mapping[str, Any]) -> Refused | None:
    """Why these OpenAI options (the fields a request model does not declare, and `quality`,
    `style`) cannot be served, or None."""
    for name, value in options.items():
        if value is None or name in _IGNORED:
            continue
        allowed = _DEFAULT_ONLY.get(name)
        if allowed is None:
            return Refused(400, f"unknown parameter {name!r}", param=name, code="unknown_parameter")
        # Compared one by one: a JSON list or object is unhashable, and still only refused.
        if not any(value == choice and type(value) is type(choice) for choice in allowed):
            served = f" (served: {', '.join(sorted({str(choice).lower() for choice in allowed}))})" if allowed else ""
            return Refused(
                400, f"{name} {value!r} is not offered by this API{served}", param=name, code="unsupported_value"
            )
    return None


def parse_size(size: str | None, limits: ProfileLimits, steps: int | None) -> tuple[int, int] | None:
    """`WIDTHxHEIGHT` as served by the profile; None for `auto` (or none given)."""
    if size is None or size == "auto":
        return None
    match = _SIZE.match(size.strip())
    if match is None:
        raise Refused(400, f"size {size!r} is not WIDTHxHEIGHT (e.g. 256x256) or auto", param="size")
    width, height = int(match.group(1)), int(match.group(2))
    problem = None
    for name, side in (("width", width), ("height", height)):
        try:
            _SIDE.validate_python(side)
        except ValidationError as exc:
            problem = problem or f"{name} {side}: {exc.errors()[0]['msg'].removeprefix('Value error, ')}"
    problem = problem or limits.image_problem(width, height, steps if steps is not None else limits.default_steps)
    if problem is not None:
        raise Refused(
            400,
            f"size {size} is not served by model {limits.name}: {problem}",
            param="size",
            code="invalid_size",
        )
    return width, height


def default_size(limits: ProfileLimits) -> tuple[int, int]:
    side = min(limits.max_side, max(limits.min_side, DEFAULT_SIDE))
    return side, side


def repaint_mask(data: bytes, max_pixels: int) -> bytes:
    """OpenAI's mask (a PNG whose fully transparent pixels are edited) as this API's (an 8-bit
    grey PNG, white where the model repaints, black where it keeps)."""
    from PIL import Image, ImageOps

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data), formats=["PNG"])
            width, height = image.size
            if width * height > max_pixels:
                raise Refused(400, f"the mask is {width}x{height}, over this model's {max_pixels} pixels", param="mask")
            image.load()
    except Refused:
        raise
    except Exception:
        raise Refused(400, "the mask is not a PNG we can read", param="mask") from None
    image = ImageOps.exif_transpose(image) or image
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if not has_alpha:
        raise Refused(
            400,
            "the mask has no alpha channel: its fully transparent pixels mark what to edit",
            param="mask",
        )
    alpha = image.convert("RGBA").getchannel("A")
    return canonical_png(alpha.point(lambda a: 255 if a == 0 else 0))


def _url_payload(request_id: str, expires: int) -> bytes:
    return _URL_DOMAIN + f"{request_id}\n{expires}".encode()


def signed_url(signer: Signer, base_url: str, request_id: str, expires: int) -> str:
    """A link to the request's image that works without a key until `expires` (unix seconds)."""
    signature = signer.sign(_url_payload(request_id, expires)).hex()
    return f"{base_url.rstrip('/')}/v1/images/files/{request_id}?expires={expires}&signature={signature}"


def url_problem(signer: Signer, request_id: str, expires: int, signature: str, now: float) -> str | None:
    """Why a link does not open its image (forged, altered or expired), or None."""
    try:
        valid = signer.verify(_url_payload(request_id, expires), bytes.fromhex(signature))
    except (ValueError, TypeError):
        valid = False
    if not valid:
        return "this link's signature does not match it"
    if now >= expires:
        return "this link has expired; ask for the image again"
    return None


def model_of(options: _Options, served: Sequence[str]) -> tuple[str, ProfileLimits]:
    """The model a call is for (OpenAI's `model`; the first of `served`, the default, when left
    out) and its limits; refused, naming the served models, when it is not one of them."""
    model = options.model if options.model is not None else served[0]
    if model not in served:
        names = ", ".join(repr(name) for name in served)
        raise Refused(
            400,
            f"model {model!r} is not served here; this orchestrator serves {names} (or leave model out)",
            param="model",
            code="model_not_found",
        )
    return model, profile_limits(model)


def image_requests(
    options: _Options,
    model: str,
    *,
    task: str,
    size: tuple[int, int] | None,
    extra: Mapping[str, Any],
) -> list[ImageRequest]:
    """The native requests of `model` for one call: one per image, seeds following on from `seed`."""
    fields: dict[str, Any] = {
        "model": model,
        "task": task,
        "prompt": options.prompt,
        "steps": options.steps,
        "guidance": options.guidance,
        "deadline_s": options.deadline_s,
        **extra,
    }
    if size is not None:
        fields["width"], fields["height"] = size
    seeds = [options.seed + i if options.seed is not None else None for i in range(options.n or 1)]
    return [ImageRequest.model_validate({**fields, "seed": seed}) for seed in seeds]


# ---- the routes ---------------------------------------------------------------------------------

_DOCUMENTED = {
    400: "the request is invalid or cannot be served as asked (OpenAI's `error` object says which field)",
    401: "missing, invalid or revoked API key",
    402: "the key's usage quota for this period is spent (OpenAI's `insufficient_quota`)",
    403: "a link whose signature does not match, or that has expired",
    404: "no such image",
    409: "the request has no image (yet)",
    413: "an upload is over its size limit",
    422: "not answered: invalid requests are 400, as OpenAI's",
    429: "rate limit reached; see Retry-After",
    502: "an image failed at the miners (the reason says why)",
    503: "no healthy miner to run the images now; see Retry-After",
    504: "the images did not finish in time; the reason names their requests, which go on",
}


_CALLS = (400, 401, 402, 413, 422, 429, 502, 503, 504)


def _responses(statuses: Sequence[int] = _CALLS) -> dict[int | str, dict[str, Any]]:
    return {
        status: {
            "model": ErrorBody,
            "description": f"{reason}. The body also carries OpenAI's "
            '`"error": {"message", "type", "param", "code"}`.',
        }
        for status, reason in _DOCUMENTED.items()
        if status in statuses
    }


def _edits_body() -> dict[str, Any]:
    schema = EditsForm.model_json_schema()
    properties = dict(schema["properties"])
    for name, what in (("image", "the image to edit (PNG, JPEG or WebP)"), ("mask", "optional: a PNG with alpha")):
        properties[name] = {"type": "string", "format": "binary", "description": what}
    form = {**schema, "properties": properties, "required": ["image", "prompt"]}
    return {"required": True, "content": {"multipart/form-data": {"schema": form}}}


def build_router(orch: Orchestrator) -> APIRouter:
    router = APIRouter(route_class=OpenAIRoute, tags=["openai"])
    settings = orch.settings
    served = settings.served_models  # the default first

    async def client(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> Caller:
        # Admitted before the body is read: a stranger's upload costs us nothing.
        secret = bearer_secret(credentials)
        return Caller(await orch.admitted(secret), secret)

    @router.post("/v1/images/generations", response_model=ImagesResponse, responses=_responses())
    async def generations(
        request: Request, body: GenerationsRequest = Body(), caller: Caller = Depends(client)
    ) -> JSONResponse:
        """OpenAI's image generation (`client.images.generate`), on this subnet's miners."""
        _check_options(body)
        model, limits = model_of(body, served)
        size = parse_size(body.size, limits, body.steps) or default_size(limits)
        extra = {"loras": [lora.model_dump(exclude_none=True) for lora in body.loras]}
        native = image_requests(body, model, task="generate", size=size, extra=extra)
        return await _serve(orch, request, caller, native, body.response_format)

    @router.post(
        "/v1/images/edits",
        response_model=ImagesResponse,
        responses=_responses(),
        openapi_extra={"requestBody": _edits_body()},
    )
    async def edits(request: Request, caller: Caller = Depends(client)) -> JSONResponse:
        """OpenAI's image edit (`client.images.edit`): `image` edited as the prompt says, or with a
        `mask` (transparent = edit), inpainted there."""
        form, image, mask = await _edit_form(request, settings.max_input_image_bytes)
        _check_options(form)
        model, limits = model_of(form, served)
        size = parse_size(form.size, limits, form.steps)
        extra: dict[str, Any] = {}
        if form.loras:
            try:
                extra["loras"] = json_value(form.loras)
            except ValueError:
                raise Refused(400, "loras is not a JSON array", param="loras") from None
        if mask is not None:
            mask = await run_in_threadpool(repaint_mask, mask, limits.max_input_pixels)
            extra["strength"] = form.strength
        elif form.strength is not None:
            raise Refused(400, "strength goes with a mask (inpainting)", param="strength")
        task = "inpaint" if mask is not None else "edit"
        native = [
            body.with_uploads(image=image, mask=mask)
            for body in image_requests(form, model, task=task, size=size, extra=extra)
        ]
        return await _serve(orch, request, caller, native, form.response_format)

    @router.get(
        "/v1/images/files/{request_id}",
        response_class=Response,
        responses={
            **_responses((400, 403, 404, 409, 422)),
            200: {"content": {"image/png": {}}, "description": "the PNG"},
        },
    )
    def image_file(
        request_id: str,
        expires: Annotated[int, Query(description="Unix seconds the link works until.")],
        signature: Annotated[str, Query(pattern=_SIGNATURE, description="The orchestrator's, over id and expiry.")],
    ) -> FileResponse:
        """An image by the link a `url` answer gave: no key, until the link expires."""
        problem = url_problem(orch.signer, request_id, expires, signature, orch.clock().timestamp())
        if problem is not None:
            raise Refused(403, problem, param="signature", code="invalid_link")
        job = orch.store.load_job(request_id)
        if job is None or not kinds.get(job.kind).inline_result:
            raise Refused(404, f"no image {request_id}")
        # Private, like the result route: a shared cache must not keep it.
        return FileResponse(orch.result_path(job), media_type="image/png", headers={"Cache-Control": "private"})

    return router


def _check_options(options: _Options) -> None:
    given = {**(options.model_extra or {}), "quality": options.quality, "style": options.style}
    problem = option_problem(given)
    if problem is not None:
        raise problem


_FORM_FILES = ("image", "image[]", "mask")


async def _edit_form(request: Request, max_bytes: int) -> tuple[EditsForm, bytes, bytes | None]:
    """The edit's fields, its image and its mask (None when not sent), each file size-capped."""
    try:
        form = await request.form(max_files=3, max_fields=4 * len(EditsForm.model_fields))
    except (HTTPException, ValueError, KeyError, AssertionError) as exc:
        reason = getattr(exc, "detail", exc)
        raise Refused(400, f"the multipart body could not be read: {reason}") from None
    fields: dict[str, Any] = {}
    files: dict[str, bytes] = {}
    for name in form:
        values = form.getlist(name)
        param = name.removesuffix("[]")
        if len(values) != 1:
            what = "image (one image per edit)" if name.startswith("image") else repr(name)
            raise Refused(400, f"{what} is given {len(values)} times", param=param)
        value = values[0]
        if isinstance(value, UploadFile):
            if name not in _FORM_FILES:
                raise Refused(400, f"form part {name!r} must not be a file", param=name)
            files[param] = await _read(value, max_bytes, param)
        elif name in _FORM_FILES:
            raise Refused(400, f"{name} must be a file part", param=param)
        else:
            fields[name] = value
    if "image" in form and "image[]" in form:
        raise Refused(400, "one image per edit", param="image")
    image = files.get("image")
    if image is None:
        raise Refused(400, "an edit needs an image (a file part named image)", param="image")
    return EditsForm.model_validate(fields), image, files.get("mask")


async def _read(upload: UploadFile, limit: int, what: str) -> bytes:
    chunks, size = [], 0
    while chunk := await upload.read(1 << 20):
        size += len(chunk)
        if size > limit:
            raise Refused(413, f"the {what} is over the {limit}-byte limit", param=what)
        chunks.append(chunk)
    return b"".join(chunks)


async def _serve(
    orch: Orchestrator, request: Request, caller: Caller, bodies: list[ImageRequest], response_format: str | None
) -> JSONResponse:
    """Submit the call's images as native requests, wait for them, answer OpenAI's shape."""
    created = int(orch.clock().timestamp())
    jobs = await _submit_all(orch, caller, bodies)
    ids = ", ".join(job.id for job in jobs)
    # Checked once the images are accepted, so a bad input is still told apart from an idle
    # subnet; a synchronous caller is not held until its deadline when nobody can serve it.
    if not await run_in_threadpool(orch.store.list_miners, True):
        await _cancel(orch, caller.key, jobs)
        reason = f"no healthy miner to run images now (requests {ids} canceled); try again shortly"
        raise Refused(503, reason, headers={"Retry-After": "10"})
    spec = kinds.get(jobs[0].kind)
    deadline_s = bodies[0].deadline_s if bodies[0].deadline_s is not None else spec.default_deadline_s(orch.settings)
    wait_s = min(orch.settings.max_wait_s, deadline_s)
    finished = await asyncio.gather(*(orch.wait_finished(job.id, wait_s) for job in jobs))
    if any(job is None for job in finished):
        raise Refused(
            504,
            f"the images did not finish within {wait_s:g}s; their requests go on: {ids} (GET /v1/requests/{{id}})",
            headers={"x-should-retry": "false"},
        )
    done = [job for job in finished if job is not None]
    failed = [job for job in done if job.status != RequestStatus.succeeded.value]
    if failed:
        reasons = "; ".join(f"{job.id} {job.status}: {job.error or 'no reason given'}" for job in failed)
        raise Refused(502, f"{len(failed)} of {len(done)} images failed ({reasons}); requests: {ids}")
    base = str(request.base_url)
    data = []
    for job in done:
        item: dict[str, Any] = {"revised_prompt": None, "request_id": job.id, "seed": job.payload["seed"]}
        if response_format == "url":
            item["url"] = signed_url(orch.signer, base, job.id, int(orch.clock().timestamp()) + URL_TTL_S)
        else:
            png = await run_in_threadpool(orch.result_bytes, job)
            item["b64_json"] = base64.b64encode(png).decode()
        data.append(item)
    return JSONResponse({"created": created, "data": data})


async def _submit_all(orch: Orchestrator, caller: Caller, bodies: list[ImageRequest]) -> list[Job]:
    """Each image as a request of the native API, the first admitted already (the route's
    dependency), the others counted against the key's rate limit as they go; if one is refused,
    those already queued are canceled: the call gets all its images or none."""
    jobs: list[Job] = []
    try:
        for i, body in enumerate(bodies):
            key = caller.key if i == 0 else await orch.admitted(caller.secret)
            kind = TASK_KINDS[body.task]
            jobs.append(await orch.submit(None, kind, body, deadline_s=body.deadline_s, key=key))
    except Exception:
        await _cancel(orch, caller.key, jobs)
        raise
    return jobs


async def _cancel(orch: Orchestrator, key: ApiKey, jobs: list[Job]) -> None:
    for job in jobs:
        with contextlib.suppress(errors.OrchestratorError):
            await run_in_threadpool(orch.cancel, key, job.id)
