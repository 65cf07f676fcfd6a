"""The session cookie: what lets a browser refresh or an opened link keep a signed-in person signed in.

Streamlit forgets a browser session on refresh; the server-side session record (medvqa.services.sessions) does
not. Its token travels in one cookie that only the server sets and only the server reads:

- `medvqa_session`: HttpOnly (no page script can read it), SameSite=Strict (no other site's page or link sends
  it), Secure when the request came over TLS, Path=/, Max-Age the idle timeout, renewed while the person works.
- After sign-in the page holds a one-time handoff code (random, single use, valid HANDOFF_SECONDS, kept in this
  process's memory only) and POSTs it, in a header, to /medvqa-session/claim, which answers by setting the
  cookie. The token itself never reaches the page or a URL.
- A new browser session reads the cookie from its WebSocket handshake (st.context.cookies) and resumes the
  server-side session when that is still live (workbench.auth).
- /medvqa-session/renew sets the cookie again with a fresh Max-Age while the session is live;
  /medvqa-session/end expires it (sign-out, or a session found ended).

The routes are served by `workbench/server.py` (st.App), which `medvqa workbench` and `medvqa demo` run. Under
`streamlit run workbench/app.py` the workbench works the same, but a refresh signs the person out.
"""

from __future__ import annotations

import functools
import hashlib
import json
import secrets
import threading
import time
from typing import TYPE_CHECKING

from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

if TYPE_CHECKING:
    from medvqa.services.database import Database

COOKIE = "medvqa_session"
HANDOFF_HEADER = "X-Medvqa-Handoff"
HANDOFF_SECONDS = 60.0
PREFIX = "/medvqa-session"
_pending: dict[str, tuple[str, float]] = {}  # sha256(handoff code) -> (session token, monotonic deadline)
_lock = threading.Lock()


def _digest(code: str) -> str:
    return hashlib.sha256(code.encode()).hexdigest()


def issue_handoff(token: str, *, now: float | None = None) -> str:
    """A one-time code the page exchanges for the cookie carrying `token`; expired codes are dropped."""
    now = time.monotonic() if now is None else now
    code = secrets.token_urlsafe(32)
    with _lock:
        for key in [key for key, (_, deadline) in _pending.items() if deadline < now]:
            del _pending[key]
        _pending[_digest(code)] = (token, now + HANDOFF_SECONDS)
    return code


def redeem_handoff(code: str, *, now: float | None = None) -> str | None:
    """The token a handoff code stands for, once: a second use, an unknown or an expired code gives None."""
    now = time.monotonic() if now is None else now
    with _lock:
        entry = _pending.pop(_digest(code), None)
    if entry is None or entry[1] < now:
        return None
    return entry[0]


def cookie_header(request: Request, token: str | None, max_age_seconds: int) -> str:
    """The Set-Cookie value: the token with the cookie's attributes, or an expired empty cookie."""
    secure = request.url.scheme == "https" or request.headers.get("x-forwarded-proto", "").lower() == "https"
    parts = [f"{COOKIE}={token or ''}", "Path=/", "HttpOnly", "SameSite=Strict"]
    parts.append(f"Max-Age={max_age_seconds if token else 0}")
    if secure:
        parts.append("Secure")
    return "; ".join(parts)


def _same_origin(request: Request) -> bool:
    """The POST came from a page of this server: a browser always sends Origin on a POST fetch; another site's
    page cannot set our custom header without a CORS preflight we never answer, and SameSite=Strict does the rest."""
    origin = request.headers.get("origin")
    if origin is None:
        return False
    host = request.headers.get("host", "")
    return origin.split("://", 1)[-1] == host


def _idle_seconds() -> int:
    from medvqa.config import load_settings

    return int(load_settings().workbench_idle_timeout_minutes) * 60


@functools.lru_cache(maxsize=2)
def _database(url: str) -> Database:
    from medvqa.config import load_settings
    from medvqa.services.database import open_database

    return open_database(load_settings())


def _configured_database() -> Database:
    from medvqa.config import load_settings

    return _database(load_settings().sqlalchemy_url.render_as_string(hide_password=False))


def _respond(request: Request, status: int, token: str | None, max_age: int) -> Response:
    response = Response(json.dumps({"ok": status == 200}), status_code=status, media_type="application/json")
    response.headers["Set-Cookie"] = cookie_header(request, token, max_age)
    response.headers["Cache-Control"] = "no-store"
    return response


def claim(request: Request) -> Response:
    """POST with the handoff code in the X-Medvqa-Handoff header: sets the session cookie."""
    if not _same_origin(request):
        return Response(status_code=403)
    token = redeem_handoff(request.headers.get(HANDOFF_HEADER, ""))
    if token is None:
        return Response(status_code=403)
    return _respond(request, 200, token, _idle_seconds())


def renew(request: Request) -> Response:
    """POST: set the cookie again with a fresh Max-Age while its session is live; expire it otherwise."""
    from medvqa.services.sessions import session_is_live

    if not _same_origin(request):
        return Response(status_code=403)
    token = request.cookies.get(COOKIE)
    idle = _idle_seconds()
    live = bool(token) and session_is_live(_configured_database(), str(token), idle_timeout_minutes=idle // 60)
    return _respond(request, 200 if live else 403, token if live else None, idle)


def end(request: Request) -> Response:
    """POST: expire the cookie (the server-side session was already ended by the page)."""
    if not _same_origin(request):
        return Response(status_code=403)
    return _respond(request, 200, None, 0)


def routes() -> list[Route]:
    """The cookie's endpoints, for st.App. Sync endpoints: Starlette runs them in its thread pool."""
    return [
        Route(f"{PREFIX}/claim", claim, methods=["POST"]),
        Route(f"{PREFIX}/renew", renew, methods=["POST"]),
        Route(f"{PREFIX}/end", end, methods=["POST"]),
    ]


def script(action: str, code: str | None = None) -> str:
    """The few lines of JavaScript the page runs to claim, renew or end the cookie (same-origin POST)."""
    if action not in ("claim", "renew", "end"):
        raise ValueError(f"unknown cookie action {action!r}")
    headers = {HANDOFF_HEADER: code} if code else {}
    return (
        "<script>fetch(window.location.origin + "
        f"{json.dumps(f'{PREFIX}/{action}')}, {{method: 'POST', credentials: 'same-origin', "
        f"headers: {json.dumps(headers)}}}).catch(() => undefined);</script>"
    )
