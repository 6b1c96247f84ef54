"""The HTTP API v1 (SPEC section 4) through the real aiohttp app, the real actors and a
real PostgreSQL database (one fresh database per test, from conftest.py).

Bad input is table-driven: every case checks the status, the error code, the error
shape `{"error": {"code", "message", "details"}, "request_id"}` and that nothing
changed (every balance, version, status, name and transaction count is the same before
and after). No request in this module may ever answer 500."""
from __future__ import annotations

import asyncio
import json
import uuid
from dataclasses import dataclass, field
from typing import Any, Callable

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from actors.settings import load_settings
from gateway.app import ROUTES, create_app

TOKEN = "test-token-123"
AMOUNT_MAX = 10**15
BODY_MAX = 65536  # config/default.toml [server] body_max_bytes
_ABSENT = object()


@dataclass
class Reply:
    status: int
    body: Any
    headers: Any
    raw: bytes


class Api:
    """A thin client over aiohttp's TestClient: JSON in, parsed JSON out, and a check on
    every reply that the service never answers 500."""

    def __init__(self, client: TestClient):
        self.client = client

    async def call(self, method: str, path: str, json_body: Any = _ABSENT, *, data: Any = None,
                   headers: dict | None = None, token: str | None = TOKEN, key: str | None = None) -> Reply:
        sent = {}
        if token is not None:
            sent["Authorization"] = f"Bearer {token}"
        if key is not None:
            sent["Idempotency-Key"] = key
        if json_body is not _ABSENT:
            data = json.dumps(json_body).encode()
            sent["Content-Type"] = "application/json"
        sent.update(headers or {})
        async with self.client.request(method, path, data=data, headers=sent) as response:
            raw = await response.read()
            status, response_headers, content_type = response.status, response.headers, response.content_type
        assert status != 500, f"{method} {path} answered 500: {raw[:500]!r}"
        body = json.loads(raw) if content_type == "application/json" and raw else raw.decode(errors="replace")
        return Reply(status, body, response_headers, raw)

    async def get(self, path: str, **kwargs) -> Reply:
        return await self.call("GET", path, **kwargs)

    async def post(self, path: str, json_body: Any = _ABSENT, **kwargs) -> Reply:
        return await self.call("POST", path, json_body, **kwargs)

    async def created(self, path: str, json_body: Any, **kwargs) -> dict:
        """POST that must succeed with 201."""
        reply = await self.post(path, json_body, key=kwargs.pop("key", None) or new_key(), **kwargs)
        assert reply.status == 201, (path, json_body, reply.status, reply.body)
        return reply.body

    async def ok(self, path: str) -> dict:
        reply = await self.get(path)
        assert reply.status == 200, (path, reply.status, reply.body)
        return reply.body

    async def pages(self, path: str, limit: int = 500) -> list[dict]:
        """Every item of a cursor-paginated list."""
        items, cursor = [], None
        for _ in range(10_000):
            separator = "&" if "?" in path else "?"
            page = await self.ok(f"{path}{separator}limit={limit}" + (f"&cursor={cursor}" if cursor else ""))
            items.extend(page["items"])
            cursor = page["next_cursor"]
            if cursor is None:
                return items
        raise AssertionError("pagination did not end")

    async def create_account(self, type: str = "revenue", owner: str = "ann", name: str | None = None,
                             funded: int = 0, **extra) -> dict:
        body = {"name": name or f"{type}-{uuid.uuid4().hex[:6]}", "type": type, "owner": owner, **extra}
        account = await self.created("/v1/accounts", body)
        if funded:
            await self.created(f"/v1/accounts/{account['id']}/deposits", {"amount": funded})
            account = await self.ok(f"/v1/accounts/{account['id']}")
        return account

    async def snapshot(self) -> dict:
        """Everything a bad request must leave alone: per account its committed row and
        the length of its history."""
        state = {}
        for account in await self.pages("/v1/accounts"):
            history = await self.pages(f"/v1/accounts/{account['id']}/transactions")
            state[account["id"]] = {key: account[key] for key in ("balance", "version", "status", "name")}
            state[account["id"]]["transactions"] = len(history)
        return state


def new_key() -> str:
    return str(uuid.uuid4())


async def created_twice(api: Api, path: str, body: dict, secret: str) -> tuple[dict, str]:
    """POSTs `body` twice with one Idempotency-Key: the second answer replays the first
    (`Idempotency-Replayed: true`) but with its `secret` field null, since no secret is
    kept with a key (decision 88). Returns the first answer and the key."""
    key = new_key()
    first = await api.post(path, body, key=key)
    second = await api.post(path, body, key=key)
    assert first.status == second.status == 201, (first.body, second.body)
    assert first.body[secret] and second.body[secret] is None
    assert {**second.body, secret: first.body[secret]} == first.body
    assert second.headers.get("Idempotency-Replayed") == "true" and "Idempotency-Replayed" not in first.headers
    return first.body, key


