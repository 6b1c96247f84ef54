"""The HTTP API fuzzed from its own OpenAPI description (/openapi.json) with schemathesis,
against the real app on a real port of 127.0.0.1 (its own event loop in a background
thread), the real actors and a real PostgreSQL database.

Schemathesis runs as its CLI (`schemathesis run`) in a subprocess: its phases (coverage
of the schema's edges, fuzzing, stateful sequences that feed ids from one answer into
the next request) and its checks: no 5xx, every status code documented, the documented
content type, every body valid against its documented schema, the documented headers,
401 without the token, 405 with `Allow` for undeclared methods, a created resource
readable, a deleted one gone. Each generated request gets an Idempotency-Key of its own
(`tests/fuzz_hooks.py` says why). `negative_data_rejection` and `positive_data_acceptance`
are left out: JSON Schema's `integer` admits `5.0`, which the API refuses by design
(amounts are integers, never floats), and business rules (a quarter that has not begun,
a transfer to itself) refuse schema-valid data.

Generation is deterministic and bounded (MAX_EXAMPLES per operation), so a run takes
seconds and repeats itself. The number of requests is counted by the server itself
(`alluse_http_requests_total` in /metrics, which also proves no 5xx was answered),
printed (`-s`) and kept in the pytest cache (`.pytest_cache/v/alluse/fuzz`).

The invalid-token cap per address is raised for these tests: the checks send requests
without a token on purpose, and past the cap every request from 127.0.0.1 would get 429
and test nothing.

Webhook delivery is off in these runs (`[webhooks] deliver = false`): the fuzzer registers
endpoints with made-up public URLs (private ones are refused, 422), and the engine must
not send anything, not even a DNS query, anywhere but 127.0.0.1. The routes themselves
are fuzzed like every other."""
from __future__ import annotations

import asyncio
import inspect
import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
from aiohttp import web

from actors.settings import load_settings
from gateway.app import ROUTES, create_app

ADMIN_TOKEN = "fuzz-admin-token-0123456789abcdef"
REPO_ROOT = Path(__file__).resolve().parent.parent
SCHEMATHESIS = Path(sys.executable).with_name("schemathesis")
MAX_EXAMPLES = 25
REQUESTS_MIN = 300
RUN_TIMEOUT_S = 120
CHECKS = ",".join((
    "not_a_server_error", "status_code_conformance", "content_type_conformance", "response_headers_conformance",
    "response_schema_conformance", "missing_required_header", "unsupported_method", "allow_header_conformance",
    "use_after_free", "ensure_resource_availability", "ignored_auth",
))
# Route labels hold braces ("/v1/accounts/{account_id}"): the labels run to the last "} ".
_REQUESTS = re.compile(r'^alluse_http_requests_total\{(?P<labels>.*)\} (?P<value>\S+)$', re.MULTILINE)
_LABEL = re.compile(r'(\w+)="((?:[^"\\]|\\.)*)"')


