"""Who may open the operator dashboard: every path under /dashboard answers only to the operator
token (`dashboard_token`), and none is served until one is set.

The dashboard shows every client's prompts and images, while an API key sees only its own
requests: so API keys never open it. The token comes as `Authorization: Bearer <token>`, or as a
cookie that opening `/dashboard?token=<token>` once sets before redirecting to `/dashboard`, so
the token leaves the address bar. The page's own fetches, images and event stream are
same-origin requests under /dashboard, so the browser sends that cookie with each of them.
"""

from __future__ import annotations

import hashlib
import hmac

from pydantic import SecretStr
from starlette.requests import Request
from starlette.responses import JSONResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from dippy_studio.protocol.http_errors import error_body

PREFIX = "/dashboard"
COOKIE = "dippy_dashboard"
TOKEN_PARAM = "token"
OFF = "the dashboard is off: set DIPPY_ORCH_DASHBOARD_TOKEN to an operator token to turn it on"
DISABLED = "the dashboard is off: DIPPY_ORCH_DASHBOARD is false"
MISSING = (
    "the dashboard needs its operator token: open /dashboard?token=<token> once, or send Authorization: Bearer <token>"
)
WRONG = "wrong dashboard token"


def is_dashboard_path(path: str) -> bool:
    return path == PREFIX or path.startswith(PREFIX + "/")


def cookie_value(token: str) -> str:
    """What the cookie holds: a digest of the token, so any token an operator picks makes a valid
    cookie value, and the cookie jar never holds the token itself."""
    return hmac.new(token.encode(), b"dippy-studio dashboard cookie", hashlib.sha256).hexdigest()


def _same(given: str, expected: str) -> bool:
    # Bytes, so a header with non-ASCII characters is a mismatch, not a TypeError.
    return hmac.compare_digest(given.encode("utf-8", "replace"), expected.encode())


class DashboardGuard:
    """ASGI middleware in front of the whole app: a request under /dashboard reaches the app only
    with the operator token; without a configured token it is answered 404 with the reason."""

    def __init__(self, app: ASGIApp, *, token: SecretStr | None, enabled: bool = True) -> None:
        self.app = app
        self.token = token.get_secret_value() if token is not None else None
        self.enabled = enabled

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and is_dashboard_path(scope["path"]):
            response = self.answer(Request(scope))
            if response is not None:
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def answer(self, request: Request) -> Response | None:
        """The answer the guard gives instead of the app, or None to let the request through."""
        if self.token is None:
            return _refuse(404, OFF)
        if not self.enabled:
            return _refuse(404, DISABLED)
        offered = request.query_params.get(TOKEN_PARAM)
        if offered is not None and request.url.path in (PREFIX, PREFIX + "/"):
            if not _same(offered, self.token):
                return _refuse(401, WRONG)
            # 303: the browser follows with a GET of the bare page, now carrying the cookie.
            back = RedirectResponse(request.scope.get("root_path", "") + PREFIX, status_code=303)
            back.headers["Cache-Control"] = "no-store"
            back.set_cookie(
                COOKIE,
                cookie_value(self.token),
                path=PREFIX,
                httponly=True,
                samesite="strict",
                secure=request.url.scheme == "https",
            )
            return back
        scheme, _, bearer = request.headers.get("authorization", "").partition(" ")
        cookie = request.cookies.get(COOKIE)
        if scheme.lower() == "bearer" and _same(bearer.strip(), self.token):
            return None
        if cookie is not None and _same(cookie, cookie_value(self.token)):
            return None
        return _refuse(401, WRONG if bearer or cookie else MISSING)


def _refuse(status: int, reason: str) -> Response:
    headers = {"WWW-Authenticate": 'Bearer realm="dashboard"'} if status == 401 else {}
    return JSONResponse(error_body(reason), status_code=status, headers=headers)
