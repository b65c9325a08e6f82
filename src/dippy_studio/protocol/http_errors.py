"""The one shape every service refuses a request in, and the FastAPI pieces that keep it so.

Every 4xx body is `{"detail": "<reason>"}`: one string a person can read. A request that does
not validate (422) adds `errors`, one entry per problem, saying where (`loc`) and why (`msg`,
`type`), for a program to act on. `install` makes an app answer so (FastAPI's validation errors
and every HTTPException, 405 with an `Allow` header naming every method the path serves);
`error_responses` declares the shape in a route's OpenAPI `responses=`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException
from starlette.routing import Match, Mount

__all__ = ["ErrorBody", "FieldError", "error_body", "error_responses", "install"]

# Enough problems to act on; a body with thousands of bad fields still gets a short reason.
_MAX_LISTED = 10
_METHODS = ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE")


class FieldError(BaseModel):
    """One reason a request did not validate."""

    loc: list[str | int] = Field(description="Where: 'body', 'query', 'path' or 'header', then the field.")
    msg: str
    type: str = Field(description="pydantic's error type, e.g. 'missing', 'less_than_equal'.")


class ErrorBody(BaseModel):
    """Why a request was refused."""

    detail: str = Field(description="The reason, for a person to read.")
    errors: list[FieldError] | None = Field(
        default=None, description="Only when the request did not validate (422): each problem, where and why."
    )


def error_body(detail: str, errors: list[FieldError] | None = None) -> dict[str, Any]:
    """The JSON body of a refusal."""
    return ErrorBody(detail=detail, errors=errors).model_dump(mode="json", exclude_none=True)


def error_responses(reasons: Mapping[int, str]) -> dict[int | str, dict[str, Any]]:
    """OpenAPI `responses=` entries for these statuses, each with its description and `ErrorBody`."""
    return {status: {"model": ErrorBody, "description": reason} for status, reason in reasons.items()}


def install(app: FastAPI) -> None:
    """Make every refusal of `app` an `ErrorBody`, and every 405 name the methods its path serves."""
    app.add_exception_handler(RequestValidationError, _invalid)
    app.add_exception_handler(HTTPException, _refused)


async def _invalid(_request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors = [
        FieldError(loc=list(error.get("loc", ())), msg=str(error.get("msg", "")), type=str(error.get("type", "")))
        for error in exc.errors()
    ]
    reasons = [f"{'.'.join(str(part) for part in error.loc)}: {error.msg}" for error in errors[:_MAX_LISTED]]
    if len(errors) > _MAX_LISTED:
        reasons.append(f"and {len(errors) - _MAX_LISTED} more")
    return JSONResponse(error_body("; ".join(reasons) or "invalid request", errors), status_code=422)


async def _refused(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    headers = dict(exc.headers or {})
    if exc.status_code == 405 and (methods := allowed_methods(request)):
        headers["Allow"] = ", ".join(methods)
    return JSONResponse(error_body(str(exc.detail)), status_code=exc.status_code, headers=headers)


def allowed_methods(request: Request) -> list[str]:
    """Every method some route serves at this request's path. Starlette's own 405 names only the
    first route that matched the path, so a path with a GET and a POST route would say one.

    Mounted apps (static files) are left out: they match every method, and say their own `Allow`."""
    routes = [route for route in request.app.router.routes if not isinstance(route, Mount)]
    return [
        method
        for method in _METHODS
        if any(route.matches({**request.scope, "method": method})[0] is Match.FULL for route in routes)
    ]
