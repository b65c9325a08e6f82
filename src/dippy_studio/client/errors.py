"""What the client raises: one exception type per kind of refusal, each with the server's reason."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from dippy_studio.client.models import Request


class DippyError(Exception):
    """Anything this client raises on purpose."""


class ApiError(DippyError):
    """The API refused a call: `status` (e.g. 422), `reason` (the server's `detail`, for a person)
    and, for a request that did not validate, `errors` (one `{loc, msg, type}` per problem)."""

    def __init__(
        self,
        status: int,
        reason: str,
        errors: list[dict[str, Any]] | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(f"{status}: {reason}")
        self.status = status
        self.reason = reason
        self.errors = errors or []
        self.headers = headers or {}


class AuthenticationError(ApiError):
    """401: the API key is missing, invalid or revoked."""


class QuotaExceeded(ApiError):
    """402: the key's quota is spent."""


class NotFound(ApiError):
    """404: no such request or LoRA for this API key."""


class Conflict(ApiError):
    """409: not in a state that allows this (e.g. the result of a request that has not succeeded)."""


class InvalidRequest(ApiError):
    """422: the request is invalid or cannot be served as asked; `reason` says why."""


class RateLimited(ApiError):
    """429 (or 503) still answered after the client's retries; `retry_after` is the server's
    Retry-After in seconds, when it gave one."""

    def __init__(self, *args: Any, retry_after: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.retry_after = retry_after


class WaitTimeout(DippyError, TimeoutError):
    """`wait` gave up before the request finished; it is still running (`request` is its last status)."""

    def __init__(self, request: Request, timeout_s: float) -> None:
        super().__init__(f"{request.id} is still {request.status} after {timeout_s:g}s")
        self.request = request


class IntegrityError(DippyError):
    """A downloaded result does not match the sha256 the API gave for it."""


class WebhookVerificationError(DippyError, ValueError):
    """A webhook's signature or timestamp does not check out: do not trust its body."""


_BY_STATUS: dict[int, type[ApiError]] = {
    401: AuthenticationError,
    402: QuotaExceeded,
    404: NotFound,
    409: Conflict,
    422: InvalidRequest,
    429: RateLimited,
    503: RateLimited,
}


def error_for(status: int, reason: str, errors: list[dict[str, Any]] | None, headers: dict[str, str]) -> ApiError:
    cls = _BY_STATUS.get(status, ApiError)
    if cls is RateLimited:
        return RateLimited(status, reason, errors, headers, retry_after=retry_after_s(headers))
    return cls(status, reason, errors, headers)


def retry_after_s(headers: dict[str, str]) -> float | None:
    """Retry-After in seconds (only the delta-seconds form: this API sends no dates)."""
    value = headers.get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None
