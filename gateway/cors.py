"""CORS, off by default: only origins listed in `[server] cors_origins` get CORS headers.
A preflight (OPTIONS with Origin and Access-Control-Request-Method) is answered here,
before authentication: it carries no token by design, so it is never a 401 and never
counts toward the invalid-token limit of its address."""
from __future__ import annotations

from aiohttp import web

ALLOWED_METHODS = "GET, POST, PATCH, DELETE"
ALLOWED_HEADERS = "Authorization, Content-Type, Idempotency-Key, X-Request-Id"
EXPOSED_HEADERS = "X-Request-Id, Retry-After, Idempotency-Replayed"
PREFLIGHT_MAX_AGE_S = "600"
CORS_ORIGINS = web.AppKey("cors_origins", frozenset)


def _allowed(request: web.Request) -> str | None:
    origin = request.headers.get("Origin")
    if origin is None:
        return None
    return origin if origin in request.app[CORS_ORIGINS] else None


@web.middleware
async def middleware(request: web.Request, handler):
    origin = _allowed(request)
    if request.method == "OPTIONS" and "Access-Control-Request-Method" in request.headers \
            and "Origin" in request.headers:
        if origin is None:
            # No CORS headers: the browser refuses the cross-origin call.
            return web.Response(status=204, headers={"Vary": "Origin"})
        return web.Response(status=204, headers={
            "Access-Control-Allow-Origin": origin, "Access-Control-Allow-Methods": ALLOWED_METHODS,
            "Access-Control-Allow-Headers": ALLOWED_HEADERS, "Access-Control-Max-Age": PREFLIGHT_MAX_AGE_S,
            "Vary": "Origin"})
    response = await handler(request)
    if origin is not None:
        response.headers["Access-Control-Allow-Origin"] = origin
        response.headers["Access-Control-Expose-Headers"] = EXPOSED_HEADERS
        response.headers["Vary"] = "Origin"
    return response
