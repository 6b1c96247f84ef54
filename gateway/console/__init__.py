"""The operator console at `GET /`: server-rendered pages (jinja2) with a little local
JavaScript, served by the gateway itself from the in-process `Engine` (no HTTP round
trip to itself). Sign-in exchanges an API token for a session cookie
(`gateway.console.sessions`); each page and button is allowed by the very permission
table of the API route it stands for (`gateway.permissions`), owner scope included.
Every asset is local: nothing is fetched from a CDN."""
from __future__ import annotations

import asyncio
import secrets
import time
from pathlib import Path

import jinja2
from aiohttp import web

from actors.settings import Settings, admin_token_file
from engine.errors import EngineError, NotFound
from gateway import permissions
from gateway.cors import CORS_ORIGINS
from gateway.console import pages
from gateway.console.sessions import CSRF_COOKIE, SESSION_COOKIE, Sessions, authenticate, clear_cookie, same, \
    see_other, set_cookie

HERE = Path(__file__).parent
SESSIONS = web.AppKey("console_sessions", Sessions)
TEMPLATES = web.AppKey("console_templates", jinja2.Environment)
STOPPING = web.AppKey("console_stopping", asyncio.Event)
TOKEN_FILE = web.AppKey("console_admin_token_file", str)
# Pages and scripts from this origin only; inline SVG and style attributes are allowed.
CSP = ("default-src 'self'; img-src 'self' data:; style-src 'self' 'unsafe-inline'; script-src 'self'; "
       "connect-src 'self'; frame-ancestors 'none'; form-action 'self'; base-uri 'none'")
CSRF_COOKIE_AGE_S = 3600


def setup(app: web.Application) -> None:
    from gateway.app import ADMIN_TOKEN, SETTINGS

    settings = app[SETTINGS]
    app[TOKEN_FILE] = _token_file(settings, app[ADMIN_TOKEN])
    app[SESSIONS] = Sessions(settings.server.console_session_s)
    app[TEMPLATES] = pages.environment(HERE / "templates")
    app[STOPPING] = asyncio.Event()
    app[CORS_ORIGINS] = frozenset(settings.server.cors_origins)

    async def stop_streams(_app):
        _app[STOPPING].set()

    app.on_shutdown.append(stop_streams)
    router = app.router
    router.add_get("/", home)
    router.add_get("/console/sign-in", sign_in_page)
    router.add_post("/console/sign-in", sign_in)
    router.add_post("/console/sign-out", sign_out)
    router.add_get("/console/portfolios", guarded(pages.portfolios, ("GET", "/v1/portfolios")))
    router.add_get("/console/portfolios/{portfolio_id}",
                   guarded(pages.portfolio, ("GET", "/v1/portfolios/{portfolio_id}")))
    router.add_get("/console/accounts/{account_id}", guarded(pages.account, ("GET", "/v1/accounts/{account_id}")))
    router.add_get("/console/events", guarded(pages.events, ("GET", "/v1/events")))
    router.add_get("/console/events/stream", guarded(pages.event_stream, ("GET", "/v1/events")))
    router.add_get("/console/supervision", guarded(pages.supervision, ("GET", "/v1/supervisor/status")))
    router.add_post("/console/quarantine/{account_id}/release",
                    guarded(pages.release, ("POST", "/v1/admin/quarantine/{account_id}/release")))
    router.add_get("/console/webhooks", guarded(pages.webhooks, ("GET", "/v1/webhooks")))
    router.add_get("/console/webhooks/{webhook_id}", guarded(pages.webhook, ("GET", "/v1/webhooks/{webhook_id}")))
    router.add_post("/console/webhooks/{webhook_id}/redeliver",
                    guarded(pages.redeliver, ("POST", "/v1/webhooks/{webhook_id}/dead-letters/retry")))
    router.add_get("/console/audit", guarded(pages.audit, ("GET", "/v1/audit")))
    router.add_post("/console/audit/verify", guarded(pages.verify, ("GET", "/v1/audit/verify")))
    router.add_static("/console/static", HERE / "static", append_version=False)


def secure_headers(response: web.StreamResponse) -> web.StreamResponse:
    response.headers["Content-Security-Policy"] = CSP
    response.headers["X-Content-Type-Options"] = "nosniff"
    response.headers["Referrer-Policy"] = "same-origin"
    response.headers.setdefault("Cache-Control", "no-store")
    return response


def current(request: web.Request):
    """(session, principal) of a signed-in request, else (None, None)."""
    session = request.app[SESSIONS].get(request.cookies.get(SESSION_COOKIE))
    if session is None:
        return None, None
    principal = authenticate(request.app, session.secret)
    if principal is None:  # revoked since sign-in
        request.app[SESSIONS].close(session.id)
        return None, None
    return session, principal