class LiveServer:
    """`create_app(settings)` (which starts and stops its own engine), or another `app`,
    served by aiohttp's AppRunner/TCPSite on a free port of 127.0.0.1, in a thread running
    its own loop."""

    def __init__(self, settings, *, app: web.Application | None = None):
        self.settings = settings
        self.app = app
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="fuzz-server", daemon=True)
        self.runner: web.AppRunner | None = None
        self.port = 0

    def __enter__(self) -> "LiveServer":
        self.thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self.loop).result(timeout=60)
        return self

    def __exit__(self, *exc_info) -> None:
        try:
            if self.runner is not None:
                asyncio.run_coroutine_threadsafe(self.runner.cleanup(), self.loop).result(timeout=60)
        finally:
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=30)
            self.loop.close()

    async def _start(self) -> None:
        self.runner = web.AppRunner(self.app if self.app is not None else create_app(self.settings), access_log=None)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.port = self.runner.addresses[0][1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def call(self, method: str, path: str, body=None, *, token: str | None = ADMIN_TOKEN,
             headers: dict | None = None) -> tuple[int, dict, object]:
        """One request; returns (status, headers, parsed JSON or text)."""
        sent = dict(headers or {})
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        data = None
        if body is not None:
            data = json.dumps(body).encode()
            sent["Content-Type"] = "application/json"
        request = urllib.request.Request(self.url + path, data=data, method=method, headers=sent)
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        try:
            with opener.open(request, timeout=30) as response:
                status, response_headers, raw = response.status, dict(response.headers), response.read()
        except urllib.error.HTTPError as error:
            status, response_headers, raw = error.code, dict(error.headers), error.read()
        if response_headers.get("Content-Type", "").startswith("application/json"):
            return status, response_headers, json.loads(raw)
        return status, response_headers, raw.decode(errors="replace")

    def request_counts(self) -> dict[tuple[str, str, str], float]:
        """`alluse_http_requests_total` by (method, route, status), from /metrics."""
        status, _, text = self.call("GET", "/metrics", token=None)
        assert status == 200, text
        counts = {}
        for match in _REQUESTS.finditer(text):
            labels = dict(_LABEL.findall(match["labels"]))
            counts[(labels["method"], labels["route"], labels["status"])] = float(match["value"])
        return counts


@pytest.fixture
def server(database_url):
    settings = load_settings({}, {"database": {"url": database_url}, "server": {"admin_token": ADMIN_TOKEN},
                                  "security": {"invalid_tokens_max": 1_000_000},
                                  "webhooks": {"deliver": False}})
    assert settings.engine.fault_injection is False and settings.webhooks.allow_private_targets is False
    with LiveServer(settings) as live:
        yield live


def created(server: LiveServer, path: str, body: dict) -> dict:
    status, _, reply = server.call("POST", path, body, headers={"Idempotency-Key": str(uuid.uuid4())})
    assert status == 201, (path, status, reply)
    return reply


def seed(server: LiveServer) -> dict:
    """A little of everything, for two owners: a funded portfolio with trades, standalone
    accounts, a transfer, so lists, feeds and analytics have data to render."""
    portfolio = created(server, "/v1/portfolios", {"name": "Ann", "owner": "ann", "initial_capital": 300_000_00})
    ann = created(server, "/v1/accounts", {"name": "Ann Rev", "type": "revenue", "owner": "ann"})
    bob = created(server, "/v1/accounts", {"name": "Bob Gen", "type": "generation", "owner": "bob"})
    for account in (ann, bob):
        created(server, f"/v1/accounts/{account['id']}/deposits", {"amount": 10_000_00, "memo": "seed"})
        created(server, f"/v1/accounts/{account['id']}/trades", {"kind": "premium", "amount": 150_00})
    created(server, "/v1/transfers", {"from_account": ann["id"], "to_account": bob["id"], "amount": 1_00})
    return {"portfolio": portfolio["id"], "ann": ann["id"], "bob": bob["id"]}


@dataclass
class FuzzRun:
    operations: int
    selected: int
    test_cases: int
    requests: int
    statuses: dict[str, int]
    output: str


def fuzz(server: LiveServer, token: str, workdir: Path, label: str) -> FuzzRun:
    """One `schemathesis run` against the live server with `token`; fails the test on any
    failed check, and on any 5xx the server counted."""
    workdir.mkdir(parents=True, exist_ok=True)
    command = [str(SCHEMATHESIS), "run", f"{server.url}/openapi.json",
               "--header", f"Authorization: Bearer {token}",
               "--checks", CHECKS, "--max-examples", str(MAX_EXAMPLES), "--generation-deterministic",
               "--workers", "1", "--request-timeout", "30",
               "--no-color", "--report", "junit", "--report-dir", str(workdir)]
    # No proxy between the fuzzer and 127.0.0.1, whatever the environment says.
    env = {name: value for name, value in os.environ.items() if not name.lower().endswith("_proxy")}
    # A fresh Idempotency-Key per generated request (why: `tests/fuzz_hooks.py`).
    env["SCHEMATHESIS_HOOKS"] = "tests.fuzz_hooks"
    env["PYTHONPATH"] = os.pathsep.join(filter(None, (str(REPO_ROOT), env.get("PYTHONPATH"))))
    before = server.request_counts()
    started = time.monotonic()
    completed = subprocess.run(command, cwd=workdir, env=env, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    elapsed = time.monotonic() - started
    after = server.request_counts()
    output = completed.stdout + completed.stderr
    (workdir / "schemathesis.txt").write_text(output)
    assert completed.returncode == 0, f"schemathesis ({label}) found failures:\n{output[-20000:]}"

    delta = {key: after[key] - before.get(key, 0.0) for key in after if after[key] != before.get(key, 0.0)}
    delta[("GET", "/metrics", "200")] = delta.get(("GET", "/metrics", "200"), 0.0) - 1  # our own scrape
    statuses: dict[str, int] = {}
    for (_, _, status), count in delta.items():
        statuses[status] = statuses.get(status, 0) + int(count)
    server_errors = {key: count for key, count in delta.items() if key[2].startswith("5") and count}
    assert not server_errors, f"the server answered 5xx during the {label} run: {server_errors}"

    selected = re.search(r"Selected:\s*(\d+)/(\d+)", output)
    tested = re.search(r"Tested:\s*(\d+)", output)
    cases = re.search(r"(\d+) generated", output)
    assert selected and tested and cases, f"unexpected schemathesis summary:\n{output[-5000:]}"
    run = FuzzRun(operations=int(tested[1]), selected=int(selected[1]), test_cases=int(cases[1]),
                  requests=sum(statuses.values()), statuses=dict(sorted(statuses.items())), output=output)
    print(f"\n[{label}] fuzzed {run.requests} requests over {run.operations} operations "
          f"({run.test_cases} test cases, {elapsed:.1f} s); statuses {run.statuses}")
    return run


def record(request, label: str, run: FuzzRun) -> None:
    cache = getattr(request.config, "cache", None)
    if cache is not None:
        cache.set(f"alluse/fuzz/{label}", {"requests": run.requests, "operations": run.operations,
                                           "test_cases": run.test_cases, "statuses": run.statuses})


def documented_operations(server: LiveServer) -> int:
    status, _, document = server.call("GET", "/openapi.json", token=None)
    assert status == 200
    return sum(len(methods) for methods in document["paths"].values())


def test_fuzz_the_api_as_the_bootstrap_admin(server, tmp_path, request):
    seed(server)
    run = fuzz(server, ADMIN_TOKEN, tmp_path / "admin", "admin")
    record(request, "admin", run)
    # Every documented operation but /openapi.json itself, which schemathesis skips.
    assert run.operations == run.selected >= documented_operations(server) - 1
    assert run.requests >= REQUESTS_MIN, run.statuses
    # The fuzzer reached the logic, not only the edges.
    assert run.statuses.get("200", 0) + run.statuses.get("201", 0) >= 100, run.statuses
    status, _, verification = server.call("GET", "/v1/audit/verify")
    assert status == 200 and verification["valid"] is True, verification


def test_fuzz_the_api_as_an_owner_scoped_viewer(server, tmp_path, request):
    seed(server)
    status, _, token = server.call("POST", "/v1/tokens", {"name": "fuzz-viewer", "role": "viewer", "owner": "ann"})
    assert status == 201 and token["role"] == "viewer" and token["owner"] == "ann", token
    run = fuzz(server, token["token"], tmp_path / "viewer", "viewer")
    record(request, "viewer", run)
    assert run.operations == run.selected >= documented_operations(server) - 1
    assert run.requests >= REQUESTS_MIN, run.statuses
    # What the viewer may not do answered 403 (documented, so the checks passed), never 5xx.
    assert run.statuses.get("403", 0) >= 50, run.statuses
    # And the viewer changed nothing: bob's account is as seeded, ann's untouched too.
    status, _, page = server.call("GET", "/v1/accounts?owner=bob")
    assert status == 200 and [a["balance"] for a in page["items"]] == [10_000_00 + 150_00 + 1_00], page


# -- what the fuzzing found, pinned ------------------------------------------------------
def test_an_undeclared_method_answers_405_with_allow(server):
    status, headers, body = server.call("PUT", "/v1/accounts")
    assert status == 405 and body["error"]["code"] == "method_not_allowed", body
    assert headers.get("Allow") == "GET, POST", headers
    status, headers, body = server.call("TRACE", "/health", token=None)
    assert status == 405 and headers.get("Allow") == "GET", (headers, body)


def test_a_transaction_cursor_that_is_not_ascii_digits_is_refused(server):
    """`"²".isdigit()` is true but `int("²")` fails: that cursor was a 500."""
    account = created(server, "/v1/accounts", {"name": "Ann Rev", "type": "revenue", "owner": "ann"})
    path = f"/v1/accounts/{account['id']}/transactions"
    for cursor in ("%C2%B2", "%D9%A3", "%EF%BC%91", "-1", "1.5", "x", "%20"):  # ², Arabic-Indic 3, fullwidth 1
        status, _, body = server.call("GET", f"{path}?cursor={cursor}")
        assert status == 422 and body["error"]["code"] == "validation_failed", (cursor, body)
        assert body["error"]["details"]["field"] == "cursor", (cursor, body)
    status, _, page = server.call("GET", f"{path}?cursor=999")
    assert status == 200 and page == {"items": [], "next_cursor": None}, page


def test_403_is_documented_on_every_v1_operation_and_idempotency_keys_where_honoured(server):
    status, _, document = server.call("GET", "/openapi.json", token=None)
    assert status == 200
    for route in ROUTES:
        operation = document["paths"][route.path][route.method.lower()]
        if route.path.startswith("/v1/"):
            assert "403" in operation["responses"], (route.method, route.path)
        headers = [p["name"] for p in operation.get("parameters", []) if p["in"] == "header"]
        honours = "idempotency_key(request)" in inspect.getsource(route.handler)
        assert ("Idempotency-Key" in headers) == honours, (route.method, route.path, honours)