def assert_error(reply: Reply, status: int, code: str, field: str | None = None) -> None:
    """The SPEC's error shape, exactly, with the request id also in X-Request-Id."""
    assert reply.status == status, (reply.status, reply.body)
    body = reply.body
    assert isinstance(body, dict), body
    assert set(body) == {"error", "request_id"}, body
    assert set(body["error"]) == {"code", "message", "details"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    assert isinstance(body["error"]["details"], dict), body
    assert isinstance(body["request_id"], str) and body["request_id"], body
    assert reply.headers.get("X-Request-Id") == body["request_id"]
    assert reply.headers.get("Content-Type", "").startswith("application/json")
    if field is not None:
        assert body["error"]["details"].get("field") == field, body


@pytest_asyncio.fixture(loop_scope="session")
async def api(database_url):
    settings = load_settings({}, {"database": {"url": database_url}, "server": {"admin_token": TOKEN}})
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    try:
        yield Api(client)
    finally:
        await client.close()


@dataclass
class World:
    """Accounts every bad-input case can aim at."""

    revenue: dict       # revenue, balance 10_000
    generation: dict    # generation, balance 20_000
    compounding: dict   # compounding, balance 5_000 (refuses withdrawals and transfers out)
    empty: dict         # revenue, balance 0
    frozen: dict        # revenue, balance 1_000, frozen
    closed: dict        # revenue, balance 0, closed

    def ids(self) -> dict:
        return {name: getattr(self, name)["id"] for name in self.__dataclass_fields__}


@pytest_asyncio.fixture(loop_scope="session")
async def world(api) -> World:
    frozen = await api.create_account("revenue", funded=1_000)
    assert (await api.call("PATCH", f"/v1/accounts/{frozen['id']}", {"status": "frozen"})).status == 200
    closed = await api.create_account("revenue")
    assert (await api.post(f"/v1/accounts/{closed['id']}/close")).status == 200
    return World(revenue=await api.create_account("revenue", funded=10_000),
                 generation=await api.create_account("generation", funded=20_000),
                 compounding=await api.create_account("compounding", funded=5_000),
                 empty=await api.create_account("revenue"), frozen=frozen, closed=closed)


# -- bad input, table-driven -----------------------------------------------------------
@dataclass
class Case:
    id: str
    method: str
    path: str                       # formatted with World.ids()
    status: int
    code: str
    body: Any = _ABSENT             # JSON-able, or a callable of World.ids(), or _ABSENT
    raw: bytes | None = None        # sent as is (with `headers`), instead of `body`
    headers: dict = field(default_factory=dict)
    token: str | None = TOKEN
    key: str | None = None
    error_field: str | None = None


DEPOSIT = "/v1/accounts/{revenue}/deposits"
WITHDRAWAL = "/v1/accounts/{revenue}/withdrawals"
TRADE = "/v1/accounts/{revenue}/trades"
JSON_HEADERS = {"Content-Type": "application/json"}


def transfer(amount: Any = 100, source: str = "revenue", target: str = "generation", **extra) -> Callable:
    return lambda ids: {"from_account": ids[source], "to_account": ids[target], "amount": amount, **extra}


def amount_cases(route: str, path: str, **body) -> list[Case]:
    bad_amounts = [("float", 1.5), ("integral_float", 100.0), ("exponent", 1e3), ("string", "100"),
                   ("bool", True), ("null", None), ("zero", 0), ("negative", -5), ("too_large", AMOUNT_MAX + 1),
                   ("huge", 10**30), ("list", [1]), ("object", {"cents": 1})]
    return [Case(f"{route}-amount-{name}", "POST", path, 422, "validation_failed", {**body, "amount": amount},
                 error_field="amount") for name, amount in bad_amounts]


CASES: list[Case] = [
    # 400 malformed JSON
    Case("malformed-json-deposit", "POST", DEPOSIT, 400, "malformed_json", raw=b'{"amount": ', headers=JSON_HEADERS),
    Case("malformed-json-trailing-comma", "POST", DEPOSIT, 400, "malformed_json", raw=b'{"amount": 5,}',
         headers=JSON_HEADERS),
    Case("malformed-json-not-utf8", "POST", DEPOSIT, 400, "malformed_json", raw=b'\xff\xfe{', headers=JSON_HEADERS),
    Case("malformed-json-transfer", "POST", "/v1/transfers", 400, "malformed_json", raw=b"{from_account: 1}",
         headers=JSON_HEADERS),
    Case("malformed-json-create", "POST", "/v1/accounts", 400, "malformed_json", raw=b"{'name': 'x'}",
         headers=JSON_HEADERS),
    Case("malformed-json-patch", "PATCH", "/v1/accounts/{revenue}", 400, "malformed_json", raw=b"{",
         headers=JSON_HEADERS),
    Case("empty-body-deposit", "POST", DEPOSIT, 400, "malformed_json", raw=b"", headers=JSON_HEADERS),
    # 422 amounts: integers only, 1 <= amount <= 10^15, on every route that takes one
    *amount_cases("deposit", DEPOSIT),
    *amount_cases("withdrawal", WITHDRAWAL),
    *amount_cases("trade", TRADE, kind="premium"),
    *[Case(f"transfer-amount-{name}", "POST", "/v1/transfers", 422, "validation_failed", transfer(amount),
           error_field="amount")
      for name, amount in [("float", 2.5), ("string", "7"), ("bool", False), ("zero", 0), ("negative", -1),
                           ("too_large", AMOUNT_MAX + 1)]],
    # 422 missing, unknown and ill-typed fields
    Case("deposit-missing-amount", "POST", DEPOSIT, 422, "validation_failed", {"memo": "x"}, error_field="amount"),
    Case("deposit-unknown-field", "POST", DEPOSIT, 422, "validation_failed", {"amount": 5, "currency": "USD"},
         error_field="currency"),
    Case("deposit-body-is-array", "POST", DEPOSIT, 422, "validation_failed", [5]),
    Case("deposit-body-is-null", "POST", DEPOSIT, 422, "validation_failed", None),
    Case("deposit-memo-not-string", "POST", DEPOSIT, 422, "validation_failed", {"amount": 5, "memo": 7},
         error_field="memo"),
    Case("deposit-memo-too-long", "POST", DEPOSIT, 422, "validation_failed", {"amount": 5, "memo": "m" * 501},
         error_field="memo"),
    Case("trade-missing-kind", "POST", TRADE, 422, "validation_failed", {"amount": 5}, error_field="kind"),
    Case("trade-unknown-kind", "POST", TRADE, 422, "validation_failed", {"amount": 5, "kind": "dividend"},
         error_field="kind"),
    Case("trade-bad-effective-date", "POST", TRADE, 422, "validation_failed",
         {"amount": 5, "kind": "premium", "effective_date": "last week"}, error_field="effective_date"),
    Case("trade-effective-date-in-future", "POST", TRADE, 422, "validation_failed",
         {"amount": 5, "kind": "premium", "effective_date": "2999-01-01"}, error_field="effective_date"),
    Case("trade-effective-date-before-opening", "POST", TRADE, 422, "validation_failed",
         {"amount": 5, "kind": "premium", "effective_date": "2000-01-03"}, error_field="effective_date"),
    Case("transfer-missing-to-account", "POST", "/v1/transfers", 422, "validation_failed",
         lambda ids: {"from_account": ids["revenue"], "amount": 5}, error_field="to_account"),
    Case("transfer-unknown-field", "POST", "/v1/transfers", 422, "validation_failed",
         transfer(5, fee=1), error_field="fee"),
    Case("transfer-account-not-string", "POST", "/v1/transfers", 422, "validation_failed",
         lambda ids: {"from_account": ids["revenue"], "to_account": 12, "amount": 5}, error_field="to_account"),
    Case("transfer-to-self", "POST", "/v1/transfers", 422, "validation_failed", transfer(5, target="revenue")),
    Case("create-missing-type", "POST", "/v1/accounts", 422, "validation_failed", {"name": "a", "owner": "o"},
         error_field="type"),
    Case("create-unknown-type", "POST", "/v1/accounts", 422, "validation_failed",
         {"name": "a", "owner": "o", "type": "savings"}, error_field="type"),
    Case("create-empty-name", "POST", "/v1/accounts", 422, "validation_failed",
         {"name": "", "owner": "o", "type": "revenue"}, error_field="name"),
    Case("create-unknown-field", "POST", "/v1/accounts", 422, "validation_failed",
         {"name": "a", "owner": "o", "type": "revenue", "balance": 100}, error_field="balance"),
    Case("create-opened-on-in-future", "POST", "/v1/accounts", 422, "validation_failed",
         {"name": "a", "owner": "o", "type": "revenue", "opened_on": "2999-01-01"}, error_field="opened_on"),
    Case("patch-status-closed", "PATCH", "/v1/accounts/{revenue}", 422, "validation_failed", {"status": "closed"},
         error_field="status"),
    Case("patch-unknown-field", "PATCH", "/v1/accounts/{revenue}", 422, "validation_failed", {"balance": 0},
         error_field="balance"),
    Case("close-with-unknown-field", "POST", "/v1/accounts/{empty}/close", 422, "validation_failed", {"force": True},
         error_field="force"),
    Case("idempotency-key-too-long", "POST", DEPOSIT, 422, "validation_failed", {"amount": 5}, key="k" * 201,
         error_field="Idempotency-Key"),
    Case("list-limit-zero", "GET", "/v1/accounts?limit=0", 422, "validation_failed", error_field="limit"),
    Case("list-limit-not-a-number", "GET", "/v1/accounts?limit=ten", 422, "validation_failed", error_field="limit"),
    Case("list-limit-too-large", "GET", "/v1/accounts?limit=501", 422, "validation_failed", error_field="limit"),
    Case("list-unknown-type", "GET", "/v1/accounts?type=savings", 422, "validation_failed", error_field="type"),
    Case("list-unknown-status", "GET", "/v1/accounts?status=asleep", 422, "validation_failed", error_field="status"),
    Case("list-cursor-too-long", "GET", "/v1/accounts?cursor=" + "c" * 65, 422, "validation_failed",
         error_field="cursor"),
    Case("list-cursor-not-an-account-id", "GET", "/v1/accounts?cursor=garbage", 422, "validation_failed",
         error_field="cursor"),
    Case("history-bad-cursor", "GET", "/v1/accounts/{revenue}/transactions?cursor=abc", 422, "validation_failed",
         error_field="cursor"),
    Case("history-limit-zero", "GET", "/v1/accounts/{revenue}/transactions?limit=0", 422, "validation_failed",
         error_field="limit"),
    # 422, not a database error: PostgreSQL text cannot hold NUL characters
    Case("deposit-memo-with-nul", "POST", DEPOSIT, 422, "validation_failed", {"amount": 5, "memo": "a\u0000b"},
         error_field="memo"),
    Case("create-name-with-nul", "POST", "/v1/accounts", 422, "validation_failed",
         {"name": "a\u0000", "owner": "o", "type": "revenue"}, error_field="name"),
    # 404 unknown ids and routes
    Case("get-unknown-account", "GET", "/v1/accounts/acc_nope", 404, "not_found"),
    Case("get-overlong-account-id", "GET", "/v1/accounts/" + "a" * 65, 404, "not_found"),
    Case("get-account-id-with-nul", "GET", "/v1/accounts/acc%00x", 404, "not_found"),
    Case("deposit-account-id-with-nul", "POST", "/v1/accounts/acc%00x/deposits", 404, "not_found", {"amount": 5}),
    Case("get-transaction-id-with-nul", "GET", "/v1/transactions/txn%00x", 404, "not_found"),
    Case("get-account-id-invalid-utf8", "GET", "/v1/accounts/acc%ff%fe", 404, "not_found"),
    Case("deposit-unknown-account", "POST", "/v1/accounts/acc_nope/deposits", 404, "not_found", {"amount": 5}),
    Case("withdrawal-unknown-account", "POST", "/v1/accounts/acc_nope/withdrawals", 404, "not_found", {"amount": 5}),
    Case("trade-unknown-account", "POST", "/v1/accounts/acc_nope/trades", 404, "not_found",
         {"amount": 5, "kind": "fee"}),
    Case("patch-unknown-account", "PATCH", "/v1/accounts/acc_nope", 404, "not_found", {"name": "x"}),
    Case("close-unknown-account", "POST", "/v1/accounts/acc_nope/close", 404, "not_found"),
    Case("history-unknown-account", "GET", "/v1/accounts/acc_nope/transactions", 404, "not_found"),
    Case("transfer-from-unknown-account", "POST", "/v1/transfers", 404, "not_found",
         lambda ids: {"from_account": "acc_nope", "to_account": ids["revenue"], "amount": 5}),
    Case("transfer-to-unknown-account", "POST", "/v1/transfers", 404, "not_found",
         lambda ids: {"from_account": ids["revenue"], "to_account": "acc_nope", "amount": 5}),
    Case("get-unknown-transaction", "GET", "/v1/transactions/txn_nope", 404, "not_found"),
    Case("unknown-route", "GET", "/v1/nothing-here", 404, "not_found"),
    Case("method-not-allowed", "DELETE", "/v1/accounts/{revenue}", 405, "method_not_allowed"),
    # 401 no token, wrong token, wrong scheme
    Case("no-token-list", "GET", "/v1/accounts", 401, "unauthorized", token=None),
    Case("no-token-deposit", "POST", DEPOSIT, 401, "unauthorized", {"amount": 5}, token=None),
    Case("wrong-token-deposit", "POST", DEPOSIT, 401, "unauthorized", {"amount": 5}, token="test-token-124"),
    Case("wrong-token-prefix", "POST", DEPOSIT, 401, "unauthorized", {"amount": 5}, token="test-token-12"),
    Case("wrong-token-transfer", "POST", "/v1/transfers", 401, "unauthorized", transfer(5), token="nope"),
    Case("basic-scheme", "GET", "/v1/accounts", 401, "unauthorized", token=None,
         headers={"Authorization": "Basic dGVzdDp0ZXN0"}),
    Case("bearer-without-token", "GET", "/v1/accounts", 401, "unauthorized", token=None,
         headers={"Authorization": "Bearer "}),
    Case("no-token-unknown-account", "GET", "/v1/accounts/acc_nope", 401, "unauthorized", token=None),
    # 413 and 415
    Case("oversized-body", "POST", DEPOSIT, 413, "payload_too_large",
         raw=b'{"amount": 5, "memo": "' + b"m" * BODY_MAX + b'"}', headers=JSON_HEADERS),
    Case("oversized-transfer", "POST", "/v1/transfers", 413, "payload_too_large",
         raw=b" " * (BODY_MAX + 1), headers=JSON_HEADERS),
    Case("text-plain", "POST", DEPOSIT, 415, "unsupported_media_type", raw=b'{"amount": 5}',
         headers={"Content-Type": "text/plain"}),
    Case("form-urlencoded", "POST", DEPOSIT, 415, "unsupported_media_type", raw=b"amount=5",
         headers={"Content-Type": "application/x-www-form-urlencoded"}),
    Case("no-content-type", "POST", "/v1/transfers", 415, "unsupported_media_type", raw=b'{"amount": 5}'),
    # 409 refusals
    Case("withdraw-more-than-balance", "POST", WITHDRAWAL, 409, "insufficient_funds", {"amount": 10_001}),
    Case("withdraw-from-empty", "POST", "/v1/accounts/{empty}/withdrawals", 409, "insufficient_funds", {"amount": 1}),
    Case("loss-more-than-balance", "POST", TRADE, 409, "insufficient_funds", {"amount": 10_001, "kind": "loss"}),
    Case("fee-more-than-balance", "POST", TRADE, 409, "insufficient_funds", {"amount": 10_001, "kind": "fee"}),
    Case("transfer-more-than-balance", "POST", "/v1/transfers", 409, "insufficient_funds", transfer(10_001)),
    Case("close-non-empty", "POST", "/v1/accounts/{revenue}/close", 409, "account_not_empty"),
    Case("withdraw-from-compounding", "POST", "/v1/accounts/{compounding}/withdrawals", 409,
         "withdrawal_not_allowed", {"amount": 1}),
    Case("transfer-from-compounding", "POST", "/v1/transfers", 409, "withdrawal_not_allowed",
         transfer(1, source="compounding")),
    Case("deposit-to-frozen", "POST", "/v1/accounts/{frozen}/deposits", 409, "account_not_active", {"amount": 5}),
    Case("withdraw-from-frozen", "POST", "/v1/accounts/{frozen}/withdrawals", 409, "account_not_active",
         {"amount": 5}),
    Case("transfer-from-frozen", "POST", "/v1/transfers", 409, "account_not_active", transfer(5, source="frozen")),
    Case("transfer-to-frozen", "POST", "/v1/transfers", 409, "account_not_active", transfer(5, target="frozen")),
    Case("deposit-to-closed", "POST", "/v1/accounts/{closed}/deposits", 409, "account_not_active", {"amount": 5}),
    Case("transfer-to-closed", "POST", "/v1/transfers", 409, "account_not_active", transfer(5, target="closed")),
    Case("reopen-closed", "PATCH", "/v1/accounts/{closed}", 409, "account_not_active", {"status": "active"}),
    Case("rename-closed", "PATCH", "/v1/accounts/{closed}", 409, "account_not_active", {"name": "again"}),
    Case("close-closed", "POST", "/v1/accounts/{closed}/close", 409, "account_not_active"),
]


@pytest.mark.parametrize("case", CASES, ids=[case.id for case in CASES])
async def test_bad_input_is_refused_with_the_error_shape_and_changes_nothing(api, world, case):
    ids = world.ids()
    body = case.body(ids) if callable(case.body) else case.body
    before = await api.snapshot()
    reply = await api.call(case.method, case.path.format(**ids), body,
                           data=case.raw, headers=case.headers, token=case.token, key=case.key)
    assert_error(reply, case.status, case.code, case.error_field)
    assert await api.snapshot() == before


async def test_a_list_filter_with_a_nul_character_is_not_a_database_failure(api, world):
    reply = await api.get("/v1/accounts?owner=a%00b")
    assert reply.status in (200, 422), (reply.status, reply.body)
    if reply.status == 200:
        assert reply.body == {"items": [], "next_cursor": None}
    else:
        assert_error(reply, 422, "validation_failed", "owner")


async def test_an_oversized_chunked_body_is_refused_with_413(api, world):
    async def chunks():
        yield b'{"amount": 5, "memo": "'
        for _ in range(BODY_MAX // 1024 + 2):
            yield b"m" * 1024
        yield b'"}'

    before = await api.snapshot()
    reply = await api.call("POST", f"/v1/accounts/{world.revenue['id']}/deposits", data=chunks(),
                           headers=JSON_HEADERS)
    assert_error(reply, 413, "payload_too_large")
    assert await api.snapshot() == before


async def test_a_bad_request_in_the_same_batch_does_not_fail_the_good_ones(api, world):
    """Requests arriving together are committed in one batch; a bad one among them must
    be refused alone, and the others must still be acknowledged."""
    revenue = world.revenue["id"]
    good = [api.post(f"/v1/accounts/{revenue}/deposits", {"amount": 10}, key=new_key()) for _ in range(10)]
    bad = api.post(f"/v1/accounts/{world.generation['id']}/deposits", {"amount": 10, "memo": "\u0000"},
                   key=new_key())
    replies = await asyncio.gather(*good[:5], bad, *good[5:])
    assert [r.status for r in replies[:5] + replies[6:]] == [201] * 10, [(r.status, r.body) for r in replies]
    assert replies[5].status == 422, replies[5].body
    assert (await api.ok(f"/v1/accounts/{revenue}"))["balance"] == 10_000 + 100


# -- idempotency -------------------------------------------------------------------------
async def test_the_same_key_and_body_returns_the_same_transaction_and_applies_once(api, world):
    path = f"/v1/accounts/{world.revenue['id']}/deposits"
    key = new_key()
    first = await api.post(path, {"amount": 250, "memo": "once"}, key=key)
    assert first.status == 201
    before = await api.snapshot()
    for _ in range(3):
        again = await api.post(path, {"amount": 250, "memo": "once"}, key=key)
        assert again.status in (200, 201)
        assert again.body == first.body
    assert await api.snapshot() == before
    assert (await api.ok(f"/v1/accounts/{world.revenue['id']}"))["balance"] == 10_250


async def test_a_key_reused_with_a_different_body_is_refused_and_changes_nothing(api, world):
    revenue, generation = world.revenue["id"], world.generation["id"]
    key = new_key()
    assert (await api.post(f"/v1/accounts/{revenue}/deposits", {"amount": 250}, key=key)).status == 201
    before = await api.snapshot()
    reuses = [
        ("POST", f"/v1/accounts/{revenue}/deposits", {"amount": 251}),
        ("POST", f"/v1/accounts/{revenue}/deposits", {"amount": 250, "memo": "other"}),
        ("POST", f"/v1/accounts/{generation}/deposits", {"amount": 250}),
        ("POST", f"/v1/accounts/{revenue}/withdrawals", {"amount": 250}),
        ("POST", f"/v1/accounts/{revenue}/trades", {"amount": 250, "kind": "premium"}),
        ("POST", "/v1/transfers", {"from_account": revenue, "to_account": generation, "amount": 250}),
        ("POST", "/v1/accounts", {"name": "n", "type": "revenue", "owner": "o"}),
        ("PATCH", f"/v1/accounts/{revenue}", {"name": "renamed"}),
    ]
    for method, path, body in reuses:
        reply = await api.call(method, path, body, key=key)
        assert_error(reply, 409, "idempotency_key_reused")
    assert await api.snapshot() == before


async def test_a_replayed_transfer_returns_the_original_legs(api, world):
    body = {"from_account": world.revenue["id"], "to_account": world.generation["id"], "amount": 300}
    key = new_key()
    first = await api.post("/v1/transfers", body, key=key)
    assert first.status == 201
    before = await api.snapshot()
    again = await api.post("/v1/transfers", body, key=key)
    assert again.status in (200, 201) and again.body == first.body
    assert await api.snapshot() == before
    assert_error(await api.post("/v1/transfers", {**body, "amount": 301}, key=key), 409, "idempotency_key_reused")


async def test_a_replayed_account_creation_returns_the_same_account(api):
    body = {"name": "once", "type": "generation", "owner": "zed"}
    key = new_key()
    first = await api.post("/v1/accounts", body, key=key)
    assert first.status == 201
    again = await api.post("/v1/accounts", body, key=key)
    assert again.status in (200, 201) and again.body["id"] == first.body["id"]
    assert len(await api.pages("/v1/accounts?owner=zed")) == 1


async def test_concurrent_requests_with_one_key_apply_once(api, world):
    path = f"/v1/accounts/{world.revenue['id']}/deposits"
    key = new_key()
    replies = await asyncio.gather(*[api.post(path, {"amount": 7}, key=key) for _ in range(20)])
    assert {r.status for r in replies} <= {200, 201}, [(r.status, r.body) for r in replies]
    assert len({r.body["id"] for r in replies}) == 1
    assert (await api.ok(f"/v1/accounts/{world.revenue['id']}"))["balance"] == 10_007


# -- happy paths -------------------------------------------------------------------------
ACCOUNT_FIELDS = {"id", "name", "type", "status", "owner", "portfolio_id", "balance", "deployable", "baseline",
                  "allocations", "version", "created_at", "updated_at"}
TRANSACTION_FIELDS = {"id", "kind", "account_id", "counterparty_account_id", "amount", "direction", "balance_after",
                      "memo", "created_at", "correlation_id"}


async def test_an_account_is_created_read_and_listed(api):
    reply = await api.post("/v1/accounts", {"name": "Gen one", "type": "generation", "owner": "ann"}, key=new_key())
    assert reply.status == 201
    account = reply.body
    assert ACCOUNT_FIELDS <= set(account)
    assert account["name"] == "Gen one" and account["type"] == "generation" and account["owner"] == "ann"
    assert account["status"] == "active" and account["balance"] == 0 and account["deployable"] == 0
    assert account["portfolio_id"] is None
    assert await api.ok(f"/v1/accounts/{account['id']}") == account
    listed = await api.ok("/v1/accounts")
    assert listed == {"items": [account], "next_cursor": None}


async def test_an_account_can_be_created_without_an_idempotency_key_and_with_a_charset(api):
    reply = await api.call("POST", "/v1/accounts", data=b'{"name": "n", "type": "revenue", "owner": "o"}',
                           headers={"Content-Type": "application/json; charset=utf-8"})
    assert reply.status == 201, reply.body
    assert reply.body["type"] == "revenue"


async def test_accounts_are_listed_with_cursor_pagination_and_filters(api):
    created = []
    for index in range(7):
        created.append(await api.create_account(("generation", "revenue", "compounding")[index % 3],
                                                owner="ann" if index % 2 == 0 else "bob"))
    frozen = created[0]["id"]
    assert (await api.call("PATCH", f"/v1/accounts/{frozen}", {"status": "frozen"})).status == 200

    async def walk(query: str, limit: int) -> list[dict]:
        items, cursor, pages = [], None, 0
        while True:
            page = await api.ok(f"/v1/accounts?{query}&limit={limit}" + (f"&cursor={cursor}" if cursor else ""))
            assert len(page["items"]) <= limit
            items.extend(page["items"])
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                return items
            assert pages < 20

    everything = await walk("", 2)
    assert sorted(a["id"] for a in everything) == sorted(a["id"] for a in created)
    assert len({a["id"] for a in everything}) == len(everything)
    for query, predicate in [
        ("owner=ann", lambda a: a["owner"] == "ann"),
        ("type=revenue", lambda a: a["type"] == "revenue"),
        ("owner=bob&type=compounding", lambda a: a["owner"] == "bob" and a["type"] == "compounding"),
        ("status=frozen", lambda a: a["status"] == "frozen"),
        ("status=active&owner=ann", lambda a: a["status"] == "active" and a["owner"] == "ann"),
        ("owner=nobody", lambda a: False),
    ]:
        expected = sorted(a["id"] for a in await api.pages("/v1/accounts") if predicate(a))
        for limit in (1, 2, 500):
            found = await walk(query, limit)
            assert sorted(a["id"] for a in found) == expected, (query, limit)
            assert all(predicate(a) for a in found)
    assert [a["id"] for a in await walk("status=frozen", 1)] == [frozen]


async def test_patch_renames_freezes_and_unfreezes(api):
    account = await api.create_account("revenue", funded=1_000)
    path = f"/v1/accounts/{account['id']}"
    renamed = await api.call("PATCH", path, {"name": "New name"}, key=new_key())
    assert renamed.status == 200 and renamed.body["name"] == "New name"
    assert renamed.body["version"] == account["version"] + 1
    frozen = await api.call("PATCH", path, {"status": "frozen"})
    assert frozen.status == 200 and frozen.body["status"] == "frozen"
    assert (await api.ok(path))["status"] == "frozen"
    before = await api.snapshot()
    assert_error(await api.post(f"{path}/deposits", {"amount": 5}, key=new_key()), 409, "account_not_active")
    assert_error(await api.post(f"{path}/trades", {"amount": 5, "kind": "premium"}), 409, "account_not_active")
    assert await api.snapshot() == before
    assert (await api.ok(path))["balance"] == 1_000
    unfrozen = await api.call("PATCH", path, {"status": "active", "name": "Again"})
    assert unfrozen.status == 200 and unfrozen.body["status"] == "active" and unfrozen.body["name"] == "Again"
    deposit = await api.created(f"{path}/deposits", {"amount": 5})
    assert deposit["balance_after"] == 1_005
    unchanged = await api.call("PATCH", path, {})
    assert unchanged.status == 200 and unchanged.body == await api.ok(path)


async def test_an_empty_account_closes_and_then_refuses_money(api):
    account = await api.create_account("generation", funded=500)
    path = f"/v1/accounts/{account['id']}"
    assert_error(await api.post(f"{path}/close"), 409, "account_not_empty")
    await api.created(f"{path}/withdrawals", {"amount": 500})
    closed = await api.post(f"{path}/close", key=new_key())
    assert closed.status == 200 and closed.body["status"] == "closed" and closed.body["balance"] == 0
    assert (await api.ok(path))["status"] == "closed"
    assert_error(await api.post(f"{path}/deposits", {"amount": 1}), 409, "account_not_active")
    assert [a["id"] for a in await api.pages("/v1/accounts?status=closed")] == [account["id"]]


async def test_deposits_withdrawals_and_trades_post_transactions(api):
    account = await api.create_account("revenue", opened_on="2026-01-05")
    path = f"/v1/accounts/{account['id']}"
    assert account["opened_on"] == "2026-01-05"
    # A result booked for a past week (before any entry dated today).
    premium = await api.created(f"{path}/trades", {"kind": "premium", "amount": 400, "effective_date": "2026-01-09"})
    assert (premium["kind"], premium["direction"], premium["balance_after"]) == ("premium", "credit", 400)
    assert premium["effective_date"] == "2026-01-09"
    assert_error(await api.post(f"{path}/trades", {"kind": "premium", "amount": 1, "effective_date": "2026-01-08"}),
                 422, "validation_failed", "effective_date")
    deposit = await api.created(f"{path}/deposits", {"amount": 10_000, "memo": "funding"})
    assert TRANSACTION_FIELDS <= set(deposit)
    assert (deposit["kind"], deposit["direction"], deposit["amount"], deposit["balance_after"], deposit["memo"]) == \
        ("deposit", "credit", 10_000, 10_400, "funding")
    assert deposit["account_id"] == account["id"]
    withdrawal = await api.created(f"{path}/withdrawals", {"amount": 2_500})
    assert (withdrawal["kind"], withdrawal["direction"], withdrawal["balance_after"]) == ("withdrawal", "debit", 7_900)
    loss = await api.created(f"{path}/trades", {"kind": "loss", "amount": 300})
    assert (loss["kind"], loss["direction"], loss["balance_after"]) == ("loss", "debit", 7_600)
    fee = await api.created(f"{path}/trades", {"kind": "fee", "amount": 100})
    assert (fee["kind"], fee["direction"], fee["balance_after"]) == ("fee", "debit", 7_500)
    biggest = await api.created(f"{path}/deposits", {"amount": AMOUNT_MAX})
    assert biggest["balance_after"] == AMOUNT_MAX + 7_500
    state = await api.ok(path)
    assert state["balance"] == AMOUNT_MAX + 7_500
    assert state["deployable"] == state["balance"] * 95 // 100
    for transaction in (deposit, withdrawal, premium, loss, fee, biggest):
        assert await api.ok(f"/v1/transactions/{transaction['id']}") == transaction


async def test_a_transfer_posts_two_legs_each_readable(api, world):
    source, target = world.revenue["id"], world.generation["id"]
    reply = await api.post("/v1/transfers", {"from_account": source, "to_account": target, "amount": 1_234,
                                             "memo": "rebalance"}, key=new_key())
    assert reply.status == 201, reply.body
    result = reply.body
    assert result["kind"] == "transfer" and result["amount"] == 1_234 and len(result["legs"]) == 2
    debit, credit = sorted(result["legs"], key=lambda leg: leg["direction"] != "debit")
    assert (debit["account_id"], debit["direction"], debit["amount"], debit["balance_after"]) == \
        (source, "debit", 1_234, 10_000 - 1_234)
    assert (credit["account_id"], credit["direction"], credit["amount"], credit["balance_after"]) == \
        (target, "credit", 1_234, 20_000 + 1_234)
    assert debit["counterparty_account_id"] == target and credit["counterparty_account_id"] == source
    assert debit["id"] != credit["id"]
    for leg in result["legs"]:
        assert TRANSACTION_FIELDS <= set(leg)
        assert leg["correlation_id"] == result["id"] and leg["kind"] == "transfer"
        assert await api.ok(f"/v1/transactions/{leg['id']}") == leg
    assert (await api.ok(f"/v1/accounts/{source}"))["balance"] == 10_000 - 1_234
    assert (await api.ok(f"/v1/accounts/{target}"))["balance"] == 20_000 + 1_234


async def test_a_transfer_refused_by_its_target_leaves_the_source_able_to_spend_everything(api, world):
    source = world.revenue["id"]
    assert_error(await api.post("/v1/transfers", {"from_account": source, "to_account": world.closed["id"],
                                                  "amount": 10_000}), 409, "account_not_active")
    # The source's tentative debit was undone: its whole balance is still spendable.
    withdrawal = await api.created(f"/v1/accounts/{source}/withdrawals", {"amount": 10_000})
    assert withdrawal["balance_after"] == 0


async def test_history_is_newest_first_with_balance_after_and_pages(api, world):
    account = world.empty["id"]
    path = f"/v1/accounts/{account}"
    amounts = [100, 250, 75, 1_000]
    for amount in amounts:
        await api.created(f"{path}/deposits", {"amount": amount})
    await api.created(f"{path}/withdrawals", {"amount": 400})
    await api.created("/v1/transfers", {"from_account": account, "to_account": world.revenue["id"], "amount": 25})
    history = (await api.ok(f"{path}/transactions"))["items"]
    assert [t["balance_after"] for t in history] == [1_000, 1_025, 1_425, 425, 350, 100]
    assert [t["kind"] for t in history] == ["transfer", "withdrawal", "deposit", "deposit", "deposit", "deposit"]
    assert all(TRANSACTION_FIELDS <= set(t) for t in history)
    paged, cursor = [], None
    while True:
        page = await api.ok(f"{path}/transactions?limit=4" + (f"&cursor={cursor}" if cursor else ""))
        paged.extend(page["items"])
        cursor = page["next_cursor"]
        if cursor is None:
            break
    assert paged == history
    running = 0
    for transaction in reversed(history):
        running += transaction["amount"] if transaction["direction"] == "credit" else -transaction["amount"]
        assert transaction["balance_after"] == running
    assert (await api.ok(path))["balance"] == running


async def test_health_ready_metrics_and_openapi_need_no_token(api, world):
    health = await api.get("/health", token=None)
    assert health.status == 200 and health.body == {"status": "ok"}
    ready = await api.get("/ready", token=None)
    assert ready.status == 200 and ready.body == {"status": "ready"}
    metrics = await api.get("/metrics", token=None)
    assert metrics.status == 200
    assert metrics.headers["Content-Type"].startswith("text/plain")
    assert "alluse_batch_size" in metrics.body
    assert "alluse_http_requests_total" in metrics.body
    document = await api.get("/openapi.json", token=None)
    assert document.status == 200 and document.body["openapi"].startswith("3.")
    for route in ROUTES:
        assert route.path in document.body["paths"], route.path
        assert route.method.lower() in document.body["paths"][route.path], (route.method, route.path)
        success = document.body["paths"][route.path][route.method.lower()]["responses"][str(route.status)]
        assert success["description"] == {200: "OK", 201: "Created", 202: "Accepted"}[route.status], route.path


async def test_the_request_id_is_echoed(api):
    reply = await api.get("/v1/accounts/acc_nope", headers={"X-Request-Id": "req-42"})
    assert_error(reply, 404, "not_found")
    assert reply.body["request_id"] == "req-42"
    ok = await api.get("/v1/accounts", headers={"X-Request-Id": "req-43"})
    assert ok.headers["X-Request-Id"] == "req-43"