def guarded(handler, route: tuple[str, str]):
    """The page runs only for a signed-in principal whom the route's permission allows; a
    form post also needs the session's CSRF token."""
    permission = permissions.PERMISSIONS[route]

    async def page(request: web.Request) -> web.StreamResponse:
        from gateway.app import ENGINE

        refusal = request.app[ENGINE].availability.refusal
        if refusal is not None:   # a standby: nothing to show but that
            return await pages.problem(request, None, None, 503, "Not available here", refusal.message)
        session, principal = current(request)
        if session is None:
            if request.method == "GET" and not request.path.endswith("/stream"):
                return see_other(f"/console/sign-in?next={request.path_qs}")
            return await pages.problem(request, None, None, 401, "Signed out", "Sign in again to continue.")
        if request.method == "POST":
            form = await request.post()
            if not same(form.get("csrf"), session.csrf):
                return await pages.problem(request, session, principal, 403, "Form expired",
                                           "This form is no longer valid. Reload the page and try again.")
        if not permissions.allowed(permission, principal.role, principal.owner):
            return await pages.problem(request, session, principal, 403, "Not allowed",
                                       f"The {principal.role} role may not see this page.")
        try:
            return secure_headers(await handler(request, session, principal))
        except NotFound:
            return await pages.problem(request, session, principal, 404, "Not found",
                                       "There is nothing here, or it belongs to another owner.")
        except EngineError as error:
            return await pages.problem(request, session, principal, 503 if error.code != "validation_failed"
                                       else 422, "Could not load this page", error.message)

    page.__name__ = handler.__name__
    return page


async def home(request: web.Request) -> web.StreamResponse:
    session, _ = current(request)
    return see_other("/console/portfolios" if session is not None else "/console/sign-in")


def _token_file(settings: Settings, token: str) -> str:
    """The file this engine's bootstrap admin token is kept in, for the sign-in page to
    name; empty when the token was configured (ALLUSE_ADMIN_TOKEN) instead."""
    path = admin_token_file(settings.database.data_dir)
    try:
        kept = path.read_bytes().strip()
    except OSError:
        return ""
    return str(path) if secrets.compare_digest(kept, token.encode()) else ""


def _safe_next(target: str | None) -> str:
    """Only a path of this console: never an absolute URL (no open redirect)."""
    if target and target.startswith("/console/") and not target.startswith("//") and "\\" not in target:
        return target
    return "/console/portfolios"


async def sign_in_page(request: web.Request, error: str | None = None, status: int = 200) -> web.Response:
    csrf = request.cookies.get(CSRF_COOKIE) or pages.new_csrf()
    response = pages.render(request, "sign_in.html", None, None, status=status, csrf=csrf, error=error,
                            next=_safe_next(request.query.get("next")), token_file=request.app[TOKEN_FILE])
    set_cookie(response, request, CSRF_COOKIE, csrf, CSRF_COOKIE_AGE_S)
    return secure_headers(response)


async def sign_in(request: web.Request) -> web.StreamResponse:
    from gateway.app import GUARD

    form = await request.post()
    if not same(form.get("csrf"), request.cookies.get(CSRF_COOKIE) or "\x00"):
        return await sign_in_page(request, "This form expired. Please sign in again.", 403)
    guard, client, now = request.app[GUARD], request.remote or "", time.monotonic()
    principal = authenticate(request.app, str(form.get("token", "")))
    if principal is None:
        if guard.invalid.blocked_for(client, now):
            return await sign_in_page(request, "Too many invalid tokens from this address. Wait a minute.", 429)
        guard.invalid.fail(client, now)
        return await sign_in_page(request, "That token is not valid (unknown, mistyped or revoked).", 401)
    session = request.app[SESSIONS].open(str(form.get("token")).strip())
    response = see_other(_safe_next(str(form.get("next", ""))))
    set_cookie(response, request, SESSION_COOKIE, session.id, int(request.app[SESSIONS].lifetime_s))
    clear_cookie(response, CSRF_COOKIE)
    return response


async def sign_out(request: web.Request) -> web.StreamResponse:
    session, _ = current(request)
    form = await request.post()
    if session is not None and not same(form.get("csrf"), session.csrf):
        return await pages.problem(request, session, None, 403, "Form expired", "Reload the page and try again.")
    if session is not None:
        request.app[SESSIONS].close(session.id)
    response = see_other("/console/sign-in")
    clear_cookie(response, SESSION_COOKIE)
    return response



