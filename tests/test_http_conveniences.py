"""The API conveniences of issue 12 through the real app, actors and PostgreSQL: the
portfolio list, operation lookups by the ids replies carry, blank idempotency keys,
the replay header, one pagination convention, audit details as objects, CORS, the
invalid-token limit sparing valid tokens, WWW-Authenticate, and a port in use."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestClient, TestServer

from actors.settings import load_settings
from gateway.api_reference import DOCS
from gateway.app import ROUTES, create_app
from tests.test_http import TOKEN, Api, assert_error, new_key

pytestmark = pytest.mark.asyncio(loop_scope="session")
ORIGIN = "https://dash.example.com"
ROOT = Path(__file__).resolve().parent.parent


async def _api(database_url, **server) -> Api:
    settings = load_settings({}, {"database": {"url": database_url},
                                  "server": {"admin_token": TOKEN, **server},
                                  "security": {"invalid_tokens_max": 3, "invalid_tokens_window_s": 60.0}})
    client = TestClient(TestServer(create_app(settings)))
    await client.start_server()
    return Api(client)


@pytest_asyncio.fixture(loop_scope="session")
async def api(database_url):
    client = await _api(database_url, cors_origins=[ORIGIN])
    try:
        yield client
    finally:
        await client.client.close()


async def portfolio(api: Api, owner: str, capital: int = 250_000_00) -> dict:
    return await api.created("/v1/portfolios", {"name": f"{owner}-p", "owner": owner, "initial_capital": capital})


def account_of(view: dict, account_type: str) -> str:
    return next(a["id"] for a in view["accounts"] if a["type"] == account_type)


async def test_the_portfolio_list_shows_roots_with_their_whole_trees_totals_page_by_page(api):
    ann = await portfolio(api, "ann")
    await api.created(f"/v1/accounts/{account_of(ann, 'generation')}/trades", {"kind": "premium", "amount": 50_000_00})
    bob = await portfolio(api, "bob", 80_000_00)
    listed = await api.pages("/v1/portfolios", limit=1)
    assert [p["id"] for p in listed] == [ann["id"], bob["id"]]  # roots only: the forked unit is not listed
    first = listed[0]
    assert first["units_active"] == 1 and first["owner"] == "ann"
    tree = await api.ok(f"/v1/portfolios/{ann['id']}/tree")
    assert first["totals"] == tree["totals"]  # the same figures as the tree, deployable included
    assert first["totals"]["balance"] == 250_000_00 + 50_000_00
    only_bob = await api.ok("/v1/portfolios?owner=bob")
    assert [p["id"] for p in only_bob["items"]] == [bob["id"]] and only_bob["next_cursor"] is None
    assert_error(await api.get("/v1/portfolios?limit=0"), 422, "validation_failed", "limit")


async def test_a_scoped_token_lists_only_its_owners_portfolios(api):
    await portfolio(api, "ann")
    await portfolio(api, "bob")
    token = (await api.post("/v1/tokens", {"name": "ann", "role": "viewer", "owner": "ann"})).body["token"]
    mine = (await api.get("/v1/portfolios", token=token)).body["items"]
    assert [p["owner"] for p in mine] == ["ann"]
    assert (await api.get("/v1/portfolios?owner=bob", token=token)).body == {"items": [], "next_cursor": None}


async def test_transfers_forks_and_merges_are_readable_by_the_ids_their_replies_carry(api):
    ann = await portfolio(api, "ann")
    generation = account_of(ann, "generation")
    # A surplus below the automatic threshold, then a manual fork of part of it.
    await api.created(f"/v1/accounts/{generation}/trades", {"kind": "premium", "amount": 20_000_00})
    fork = await api.created(f"/v1/accounts/{generation}/fork", {"amount": 10_000_00})
    assert await api.ok(f"/v1/forks/{fork['id']}") == fork
    merge = await api.created(f"/v1/portfolios/{fork['portfolio_id']}/merge", {})
    looked_up = await api.ok(f"/v1/merges/{merge['id']}")
    # A merge's reply is stamped when it began; read back, it carries its first leg's time.
    assert {**looked_up, "created_at": None} == {**merge, "created_at": None}
    assert looked_up["created_at"] == min(leg["created_at"] for leg in merge["legs"])
    source = await api.create_account("revenue", funded=10_00)
    target = await api.create_account("revenue")
    transfer = await api.created("/v1/transfers", {"from_account": source["id"], "to_account": target["id"],
                                                  "amount": 3_00, "memo": "rent"})
    read_back = await api.ok(f"/v1/transfers/{transfer['id']}")
    assert {**read_back, "created_at": None} == {**transfer, "created_at": None}
    # Each lookup knows its kind: a transfer's id is no fork, and unknown ids are 404.
    assert_error(await api.get(f"/v1/forks/{transfer['id']}"), 404, "not_found")
    assert_error(await api.get(f"/v1/transfers/{fork['id']}"), 404, "not_found")
    assert_error(await api.get("/v1/merges/mrg_does_not_exist"), 404, "not_found")
    token = (await api.post("/v1/tokens", {"name": "bob", "role": "viewer", "owner": "bob"})).body["token"]
    assert_error(await api.get(f"/v1/transfers/{transfer['id']}", token=token), 404, "not_found")


async def test_a_blank_idempotency_key_is_refused_and_a_replay_says_so(api):
    account = await api.create_account("revenue")
    path = f"/v1/accounts/{account['id']}/deposits"
    for blank in ("", " ", "\t"):
        assert_error(await api.post(path, {"amount": 5}, headers={"Idempotency-Key": blank}), 422,
                     "validation_failed", "Idempotency-Key")
    assert (await api.ok(f"/v1/accounts/{account['id']}"))["balance"] == 0
    key = new_key()
    first = await api.post(path, {"amount": 5}, key=key)
    assert first.status == 201 and "Idempotency-Replayed" not in first.headers
    again = await api.post(path, {"amount": 5}, key=key)
    assert again.status == 201 and again.body == first.body and again.headers["Idempotency-Replayed"] == "true"
    assert (await api.ok(f"/v1/accounts/{account['id']}"))["balance"] == 5


async def test_every_list_pages_with_cursor_and_the_event_feed_keeps_its_old_names(api):
    account = await api.create_account("revenue", funded=1_00)
    await api.created(f"/v1/accounts/{account['id']}/deposits", {"amount": 2_00})
    page = await api.ok("/v1/events?limit=2")
    assert page["next_cursor"] == str(page["next_after"]) == str(page["items"][-1]["seq"])
    by_cursor = await api.ok(f"/v1/events?limit=2&cursor={page['next_cursor']}")
    by_after = await api.ok(f"/v1/events?limit=2&after={page['next_after']}")
    assert by_cursor == by_after and by_cursor["items"][0]["seq"] == page["items"][-1]["seq"] + 1
    audit = await api.ok("/v1/audit?limit=1")
    assert set(audit) == {"items", "next_cursor"}


def carries(payload: dict, shape: dict, *, except_keys: tuple[str, ...] = ()) -> None:
    """Every field of a REST shape is in the event's payload, by the same name and with
    the same value (the payload may have more)."""
    missing = set(shape) - set(payload)
    assert not missing, f"the payload lacks {sorted(missing)}"
    differing = {key: (payload[key], shape[key]) for key in shape
                 if key not in except_keys and payload[key] != shape[key]}
    assert not differing, differing


async def test_event_payloads_carry_the_field_names_of_the_rest_shapes(api):
    """Issue 12: a webhook receiver or feed reader parses an event's payload as it parses
    the REST reply of the same thing. Fields only the events had are kept."""
    from tests.test_http_growth import QUARTER, events

    ann = await portfolio(api, "ann")
    generation, revenue = account_of(ann, "generation"), account_of(ann, "revenue")
    premium = await api.created(f"/v1/accounts/{revenue}/trades", {"kind": "premium", "amount": 200_00})
    await api.created(f"/v1/accounts/{generation}/trades", {"kind": "premium", "amount": 20_000_00})
    fork = await api.created(f"/v1/accounts/{generation}/fork", {"amount": 10_000_00})
    merged_unit = await api.created(f"/v1/portfolios/{fork['portfolio_id']}/merge", {})
    merge = await api.ok(f"/v1/merges/{merged_unit['id']}")  # stamped with its legs' time, as the event is
    reinvestment = (await api.post(f"/v1/portfolios/{ann['id']}/reinvest", {"quarter": QUARTER}, key=new_key())).body
    spare = await api.create_account("revenue")
    source = await api.create_account("revenue", funded=10_00)
    transfer = await api.created("/v1/transfers", {"from_account": source["id"], "to_account": spare["id"],
                                                  "amount": 3_00})
    frozen = (await api.call("PATCH", f"/v1/accounts/{spare['id']}", {"status": "frozen"})).body
    feed = await events(api)
    by_type: dict[str, list[dict]] = {}
    for event in feed:
        by_type.setdefault(event["type"], []).append(event["payload"])

    (opened,) = by_type["portfolio.opened"]
    carries(opened, ann)
    assert opened["portfolio"]["id"] == ann["id"] and opened["legs"] == []  # the older fields stay
    created = {payload["id"]: payload for payload in by_type["account.opened"]}
    carries(created[spare["id"]], spare)                     # as created: the reply is its opening state
    assert created[generation]["deployable"] == 0 and created[generation]["balance"] == 0
    posted = {payload["id"]: payload for payload in by_type["transaction.posted"]}
    carries(posted[premium["id"]], premium)
    (forked,) = by_type["portfolio.forked"]
    carries(forked, fork)
    assert forked["from_account"] == generation and forked["portfolio"]["id"] == fork["portfolio_id"]
    (merged,) = by_type["portfolio.merged"]
    carries(merged, merge)
    assert merged["to_account"] == account_of(ann, "compounding")
    (moved,) = by_type["transfer.posted"]
    carries(moved, transfer)
    changed = [payload for payload in by_type["account.status_changed"] if payload["account_id"] == spare["id"]]
    carries(changed[-1], {key: frozen[key] for key in ("id", "status")})
    reinvested = {payload["account_id"]: payload for payload in by_type["account.reinvested"]}
    for account in reinvestment["accounts"]:
        carries(reinvested[account["account_id"]], {**account, "quarter": reinvestment["quarter"]})


async def test_the_audit_records_details_is_an_object(api):
    operator = (await api.post("/v1/tokens", {"name": "op", "role": "operator"})).body
    portfolio_view = await portfolio(api, "ann")
    com = account_of(portfolio_view, "compounding")
    await api.created(f"/v1/accounts/{com}/withdrawals", {"amount": 1_00, "override_reason": "estate"})
    records = (await api.ok("/v1/audit?limit=1000"))["items"]
    withdrawal = next(r for r in records if r["action"] == "withdraw")
    assert withdrawal["details"]["reason"] == "estate" and isinstance(withdrawal["details"], dict)
    assert '"reason":"estate"' in withdrawal["details_text"]
    assert any(r["token_id"] == "bootstrap-admin" and r["target"] == operator["id"] for r in records)


async def test_cors_answers_allowed_origins_only_and_a_preflight_needs_no_token(api):
    for _ in range(5):  # more preflights than the invalid-token limit (3) allows failures
        preflight = await api.call("OPTIONS", "/v1/accounts", token=None,
                                   headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST",
                                            "Access-Control-Request-Headers": "authorization,content-type"})
        assert preflight.status == 204 and preflight.headers["Access-Control-Allow-Origin"] == ORIGIN
        assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    stranger = await api.call("OPTIONS", "/v1/accounts", token=None,
                              headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "GET"})
    assert stranger.status == 204 and "Access-Control-Allow-Origin" not in stranger.headers
    allowed = await api.get("/v1/whoami", headers={"Origin": ORIGIN})
    assert allowed.status == 200 and allowed.headers["Access-Control-Allow-Origin"] == ORIGIN
    plain = await api.get("/v1/whoami", headers={"Origin": "https://evil.example"})
    assert plain.status == 200 and "Access-Control-Allow-Origin" not in plain.headers
    assert (await api.get("/v1/whoami")).status == 200  # the preflights counted as no invalid token


async def test_cors_is_off_by_default(database_url):
    api = await _api(database_url)
    try:
        reply = await api.call("OPTIONS", "/v1/accounts", token=None,
                               headers={"Origin": ORIGIN, "Access-Control-Request-Method": "GET"})
        assert reply.status == 204 and "Access-Control-Allow-Origin" not in reply.headers
        assert "Access-Control-Allow-Origin" not in (await api.get("/v1/whoami", headers={"Origin": ORIGIN})).headers
    finally:
        await api.client.close()


async def test_a_valid_token_works_from_an_address_blocked_for_invalid_ones(api):
    for _ in range(3):
        reply = await api.get("/v1/whoami", token="alu_guess")
        assert_error(reply, 401, "unauthorized")
        assert reply.headers["WWW-Authenticate"].startswith("Bearer")
    blocked = await api.get("/v1/whoami", token="alu_guess")
    assert_error(blocked, 429, "too_many_invalid_tokens")
    assert blocked.headers["Retry-After"]
    assert (await api.get("/v1/whoami")).status == 200
    assert_error(await api.get("/v1/whoami", token=None), 429, "too_many_invalid_tokens")


async def test_openapi_and_docs_are_public_and_describe_every_operation(api):
    document = await api.get("/openapi.json", token=None)
    assert document.status == 200
    for route in ROUTES:
        operation = document.body["paths"][route.path][route.method.lower()]
        assert operation["summary"] and operation["description"] and operation["tags"], route.path
        if route.request is not None and DOCS[route.handler.__name__].example is not None:
            assert "example" in operation["requestBody"]["content"]["application/json"], route.path
    deposit = document.body["paths"]["/v1/accounts/{account_id}/deposits"]["post"]["responses"]
    assert "`balance_limit_exceeded`" in deposit["409"]["description"]
    assert "`account_quarantined`" in deposit["503"]["description"]
    assert set(DOCS) == {route.handler.__name__ for route in ROUTES}
    page = await api.get("/docs", token=None)
    assert page.status == 200 and "swagger-ui-bundle.js" in page.body
    script = await api.get("/docs/assets/swagger-ui-bundle.js", token=None)
    assert script.status == 200 and len(script.raw) > 100_000


async def test_a_port_in_use_is_one_clear_line_and_exit_code_2_before_anything_starts(tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        env = {**os.environ, "ALLUSE_PORT": str(port), "ALLUSE_HOST": "127.0.0.1",
               "ALLUSE_DATA_DIR": str(tmp_path / "data")}
        env.pop("ALLUSE_ADMIN_TOKEN", None)
        done = subprocess.run([sys.executable, "-m", "gateway"], cwd=ROOT, env=env, capture_output=True, text=True,
                              timeout=60)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert done.stdout == "" and done.stderr.strip().count("\n") == 0, (done.stdout, done.stderr)
    assert f"cannot listen on 127.0.0.1:{port}" in done.stderr
    assert not (tmp_path / "data").exists()  # no database started, no admin token made
