"""The HTTP client of the `alluse` remote commands: one request at a time with the
standard library, the bearer token from `--token-file`, `ALLUSE_TOKEN`,
`ALLUSE_TOKEN_FILE` or the local data directory's generated `admin-token`, and every
failure turned into one `CommandError` line (the API's error code and message, with its
request id)."""
from __future__ import annotations

import json
import os
import ssl
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

from actors.settings import admin_token_file

TIMEOUT_S = 30.0
DEFAULT_URL = "http://127.0.0.1:8080"


class CommandError(Exception):
    """A failure the command reports as one line on stderr, exiting non-zero."""

    def __init__(self, message: str, exit_code: int = 1):
        super().__init__(message)
        self.message, self.exit_code = message, exit_code


def read_token(token_file: str | None, data_dir: str) -> str:
    """--token-file, else ALLUSE_TOKEN, else ALLUSE_TOKEN_FILE, else `<data_dir>/admin-token`."""
    path = token_file or None
    if path is None and os.environ.get("ALLUSE_TOKEN"):
        return os.environ["ALLUSE_TOKEN"].strip()
    path = path or os.environ.get("ALLUSE_TOKEN_FILE") or str(admin_token_file(data_dir))
    try:
        token = Path(path).read_text().strip()
    except OSError as error:
        raise CommandError(f"no token: set ALLUSE_TOKEN or pass --token-file (cannot read {path}: "
                           f"{error.strerror})") from error
    if not token:
        raise CommandError(f"no token: {path} is empty")
    return token


class Client:
    def __init__(self, url: str, token: str, *, ca_file: str | None = None):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.netloc:
            raise CommandError(f"--url {url!r} is not an http:// or https:// address", exit_code=2)
        self.url = url.rstrip("/")
        self.token = token
        self.context = ssl.create_default_context(cafile=ca_file) if parts.scheme == "https" else None

    def request(self, method: str, path: str, body: dict | None = None, *, query: dict | None = None,
                idempotency_key: str | None = None, authenticated: bool = True):
        address = self.url + path
        if query:
            address += "?" + urllib.parse.urlencode({k: v for k, v in query.items() if v is not None})
        headers = {"Accept": "application/json"}
        if authenticated:
            headers["Authorization"] = f"Bearer {self.token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        if method in ("POST", "PATCH", "DELETE"):
            headers["Idempotency-Key"] = idempotency_key or str(uuid.uuid4())
        call = urllib.request.Request(address, data=data, method=method, headers=headers)
        try:
            with urllib.request.urlopen(call, timeout=TIMEOUT_S, context=self.context) as response:
                return _decode(response.read())
        except urllib.error.HTTPError as error:
            raise CommandError(_api_error(error)) from None
        except urllib.error.URLError as error:
            raise CommandError(f"cannot reach {self.url}: {error.reason}") from None
        except (TimeoutError, OSError) as error:
            raise CommandError(f"cannot reach {self.url}: {error}") from None

    def get(self, path: str, **query):
        return self.request("GET", path, query=query or None)

    def pages(self, path: str, *, limit_total: int, page_max: int, cursor: str | None = None, **query) -> dict:
        """Follows `next_cursor` until `limit_total` items (a bound: never unbounded), as one
        page of the API's shape: its `next_cursor` is where the items shown end, so the
        caller can say there is more and continue from there."""
        items: list = []
        while True:
            page = self.get(path, **query, limit=min(limit_total - len(items), page_max), cursor=cursor)
            items.extend(page.get("items", []))
            cursor = page.get("next_cursor")
            if not cursor or len(items) >= limit_total:
                return {"items": items, "next_cursor": cursor}

def _decode(raw: bytes):
    if not raw:
        return None
    try:
        return json.loads(raw)
    except ValueError:
        return raw.decode(errors="replace")


def _api_error(error: urllib.error.HTTPError) -> str:
    try:
        body = json.loads(error.read())
        detail = body["error"]
        field = detail.get("details", {}).get("field")
        where = f" (field {field})" if field else ""
        return (f"{error.code} {detail['code']}: {detail['message']}{where} "
                f"[request {body.get('request_id', '?')}]")
    except (ValueError, KeyError, TypeError, AttributeError):
        return f"{error.code} {error.reason}"
