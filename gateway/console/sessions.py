"""Console sign-in sessions: an API token is exchanged for a random session id kept in a
cookie (HttpOnly, SameSite=Strict, Secure under TLS, expiring). The token's secret stays
in this process's memory only, and is checked again on every request, so a revoked
token signs its sessions out at once. Every form carries the session's CSRF token; the
sign-in form, before there is a session, a double-submit cookie's."""
from __future__ import annotations

import hmac
import secrets
import time
from collections import OrderedDict
from dataclasses import dataclass

from aiohttp import web

from engine.audit import Principal

SESSION_COOKIE = "alluse_session"
CSRF_COOKIE = "alluse_csrf"
SESSIONS_MAX = 10_000


@dataclass
class Session:
    id: str
    secret: str
    csrf: str
    expires_at: float


class Sessions:
    """Bounded: past `SESSIONS_MAX`, the oldest sign-ins are forgotten first."""

    def __init__(self, lifetime_s: float):
        self.lifetime_s = lifetime_s
        self._sessions: OrderedDict[str, Session] = OrderedDict()

    def open(self, secret: str, now: float | None = None) -> Session:
        now = time.monotonic() if now is None else now
        session = Session(id=secrets.token_urlsafe(32), secret=secret, csrf=secrets.token_urlsafe(24),
                          expires_at=now + self.lifetime_s)
        self._sessions[session.id] = session
        while len(self._sessions) > SESSIONS_MAX:
            self._sessions.popitem(last=False)
        return session

    def get(self, session_id: str | None, now: float | None = None) -> Session | None:
        if not session_id:
            return None
        session = self._sessions.get(session_id)
        now = time.monotonic() if now is None else now
        if session is None or session.expires_at <= now:
            self._sessions.pop(session_id, None)
            return None
        return session

    def close(self, session_id: str | None) -> None:
        if session_id:
            self._sessions.pop(session_id, None)


def see_other(location: str) -> web.Response:
    """A 303 to a path of this console (returned, not raised: the gateway's error
    middleware turns raised HTTP exceptions into error bodies)."""
    return web.Response(status=303, headers={"Location": location})


def same(presented: str | None, expected: str) -> bool:
    return presented is not None and hmac.compare_digest(presented.encode(), expected.encode())


def set_cookie(response: web.StreamResponse, request: web.Request, name: str, value: str, max_age_s: int) -> None:
    response.set_cookie(name, value, max_age=max_age_s, path="/", httponly=True, samesite="Strict",
                        secure=request.secure)


def clear_cookie(response: web.StreamResponse, name: str) -> None:
    response.del_cookie(name, path="/")


def authenticate(app: web.Application, secret: str) -> Principal | None:
    """The same check as the API's bearer tokens (`gateway.app._principal`)."""
    from actors.security import BOOTSTRAP
    from gateway.app import ADMIN_TOKEN, ENGINE

    secret = secret.strip()
    if not secret or len(secret) > 4096:
        return None
    if hmac.compare_digest(secret.encode("utf-8", "surrogatepass"), app[ADMIN_TOKEN].encode()):
        return BOOTSTRAP
    return app[ENGINE].security.authenticate(secret)
