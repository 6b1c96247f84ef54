"""Errors aiohttp answers itself, before any middleware runs (a malformed request line,
a header past its size or count limit, a broken chunked body): aiohttp's own answer is
plain text that quotes the offending bytes, and its log line carries them too, which
could put a bearer token in a reply or a log. `install()` replaces that one method of
aiohttp's request handler so these answers take the SPEC's error shape, say nothing of
the bytes received, and log only the status and the kind of error."""
from __future__ import annotations

import logging

import msgspec
from aiohttp import web, web_protocol

from actors.ids import new_request_id

log = logging.getLogger("alluse.gateway")

_CODES = {400: "bad_request", 413: "payload_too_large", 431: "headers_too_large", 500: "internal_error"}
_encode = msgspec.json.Encoder().encode


def _handle_error(self, request, status: int = 500, exc: BaseException | None = None,
                  message: str | None = None) -> web.StreamResponse:
    log.warning("rejected a malformed request from %s: %d %s", request.remote, status,
                type(exc).__name__ if exc is not None else "")
    if request.writer.output_size > 0:
        raise ConnectionError("Response is sent already, cannot send another response with the error message")
    request_id = new_request_id()
    body = {"error": {"code": _CODES.get(status, "bad_request"),
                      "message": "internal error; quote the request id" if status >= 500
                      else "the request is malformed or its headers are too large",
                      "details": {}},
            "request_id": request_id}
    response = web.Response(status=status, body=_encode(body), content_type="application/json",
                            headers={"X-Request-Id": request_id})
    response.force_close()
    return response


def install() -> None:
    web_protocol.RequestHandler.handle_error = _handle_error
